"""Training throughput and peak memory of the diffusion objective: sparse MLM head vs full logits.

    python benchmarks/bench_train.py                       # CPU: tiny and small ModernBERT, 50k vocabulary
    python benchmarks/bench_train.py --sizes base --device cuda --dtype bf16   # on a GPU
    python benchmarks/bench_train.py --mode run --steps 20 60      # the Trainer at the recipe shape (below)
    python benchmarks/bench_train.py --mode profile                # where one training step's time goes

`--mode run` measures whole DiffusionTrainer runs (ModernBERT hidden 256, 4 layers, 16,384-token vocabulary,
8 x 512 packed rows, fp32) of two lengths, each in a fresh process: s/step is the difference of the two
wall times over the difference of the step counts (start-up cancels; so does compilation, unless
torch.compile's on-disk cache lets the second process compile faster), and again from the long run's own
per-step clock between the short run's step count and its end (no start-up, no compilation: the figure
to read for compiled variants); peak memory is the
max RSS (CPU) or max allocated (CUDA) of each run, and also traced after every step of the long run (its
peak after the short run's step count vs at its end: growth within one process). Variants: the sparse
head (`dlm`), `--no_sparse_head` (`full`), `--torch_compile` (`dlm+compile`), a reference-style loop (`reference`: full logits and
F.cross_entropy over all B x L positions, 1/t weights, clipping, AdamW, cosine schedule, written after the
recipe's own pretrain.py loop), and any other checkout of dlm via `--baseline_src DIR` (`baseline`).
Runs alternate between variants so that the noise of a shared machine hits them alike.

Each (size, head) pair runs in a fresh subprocess so that peak memory (max RSS on CPU, max allocated
on CUDA) belongs to that configuration alone. A step is the real training step: `diffusion_loss`
(antithetic times, 1/p weights) forward + backward + AdamW. No tokenizer is needed: the model is
built from a config with ModernBERT's 50,368-entry vocabulary and fed random token ids.
Appends a table to benchmarks/RESULTS.md under "## Training (bench_train.py)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VOCAB = 50368  # ModernBERT's vocabulary (50,280 tokens padded to a multiple of 64)
SECTION = "## Training (bench_train.py)"


def measure(size: str, sparse: bool, batch: int, seq_len: int, steps: int, device: str, dtype: str) -> dict:
    """Tokens/s and peak memory of `steps` timed training steps (after 2 warm-up steps)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from dlm.diffusion import antithetic_times, diffusion_loss
    from dlm.modeling import MODEL_CONFIGS

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=VOCAB, max_position_embeddings=max(seq_len, 512), pad_token_id=0,
                              mask_token_id=4, **MODEL_CONFIGS[size])
    model = ModernBertForMaskedLM(config).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")
    maskable = torch.ones(batch, seq_len, dtype=torch.bool, device=device)

    def step() -> None:
        ids = torch.randint(10, VOCAB, (batch, seq_len), generator=gen, device=device)
        t = antithetic_times(batch, gen)
        noise = torch.rand((batch, seq_len), generator=gen, device=device)
        with amp:
            loss = diffusion_loss(model, ids, maskable, 4, t, noise, sparse=sparse)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # Best step: the shared development CPUs are noisy, and the fastest step is the least disturbed one.
    best, median = min(times), sorted(times)[len(times) // 2]
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"size": size, "sparse": sparse, "tokens_per_s": batch * seq_len / best,
            "step_s": best, "median_step_s": median, "peak_mb": peak_mb,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


RECIPE_SHAPE = dict(vocab=16384, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, batch=8, seq_len=512)


def _recipe_model(device: str):
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    s = RECIPE_SHAPE
    config = ModernBertConfig(vocab_size=s["vocab"], max_position_embeddings=s["seq_len"], pad_token_id=0,
                              mask_token_id=4, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              hidden_size=s["hidden_size"],
                              intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
                              num_attention_heads=s["num_attention_heads"])
    return ModernBertForMaskedLM(config).to(device)


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clock(device: str) -> tuple[float, float]:
    """(wall, CPU) seconds now, after the device has finished its queued work."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def run_variant(variant: str, steps: int, device: str) -> dict:
    """Wall time and peak memory of one training run of `steps` optimizer steps at RECIPE_SHAPE."""
    import tempfile

    import torch

    s = RECIPE_SHAPE
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(10, s["vocab"], (s["batch"] * steps, s["seq_len"]), generator=g)
    model = _recipe_model(device).train()
    if variant == "reference":
        return _run_reference_loop(model, rows, steps, device)
    from datasets import Dataset
    from transformers import TrainerCallback, default_data_collator

    from dlm.training import DiffusionTrainer, DiffusionTrainingArguments

    trace: list[float] = []  # peak memory after each optimizer step (the same process all along)
    times: list[tuple[float, float]] = []  # (wall, CPU) seconds at the end of each optimizer step

    class Trace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trace.append(_peak_mb(device))
            times.append(_clock(device))

    with tempfile.TemporaryDirectory() as tmp:
        args = DiffusionTrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=s["batch"], learning_rate=5e-5,
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01, eval_strategy="no", eval_on_start=False,
            save_strategy="no", logging_steps=10, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            torch_compile=variant.endswith("+compile"), seed=0, use_cpu=device == "cpu")
        trainer = DiffusionTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
                                   data_collator=default_data_collator, mask_id=4, objective="pretrain",
                                   sparse_head=not variant.startswith("full"), callbacks=[Trace()])
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    losses = [e.get("loss", e.get("train_loss")) for e in trainer.state.log_history if "loss" in e or "train_loss" in e]
    return {"variant": variant, "steps": steps, "wall_s": wall, "cpu_s": cpu, "peak_mb": _peak_mb(device),
            "last_loss": losses[-1], "peak_trace": trace, "time_trace": times}


def _run_reference_loop(model, rows, steps: int, device: str) -> dict:
    """The reference recipe's step: full logits, CE over all B x L positions (-100 where visible) / t, mean."""
    import torch
    import torch.nn.functional as F
    from transformers import get_scheduler

    s = RECIPE_SHAPE
    optim = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    sched = get_scheduler("cosine", optim, num_warmup_steps=0, num_training_steps=steps)
    start, cpu = time.perf_counter(), time.process_time()
    trace, times = [], []
    for i in range(steps):
        ids = rows[i * s["batch"]:(i + 1) * s["batch"]].to(device)
        t = torch.rand(s["batch"], 1, device=device).expand_as(ids).clamp_min(1e-5)
        masked = torch.bernoulli(t).bool()
        logits = model(input_ids=ids.masked_fill(masked, 4), attention_mask=torch.ones_like(ids)).logits
        ce = F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(~masked, -100).flatten(), reduction="none")
        loss = (ce.view_as(t) / t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        sched.step()
        trace.append(_peak_mb(device))
        times.append(_clock(device))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"variant": "reference", "steps": steps, "wall_s": wall, "cpu_s": cpu, "peak_mb": _peak_mb(device),
            "last_loss": loss.item(), "peak_trace": trace, "time_trace": times}


def profile_step(sparse: bool, steps: int, device: str, compile_model: bool = False) -> dict:
    """Mean seconds per phase of a training step: encoder forward, head, loss, backward, optimizer.

    With `compile_model` the model runs under torch.compile (inductor): hooks are traced into the graph
    then, so only the forward / backward / optimizer split is measured, after 3 warm-up steps (compilation).
    """
    import torch

    from dlm.diffusion import antithetic_times, diffusion_loss
    from dlm.modeling import sparse_head_module

    s = RECIPE_SHAPE
    model = _recipe_model(device).train()
    # fused AdamW: the Trainer's default optimizer (optim="adamw_torch_fused")
    optim = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True)
    gen = torch.Generator(device).manual_seed(0)
    maskable = torch.ones(s["batch"], s["seq_len"], dtype=torch.bool, device=device)
    marks: dict[str, float] = {}

    def now() -> float:  # CPU: seconds of all the process's threads, robust to other jobs on a shared CPU
        wall, cpu = _clock(device)
        return wall if device.startswith("cuda") else cpu

    runner = torch.compile(model) if compile_model else model
    head = sparse_head_module(model)  # ModernBERT: dense + norm on the selected rows; `decoder` makes the logits
    head.register_forward_pre_hook(lambda *_: marks.__setitem__("head_start", now()))
    model.decoder.register_forward_pre_hook(lambda *_: marks.__setitem__("decoder_start", now()))
    model.decoder.register_forward_hook(lambda *_: marks.__setitem__("decoder_end", now()))
    phases = ("encoder forward", "head forward (dense+norm)", "decoder forward (logits)", "loss (CE + weights)",
              "backward", "optimizer (clip + fused AdamW)", "step")
    totals = dict.fromkeys(phases, 0.0)
    warmup = 3 if compile_model else 2
    for i in range(steps + warmup):
        ids = torch.randint(10, s["vocab"], (s["batch"], s["seq_len"]), generator=gen, device=device)
        t, noise = antithetic_times(s["batch"], gen), torch.rand(ids.shape, generator=gen, device=device)
        t0 = now()
        loss = diffusion_loss(runner, ids, maskable, 4, t, noise, sparse=sparse)
        t1 = now()
        if compile_model:  # the hooks ran at trace time only: the whole forward counts as "encoder forward"
            marks.update(head_start=t1, decoder_start=t1, decoder_end=t1)
        loss.backward()
        t2 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        t3 = now()
        if i >= warmup:
            values = (marks["head_start"] - t0, marks["decoder_start"] - marks["head_start"],
                      marks["decoder_end"] - marks["decoder_start"], t1 - marks["decoder_end"], t2 - t1, t3 - t2,
                      t3 - t0)
            for key, value in zip(phases, values):
                totals[key] += value / steps
    return totals


def _child_json(argv: list[str], threads: int, src: str | None) -> dict:
    cmd = [sys.executable, __file__, *argv, "--threads", str(threads)] + (["--src", src] if src else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_run(args) -> str:
    """--mode run: alternate the variants over the two run lengths, print and return a markdown table."""
    short, long_ = sorted(args.steps_pair)
    results: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.repeats):
        for steps in (short, long_):
            for variant in args.variants:
                src = args.baseline_src if variant.startswith("baseline") else None
                r = _child_json(["--_run", variant, "--device", args.device, "--steps", str(steps)], args.threads, src)
                results.setdefault((variant, steps), []).append(r)
                print(f"rep {rep} {variant:16s} {steps:4d} steps  {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  peak {r['peak_mb']:6.0f} MB  "
                      f"loss {r['last_loss']:.3f}", flush=True)
    s = RECIPE_SHAPE
    lines = [f"\n### {time.strftime('%Y-%m-%d')} — `--mode run`, {args.device}, fp32, {args.threads} threads, "
             f"ModernBERT hidden {s['hidden_size']} x {s['num_hidden_layers']} layers, vocab {s['vocab']}, "
             f"{s['batch']} x {s['seq_len']} rows, runs of {short} and {long_} steps, {args.repeats} alternating "
             f"repeat(s)\n",
             f"| variant | wall s/step | CPU s/step | inside the long run: wall / CPU s/step, steps {short} -> {long_} | "
             f"peak MB at {short} steps | peak MB at {long_} steps | growth | one run: peak at step {short} -> {long_} | "
             f"speed vs reference (CPU s) |", "|---|---|---|---|---|---|---|---|---|"]
    rate: dict[str, dict[str, float]] = {}
    for variant in args.variants:
        a, b = results[(variant, short)], results[(variant, long_)]
        for key in ("wall_s", "cpu_s"):  # median over repeats of (long - short) / step difference
            diffs = sorted((y[key] - x[key]) / (long_ - short) for x, y in zip(a, b))
            rate.setdefault(variant, {})[key] = diffs[len(diffs) // 2]
    for variant in args.variants:
        pa = max(r["peak_mb"] for r in results[(variant, short)])
        pb = max(r["peak_mb"] for r in results[(variant, long_)])
        ref = f"{rate['reference']['cpu_s'] / rate[variant]['cpu_s']:.2f}x" if "reference" in rate else ""
        # The long run's own trace: the peak after step `short` and at the end of the same process (no
        # process-to-process variance of the start-up peak in the comparison).
        traces = [r["peak_trace"] for r in results[(variant, long_)] if len(r.get("peak_trace", [])) == long_]
        one = (" / ".join(f"{t[short - 1]:.0f} -> {t[-1]:.0f} ({100 * (t[-1] / t[short - 1] - 1):+.1f}%)" for t in traces)
               if traces else "")
        # The same process's clock from the end of step `short` to the end: no start-up, no compilation
        # (torch.compile's on-disk cache makes a second process compile faster, which skews the two-run
        # difference of a compiled variant; this figure is the one to read for those).
        inner = sorted(((t[-1][0] - t[short - 1][0]) / (long_ - short), (t[-1][1] - t[short - 1][1]) / (long_ - short))
                       for t in (r["time_trace"] for r in results[(variant, long_)]) if len(t) == long_)
        inside = f"{inner[len(inner) // 2][0]:.3f} / {inner[len(inner) // 2][1]:.3f}" if inner else ""
        lines.append(f"| {variant} | {rate[variant]['wall_s']:.3f} | {rate[variant]['cpu_s']:.3f} | {inside} | {pa:.0f} | "
                     f"{pb:.0f} | {100 * (pb / pa - 1):+.0f}% | {one} | {ref} |")
    table = "\n".join(lines) + "\n"
    print(table)
    return table


def main_profile(args) -> str:
    """--mode profile: phase times of the sparse and full step (and a baseline checkout), alternating."""
    variants = [("dlm", "sparse", None), ("full", "full", None)]
    if args.profile_compile:
        variants.append(("dlm+compile", "sparse+compile", None))
    if args.baseline_src:
        variants.insert(1, ("baseline", "sparse", args.baseline_src))
    sums: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, head, src in variants:
            r = _child_json(["--_profile", head, "--device", args.device, "--steps", str(args.steps[0])],
                            args.threads, src)
            for k, v in r.items():
                sums.setdefault(name, {}).setdefault(k, []).append(v)
            print(f"rep {rep} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    names = [n for n, _, _ in variants]
    s = RECIPE_SHAPE
    lines = [f"\n### {time.strftime('%Y-%m-%d')} — `--mode profile`, {args.device}, fp32, {args.threads} threads, "
             f"recipe shape ({s['batch']} x {s['seq_len']}, vocab {s['vocab']}), mean of {args.steps[0]} steps, "
             f"median of {args.repeats} alternating repeat(s), CPU seconds of the process (all threads)\n",
             "| phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for phase in sums[names[0]]:
        cells = [sorted(sums[n][phase])[len(sums[n][phase]) // 2] for n in names]
        lines.append(f"| {phase} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="heads", choices=["heads", "run", "profile"],
                        help="heads: sparse vs full step per size; run: whole Trainer runs at the recipe shape "
                             "(s/step and peak memory from two run lengths); profile: time per phase of a step.")
    parser.add_argument("--variants", nargs="+", default=["reference", "full", "dlm"],
                        help="--mode run: any of reference, full, dlm, dlm+compile, baseline, baseline+compile.")
    parser.add_argument("--baseline_src", help="Another dlm checkout (e.g. `git worktree add /tmp/base main`) "
                                                "for the baseline variants.")
    parser.add_argument("--profile_compile", action="store_true",
                        help="--mode profile: also time the step of a torch.compile'd model (inductor).")
    parser.add_argument("--repeats", type=int, default=1, help="--mode run/profile: alternating repeats.")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="ModernBERT sizes of dlm.modeling.")
    parser.add_argument("--batch", type=int, default=8, help="Sequences per step.")
    parser.add_argument("--seq_len", type=int, default=256, help="Tokens per sequence.")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="Timed steps per configuration (heads: 6, profile: 5); --mode run: the two run lengths "
                             "(default 20 60).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast mixed precision.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--no_write", action="store_true", help="Print only; do not append to RESULTS.md.")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    parser.add_argument("--_profile", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.src:  # a child measuring another checkout of dlm
        sys.path.insert(0, str(Path(args.src).resolve()))
    if args._run or args._profile:
        import torch

        torch.set_num_threads(args.threads)
        if args._run:
            print(json.dumps(run_variant(args._run, args.steps[0], args.device)))
        else:
            print(json.dumps(profile_step(args._profile.startswith("sparse"), args.steps[0], args.device,
                                          compile_model=args._profile.endswith("+compile"))))
        return
    if args.mode in ("run", "profile"):
        if args.mode == "run":
            args.steps_pair = args.steps or [20, 60]
            if len(args.steps_pair) != 2:
                parser.error("--mode run takes two run lengths: --steps SHORT LONG")
            table = main_run(args)
        else:
            args.steps = args.steps or [5]
            table = main_profile(args)
        if not args.no_write:
            write_section(ROOT / "benchmarks" / "RESULTS.md", table)
        return
    args.steps = (args.steps or [6])[0]

    if args._one:  # child process: one configuration
        import torch

        torch.set_num_threads(args.threads)
        size, sparse = args._one.split(":")
        print(json.dumps(measure(size, sparse == "sparse", args.batch, args.seq_len, args.steps, args.device,
                                 args.dtype)))
        return

    rows = []
    for size in args.sizes:
        for head in ("full", "sparse"):
            cmd = [sys.executable, __file__, "--_one", f"{size}:{head}", "--batch", str(args.batch), "--seq_len",
                   str(args.seq_len), "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{size:6s} {head:6s} {r['tokens_per_s']:9.0f} tok/s  {r['step_s']:.3f} s/step "
                  f"(median {r['median_step_s']:.3f})  "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)

    lines = [f"\n### {time.strftime('%Y-%m-%d')} — {args.device} {args.dtype}, {args.threads} threads, batch {args.batch} x "
             f"{args.seq_len} tokens, vocab {VOCAB}, {args.steps} timed steps ({platform.processor() or platform.machine()})\n",
             "| model | params | head | tokens/s (best step) | s/step best / median | peak memory | sparse speed-up |",
             "|---|---|---|---|---|---|---|"]
    for full, sparse in zip(rows[::2], rows[1::2]):
        for r in (full, sparse):
            speed = f"{sparse['tokens_per_s'] / full['tokens_per_s']:.2f}x" if r is sparse else ""
            lines.append(f"| {r['size']} | {r['params_m']:.1f}M | {'sparse' if r['sparse'] else 'full'} | "
                         f"{r['tokens_per_s']:.0f} | {r['step_s']:.3f} / {r['median_step_s']:.3f} | {r['peak_mb']:.0f} MB | {speed} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", table)


def write_section(path: Path, text: str) -> None:
    """Append `text` at the end of our own section (created if missing), leaving other sections alone."""
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in content:
        content = content.rstrip("\n") + f"\n\n{SECTION}\n\nTraining step = diffusion_loss forward + backward + " \
                                         "AdamW; 'sparse' runs the MLM head on masked rows only.\n"
    start = content.index(SECTION)
    nxt = content.find("\n## ", start + len(SECTION))
    end = len(content) if nxt == -1 else nxt
    content = content[:end].rstrip("\n") + "\n" + text + content[end:]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    tmp.replace(path)


if __name__ == "__main__":
    main()
