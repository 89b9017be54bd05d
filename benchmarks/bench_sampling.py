"""Accuracy against forward passes: fixed-step reference vs parallel (threshold / entropy-bound) decoding.

    python benchmarks/bench_sampling.py                       # trains a tiny model via quickstart.sh first
    python benchmarks/bench_sampling.py --model DIR --tasks heldout_tasks.jsonl --gen_length 8

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


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(BenchArguments).parse_args_into_dataclasses()
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
