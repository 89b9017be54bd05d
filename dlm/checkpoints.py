"""Trainer checkpoints that are complete or absent: atomic writes, a completeness check, and resume.

The Trainer writes `checkpoint-N/` in place, file by file, so a full disk or a kill leaves a folder
that `get_last_checkpoint` still picks (a 0-byte `trainer_state.json`, a truncated `optimizer.pt`),
and a resume then ends in a JSON, safetensors or zip traceback. Two defences:
  * `AtomicCheckpoints` (a Trainer mixin) lets the Trainer write into a hidden staging folder and
    renames it to `checkpoint-N` once every rank is done, so a reader never sees half a checkpoint;
  * `checkpoint_problem` says why a folder is not resumable (every file the Trainer writes must parse),
    so `--resume_from_checkpoint auto` falls back to the newest good one and a named one fails in one line.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
from transformers import TrainerState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints, sort_checkpoints

from dlm.errors import UsageError, folder_size, replace_dir, write_failure_message
from dlm.modeling import describe_key_problems, header_mismatches, safetensors_problem, weights_problem

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING = f".{PREFIX_CHECKPOINT_DIR}-staging"  # hidden: neither get_last_checkpoint nor rotation looks at it


def torch_file_problem(path: Path) -> str | None:
    """Why a Trainer state file (optimizer.pt, scheduler.pt, rng_state*.pth) cannot be resumed from, or None.

    Loaded exactly as the Trainer will (weights_only=True, numpy's RNG types allowed by its own
    `safe_globals`), but memory-mapped so that checking a multi-GB optimizer state reads only its pickle.
    """
    try:
        with safe_globals():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # torch's message advises re-running with weights_only=False: never the advice to give here.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it asks to call {found.group(1)})" if found else ""
        return f"{path.name} is not a plain tensor file{what}: refused to unpickle it"
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        return f"{path.name} is truncated or not a torch archive ({str(err).splitlines()[0][:120]})"
    # A plain tensor file of the wrong kind would fail inside load_state_dict with a KeyError traceback.
    needs = {"optimizer.pt": ("optimizer state", ("state", "param_groups")),
             "rng_state": ("RNG states", ("python", "numpy", "cpu"))}
    for prefix, (what, keys) in needs.items():
        if path.name.startswith(prefix) and not (isinstance(state, dict) and all(k in state for k in keys)):
            return f"{path.name} holds no {what} ({', '.join(keys)} expected)"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint (None if it is): every file the Trainer wrote must parse."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder" if folder.exists() else "no such folder"
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (the Trainer writes it last: the checkpoint was cut short)"
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return f"{path.name} is not valid JSON ({'empty file' if not path.stat().st_size else err})"
    try:  # parsed as the Trainer will parse it on resume
        TrainerState.load_from_json(str(folder / "trainer_state.json"))
    except (TypeError, ValueError, AttributeError) as err:
        return f"trainer_state.json is not a Trainer state ({str(err).splitlines()[0][:120]})"
    # Sharded formats (FSDP state-dict folders, DeepSpeed global_step*) are checked by their own loaders.
    sharded = any(folder.glob("pytorch_model_fsdp_*")) or any(folder.glob("global_step*"))
    if (folder / "adapter_model.safetensors").is_file():
        weights = safetensors_problem(folder / "adapter_model.safetensors")
    else:
        weights = None if sharded else weights_problem(folder)
    if weights:
        return weights
    # The Trainer restores the optimizer only when both files exist: one alone would resume with a fresh optimizer.
    halves = [n for n in ("optimizer.pt", "scheduler.pt") if (folder / n).is_file()]
    if len(halves) == 1 and not sharded:
        return f"{halves[0]} without {({'optimizer.pt', 'scheduler.pt'} - set(halves)).pop()}"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        if problem := torch_file_problem(path):
            return problem
    return None


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest `checkpoint-N` that passes `checkpoint_problem`; every newer one skipped is logged with the reason.

    Ordering is the Trainer's own (`sort_checkpoints`, by step); `get_last_checkpoint` cannot skip a damaged one.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [Path(p) for p in sort_checkpoints(str(folder)) if CHECKPOINT_RE.match(Path(p).name)]
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("--resume_from_checkpoint auto: skipping %s: %s", path, problem)
    return None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint auto|PATH` -> a checkpoint folder (or None to start fresh)."""
    if not resume:
        return None
    if resume == "auto":
        found = last_complete_checkpoint(output_dir)
        if found is None:
            logger.info("--resume_from_checkpoint auto: no complete checkpoint in %s, starting from scratch", output_dir)
            return None
        logger.info("resuming from %s", found)
        return str(found)
    if problem := checkpoint_problem(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint: {problem}")
    return resume


def check_resume_fits(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fit the model (another size or architecture).

    The Trainer would end in torch's size-mismatch traceback, or only warn about missing keys and
    resume silently from a partial load. Adapter (LoRA) and sharded checkpoints are left to their loaders.
    """
    folder = Path(checkpoint)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        return
    mismatched, unexpected = header_mismatches(model, files)
    if mismatched or unexpected:
        raise UsageError(f"--resume_from_checkpoint {folder} was written by another model, it does not fit "
                         f"{type(model).__name__}: {describe_key_problems([], unexpected, mismatched)}")


class AtomicCheckpoints:
    """Trainer mixin: `checkpoint-N/` appears only once complete, and a failed write is one line.

    The Trainer writes where `_get_output_dir` points; during a save that is `output_dir/STAGING`,
    so every rank writes `STAGING/checkpoint-N` with the Trainer's own code, and the main process
    renames it into place after all ranks are done. A write that fails (full disk, file-size limit)
    removes the staging folder and leaves every complete checkpoint as it was.
    """

    _staging_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / STAGING, run_dir / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed run left behind
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            done = [Path(p) for p in sort_checkpoints(str(run_dir)) if CHECKPOINT_RE.match(Path(p).name)]
            message = write_failure_message(err, staging / name, final, needed_label="the last checkpoint took",
                                            needed_bytes=folder_size(done[-1]) if done else None)
            shutil.rmtree(staging, ignore_errors=True)
            if message:
                raise UsageError(message) from None
            raise
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:  # the Trainer named the staging path as the best one
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            replace_dir(staging / name, final)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
