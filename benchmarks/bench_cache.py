"""Seconds per denoising step with and without the prompt cache (dlm.cache) on a ModernBERT-base-shaped encoder.

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py                  # 6 layers, prompts of 1024 and 256
    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py --layers 22      # ModernBERT-base's full depth

The model has ModernBERT-base's shape (hidden 768, 12 heads, MLP 1152, a global layer every third, local
window 128, vocabulary 50368) with random weights: this measures speed, not answers (accuracy is
benchmarks/cache_quality.sh). One prompt of random tokens, 64 masks in blocks of 32, temperature 0, no early
stop, so every setting runs 64 steps. Settings, all on the same weights:
  off           today's sampler: the full forward every step (model trained without isolation)
  off+isolated  the full forward with the isolation mask (what an isolated model runs with the cache off)
  exact         the prompt cache on the isolated model: must give the tokens of off+isolated
  approx        the prompt cache on the non-isolated model: prompt and finished blocks refreshed per block
Settings are run one after another for each prompt length and rule (alternating, so that the load of a
shared machine spreads over all of them). The table goes to stdout and replaces its section of RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sampling import markdown_table, replace_section  # noqa: E402

from dlm.errors import ArgumentParser, run_main, setup_logging  # noqa: E402

SECTION = "## Prompt cache: seconds per step (bench_cache.py)"
SETTINGS = {"off": (False, "off"), "off+isolated": (True, "off"), "exact": (True, "exact"), "approx": (False, "approx")}


@dataclass
class BenchArguments:
    layers: int = field(default=6, metadata={"help": "Encoder layers (ModernBERT-base has 22)."})
    prompt_lengths: str = field(default="256,1024", metadata={"help": "Prompt lengths in tokens."})
    gen_length: int = field(default=64, metadata={"help": "Masks after the prompt."})
    block_length: int = field(default=32, metadata={"help": "Semi-autoregressive block size."})
    threshold: float = field(default=0.9, metadata={"help": "τ of the threshold rule (the other rule is fixed-step)."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: CPU time is then the work done)."})
    results: str = field(default=str(ROOT / "benchmarks" / "RESULTS.md"), metadata={
        "help": "Markdown file whose bench_cache section is replaced ('' to skip)."})


def build(layers: int):
    """A random-weight ModernBERT-base-shaped masked LM and a small offline tokenizer for the special ids."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from dlm.tokenization import train_tokenizer

    tokenizer = train_tokenizer(texts=["the quick brown fox jumps over the lazy dog 0123456789"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_attention_heads=12,
                              num_hidden_layers=layers, global_attn_every_n_layers=3, local_attention=128,
                              max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              cls_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.eos_token_id)
    return ModernBertForMaskedLM(config).eval(), tokenizer


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(BenchArguments).parse_args_into_dataclasses()
    import torch

    from dlm.sampling import SamplerConfig, generate

    torch.set_num_threads(args.threads)
    model, tokenizer = build(args.layers)
    rules = {"fixed-step": {"steps": args.gen_length}, f"τ = {args.threshold}": {"threshold": args.threshold}}
    rows, checks = [], []
    for rule, rule_kw in rules.items():
        for n in sorted((int(x) for x in args.prompt_lengths.split(",")), reverse=True):
            prompt = torch.randint(20, len(tokenizer), (n,), generator=torch.Generator().manual_seed(n)).tolist()
            outputs, timing = {}, {}
            for name, (isolated, cache) in SETTINGS.items():
                model.config.prompt_isolation = isolated
                cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, stop_at_eos=False,
                                    prompt_cache=cache, **rule_kw)
                wall, cpu = time.perf_counter(), time.process_time()
                (res,) = generate(model, tokenizer, [prompt], cfg, chat=False, seed=0)
                timing[name] = (time.process_time() - cpu, time.perf_counter() - wall, res.nfe)
                outputs[name] = res.output_ids
                print(f"{rule:>12} prompt {n:5d} {name:>13}: {timing[name][0]:7.2f} s CPU, {timing[name][1]:7.2f} s "
                      f"wall, {res.nfe} steps", flush=True)
            base = timing["off"][0]
            for name, (cpu, wall, nfe) in timing.items():
                rows.append([rule, str(n), name, f"{cpu / nfe:.3f}", f"{args.gen_length / cpu:.1f}",
                             f"**{base / cpu:.2f}×**", f"{wall / nfe:.2f}"])
            same = outputs["exact"] == outputs["off+isolated"]
            agree = sum(a == b for a, b in zip(outputs["approx"], outputs["off"])) / args.gen_length
            checks.append(f"{rule}, prompt {n}: exact tokens == off+isolated tokens: {same}; "
                          f"approx agrees with off on {100 * agree:.0f}% of positions (random weights)")
            report(args, rows, checks)  # after every group: a cut-short run still leaves its rows
    return 0


def report(args: BenchArguments, rows: list[list[str]], checks: list[str]) -> None:
    table = markdown_table(["rule", "prompt", "setting", "CPU s / step", "tokens / CPU s", "speed-up vs off",
                            "wall s / step"], rows)
    body = "\n".join([
        SECTION, "",
        (f"### 2026-11-26 — CPU, {args.threads} thread, 2 cores shared with other jobs ({platform.machine()}); "
        f"ModernBERT-base shape with {args.layers} layers, random weights, fp32; {args.gen_length} generated "
        f"tokens in blocks of {args.block_length}, batch 1, no early stop"), "",
        (f"`OMP_NUM_THREADS={args.threads} python benchmarks/bench_cache.py --layers {args.layers} --threads "
        f"{args.threads}`. Times are the process's CPU time (one thread, so it is the work done, whatever "
        "the other jobs on the shared cores take); wall time, inflated several-fold by those jobs, is the "
        "last column. The settings of a prompt length ran one after another. The first step of exact/approx "
        "is a full forward (it fills the cache), included. Random weights are never 90% sure of a token, "
        "so τ = 0.9 also commits one token per step here."), "",
        table, "", *[f"- {c}" for c in checks]])
    print("\n" + body, flush=True)
    if args.results:
        replace_section(Path(args.results), SECTION, body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_main(main)
