"""Synthetic checkable tasks: answers are right, held-out identities never reach training, files round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.errors import UsageError
from dlm.synthetic import TASKS, Problem, generate_split, is_heldout, normalize_answer, pretraining_lines, task_prompt

ROOT = Path(__file__).resolve().parent.parent


def _check(problem) -> bool:
    """Recompute the answer from the rendering, independently of the generator."""
    text = problem.instruction
    if problem.task == "fewshot":  # 22 solved 2-digit examples, then the query; never the query's own pair
        *examples, query = text.split("\n")
        pairs = [tuple(sorted(map(int, e.split("=")[0].split("+")))) for e in examples]
        return (len(examples) == 22 and all(int(e.split("=")[1]) == sum(map(int, e.split("=")[0].split("+")))
                                            for e in examples)
                and tuple(sorted(map(int, query.rstrip("=").split("+")))) not in pairs
                and problem.answer == str(sum(map(int, query.rstrip("=").split("+")))))
    if problem.task.startswith("add"):
        a, b = text.rstrip("=").split("+")
        digits = int(problem.task[3:])
        return len(a) == len(b) == digits and problem.answer == str(int(a) + int(b))
    items = text.split(": ", 1)[1].split(" ")
    if problem.task == "reverse":
        return problem.answer.split(" ") == items[::-1]
    if problem.task == "sort":
        return problem.answer.split(" ") == sorted(items, key=int)
    raise AssertionError(problem.task)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_correct_and_split_is_on_identity(task):
    train = generate_split(task, 300, heldout=False, fraction=0.2, seed=3)
    held = generate_split(task, 60, heldout=True, fraction=0.2, seed=3)
    assert all(_check(p) for p in train + held)
    assert not {p.key for p in train} & {p.key for p in held}
    assert len({p.instruction for p in held}) == 60  # held-out problems are distinct
    assert all(is_heldout(p, 0.2, 3) for p in held) and not any(is_heldout(p, 0.2, 3) for p in train)


def test_addition_identity_is_the_unordered_pair():
    held = generate_split("add2", 500, heldout=True, fraction=0.1, seed=0)
    train = generate_split("add2", 20_000, heldout=False, fraction=0.1, seed=0)
    # b+a of a held-out a+b is held out too, so commutativity cannot leak an answer into training
    held_pairs = {tuple(map(int, p.instruction[:-1].split("+"))) for p in held}
    train_pairs = {tuple(map(int, p.instruction[:-1].split("+"))) for p in train}
    assert not {(b, a) for a, b in held_pairs} & train_pairs
    # the train side of add2 (7,290 ordered problems) is exhausted, then repeats instead of failing
    train_space = sum(not is_heldout(Problem("add2", (min(a, b), max(a, b)), "", ""), 0.1, 0)
                      for a in range(10, 100) for b in range(10, 100))
    assert len(train) == 20_000 and len({p.instruction for p in train}) == train_space


def test_split_is_reproducible_and_seeded():
    a = generate_split("reverse", 50, heldout=True, seed=1)
    assert a == generate_split("reverse", 50, heldout=True, seed=1)
    assert a != generate_split("reverse", 50, heldout=True, seed=2)


def test_too_many_heldout_problems_is_a_usage_error():
    with pytest.raises(UsageError, match="--num_heldout"):
        generate_split("add2", 5000, heldout=True, fraction=0.1)


def test_normalize_answer():
    assert normalize_answer("  1 2\n\t3  ") == "1 2 3"
    assert normalize_answer("85") == normalize_answer(" 85 \n")
    assert normalize_answer("8 5") != normalize_answer("85")


def test_pretraining_lines_render_problem_and_answer():
    probs = generate_split("add2", 3, heldout=False) + generate_split("sort", 2, heldout=False)
    lines = pretraining_lines(probs)
    assert lines[0] == probs[0].instruction + probs[0].answer
    assert lines[3] == f"{probs[3].instruction} -> {probs[3].answer}"


def test_make_synthetic_data_writes_consistent_files(tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, str(ROOT / "make_synthetic_data.py"), "--output_dir", str(out), "--tasks", "add2,sort",
           "--num_train", "200", "--num_heldout", "30", "--pretrain_repeats", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    train = json.loads((out / "train.json").read_text())
    held = json.loads((out / "heldout.json").read_text())
    tasks = [json.loads(line) for line in (out / "heldout_tasks.jsonl").read_text().splitlines()]
    corpus = (out / "pretrain.txt").read_text().splitlines()
    assert len(train) == 400 and len(held) == 60 and len(tasks) == 60 and len(corpus) == 800
    assert all(set(r) == {"instruction", "input", "output"} for r in train + held)
    held_prompts = {r["instruction"] for r in held}
    assert not held_prompts & {r["instruction"] for r in train}
    assert not any(line.startswith(p) for line in corpus for p in held_prompts)
    assert [t["answer"] for t in tasks] == [r["output"] for r in held]
    assert {t["task"] for t in tasks} == {"add2", "sort"}
    # the evaluation prompt is the user turn that training renders for the same record
    assert tasks[0]["prompt"].startswith(held[0]["instruction"])

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--output_dir" in again.stderr
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "x"), "--tasks", "add7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "add7" in bad.stderr and not (tmp_path / "x").exists()
