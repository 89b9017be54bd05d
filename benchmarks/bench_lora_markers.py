"""LoRA SFT with and without training the chat-marker rows, on the quickstart task (issue 11, point 6).

A model pretrained without chat markers (the quickstart's pretrained model: its `<|user|>`,
`<|assistant|>`, `<|eot|>` rows were never trained) is fine-tuned with LoRA twice, same seed and steps:
  * `markers`  the current apply_lora: LoRA on all linear layers + the marker rows (peft trainable tokens)
  * `frozen`   the previous behaviour: LoRA on all linear layers only (marker rows stay as initialised)
then each merged model answers the held-out problems (quickstart sampler settings). Reported: exact
match, and how often the generation ends with `<|eot|>` right after a correct-length answer.

    OMP_NUM_THREADS=2 python benchmarks/bench_lora_markers.py --pretrained /work/artifacts/qs/pretrain/final_model \
        --sft_data /work/artifacts/qs/data/sft --tasks /work/artifacts/qs/data/synthetic/heldout_tasks.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dlm.training as training  # noqa: E402
from dlm.evaluation import load_tasks  # noqa: E402
from dlm.modeling import load_checkpoint  # noqa: E402
from dlm.sampling import SamplerConfig, generate  # noqa: E402
from dlm.tokenization import special_ids  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pretrained", required=True)
    p.add_argument("--sft_data", required=True)
    p.add_argument("--tasks", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--gen_length", type=int, default=4)
    args = p.parse_args()

    items = load_tasks(args.tasks, limit=args.limit)
    real_apply_lora = training.apply_lora
    rows = []
    for mode in ("markers", "frozen"):
        if mode == "frozen":  # the previous behaviour: no tokenizer, so no trainable marker rows
            training.apply_lora = lambda model, model_args, tokenizer=None: real_apply_lora(model, model_args)
        with tempfile.TemporaryDirectory() as work:
            model_args = training.SFTModelArguments(path_to_pretrained_checkpoint=args.pretrained, lora=True,
                                                    lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0)
            data_args = training.DataArguments(path_to_prepped_data=args.sft_data)
            train_args = training.DiffusionTrainingArguments(
                output_dir=str(Path(work) / mode), max_steps=args.steps, per_device_train_batch_size=args.batch,
                learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, eval_strategy="no",
                eval_on_start=False, save_strategy="no", logging_steps=50, report_to="none", seed=0,
                disable_tqdm=True)
            start = time.time()
            training.run_training("sft", model_args, data_args, train_args)
            seconds = time.time() - start
            model, tokenizer = load_checkpoint(str(Path(work) / mode / "final_model"))
        eot = special_ids(tokenizer).eot
        results = generate(model, tokenizer, [it.prompt for it in items], SamplerConfig(gen_length=args.gen_length),
                           seed=0, batch_size=100)
        correct = sum(r.text.strip() == it.answer for r, it in zip(results, items))
        stopped = 0
        for r, it in zip(results, items):
            n = len(tokenizer(it.answer, add_special_tokens=False)["input_ids"])
            stopped += n < len(r.output_ids) and r.output_ids[n] == eot
        rows.append((mode, correct, stopped, len(items), seconds))
        training.apply_lora = real_apply_lora
    print(f"LoRA SFT, {args.steps} steps x {args.batch}, lr {args.lr}, r {args.lora_r}; {len(items)} held-out problems")
    print("| marker rows | exact match | <|eot|> right after an answer of the right length | train s |")
    print("|---|---|---|---|")
    for mode, correct, stopped, n, seconds in rows:
        print(f"| {mode} | {correct}/{n} | {stopped}/{n} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
