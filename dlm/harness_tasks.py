"""Offline lm-evaluation-harness tasks: checkable {prompt, answer} problems as task YAMLs over local JSONL files.

    python -m dlm.harness_tasks --tasks data/synthetic/heldout_tasks.jsonl --output_dir harness_tasks \
        [--gsm8k ../shared/data/gsm8k_alpaca.json]
    python -m dlm.harness --model dlm --model_args pretrained=DIR --include_path harness_tasks --tasks dlm_add_mc

The hub is not needed: each YAML reads its JSONL through the `json` dataset builder (absolute paths).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from dlm.errors import ArgumentParser, UsageError, atomic_write_text, run_main, setup_logging


def wrong_sums(answer: int, rng, k: int = 3) -> list[int]:
    """k distinct wrong answers near `answer` (off by one or ten, the mistakes a weak adder makes)."""
    near = [answer + d for d in (1, -1, 10, -10, 9, -9, 11, -11, 2, -2) if answer + d >= 0]
    return rng.sample(near, k)


def _yaml(name: str, data_file: Path, body: str) -> str:
    # JSON strings are valid YAML scalars: paths and prompts need no YAML quoting rules.
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n"
            f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
            f"test_split: test\n{body}")


def write_tasks(out_dir: str | Path, items: list[dict], name: str = "dlm_add", gsm8k: str | Path | None = None,
                seed: int = 0, max_gen_toks: int = 16) -> list[str]:
    """Write harness tasks over local JSONL files into `out_dir` (use it as --include_path); return task names.

      * `{name}_mc`: multiple choice, the right answer against 3 wrong sums (integer answers), metric acc;
      * `{name}_gen`: generate_until, exact match of the answer (whitespace trimmed);
      * `gsm8k_local` (when `gsm8k`, an Alpaca JSON of GSM8K, is given): generate_until, the last number.
    """
    out = Path(out_dir).resolve()  # the YAMLs name their data by absolute path: any working directory works
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for it in items:
        if not str(it["answer"]).strip().isdigit():
            continue
        right = int(it["answer"])
        choices = [str(right)] + [str(w) for w in wrong_sums(right, rng)]
        rng.shuffle(choices)
        rows.append({"prompt": it["prompt"], "choices": choices, "label": choices.index(str(right))})
    names = []
    strip = '["^\\\\s+", "\\\\s+$"]'
    if rows:
        atomic_write_text(out / f"{name}_mc.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / f"{name}_mc.yaml", _yaml(f"{name}_mc", out / f"{name}_mc.jsonl", (
            "output_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: label\n"
            'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
            "    higher_is_better: true\n")))
        names.append(f"{name}_mc")
    atomic_write_text(out / f"{name}_gen.jsonl",
                      "".join(json.dumps({"prompt": it["prompt"], "answer": str(it["answer"])}) + "\n"
                              for it in items))
    gen = (f"output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\ngeneration_kwargs:\n"
           f"  until: []\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
           f"    aggregation: mean\n    higher_is_better: true\n    regexes_to_ignore: {strip}\n")
    atomic_write_text(out / f"{name}_gen.yaml", _yaml(f"{name}_gen", out / f"{name}_gen.jsonl", gen))
    names.append(f"{name}_gen")
    if gsm8k is not None and Path(gsm8k).is_file():
        records = json.loads(Path(gsm8k).read_text())
        number = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
        lines = []
        for rec in records:
            found = number.findall(rec["output"])
            if found:
                answer = found[-1].replace(",", "").rstrip(".")
                lines.append(json.dumps({"question": rec["instruction"], "answer": answer}))
        atomic_write_text(out / "gsm8k_local.jsonl", "\n".join(lines) + "\n")
        body = ("output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\ngeneration_kwargs:\n"
                "  until: []\n  max_gen_toks: 256\n  do_sample: false\nfilter_list:\n  - name: last-number\n"
                "    filter:\n      - function: regex\n        group_select: -1\n"
                '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"\n      - function: take_first\n'
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                '    regexes_to_ignore: [",", "\\\\$", "\\\\.$"]\n')
        atomic_write_text(out / "gsm8k_local.yaml", _yaml("gsm8k_local", out / "gsm8k_local.jsonl", body))
        names.append("gsm8k_local")
    return names


@dataclass
class TaskArguments:
    tasks: str = field(metadata={"help": "JSONL of {prompt, answer} (evaluate.py's --tasks format)."})
    output_dir: str = field(metadata={"help": "Folder for the task YAMLs and JSONL files (the harness's "
                                              "--include_path)."})
    gsm8k: str | None = field(default=None, metadata={"help": "Alpaca JSON of GSM8K problems: also write gsm8k_local."})
    name: str = field(default="dlm_add", metadata={"help": "Task name prefix: NAME_mc and NAME_gen."})
    max_gen_toks: int = field(default=16, metadata={"help": "The generation task's max_gen_toks."})
    seed: int = field(default=0, metadata={"help": "Seed of the wrong answers and of the choice order."})


def main() -> int:
    from dlm.evaluation import load_tasks

    setup_logging()
    (args,) = ArgumentParser(TaskArguments).parse_args_into_dataclasses()
    if args.gsm8k is not None and not Path(args.gsm8k).is_file():
        raise UsageError(f"--gsm8k {args.gsm8k}: no such file")
    items = [{"prompt": it.prompt, "answer": it.answer} for it in load_tasks(args.tasks)]
    names = write_tasks(args.output_dir, items, args.name, args.gsm8k, args.seed, args.max_gen_toks)
    print(f"wrote {', '.join(names)} to {args.output_dir} (use --include_path {args.output_dir})")
    return 0


if __name__ == "__main__":
    run_main(main)
