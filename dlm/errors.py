"""The ground floor: one-line usage errors with exit status 2, the argument parser that reports them, and atomic outputs.

Every entry point wraps its `main` with `run_main`, raises `UsageError` for bad input, and writes
folders through `atomic_output_dir` so that a failure never leaves a half-written result behind.
This module imports nothing from dlm, so every other module may import it.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers import HfArgumentParser

logger = logging.getLogger("dlm")


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported in one line, exit status 2."""


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (no usage dump) with exit status 2.

    An unknown flag names the closest real one: HfArgumentParser raises a ValueError listing every
    leftover string instead, a traceback for the most common typo of all.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings: bool = False, **kwargs):
        if not return_remaining_strings:
            # Before the dataclasses are built: a typo in a required flag is reported as the typo.
            _, remaining = self.parse_known_args(args)
            if remaining:
                self.error(self.unknown_argument_message(remaining))
        return super().parse_args_into_dataclasses(args, return_remaining_strings=return_remaining_strings, **kwargs)

    def unknown_argument_message(self, remaining: list[str]) -> str:
        """'unrecognized argument --learnig_rate: did you mean --learning_rate?' for the first leftover string."""
        flags = [f for f in remaining if f.startswith("-")]
        if not flags:
            return f"unexpected value {remaining[0]!r}: every value follows its flag (see --help)"
        flag = flags[0].split("=", 1)[0]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see --help for the flags"
        return f"unrecognized argument {flag}: {hint}"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stderr)


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point: `UsageError` becomes `error: ...` on stderr and exit status 2."""
    try:
        code = main()
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(code or 0)


def check_output_dir(path: str | os.PathLike, flag: str, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless --overwrite was given."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {path} already exists and is not empty (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, flag: str = "--output", overwrite: bool = False,
                      needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on failure it is removed.

    The old content of `path` (only possible with overwrite) is deleted only after the new
    one is complete, so an interrupted run loses nothing that was already there. A write that runs
    out of room is one line naming the output (and `needed_bytes`, the expected size, when known).
    """
    final = check_output_dir(path, flag, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException as err:
        message = write_failure_message(err, tmp, final, needed_bytes) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if message:  # a full disk or a file-size limit: one line naming the output
            raise UsageError(message) from None
        raise
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`; an old `final` is deleted only once the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# errno values of a write that ran out of room: a full disk, a file-size limit (RLIMIT_FSIZE), a quota.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What torch.save (C++ stream writer) and safetensors (Rust) say instead of raising an OSError.
_WRITER_FAILURES = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed", "I/O error")


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of all files below `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _human(n: float) -> str:
    """1536 -> '1.5 KB'."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def write_failure_message(err: BaseException, written: str | os.PathLike, target: str | os.PathLike,
                          needed_bytes: int | None = None, needed_label: str = "a complete one takes about") -> str | None:
    """One line for an error raised while writing the folder `written` (that becomes `target`), or None.

    None means the error is not a failed write (it should propagate as it is). Otherwise the line
    names the target, the file being written, the reason (full disk, file-size limit), the free
    space and, when known, about how much a complete write needs.
    """
    reason, at = None, None
    chain, seen = [err], set()
    while chain:
        e = chain.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            reason, at = os.strerror(e.errno), e.filename and Path(e.filename).name
        elif (m := re.search(r"os error (\d+)", text)) and int(m.group(1)) in _NO_ROOM:
            reason = os.strerror(int(m.group(1)))
            if type(e).__name__ == "SafetensorError":  # safetensors removes the file it failed to write
                at = "the .safetensors weights"
        elif reason is None and isinstance(e, (OSError, RuntimeError)) and any(w in text for w in _WRITER_FAILURES):
            reason = "the file could not be written (disk full or a file-size limit?)"
        chain += [e.__cause__, e.__context__]
    if reason is None:
        return None
    written, target = Path(written), Path(target)
    where = target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    # The caller removes the partial folder: report the room there will be once it is gone.
    free = shutil.disk_usage(where).free + (folder_size(written) if written.is_dir() else 0)
    if reason.endswith("?)"):  # torch's writer does not say why: tell a file-size limit from a full disk
        size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if size_limit != resource.RLIM_INFINITY:
            reason = f"{os.strerror(errno.EFBIG)} (the file-size limit, ulimit -f, is {_human(size_limit)})"
        elif free < 64 * 2**20:
            reason = os.strerror(errno.ENOSPC)
    if at is None and written.is_dir():  # torch.save leaves its partial file: the newest one
        files = sorted((p for p in written.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
        at = str(files[-1].relative_to(written)) if files else None
    at = f" at {at}" if at else ""
    need = f", {needed_label} {_human(needed_bytes)}" if needed_bytes else ""
    return f"writing {target} failed{at}: {reason}; {_human(free)} free on that disk{need}; nothing complete was touched"
