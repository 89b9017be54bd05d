"""Write checkable synthetic instruction data for an offline run of the whole pipeline.

    python make_synthetic_data.py --output_dir data/synthetic --tasks add2 --num_train 8000 --num_heldout 300

writes, in one atomic folder:
  train.json            Alpaca records for prepare_sft_data.py (training identities only)
  heldout.json          Alpaca records of the held-out problems (never in train.json nor pretrain.txt)
  heldout_tasks.jsonl   {"prompt", "answer", "task"} per held-out problem, for evaluate.py --tasks
  pretrain.txt          a plain-text corpus of training problems, for tokenizer.py and prepare_pretrain_data.py
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from dlm.errors import ArgumentParser, UsageError, atomic_output_dir, run_main, setup_logging
from dlm.synthetic import TASKS, generate_split, pretraining_lines, task_prompt

logger = logging.getLogger("make_synthetic_data")


@dataclass
class Arguments:
    output_dir: str = field(metadata={"help": "Folder to write train.json, heldout.json, heldout_tasks.jsonl, "
                                              "pretrain.txt into (created atomically)."})
    tasks: str = field(default="add2", metadata={"help": f"Comma-separated tasks, from: {', '.join(TASKS)}."})
    num_train: int = field(default=8000, metadata={"help": "Training problems per task (repeat once a small "
                                                           "task's training identities are exhausted)."})
    num_heldout: int = field(default=300, metadata={"help": "Held-out problems per task (all distinct)."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Share of problem identities reserved for "
                                                                   "the held-out split."})
    pretrain_repeats: int = field(default=1, metadata={"help": "How many times the training problems appear "
                                                               "(reshuffled) in pretrain.txt."})
    seed: int = field(default=0, metadata={"help": "Seed of the split and of the draws."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(Arguments).parse_args_into_dataclasses()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks: give at least one task")
    if args.num_train < 1 or args.num_heldout < 1:
        raise UsageError("--num_train and --num_heldout must be at least 1")
    if args.pretrain_repeats < 0:
        raise UsageError("--pretrain_repeats must be >= 0")

    import random

    train, heldout = [], []
    for name in names:
        train += generate_split(name, args.num_train, heldout=False, fraction=args.heldout_fraction, seed=args.seed)
        heldout += generate_split(name, args.num_heldout, heldout=True, fraction=args.heldout_fraction,
                                  seed=args.seed)
    rng = random.Random(args.seed)
    rng.shuffle(train)  # mix tasks so every batch sees all of them
    corpus: list[str] = []
    for _ in range(args.pretrain_repeats):
        lines = pretraining_lines(train)
        rng.shuffle(lines)
        corpus += lines

    with atomic_output_dir(args.output_dir, "--output_dir", args.overwrite) as tmp:
        (tmp / "train.json").write_text(json.dumps([p.to_alpaca() for p in train], indent=0))
        (tmp / "heldout.json").write_text(json.dumps([p.to_alpaca() for p in heldout], indent=0))
        (tmp / "heldout_tasks.jsonl").write_text("".join(
            json.dumps({"prompt": task_prompt(p), "answer": p.answer, "task": p.task}) + "\n" for p in heldout))
        (tmp / "pretrain.txt").write_text("\n".join(corpus) + "\n")
    logger.info("wrote %d training and %d held-out problems (%s) and %d corpus lines to %s",
                len(train), len(heldout), ", ".join(names), len(corpus), args.output_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
