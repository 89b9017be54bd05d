"""Measure a diffusion LM: ELBO likelihood on prepared data and/or exact-match accuracy on checkable tasks.

    python evaluate.py --model work_dir/LDM_SFT/final_model --path_to_prepped_data data/sft
    python evaluate.py --model work_dir/LDM_SFT/final_model --tasks data/synthetic/heldout_tasks.jsonl \
        --gen_length 8 --threshold 0.9

Prints a table; `--json` prints one JSON object instead, `--save_json FILE` also writes it to a file.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field

from dlm.cli import SamplerArguments, trained_canvas
from dlm.errors import ArgumentParser, UsageError, atomic_write_text, run_main, setup_logging
from dlm.evaluation import evaluate_elbo, evaluate_tasks, format_table, load_tasks, prepared_format

logger = logging.getLogger("evaluate")


@dataclass
class EvalArguments(SamplerArguments):
    model: str | None = field(default=None, metadata={
        "help": "Checkpoint folder (config.json, model.safetensors, tokenizer), or a bare .safetensors file "
                "with --hf_model_name."})
    safetensors_path: str | None = field(default=None, metadata={
        "help": "Reference-recipe spelling of a bare weights file (needs --hf_model_name)."})
    hf_model_name: str | None = field(default=None, metadata={
        "help": "Config and tokenizer for a bare .safetensors file (hub id or folder)."})
    path_to_prepped_data: str | None = field(default=None, metadata={
        "help": "Prepared pretraining or SFT folder: report the ELBO NLL and perplexity bound of --split."})
    split: str = field(default="test", metadata={"help": "Split of --path_to_prepped_data to score."})
    num_samples: int = field(default=32, metadata={
        "help": "Monte-Carlo draws per row for the ELBO (stratified over the number of masked tokens)."})
    mc_groups: int = field(default=2, metadata={
        "help": "Independent stratified groups the draws are split into, to estimate the Monte-Carlo error."})
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first N rows of the split."})
    tasks: str | None = field(default=None, metadata={
        "help": "JSONL of {prompt, answer[, task]}: report exact-match accuracy and NFE per generated token."})
    max_tasks: int | None = field(default=None, metadata={"help": "Use only the first N tasks of the file."})
    batch_size: int = field(default=32, metadata={"help": "Rows (ELBO) or prompts (tasks) per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the ELBO draws and of the sampler."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the table."})
    save_json: str | None = field(default=None, metadata={"help": "Also write the JSON result to this file."})
    save_predictions: str | None = field(default=None, metadata={
        "help": "Write one JSON line per task (prompt, answer, prediction, correct, nfe) to this file."})


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(EvalArguments).parse_args_into_dataclasses()
    weights = args.model or args.safetensors_path
    if not weights:
        raise UsageError("--model (or --safetensors_path with --hf_model_name) is required")
    if not args.path_to_prepped_data and not args.tasks:
        raise UsageError("nothing to evaluate: pass --path_to_prepped_data and/or --tasks")
    if args.batch_size < 1 or args.num_samples < 1 or args.mc_groups < 1:
        raise UsageError("--batch_size, --num_samples and --mc_groups must be at least 1")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    # Check the cheap inputs before loading a model.
    items = load_tasks(args.tasks, args.max_tasks) if args.tasks else None
    config = args.to_config(default_gen_length=16, trained=trained_canvas(weights)) if items else None
    if args.path_to_prepped_data:
        prepared_format(args.path_to_prepped_data)

    import torch

    from dlm.modeling import load_checkpoint

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    model, tokenizer = load_checkpoint(weights, args.hf_model_name, flag="--model" if args.model else "--safetensors_path")
    model.to(device).eval()

    report: dict = {"model": weights}
    rows = []
    if args.path_to_prepped_data:
        elbo = evaluate_elbo(model, tokenizer, args.path_to_prepped_data, split=args.split, batch_size=args.batch_size,
                             num_samples=args.num_samples, mc_groups=args.mc_groups, seed=args.seed,
                             max_rows=args.max_rows)
        report["elbo"] = asdict(elbo)
        # Significant digits, not decimals: a well-trained model's NLL is ~1e-3 and its error ~1e-5.
        rows += [("ELBO NLL / token (nats)", f"{elbo.nll_per_token:.4g} ± {elbo.stderr:.2g} "
                                             f"(Monte Carlo ± {elbo.mc_stderr:.2g})"),
                 ("perplexity bound", f"{elbo.perplexity_bound:.5g}"),
                 ("loss (Trainer eval_loss form)", f"{elbo.loss:.4g} ± {elbo.loss_stderr:.2g} "
                                                   f"(Monte Carlo ± {elbo.loss_mc_stderr:.2g})"),
                 ("rows / tokens", f"{elbo.rows} / {elbo.tokens} ({elbo.split}, {elbo.num_samples} draws)")]
    if items:
        res = evaluate_tasks(model, tokenizer, items, config, chat=not args.no_chat_template, seed=args.seed,
                             batch_size=args.batch_size)
        report["tasks"] = res.summary()
        report["sampler"] = asdict(config)
        rows += [("exact match", f"{100 * res.accuracy:.1f}% ± {100 * res.stderr:.1f} ({res.correct}/{res.n})")]
        rows += [(f"  {name}", f"{100 * v['accuracy']:.1f}% (n={v['n']})") for name, v in res.per_task.items()
                 if len(res.per_task) > 1]
        rows += [("NFE / generated token", f"{res.nfe_per_token:.3f} ({res.tokens_per_forward:.2f} tokens/forward)"),
                 ("tokens / s", f"{res.tokens_per_second:.1f} ({res.seconds:.1f} s)")]
        if args.save_predictions:
            atomic_write_text(args.save_predictions, "".join(json.dumps(p) + "\n" for p in res.predictions))
    text = json.dumps(report, indent=2)
    if args.save_json:
        atomic_write_text(args.save_json, text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        print(format_table(["metric", "value"], rows))
    return 0


if __name__ == "__main__":
    run_main(main)
