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
