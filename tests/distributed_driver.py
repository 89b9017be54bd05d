"""Driver of the 2-process tests (tests/test_distributed.py): real pretraining runs with a few probes.

    python -m accelerate.commands.launch --config_file ... tests/distributed_driver.py MODE [pretrain.py flags]

MODE `strata_nan`: record the noise levels t of every micro-batch, record which optimizer steps ran
  (a TrainerCallback), and make rank 1's loss NaN at step DLM_TEST_NAN_STEP; each rank writes rank{i}.json.
MODE `fsdp_resume`: train and stop after step DLM_TEST_STOP_AT (as if killed after that checkpoint), train
  again resuming from the sharded checkpoint, and once more uninterrupted (output dir + "_ref"); after each
  run rank 0 writes the gathered training weights (accelerate's get_state_dict) to gathered_<name>.safetensors.
  accelerate maps every CPU launch to DDP (MULTI_CPU) and ignores its FSDP settings, although torch FSDP
  runs on CPU over gloo: this mode declares the launch a multi-device one whose device is the CPU, so
  that accelerate really shards the model (FSDP2) the way it does on GPUs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MODE, FLAGS = sys.argv[1], sys.argv[2:]

if MODE == "fsdp_resume":
    import accelerate.state as accelerate_state
    from accelerate.utils import DistributedType

    torch.distributed.init_process_group("gloo")
    _prepare_backend = accelerate_state.PartialState._prepare_backend

    def _fsdp_capable_backend(self, *args, **kwargs):
        backend, kind = _prepare_backend(self, *args, **kwargs)
        return backend, DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind

    accelerate_state.PartialState._prepare_backend = _fsdp_capable_backend
    accelerate_state.PartialState.set_device = lambda self: setattr(self, "device", torch.device("cpu"))

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import dlm.training as training  # noqa: E402
from dlm.errors import ArgumentParser, setup_logging  # noqa: E402
from dlm.training import (DataArguments, DiffusionTrainer, DiffusionTrainingArguments, ModelArguments,  # noqa: E402
                          NonFiniteLossError, run_training)


setup_logging()


def with_callback(callback: TrainerCallback) -> None:
    """Every DiffusionTrainer built from now on gets `callback` (run_training builds its own trainer)."""
    real_init = DiffusionTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(callback)

    DiffusionTrainer.__init__ = init


def parse(flags: list[str]):
    return ArgumentParser((ModelArguments, DataArguments, DiffusionTrainingArguments)).parse_args_into_dataclasses(flags)


def gathered(trainer, name: str) -> None:
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # every rank joins the gather
    if trainer.is_world_process_zero():
        out = Path(trainer.args.output_dir).parent / f"gathered_{name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out))
        info = {"distributed_type": str(trainer.accelerator.distributed_type), "fsdp2": trainer.accelerator.is_fsdp2,
                "param_type": type(next(trainer.model_wrapped.parameters())).__name__}
        (out.with_suffix(".json")).write_text(json.dumps(info))


if MODE == "strata_nan":
    nan_step = int(os.environ["DLM_TEST_NAN_STEP"])
    record: dict = {"times": [], "stepped": [], "error": None}
    real_loss, real_compute_loss = training.diffusion_loss, DiffusionTrainer.compute_loss

    def diffusion_loss(model, input_ids, maskable, mask_id, t, noise, *args, **kwargs):
        record["times"].append({"t": t.tolist()})
        return real_loss(model, input_ids, maskable, mask_id, t, noise, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        seen = len(record["times"])
        loss = real_compute_loss(self, model, inputs, *args, **kwargs)
        for entry in record["times"][seen:]:
            entry["step"] = self.state.global_step + 1
        if self.state.global_step + 1 == nan_step and self.args.process_index == 1:
            loss = loss * float("nan")
        return loss

    class StepRecorder(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            record["stepped"].append(state.global_step + 1)

    training.diffusion_loss, DiffusionTrainer.compute_loss = diffusion_loss, compute_loss
    with_callback(StepRecorder())
    _, _, targs = parse(FLAGS)
    try:
        run_training("pretrain", *parse(FLAGS))
    except NonFiniteLossError as err:
        record["error"] = str(err)
    rank = int(os.environ.get("RANK", "0"))
    Path(targs.output_dir, f"rank{rank}.json").write_text(json.dumps(record))
    sys.exit(1 if record["error"] else 0)

elif MODE == "fsdp_resume":
    class StopAt(TrainerCallback):
        stop_at = int(os.environ["DLM_TEST_STOP_AT"])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.stop_at:
                control.should_save = control.should_training_stop = True

    stop = StopAt()
    with_callback(stop)
    gathered(run_training("pretrain", *parse(FLAGS)), "first")
    stop.stop_at = -1
    gathered(run_training("pretrain", *parse(FLAGS + ["--resume_from_checkpoint=auto"])), "resumed")
    _, _, targs = parse(FLAGS)
    gathered(run_training("pretrain", *parse(FLAGS + [f"--output_dir={targs.output_dir}_ref", "--experiment_name="])),
             "reference")
