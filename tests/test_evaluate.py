"""evaluate.py and dlm.evaluation: statistics, ELBO agreement with the Trainer's eval loss, task scoring, CLI errors."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.errors import UsageError
from dlm.evaluation import (answer_length, binomial_stderr, evaluate_elbo, exact_match, format_table, load_tasks,
                            mean_and_stderr, ratio_and_stderr, summarize_elbo)

ROOT = Path(__file__).resolve().parent.parent


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# -- statistics ---------------------------------------------------------------------------------

def test_mean_and_stderr_match_the_textbook():
    xs = [1.0, 4.0, 2.5, 7.0, 3.0]
    mean, se = mean_and_stderr(xs)
    assert mean == pytest.approx(statistics.mean(xs))
    assert se == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)))
    assert math.isnan(mean_and_stderr([2.0])[1])


def test_ratio_stderr_reduces_to_mean_stderr_for_equal_lengths():
    xs = [3.0, 5.0, 4.0, 8.0]
    r, se = ratio_and_stderr([x * 10 for x in xs], [10] * 4)  # rows of 10 tokens: R = mean per-token value
    assert r == pytest.approx(statistics.mean(xs))
    assert se == pytest.approx(statistics.stdev(xs) / 2)
    # per-token ratio weights long rows more than the mean of per-row ratios does
    r2, _ = ratio_and_stderr([1.0, 30.0], [1, 10])
    assert r2 == pytest.approx(31 / 11)


def test_summarize_elbo_monte_carlo_error_and_perplexity():
    res = summarize_elbo([20.0, 40.0], [10, 10], [4.0, 0.0], num_samples=8, seed=0, split="test", format="x")
    assert res.nll_per_token == pytest.approx(3.0) and res.loss == pytest.approx(3.0)
    assert res.perplexity_bound == pytest.approx(math.exp(3.0))
    assert res.mc_stderr == pytest.approx(math.sqrt(4.0) / 20)
    assert res.tokens == 20 and res.rows == 2


def test_binomial_exact_match_and_answer_length():
    assert binomial_stderr(90, 100) == pytest.approx(0.03)
    assert exact_match(" 1 2\n3 ", "1 2 3") and not exact_match("123", "1 2 3")
    assert answer_length([5, 6, 2, 2, 2], stop_ids=[2, 3]) == 3  # answer tokens + the stop token
    assert answer_length([5, 6, 7], stop_ids=[2]) == 3


def test_format_table_aligns_columns():
    text = format_table(["setting", "acc", "nfe"], [["ref", 0.95, 12], ["tau=0.9", 0.9412, 3]])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines[:1] + lines[2:]}) == 1
    assert lines[2].endswith("0.95   12") and lines[3].startswith("tau=0.9")


def test_load_tasks_validates(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"prompt": "1+2=", "answer": 3}\n\n{"prompt": "a", "answer": "b", "task": "x"}\n')
    items = load_tasks(good)
    assert [(i.prompt, i.answer, i.task) for i in items] == [("1+2=", "3", "task"), ("a", "b", "x")]
    assert len(load_tasks(good, limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2="}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:1: expected"):
        load_tasks(bad)
    with pytest.raises(UsageError, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")


# -- ELBO ---------------------------------------------------------------------------------------

def _prepared_pretrain(folder: Path, tokenizer, text: str, rows: int = 12, length: int = 32) -> Path:
    """A prepared pretraining folder following the metadata contract of dlm.data (packed rows)."""
    from datasets import Dataset, DatasetDict

    from dlm.data.storage import METADATA_FILE, PRETRAIN_FORMAT
    from dlm.tokenization import tokenizer_fingerprint

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    packed = [ids[i * length:(i + 1) * length] for i in range(2 * rows)]
    DatasetDict(train=Dataset.from_dict({"input_ids": packed[:rows]}),
                test=Dataset.from_dict({"input_ids": packed[rows:]})).save_to_disk(str(folder))
    (folder / METADATA_FILE).write_text(json.dumps({"format": PRETRAIN_FORMAT, "tokenizer": "test",
                                                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                                    "context_length": length}))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer, corpus_text):
    return _prepared_pretrain(tmp_path_factory.mktemp("prep") / "data", tokenizer, corpus_text)


def test_elbo_agrees_with_trainer_eval_loss(tiny_model_dir, prepared, tmp_path):
    """Done-when 2: evaluate.py's ELBO and the Trainer's eval loss estimate the same number on the same rows."""
    from transformers import default_data_collator
    from dlm.data.storage import load_prepared
    from dlm.modeling import load_checkpoint
    from dlm.tokenization import special_ids
    from dlm.training import DiffusionTrainer, DiffusionTrainingArguments

    torch.manual_seed(0)
    model, tok = load_checkpoint(str(tiny_model_dir))
    res = evaluate_elbo(model, tok, prepared, batch_size=4, num_samples=16, seed=1)
    assert res.rows == 12 and res.tokens == 12 * 32 and res.format == "dlm-pretrain"
    assert res.loss == pytest.approx(res.nll_per_token)  # equal-length rows: both normalisations agree
    assert 0 < res.mc_stderr < res.stderr  # data variation includes the Monte-Carlo noise
    again = evaluate_elbo(model, tok, prepared, batch_size=4, num_samples=16, seed=1)
    assert again.nll_per_token == res.nll_per_token  # seeded

    data, _ = load_prepared(prepared, "dlm-pretrain", tok)
    evals = []
    for seed in range(6):
        args = DiffusionTrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=4, seed=seed,
                                          report_to="none", disable_tqdm=True)
        trainer = DiffusionTrainer(model=model, args=args, eval_dataset=data["test"], mask_id=special_ids(tok).mask,
                                   data_collator=default_data_collator)
        evals.append(trainer.evaluate()["eval_loss"])
    trainer_mean, trainer_se = mean_and_stderr(evals)
    combined = math.sqrt(res.mc_stderr ** 2 + trainer_se ** 2)
    assert abs(res.loss - trainer_mean) < 3 * combined, (res.loss, trainer_mean, combined)


# -- tasks and the command line -----------------------------------------------------------------

def test_evaluate_cli_tasks_are_scored_by_exact_match(tiny_model_dir, tmp_path):
    from dlm.evaluation import TaskItem, evaluate_tasks
    from dlm.modeling import load_checkpoint
    from dlm.sampling import SamplerConfig

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(5)))
    preds = tmp_path / "preds.jsonl"
    proc = run_evaluate("--model", str(tiny_model_dir), "--tasks", str(tasks), "--gen_length", "4", "--json",
                        "--save_predictions", str(preds))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["tasks"]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert report["n"] == 5 and report["correct"] == sum(r["correct"] for r in rows)
    assert report["nfe"] == sum(r["nfe"] for r in rows)
    assert report["nfe_per_token"] == pytest.approx(1 / report["tokens_per_forward"])
    assert report["nfe"] <= 5 * 4  # one commit per step: at most gen_length passes per prompt

    # Greedy decoding is deterministic: scoring the model's own outputs as answers gives 100%, others 0%.
    model, tok = load_checkpoint(str(tiny_model_dir))
    config = SamplerConfig(gen_length=4)
    own = evaluate_tasks(model, tok, [TaskItem(r["prompt"], "  " + r["prediction"] + " ") for r in rows], config)
    assert (own.correct, own.accuracy, own.stderr) == (5, 1.0, 0.0)
    other = evaluate_tasks(model, tok, [TaskItem(r["prompt"], r["prediction"] + "x") for r in rows], config)
    assert other.correct == 0 and other.nfe == own.nfe


@pytest.mark.parametrize("args, message", [
    ([], "--model"),
    (["--model", "{model}", "--tasks", "{tasks}", "--threshold", "1.5"], "--threshold"),
    (["--model", "{model}", "--path_to_prepped_data", "{tmp}"], "--path_to_prepped_data"),
])
def test_evaluate_cli_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, args, message):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    out = tmp_path / "out.json"
    fill = {"model": str(tiny_model_dir), "tmp": str(tmp_path), "tasks": str(tasks)}
    proc = run_evaluate(*[a.format(**fill) for a in args], "--save_json", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# -- the scored region and distributed eval (issue 11, points 7 and 8) ----------------------------

@pytest.fixture(scope="module")
def sft_prepared(tmp_path_factory, tiny_model_dir):
    """Real prepare_sft output: answers of very different lengths, so batch padding would matter."""
    from dlm.data.chat import SFTDataArguments, prepare_sft

    work = tmp_path_factory.mktemp("sft_eval")
    records = [{"instruction": f"Question {a}: what follows {a}?",
                "output": " ".join(["then"] * (1 + (a * 7) % 13)) + f" {a + 1}."} for a in range(60)]
    (work / "alpaca.json").write_text(json.dumps(records))
    prepare_sft(SFTDataArguments(path_to_data_store=str(work / "data"), hf_model_name=str(tiny_model_dir),
                                 data_files=[str(work / "alpaca.json")], context_length=64, test_split_pct=0.2))
    return work / "data"


def _trainer_eval_loss(model, tok, data_path, batch_size: int, seed: int = 3) -> float:
    from dlm.data.collators import SFTCollator
    from dlm.data.storage import load_prepared
    from dlm.tokenization import special_ids
    from dlm.training import DiffusionTrainer, DiffusionTrainingArguments

    data, _ = load_prepared(data_path, "dlm-sft", tok)
    args = DiffusionTrainingArguments(output_dir=str(Path(data_path).parent / "t"), per_device_eval_batch_size=batch_size,
                                      seed=seed, report_to="none", disable_tqdm=True)
    ids = special_ids(tok)
    trainer = DiffusionTrainer(model=model, args=args, eval_dataset=data["test"].select(range(9)), mask_id=ids.mask,
                               objective="sft", data_collator=SFTCollator(pad_id=ids.eos))
    return trainer.evaluate()["eval_loss"]


def test_sft_elbo_does_not_depend_on_the_batch(tiny_model_dir, sft_prepared):
    """The same 9 SFT test rows at batch 1, 7 and 8: evaluate.py and the Trainer's eval loss agree with
    themselves (far inside the Monte-Carlo error), because the scored region is each row's own answer."""
    from dlm.modeling import load_checkpoint

    model, tok = load_checkpoint(str(tiny_model_dir))
    res = {b: evaluate_elbo(model, tok, sft_prepared, batch_size=b, num_samples=4, seed=1, max_rows=9)
           for b in (1, 7, 8)}
    assert res[1].rows == 9 and res[1].format == "dlm-sft"
    assert len({r.tokens for r in res.values()}) == 1  # the same scored tokens at every batch size
    for b in (7, 8):
        assert res[b].nll_per_token == pytest.approx(res[1].nll_per_token, rel=1e-5, abs=1e-5)
        assert abs(res[b].loss - res[1].loss) < 1e-3 * res[1].loss_mc_stderr + 1e-5
    trainer = {b: _trainer_eval_loss(model, tok, sft_prepared, b) for b in (1, 7, 8)}
    assert trainer[7] == pytest.approx(trainer[1], abs=1e-5) and trainer[8] == pytest.approx(trainer[1], abs=1e-5)
    # The same region in both: the Trainer's one-draw estimate is within Monte-Carlo reach of evaluate.py's.
    assert abs(trainer[1] - res[1].loss) < 0.5 * res[1].loss


def test_isolated_model_is_scored_with_its_mask_at_any_batch_size(tiny_model_dir, sft_prepared):
    """evaluate.py's ELBO of a model trained with --prompt_isolation uses the isolation mask (a per-layer-type
    mapping for ModernBERT), and still does not depend on the batch (it used to fail on that mapping)."""
    from dlm.modeling import build_from_scratch, load_checkpoint

    _, tok = load_checkpoint(str(tiny_model_dir))
    torch.manual_seed(0)  # peaked predictions, so that what the prompt may attend to changes the figure
    model = build_from_scratch("tiny", tok, max_position_embeddings=512, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, initializer_range=0.5).eval()
    plain = evaluate_elbo(model, tok, sft_prepared, batch_size=8, num_samples=4, seed=1, max_rows=9)
    model.config.prompt_isolation = True
    res = {b: evaluate_elbo(model, tok, sft_prepared, batch_size=b, num_samples=4, seed=1, max_rows=9) for b in (1, 8)}
    assert res[8].nll_per_token == pytest.approx(res[1].nll_per_token, rel=1e-5, abs=1e-5)
    assert res[1].tokens == plain.tokens and abs(res[1].nll_per_token - plain.nll_per_token) > 1e-3


EVAL_DRIVER = """
import json, sys
from pathlib import Path
from dlm.data.collators import SFTCollator
from dlm.data.storage import load_prepared
from dlm.modeling import load_checkpoint
from dlm.tokenization import special_ids
from dlm.training import DiffusionTrainer, DiffusionTrainingArguments
model_dir, data_path, out = sys.argv[1:4]
model, tok = load_checkpoint(model_dir)
data, _ = load_prepared(data_path, "dlm-sft", tok)
ids = special_ids(tok)
args = DiffusionTrainingArguments(output_dir=out, per_device_eval_batch_size=2, seed=5, report_to="none",
                                  disable_tqdm=True)
trainer = DiffusionTrainer(model=model, args=args, eval_dataset=data["test"].select(range(5)), mask_id=ids.mask,
                           objective="sft", data_collator=SFTCollator(pad_id=ids.eos))
metrics = trainer.evaluate()
if trainer.is_world_process_zero():
    Path(out, "metrics.json").write_text(json.dumps({**metrics, "world": trainer.args.world_size}))
"""


def test_eval_loss_is_the_same_on_one_and_two_gloo_processes(tiny_model_dir, sft_prepared, tmp_path):
    """5 rows (odd: the 2-process sampler repeats a row to even out) at eval batch 2: same eval loss."""
    import os

    driver = tmp_path / "driver.py"
    driver.write_text(EVAL_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for name, launcher in [("single", [sys.executable]),
                           ("multi", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                      str(ROOT / "configs" / "accelerate" / "cpu_multiprocess.yaml"),
                                      "--main_process_port", "29541"])]:
        out = tmp_path / name
        proc = subprocess.run(launcher + [str(driver), str(tiny_model_dir), str(sft_prepared), str(out)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "metrics.json").read_text())
    assert (results["single"]["world"], results["multi"]["world"]) == (1, 2)
    assert results["multi"]["eval_loss"] == pytest.approx(results["single"]["eval_loss"], abs=1e-5)


# -- the canvas a model knows (issue 11, point 10) -------------------------------------------------

def test_front_ends_default_to_the_canvas_recorded_at_sft(tiny_model_dir, tmp_path):
    """With a dlm.json SFT record, inference.py's defaults decode exactly the canvas evaluate.py uses, so
    they answer the same; a much longer canvas gets a one-line warning."""
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "dlm.json").write_text(json.dumps({"objective": "sft",
                                                "sft_canvas": {"longest_answer": 3, "context_length": 32}}))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(4)))
    preds = tmp_path / "preds.jsonl"
    proc = run_evaluate("--model", str(model), "--tasks", str(tasks), "--save_predictions", str(preds), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sampler"]["gen_length"] == 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    inference = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model", str(model), "--prompts_file",
                                str(tasks), "--json"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert inference.returncode == 0, inference.stderr
    answers = [json.loads(line) for line in inference.stdout.splitlines()]
    assert [len(a["output_ids"]) for a in answers] == [3] * 4
    assert [a["text"] for a in answers] == [json.loads(line)["prediction"] for line in preds.read_text().splitlines()]
    assert "warning" not in inference.stderr.lower()


def test_a_much_longer_canvas_than_trained_gets_one_warning(tmp_path, caplog):
    from dlm.cli import SamplerArguments, trained_canvas

    (tmp_path / "dlm.json").write_text(json.dumps({"sft_canvas": {"longest_answer": 3, "context_length": 32}}))
    trained = trained_canvas(str(tmp_path / "model.safetensors"))  # a bare weights file finds its folder's record
    assert trained == {"longest_answer": 3, "context_length": 32} and trained_canvas(str(ROOT)) is None
    with caplog.at_level("WARNING"):
        assert SamplerArguments().to_config(128, trained).gen_length == 3
        assert SamplerArguments(gen_length=11).to_config(128, trained).gen_length == 11
        assert not caplog.records
        SamplerArguments(gen_length=64).to_config(128, trained)
        SamplerArguments(seq_len=48).to_config(128, trained)
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["--gen_length 64", "--seq_len 48"]
    assert all("longest answer was 3 tokens" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records)
    padded = {"longest_answer": 3, "context_length": 32, "answers_padded_to": "context"}
    caplog.clear()
    with caplog.at_level("WARNING"):
        SamplerArguments(gen_length=24).to_config(128, padded)  # answers were padded to 32: a known canvas
    assert not caplog.records


def test_longest_final_answer_of_a_prepared_split(sft_prepared, tokenizer):
    from dlm.data.collators import longest_final_answer
    from dlm.data.storage import load_prepared

    data, _ = load_prepared(sft_prepared, "dlm-sft", tokenizer)
    expected = 0
    for mask in data["train"]["answer_mask"]:
        run = 0
        for m in reversed(mask):
            if not m:
                break
            run += 1
        expected = max(expected, run)
    assert expected > 5 and longest_final_answer(data["train"]) == expected


def test_sft_collator_marks_padding_and_can_pad_to_a_fixed_canvas():
    from dlm.data.collators import KeepRowIndex, SFTCollator

    rows = [{"input_ids": [5, 6, 7], "answer_mask": [0, 1, 1]}, {"input_ids": [5, 6], "answer_mask": [0, 1]}]
    batch = SFTCollator(pad_id=2)(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][1, 2:].eq(2).all()
    assert batch["answer_mask"][1].tolist() == [0, 1] + [1] * 6  # training: the EOS padding is answer
    assert batch["is_padding"][1].tolist() == [False, False] + [True] * 6  # evaluation leaves it out
    fixed = SFTCollator(pad_id=2, pad_to_length=20)(rows)
    assert fixed["input_ids"].shape == (2, 24) and fixed["answer_mask"][:, 3:].all()
    indexed = KeepRowIndex(SFTCollator(pad_id=2))([{**r, "row_index": i + 4} for i, r in enumerate(rows)])
    assert indexed["row_index"].tolist() == [4, 5] and torch.equal(indexed["input_ids"], batch["input_ids"])
