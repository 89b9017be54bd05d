"""Accuracy against forward passes: fixed-step reference vs parallel (threshold / entropy-bound) decoding.

    python benchmarks/bench_sampling.py                       # trains a tiny model via quickstart.sh first
    python benchmarks/bench_sampling.py --model DIR --tasks heldout_tasks.jsonl --gen_length 8
    python benchmarks/bench_sampling.py --shapes                # s/step and peak memory at a 50k vocabulary

`--shapes` measures one sampler step at a real size instead: a random-weight ModernBERT-base shape
(50,368-token vocabulary, hidden 768; fewer layers on CPU, see --shape_layers), batch 8 x 512 masks, at
temperature 0 and 0.7, for the current step and for the step of commit --before_ref (the old path, loaded
from git into the same run), each measurement in its own subprocess so that peak memory is its own.

Without --model, the model is trained by the quickstart's own scripts (quickstart.sh with QS_TASKS)
on 5-digit addition: the answer is 5-6 digits plus the end-of-turn, so "tokens per forward pass" means
something (2-digit addition answers are 2-4 tokens), and 200k training problems out of 4e9 rule out
memorising. (List reversal, 8-16 letters, stayed at 1.86 nats/token for 1000 SFT steps on the tiny model:
not learnable at this size and budget.) Every setting decodes the same held-out problems at
temperature 0; tokens are the answer tokens up to and including the end-of-turn (the EOS tail that early
stopping fills for free is not counted). The table goes to stdout and replaces its task's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlm.errors import ArgumentParser, UsageError, atomic_write_text, run_main, setup_logging  # noqa: E402

logger = logging.getLogger("bench_sampling")
SECTION = "## Sampling: accuracy vs forward passes (bench_sampling.py)"
SHAPES_SECTION = "## Sampling at a 50k vocabulary: time and memory per step (bench_sampling.py --shapes)"


@dataclass
class BenchArguments:
    model: str | None = field(default=None, metadata={"help": "Trained checkpoint folder; default: train one."})
    tasks: str | None = field(default=None, metadata={"help": "Held-out {prompt, answer} JSONL for --model."})
    task: str = field(default="add5", metadata={"help": "Synthetic task to train on when --model is not given."})
    num_train: int = field(default=200_000, metadata={"help": "Training problems when training here."})
    work_dir: str = field(default="work_dir/bench_sampling", metadata={"help": "Where the trained model goes."})
    sft_steps: int = field(default=3000, metadata={"help": "SFT steps when training here."})
    num_problems: int = field(default=300, metadata={"help": "Held-out problems to decode (>= 200)."})
    gen_length: int = field(default=8, metadata={"help": "Masks after each prompt (add5 answers <= 7 tokens)."})
    batch_size: int = field(default=50, metadata={"help": "Prompts per forward pass."})
    thresholds: str = field(default="0.7,0.8,0.9,0.95", metadata={"help": "Confidence thresholds τ."})
    entropy_bounds: str = field(default="0.5,1.0", metadata={"help": "Entropy bounds γ (nats)."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (timings are per this many)."})
    results: str = field(default=str(ROOT / "benchmarks" / "RESULTS.md"), metadata={
        "help": "Markdown file whose bench_sampling section is replaced ('' to skip)."})
    shapes: bool = field(default=False, metadata={
        "help": "Measure s/step and peak memory of the sampler at a ModernBERT-base shape (50,368 vocabulary)."})
    shape_layers: int = field(default=2, metadata={"help": "--shapes: encoder layers (ModernBERT-base has 22)."})
    shape_batch: int = field(default=8, metadata={"help": "--shapes: prompts per batch."})
    shape_masks: int = field(default=512, metadata={"help": "--shapes: masks per prompt (one block)."})
    shape_steps: int = field(default=2, metadata={"help": "--shapes: steps timed per measurement (after one warm-up step)."})
    shape_repeats: int = field(default=2, metadata={"help": "--shapes: measurements per setting (best time is kept)."})
    before_ref: str = field(default="138f65a", metadata={
        "help": "--shapes: git commit whose sampler step is 'before' ('' to measure only the current one)."})
    shape_worker: str | None = field(default=None, metadata={"help": "(internal) PATH:TEMPERATURE of one measurement."})


def train_model(args: BenchArguments) -> tuple[Path, Path]:
    """Train through the quickstart's scripts (same pipeline, another task) and return (model, tasks)."""
    out = Path(args.work_dir)
    env = {**os.environ, "QS_TASKS": args.task, "QS_NUM_HELDOUT": str(args.num_problems),
           "QS_NUM_TRAIN": str(args.num_train), "QS_SFT_STEPS": str(args.sft_steps),
           "QS_GEN_LENGTH": str(args.gen_length), "QS_SKIP_INFERENCE": "1",
           "PYTHON": sys.executable}
    logger.info("training a tiny model on %r via quickstart.sh into %s", args.task, out)
    subprocess.run(["bash", str(ROOT / "quickstart.sh"), str(out)], check=True, env=env)
    return out / "sft" / "final_model", out / "data" / "synthetic" / "heldout_tasks.jsonl"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the `heading` section, leaving every other section untouched."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + body.rstrip().splitlines() + [""] + lines[end:]
    else:
        lines = lines + [""] + body.rstrip().splitlines()
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")


class _Stop(Exception):
    """Raised from on_step once the timed steps are done (no need to denoise 512 masks to the end)."""


def _old_sampling(ref: str):
    """The sampler module of commit `ref` (with that commit's policies), imported from git for comparison."""
    import importlib.util
    import types

    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    policies = types.ModuleType("dlm_before_policies")
    exec(compile(source("dlm/policies.py"), f"{ref}:dlm/policies.py", "exec"), policies.__dict__)
    sys.modules["dlm_before_policies"] = policies
    code = source("dlm/sampling.py").replace("from dlm.policies import", "from dlm_before_policies import")
    spec = importlib.util.spec_from_loader("dlm_before_sampling", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dlm_before_sampling"] = module
    exec(compile(code, f"{ref}:dlm/sampling.py", "exec"), module.__dict__)
    return module


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def shape_worker(args: BenchArguments) -> int:
    """One measurement (in its own process): print {"s_per_step", "peak_mib"} as JSON."""
    import json

    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from dlm.tokenization import train_tokenizer

    path, temperature = args.shape_worker.split(":")
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(texts=["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=50_368, hidden_size=768, intermediate_size=1152, num_attention_heads=12,
                           num_hidden_layers=args.shape_layers, max_position_embeddings=8192,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id,
                           sep_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id)
    model = ModernBertForMaskedLM(cfg).eval()
    sampling = _old_sampling(args.before_ref) if path == "before" else __import__("dlm.sampling").sampling
    config = sampling.SamplerConfig(gen_length=args.shape_masks, steps=args.shape_masks, temperature=float(temperature),
                                    stop_at_eos=False)
    prompts = [f"prompt number {i}: the quick brown fox" for i in range(args.shape_batch)]
    times = []

    def on_step(event) -> None:
        times.append(time.perf_counter())
        if len(times) > args.shape_steps:
            raise _Stop

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _rss_peak_kib()
    start = time.perf_counter()
    try:
        sampling.generate(model, tokenizer, prompts, config, chat=False, seed=0, on_step=on_step)
    except _Stop:
        pass
    peak = _rss_peak_kib() - before
    steps = [b - a for a, b in zip([start] + times, times)][1:]  # the first step is a warm-up
    print(json.dumps({"s_per_step": sum(steps) / len(steps), "peak_mib": peak / 1024,
                      "first_step_s": times[0] - start}))
    return 0


def run_shapes(args: BenchArguments) -> int:
    """s/step and peak memory before/after at the ModernBERT-base shape; alternating, best of the repeats."""
    import json

    paths = ["after"] + (["before"] if args.before_ref else [])
    settings = [(p, t) for t in ("0", "0.7") for p in paths]
    best: dict = {}
    for repeat in range(args.shape_repeats):
        for path, temperature in settings:
            cmd = [sys.executable, __file__, "--shape_worker", f"{path}:{temperature}", "--threads", str(args.threads),
                   "--shape_layers", str(args.shape_layers), "--shape_batch", str(args.shape_batch),
                   "--shape_masks", str(args.shape_masks), "--shape_steps", str(args.shape_steps),
                   "--before_ref", args.before_ref]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).stdout
            res = json.loads(out.strip().splitlines()[-1])
            logger.info("%s T=%s (repeat %d): %.2f s/step, peak +%.0f MiB", path, temperature, repeat + 1,
                        res["s_per_step"], res["peak_mib"])
            old = best.get((path, temperature))
            best[(path, temperature)] = res if old is None else {
                "s_per_step": min(old["s_per_step"], res["s_per_step"]), "peak_mib": max(old["peak_mib"], res["peak_mib"])}
    rows = []
    for path in paths:
        t0, t7 = best[(path, "0")], best[(path, "0.7")]
        label = "after (this commit)" if path == "after" else f"before ({args.before_ref})"
        rows += [[label, f"{t0['s_per_step']:.2f}", f"{t7['s_per_step']:.2f}",
                  f"{t7['s_per_step'] / t0['s_per_step']:.2f}×", f"{t0['peak_mib']:.0f}", f"{t7['peak_mib']:.0f}",
                  f"{t7['peak_mib'] / t0['peak_mib']:.2f}×"]]
    after0, after7 = best[("after", "0")], best[("after", "0.7")]
    met = after7["s_per_step"] <= 1.5 * after0["s_per_step"] and after7["peak_mib"] <= 1.5 * after0["peak_mib"]
    headers = ["step", "T = 0 s/step", "T = 0.7 s/step", "time ratio", "T = 0 peak MiB", "T = 0.7 peak MiB",
               "memory ratio"]
    body = "\n".join([
        SHAPES_SECTION, "",
        f"Random-weight ModernBERT-base shape (vocabulary 50,368, hidden 768, intermediate 1152, 12 heads) with "
        f"**{args.shape_layers} encoder layers instead of 22** (CPU), batch {args.shape_batch} x "
        f"{args.shape_masks} masks after a short prompt, one block, one commit per step (so every timed step "
        f"decides about {args.shape_masks} positions per row), fixed seed. s/step: best of {args.shape_repeats} "
        f"runs, mean of {args.shape_steps} steps after a warm-up step; peak memory: growth of the peak RSS "
        f"during generation over the RSS after loading (the logits of one step alone are "
        f"{args.shape_batch * args.shape_masks * 50_368 * 4 / 2**20:.0f} MiB in float32). Each measurement in "
        f"its own process, settings alternated; {args.threads} CPU threads, CPU, 2 cores shared with other "
        f"jobs, {time.strftime('%Y-%m-%d')}. 'before' is the sampler step of commit {args.before_ref}, loaded "
        f"from git in the same run.", "",
        markdown_table(headers, rows), "",
        f"Target (after: T = 0.7 at most 1.5x the time and 1.5x the peak memory of T = 0): "
        f"{'met' if met else 'NOT met'}.", "",
        "Command: `python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:]) + "`", ""])
    print(body)
    if args.results:
        replace_section(Path(args.results), SHAPES_SECTION, body)
    return 0


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(BenchArguments).parse_args_into_dataclasses()
    if args.shape_worker:
        return shape_worker(args)
    if args.shapes:
        return run_shapes(args)
    if args.num_problems < 1:
        raise UsageError("--num_problems must be at least 1")
    import torch

    from dlm.evaluation import evaluate_tasks, load_tasks
    from dlm.modeling import load_checkpoint
    from dlm.sampling import SamplerConfig

    torch.set_num_threads(args.threads)
    if args.model:
        if not args.tasks:
            raise UsageError("--model needs --tasks (the held-out {prompt, answer} JSONL)")
        model_dir, tasks_path = Path(args.model), Path(args.tasks)
    else:
        model_dir, tasks_path = train_model(args)
    items = load_tasks(tasks_path, args.num_problems)
    model, tokenizer = load_checkpoint(str(model_dir))
    model.eval()

    settings: list[tuple[str, SamplerConfig]] = [
        (f"fixed-step, steps = gen length ({args.gen_length})", SamplerConfig(gen_length=args.gen_length))]
    settings += [(f"threshold τ = {t}", SamplerConfig(gen_length=args.gen_length, threshold=float(t)))
                 for t in args.thresholds.split(",") if t]
    settings += [(f"entropy bound γ = {g}", SamplerConfig(gen_length=args.gen_length, entropy_bound=float(g)))
                 for g in args.entropy_bounds.split(",") if g]

    evaluate_tasks(model, tokenizer, items[:args.batch_size], settings[0][1], batch_size=args.batch_size)  # warm-up
    results = []
    for name, config in settings:
        res = evaluate_tasks(model, tokenizer, items, config, seed=0, batch_size=args.batch_size)
        results.append((name, res))
        logger.info("%s: accuracy %.3f, %.2f tokens/forward, %.0f tokens/s", name, res.accuracy,
                    res.tokens_per_forward, res.tokens_per_second)

    ref = results[0][1]
    headers = ["sampler", "exact match", "NFE / token", "tokens / forward", "tokens / s", "speed-up"]
    rows = [[name, f"{100 * r.accuracy:.1f}% ± {100 * r.stderr:.1f}", f"{r.nfe_per_token:.3f}",
             f"{r.tokens_per_forward:.2f}", f"{r.tokens_per_second:.0f}",
             f"{r.tokens_per_second / ref.tokens_per_second:.2f}×"] for name, r in results]
    winners = [name for name, r in results[1:] if name.startswith("threshold") and r.tokens_per_forward >= 3
               and r.accuracy >= ref.accuracy - 0.01 and r.tokens_per_second >= 3 * ref.tokens_per_second]
    verdict = (f"Target (a threshold setting with ≥ 3 tokens per forward pass, ≤ 1 point below the reference's "
               f"accuracy, ≥ 3× its tokens/s): {'met by ' + ', '.join(winners) if winners else 'NOT met'}.")
    answer_tokens = ref.answer_tokens / ref.n
    heading = f"{SECTION}: task {items[0].task}"
    body = "\n".join([
        heading, "",
        f"Task: `{items[0].task}` held-out problems (n = {ref.n}), {answer_tokens:.1f} answer tokens on average "
        f"(incl. end-of-turn), canvas of {args.gen_length} masks, one block, temperature 0, `low_confidence` "
        f"confidences, batches of {args.batch_size} prompts; model `{model_dir}`; {args.threads} CPU threads on "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}. Tokens = answer tokens up "
        f"to and including the end-of-turn; the EOS tail that early stopping fills is not counted.", "",
        markdown_table(headers, rows), "", verdict, "",
        "Command: `python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:]) + "`", ""])
    print(body)
    if args.results:
        replace_section(Path(args.results), heading, body)
    return 0


if __name__ == "__main__":
    run_main(main)
