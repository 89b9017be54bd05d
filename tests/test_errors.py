"""One-line errors and atomic output folders."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlm.errors import UsageError, atomic_output_dir


def test_atomic_output_dir_keeps_old_content_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    with pytest.raises(UsageError, match="--out .* already exists"):
        with atomic_output_dir(out, "--out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, "--out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "precious"
    with atomic_output_dir(out, "--out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_run_main_turns_usage_error_into_one_line_exit_2():
    code = ("from dlm.errors import run_main, UsageError\n"
            "def main():\n    raise UsageError('--flag: bad value')\n"
            "run_main(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: --flag: bad value\n"


# One real flag per script, misspelled by dropping a letter: the error must name the typo and the real flag.
SCRIPT_FLAGS = {
    "pretrain.py": "--learning_rate", "finetune_sft.py": "--path_to_pretrained_checkpoint",
    "inference.py": "--gen_length", "evaluate.py": "--num_samples", "prepare_pretrain_data.py": "--context_length",
    "prepare_sft_data.py": "--context_length", "tokenizer.py": "--vocab_size", "make_synthetic_data.py": "--num_heldout",
}


def test_misspelled_flag_is_one_line_naming_the_closest_flag_in_every_script(monkeypatch, capsys):
    import runpy

    from conftest import ROOT

    for script, flag in SCRIPT_FLAGS.items():
        typo = flag[:6] + flag[7:]  # --learning_rate -> --learnng_rate: not a prefix, so argparse cannot guess
        monkeypatch.setattr(sys, "argv", [script, f"{typo}=3", "--output_dir", "unused"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (script, err)
        assert err == f"{script}: error: unrecognized argument {typo}: did you mean {flag}?\n", script


def test_stray_value_and_unknown_flag_without_a_neighbour(capsys):
    from dataclasses import dataclass

    from dlm.errors import ArgumentParser

    @dataclass
    class Args:
        learning_rate: float = 1.0
        experiment_name: str | None = None

        def __post_init__(self):
            if not self.experiment_name:
                raise UsageError("--experiment_name is required")

    parser = ArgumentParser(Args, prog="x")
    assert parser.parse_args_into_dataclasses(["--learning_rate", "2", "--experiment_name", "e"])[0].learning_rate == 2
    for argv, expected in ((["--experiment_name", "e", "oops"], "unexpected value 'oops'"),
                           (["--experiment_name", "e", "--zzz"], "unrecognized argument --zzz: see --help"),
                           # the typo of a required flag is reported as a typo, not as the flag missing
                           (["--experiment_nme", "e"], "--experiment_nme: did you mean --experiment_name?")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args_into_dataclasses(argv)
        assert exit_.value.code == 2 and expected in capsys.readouterr().err
    # callers that ask for the leftovers still get them
    assert parser.parse_args_into_dataclasses(["--experiment_name", "e", "--zzz"], return_remaining_strings=True)[1] == ["--zzz"]


def test_atomic_output_dir_reports_a_full_disk_in_one_line_and_keeps_the_old_output(tmp_path):
    import resource

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(UsageError) as err:
            with atomic_output_dir(out, "--out", overwrite=True) as tmp:
                (tmp / "big.bin").write_bytes(b"x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(f"writing {out} failed at big.bin: File too large; ")
    assert str(err.value).endswith("free on that disk; nothing complete was touched")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "precious"
