"""How training runs over several devices: launch checks, cross-rank agreement, and the final save.

Two rules hold whatever the launch (single process, DDP, FSDP full or sharded, DeepSpeed ZeRO-2/3):

  * a combination that cannot end well is refused at start-up in one line, never after the run
    (nn.DataParallel, ZeRO-3 without gathering the weights at save time);
  * `final_model/` is a complete safetensors Hugging Face folder: every rank joins accelerate's
    `get_state_dict` (which gathers FSDP shards or ZeRO-3 partitions), and rank 0 writes the gathered
    weights; LoRA adapters are merged into those gathered weights, never into one rank's shard.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from dlm.errors import UsageError, replace_dir, write_failure_message
from dlm.modeling import unwrap

logger = logging.getLogger(__name__)


def check_launch(n_gpu: int, distributed: bool) -> None:
    """Refuse several GPUs in one process: the Trainer would wrap the model in nn.DataParallel.

    DataParallel replicates the model on every forward and scatters the batch, which breaks the
    sparse-head hook (it sees a replica's slice) and is slower than DDP anyway.
    """
    if n_gpu > 1 and not distributed:
        raise UsageError(f"{n_gpu} GPUs are visible to a single process (nn.DataParallel is not supported): "
                         f"start with `accelerate launch` or `torchrun --nproc_per_node {n_gpu}`, "
                         "or pick one GPU with CUDA_VISIBLE_DEVICES=0")


def check_deepspeed_save(zero_stage: int | None, gathers_16bit_weights: bool) -> None:
    """Refuse ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`: final_model/ could not be gathered."""
    if zero_stage == 3 and not gathers_16bit_weights:
        raise UsageError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save cannot write "
                         "final_model/ as safetensors: set zero3_save_16bit_model: true in the accelerate config "
                         "(or the key in the DeepSpeed JSON), as configs/accelerate/deepspeed_zero3.yaml does")


def check_sharded_setup(deepspeed: str | dict | None = None) -> None:
    """Start-up checks of the sharding configuration, read the way accelerate will read it.

    `deepspeed` is TrainingArguments.deepspeed (a JSON path or dict); otherwise the DeepSpeed settings
    come from `accelerate launch` (its ACCELERATE_* environment). DeepSpeedPlugin parses both without
    importing deepspeed, so the check runs before any model is loaded.
    """
    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    if not deepspeed and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed) if deepspeed else DeepSpeedPlugin()
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    check_deepspeed_save(int(zero.get("stage", plugin.zero_stage)),
                         bool(zero.get("stage3_gather_16bit_weights_on_model_save", plugin.zero3_save_16bit_model)))


def count_non_finite(loss: torch.Tensor, accelerator) -> int:
    """How many processes hold a non-finite loss: one all-reduce of a 0/1 flag, so every rank agrees.

    Under DDP/FSDP/DeepSpeed the backward pass has already averaged one rank's NaN gradients into
    every rank's, so a rank with a finite local loss must stop too, before its optimizer step.
    """
    flag = (~torch.isfinite(loss.detach()).all()).to(torch.int32).reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return int(flag.item())


def _merged_lora_copy(peft_model, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plain masked LM that `state` (a gathered PeftModel state dict) merges into, built on rank 0.

    The live model may be sharded (FSDP, ZeRO-3), so peft merges a fresh CPU copy that holds the
    gathered weights. The copy is built for real (not on the meta device) so that its tied embedding
    and decoder stay one tensor when the weights are copied in.
    """
    from peft import get_peft_model
    from transformers import AutoModelForMaskedLM

    dtype = next(iter(state.values())).dtype
    copy = get_peft_model(AutoModelForMaskedLM.from_config(unwrap(peft_model).config, dtype=dtype),
                          peft_model.peft_config[peft_model.active_adapter])
    copy.load_state_dict(state, strict=True)
    return copy.merge_and_unload()


def save_final_model(trainer, tokenizer, folder: str | Path, extra: dict) -> None:
    """Write `final_model/`: a complete HF folder (safetensors, config, tokenizer + chat template), atomically.

    Every rank joins the gather (accelerate's `get_state_dict`: FSDP shards and ZeRO-3 partitions are
    collected on rank 0); rank 0 writes the gathered weights into a temporary sibling and renames it
    into place, so an existing final_model/ is replaced only whole.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    accelerator = trainer.accelerator
    state = accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank joins
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(trainer.model)
        state = {k: v.detach().cpu() for k, v in state.items()}
        try:
            if hasattr(model, "merge_and_unload"):  # LoRA: merge the adapters into a plain masked LM
                _merged_lora_copy(model, state).save_pretrained(tmp, safe_serialization=True)
            else:
                unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "dlm.json").write_text(json.dumps(extra, indent=2))
        except Exception as err:
            message = write_failure_message(err, tmp, folder, needed_label="the weights alone take",
                                            needed_bytes=sum(v.numel() * v.element_size() for v in state.values()))
            shutil.rmtree(tmp, ignore_errors=True)
            if message:
                raise UsageError(message) from None
            raise
        replace_dir(tmp, folder)
    accelerator.wait_for_everyone()
