"""Damaged checkpoints, hostile pickles, and full disks: resume falls back or fails in one line, nothing complete is lost.

One real tiny training run (in-process) writes checkpoint-2 and checkpoint-4; each case damages a copy
with real truncated files or real pickles whose `__reduce__` would create a marker file.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import shutil
from pathlib import Path

import pytest
import torch

from dlm.checkpoints import STAGING, checkpoint_problem, last_complete_checkpoint, resolve_resume
from dlm.errors import UsageError



def train_args(model_dir, data, out, steps, **extra) -> list[str]:
    args = {"output_dir": out, "hf_model_name": model_dir, "path_to_prepped_data": data, "max_steps": steps,
            "per_device_train_batch_size": 2, "save_steps": 2, "eval_strategy": "no", "eval_on_start": "false",
            "logging_steps": 1, "disable_tqdm": "true", "report_to": "none", "seed": 3, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, corpus_text):
    """(model dir, data dir, output dir) of a finished 4-step run with checkpoint-2, checkpoint-4 and final_model."""
    from dlm.data.packing import PretrainDataArguments, prepare_pretrain
    from dlm.errors import ArgumentParser
    from dlm.training import DataArguments, DiffusionTrainingArguments, ModelArguments, run_training

    work = tmp_path_factory.mktemp("ckpt")
    (work / "corpus.txt").write_text(corpus_text[:6000])
    prepare_pretrain(PretrainDataArguments(path_to_data_store=str(work / "data"), hf_model_name=str(tiny_model_dir),
                                           context_length=32, data_files=[str(work / "corpus.txt")]))
    parser = ArgumentParser((ModelArguments, DataArguments, DiffusionTrainingArguments))
    run_training("pretrain", *parser.parse_args_into_dataclasses(train_args(tiny_model_dir, work / "data",
                                                                            work / "out", 4)))
    out = work / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / STAGING).exists()
    return tiny_model_dir, work / "data", out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


class Marker:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


DAMAGES = {
    "empty trainer_state.json": (lambda c: c.joinpath("trainer_state.json").write_bytes(b""),
                                 "trainer_state.json is not valid JSON (empty file)"),
    "truncated trainer_state.json": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "truncated model.safetensors": (lambda c: truncate(c / "model.safetensors", 0.9),
                                    "model.safetensors is truncated or not a safetensors file"),
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated or not a torch archive"),
    "trainer_state.json a list": (lambda c: c.joinpath("trainer_state.json").write_text("[]"),
                                  "trainer_state.json is not a Trainer state"),
    "optimizer.pt of another kind": (lambda c: torch.save({"a": torch.zeros(1)}, c / "optimizer.pt"),
                                     "optimizer.pt holds no optimizer state (state, param_groups expected)"),
    "no trainer_state.json": (lambda c: c.joinpath("trainer_state.json").unlink(), "no trainer_state.json"),
    "optimizer.pt deleted": (lambda c: c.joinpath("optimizer.pt").unlink(), "scheduler.pt without optimizer.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_skipped_by_auto_and_named_when_given(damage, run, tmp_path, caplog):
    _, _, out = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    damage_fn, expected = DAMAGES[damage]
    damage_fn(copy / "checkpoint-4")
    assert checkpoint_problem(copy / "checkpoint-2") is None
    problem = checkpoint_problem(copy / "checkpoint-4")
    assert problem and problem.startswith(expected), problem
    with caplog.at_level(logging.WARNING, logger="dlm.checkpoints"):
        assert resolve_resume("auto", str(copy)) == str(copy / "checkpoint-2")
    assert f"skipping {copy / 'checkpoint-4'}: {expected}" in caplog.text
    with pytest.raises(UsageError) as err:
        resolve_resume(str(copy / "checkpoint-4"), str(copy))
    assert str(err.value).startswith(f"--resume_from_checkpoint {copy / 'checkpoint-4'}: not a complete checkpoint: "
                                      f"{expected}") and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_malicious_pickle_is_one_line_naming_the_file_and_never_runs(name, run, tmp_path):
    _, _, out = run
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(out / "checkpoint-4", copy)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "payload": Marker(marker)}, copy / name)
    with pytest.raises(UsageError) as err:
        resolve_resume(str(copy), str(tmp_path))
    msg = str(err.value)
    assert f"{name} is not a plain tensor file (it asks to call io.open): refused to unpickle it" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()
    assert last_complete_checkpoint(tmp_path) is None  # auto does not trust it either


def test_resume_falls_back_then_a_full_disk_is_one_line_and_touches_nothing_complete(run, tmp_path, caplog):
    """A real run: auto skips a truncated checkpoint-4, resumes from checkpoint-2, and writing checkpoint-4
    hits a file-size limit (RLIMIT_FSIZE) at optimizer.pt: one line, every complete folder as it was."""
    from dlm.errors import ArgumentParser
    from dlm.training import DataArguments, DiffusionTrainingArguments, ModelArguments, run_training

    model_dir, data, out = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    truncate(copy / "checkpoint-4" / "optimizer.pt")
    before = {name: digest(copy / name) for name in ("checkpoint-2", "checkpoint-4", "final_model")}
    shutil.copytree(out / "checkpoint-4", copy / STAGING / "checkpoint-6")  # what a killed run leaves: never resumed
    model_bytes = (copy / "checkpoint-2" / "model.safetensors").stat().st_size
    opt_bytes = (out / "checkpoint-2" / "optimizer.pt").stat().st_size
    assert model_bytes < opt_bytes
    parser = ArgumentParser((ModelArguments, DataArguments, DiffusionTrainingArguments))
    args = parser.parse_args_into_dataclasses(train_args(model_dir, data, copy, 4, resume_from_checkpoint="auto"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((model_bytes + opt_bytes) // 2, hard))  # weights fit, optimizer not
    try:
        with caplog.at_level(logging.INFO), pytest.raises(UsageError) as err:
            run_training("pretrain", *args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert f"skipping {copy / 'checkpoint-4'}: optimizer.pt is truncated" in caplog.text
    assert f"resuming from {copy / 'checkpoint-2'}" in caplog.text
    msg = str(err.value)
    assert msg.startswith(f"writing {copy / 'checkpoint-4'} failed at optimizer.pt: File too large (the file-size "
                          f"limit, ulimit -f, is ") and "\n" not in msg
    assert "free on that disk, the last checkpoint took" in msg and msg.endswith("nothing complete was touched")
    assert {name: digest(copy / name) for name in before} == before
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []


def test_final_model_write_failure_keeps_the_old_final_model(run, tmp_path, tokenizer):
    """save_final_model under a file-size limit smaller than the weights: one line, old final_model intact."""
    from transformers import AutoModelForMaskedLM

    from dlm.training import DiffusionTrainer, DiffusionTrainingArguments, save_final_model

    _, _, out = run
    folder = tmp_path / "final_model"
    shutil.copytree(out / "final_model", folder)
    before = digest(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    trainer = DiffusionTrainer(model=model, args=DiffusionTrainingArguments(
        output_dir=str(tmp_path), report_to="none", eval_strategy="no", eval_on_start=False),
                               mask_id=tokenizer.mask_token_id)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((folder / "model.safetensors").stat().st_size // 2, hard))
    try:
        with pytest.raises(UsageError) as err:
            save_final_model(trainer, tokenizer, folder, extra={})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(f"writing {folder} failed at the .safetensors weights: File too large; ")
    assert "free on that disk, the weights alone take " in str(err.value)
    assert digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]


def test_resuming_another_models_checkpoint_is_one_line(run, tokenizer):
    """The Trainer would end in torch's size-mismatch traceback (or, for missing keys, only warn)."""
    from transformers import AutoModelForMaskedLM

    from dlm.checkpoints import check_resume_fits
    from dlm.modeling import build_from_scratch

    model_dir, _, out = run
    check_resume_fits(AutoModelForMaskedLM.from_pretrained(model_dir), out / "checkpoint-4")  # same shapes: fine
    with pytest.raises(UsageError) as err:
        check_resume_fits(build_from_scratch("tiny", tokenizer), out / "checkpoint-4")  # hidden 128, not 32
    msg = str(err.value)
    assert msg.startswith(f"--resume_from_checkpoint {out / 'checkpoint-4'} was written by another model, it does not "
                          f"fit ModernBertForMaskedLM: mis-shaped ") and "(32,) vs (128,)" in msg and "\n" not in msg
