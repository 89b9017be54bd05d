"""Shared command-line plumbing: one-line errors with exit status 2, and atomic outputs.

Every entry point wraps its `main` with `run_main`, raises `UsageError` for bad input,
and writes folders through `atomic_output_dir` so that a failure never leaves a
half-written result behind. `SamplerArguments` are the sampler flags that inference.py and
evaluate.py share (kept here, free of torch, so bad flags are refused before heavy imports).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

logger = logging.getLogger("dlm")


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported in one line, exit status 2."""


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


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
def atomic_output_dir(path: str | os.PathLike, flag: str = "--output", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on failure it is removed.

    The old content of `path` (only possible with overwrite) is deleted only after the new
    one is complete, so an interrupted run loses nothing that was already there.
    """
    final = check_output_dir(path, flag, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class SamplerArguments:
    """The sampler's command-line flags, shared by inference.py and evaluate.py (`to_config` checks them)."""

    seq_len: int | None = field(default=None, metadata={
        "help": "Total canvas length (prompt + generated), as in the reference recipe."})
    gen_length: int | None = field(default=None, metadata={
        "help": "Masks to generate after the prompt (excludes --seq_len; default 128 in inference.py, "
                "16 in evaluate.py)."})
    num_steps: int | None = field(default=None, metadata={
        "aliases": ["--steps"],
        "help": "Fixed-step budget over all blocks; must be a multiple of the number of blocks "
                "(default: one token per step)."})
    block_length: int | None = field(default=None, metadata={
        "help": "Semi-autoregressive block size (default: the whole generated region is one block)."})
    strategy: Literal["low_confidence", "random", "margin", "entropy"] = field(default="low_confidence", metadata={
        "aliases": ["--remasking"], "help": "Which masked positions are committed first (the confidence)."})
    threshold: float | None = field(default=None, metadata={
        "help": "Parallel decoding: commit every masked position of the block with confidence >= τ (at least one)."})
    entropy_bound: float | None = field(default=None, metadata={
        "help": "Parallel decoding: commit the largest set of positions whose summed entropy stays <= γ."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = argmax)."})
    top_k: int | None = field(default=None, metadata={"help": "Sample only among the k most likely tokens."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    cfg_scale: float = field(default=0.0, metadata={
        "help": "Classifier-free guidance scale w (0 = off; costs a second forward pass per step)."})
    no_early_stop: bool = field(default=False, metadata={
        "help": "Keep denoising after an end-of-turn/EOS instead of filling the rest with EOS."})
    no_chat_template: bool = field(default=False, metadata={
        "help": "Feed prompts as raw text instead of a user turn of the chat template."})

    def to_config(self, default_gen_length: int):
        """The validated `SamplerConfig` of these flags (a `UsageError` names the bad flag)."""
        from dlm.sampling import SamplerConfig  # torch: imported only once the flags are parsed

        if self.seq_len is not None and self.gen_length is not None:
            raise UsageError("--seq_len (total canvas) and --gen_length (generated part) exclude each other: pass one")
        return SamplerConfig(
            gen_length=default_gen_length if self.gen_length is None else self.gen_length, seq_len=self.seq_len,
            steps=self.num_steps, block_length=self.block_length, strategy=self.strategy, threshold=self.threshold,
            entropy_bound=self.entropy_bound, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            cfg_scale=self.cfg_scale, stop_at_eos=not self.no_early_stop).validate()
