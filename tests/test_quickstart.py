"""quickstart.sh end to end with tiny step counts: every real script runs, outputs are consistent and honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_quickstart(out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "quickstart.sh"), str(out)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_shortened_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    proc = run_quickstart(out, QS_NUM_TRAIN="400", QS_NUM_HELDOUT="12", QS_PRETRAIN_STEPS="2", QS_PRETRAIN_BATCH="4",
                          QS_SFT_STEPS="2", QS_BATCH="8", QS_EVAL_BATCH="16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = [line for line in proc.stdout.splitlines() if line.startswith("== [")]
    assert [s.split("] ")[1][:3] for s in stages[:7]] == [f"{i}/7" for i in range(1, 8)]

    # the held-out problems were never trained on, in either stage
    held = json.loads((out / "data/synthetic/heldout.json").read_text())
    train = json.loads((out / "data/synthetic/train.json").read_text())
    corpus = (out / "data/synthetic/pretrain.txt").read_text()
    assert len(held) == 12 and not {r["instruction"] for r in held} & {r["instruction"] for r in train}
    assert not any(r["instruction"] + r["output"] in corpus for r in held)

    # the report printed on the terminal is the one saved, and it matches the predictions
    report = json.loads((out / "eval.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert report["tasks"]["n"] == 12 == len(preds)
    assert report["tasks"]["correct"] == sum(p["correct"] for p in preds)
    assert [p["answer"] for p in preds] == [r["output"] for r in held]
    assert f"({report['tasks']['correct']}/12)" in proc.stdout
    assert report["elbo"]["rows"] > 0 and report["elbo"]["nll_per_token"] > 0
    for stage in ("pretrain", "sft"):
        model = out / stage / "final_model"
        assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()

    # the last stage answered the prompt (plain text when piped: no live view escape codes)
    answer_part = proc.stdout.split("7/7")[1]
    assert "prompt: 38+47=" in answer_part and "\x1b[" not in answer_part
    assert "tokens/forward" in proc.stderr.split("7/7")[-1]


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    proc = run_quickstart(precious)
    assert proc.returncode == 2 and "not made by quickstart.sh" in proc.stderr
    assert (precious / "notes.txt").read_text() == "keep"
