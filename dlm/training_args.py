"""The command-line arguments of pretrain.py and finetune_sft.py: model, data and training flags.

Reference recipe names first, Hugging Face names as aliases; the defaults are the recipe's (DESIGN §1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from dlm.diffusion import EPS
from dlm.errors import ArgumentParser, UsageError
from dlm.modeling import MODEL_CONFIGS

OBJECTIVES = ("pretrain", "sft")
_PER_GPU_BATCH_DEFAULT = 16  # the reference recipe's --per_gpu_batch_size


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelArguments:
    hf_model_name: str | None = field(default=None, metadata={
        "aliases": ["--model_name_or_path"],
        "help": "Masked LM to adapt (hub id or local folder, any AutoModelForMaskedLM); with --from_scratch "
                "only its tokenizer is used."})
    from_scratch: bool = field(default=False, metadata={
        "help": "Build a freshly initialised ModernBERT of --model_config size instead of loading weights."})
    model_config: str = field(default="tiny", metadata={
        "help": f"Size for --from_scratch: one of {', '.join(MODEL_CONFIGS)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    sparse_head: bool = field(default=True, metadata={
        "help": "Run the MLM head only on masked positions (--no_sparse_head computes full logits)."})
    lora: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (peft) on all linear layers; final_model/ holds the merged weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@dataclass
class SFTModelArguments(ModelArguments):
    path_to_pretrained_checkpoint: str | None = field(default=None, metadata={
        "help": "Diffusion-pretrained weights to fine-tune: a checkpoint folder, or a bare model.safetensors "
                "(then --hf_model_name gives config and tokenizer). Loading is strict."})


@dataclass
class DataArguments:
    path_to_prepped_data: str | None = field(default=None, metadata={
        "aliases": ["--dataset_path"],
        "help": "Folder written by prepare_pretrain_data.py / prepare_sft_data.py."})
    crop_probability: float = field(default=0.01, metadata={
        "help": "Pretraining: fraction of batches cropped to a random length in [1, L]."})
    mask_eps: float = field(default=EPS, metadata={"help": "Minimum mask probability eps in p = (1-eps)t + eps."})
    prompt_isolation: bool = field(default=False, metadata={
        "help": "Train with the prompt-isolation mask (prompt positions attend only to the prompt), so that "
                "sampling can cache the prompt exactly (--prompt_cache exact). SFT: the prompt is everything "
                "before the last answer turn; pretraining: a split point drawn per row, uniform over {0..L-1}. "
                "Recorded in the checkpoint (config.json and dlm.json)."})
    pad_answers_to_context: bool = field(default=False, metadata={
        "help": "SFT: pad every answer with EOS (scored as answer) to the prepared context length, as LLaDA does, so "
                "the model learns canvases up to that length (default: up to the longest row of each batch)."})


@dataclass
class DiffusionTrainingArguments(TrainingArguments):
    """TrainingArguments plus the reference-recipe flag names (DESIGN §1) and defaults for this task."""

    # Reference-recipe names that are plain aliases of Trainer fields.
    max_steps: int = field(default=-1, metadata={
        "aliases": ["--num_training_steps"], "help": "Total optimizer steps (overrides --num_train_epochs)."})
    eval_steps: float | None = field(default=500, metadata={
        "aliases": ["--evaluation_interval"], "help": "Evaluate the fixed-seed ELBO on the test split every N steps."})
    save_steps: float = field(default=500, metadata={
        "aliases": ["--checkpoint_interval"], "help": "Write a checkpoint-N folder every N steps."})
    warmup_steps: float = field(default=1000, metadata={
        "aliases": ["--num_warmup_steps"], "help": "Linear warmup steps (or a fraction of the run if < 1)."})
    # The reference recipe's defaults (pretrain.py), where they differ from TrainingArguments'.
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "Learning-rate schedule after warmup: linear, cosine, constant, ... (transformers' SchedulerType)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int | None = field(default=None, metadata={
        "help": "Sequences per device per forward pass (the micro-batch); when given it replaces "
                "--per_gpu_batch_size // --gradient_accumulation_steps."})
    per_device_eval_batch_size: int | None = field(default=None, metadata={
        "help": "Sequences per device per evaluation batch (default: the training micro-batch)."})
    # Defaults that differ from TrainingArguments.
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: no, steps or epoch."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    eval_on_start: bool = field(default=True, metadata={
        "help": "Evaluate before the first step, so the loss curve starts at the initial ELBO."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept False: the collators need the answer_mask column, which the model does not take."})
    # Reference-recipe flags with their own semantics.
    experiment_name: str | None = field(default=None, metadata={
        "help": "Run name; output goes to --working_directory/--experiment_name (or give --output_dir)."})
    working_directory: str = field(default="work_dir", metadata={"help": "Parent folder of experiment outputs."})
    per_gpu_batch_size: int = field(default=_PER_GPU_BATCH_DEFAULT, metadata={
        "help": "Sequences per GPU per optimizer step; must be divisible by --gradient_accumulation_steps "
                "(micro-batch = per_gpu_batch_size // gradient_accumulation_steps)."})
    log_wandb: bool = field(default=False, metadata={"help": "Report to Weights & Biases (same as --report_to wandb)."})
    # Same fields as TrainingArguments; the help says what mixed precision means here.
    bf16: bool = field(default=False, metadata={
        "help": "Compute in bfloat16 (autocast). The weights and optimizer stay fp32 (master weights): models "
                "are loaded for training in fp32 whatever dtype their checkpoint was stored in."})
    fp16: bool = field(default=False, metadata={
        "help": "Compute in float16 (autocast, loss scaling); weights stay fp32 as with --bf16."})

    def __post_init__(self):
        # Translate the recipe flags before TrainingArguments validates and freezes its fields.
        if self.experiment_name:
            self.output_dir = str(Path(self.working_directory) / self.experiment_name)
        if not self.output_dir:
            raise UsageError("--experiment_name (or --output_dir) is required")
        if self.per_device_train_batch_size is not None:  # the Hugging Face flag names the micro-batch itself
            if self.per_gpu_batch_size != _PER_GPU_BATCH_DEFAULT:
                raise UsageError("give --per_gpu_batch_size or --per_device_train_batch_size, not both")
        else:
            if self.per_gpu_batch_size < 1 or self.gradient_accumulation_steps < 1:
                raise UsageError("--per_gpu_batch_size and --gradient_accumulation_steps must be positive")
            if self.per_gpu_batch_size % self.gradient_accumulation_steps:
                raise UsageError(f"--per_gpu_batch_size {self.per_gpu_batch_size} is not divisible by "
                                 f"--gradient_accumulation_steps {self.gradient_accumulation_steps}")
            self.per_device_train_batch_size = self.per_gpu_batch_size // self.gradient_accumulation_steps
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.log_wandb:
            self.report_to = "wandb"
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Multi-process launch without GPUs (torchrun / accelerate on CPU): data parallel over gloo.
            # Without this accelerate would fall back to one non-distributed process per rank.
            self.use_cpu = True
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning is meaningless (and warns) without an accelerator
        if self.eval_steps is None or self.eval_steps <= 0:
            self.eval_strategy = "no"
        try:
            super().__post_init__()
        except ValueError as err:  # TrainingArguments' own validation: still a one-line usage error
            raise UsageError(str(err).splitlines()[0]) from None


@dataclass
class SFTTrainingArguments(DiffusionTrainingArguments):
    """DiffusionTrainingArguments with the reference recipe's fine-tuning defaults (finetune_sft.py)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    max_steps: int = field(default=30000, metadata={
        "aliases": ["--num_training_steps"], "help": "Total optimizer steps (overrides --num_train_epochs)."})
    save_steps: float = field(default=10000, metadata={
        "aliases": ["--checkpoint_interval"], "help": "Write a checkpoint-N folder every N steps."})


def argument_parser(objective: str, model_cls: type | None = None) -> ArgumentParser:
    """The command-line parser of pretrain.py (objective "pretrain") or finetune_sft.py ("sft")."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    model_cls = model_cls or (ModelArguments if objective == "pretrain" else SFTModelArguments)
    training_cls = DiffusionTrainingArguments if objective == "pretrain" else SFTTrainingArguments
    return ArgumentParser((model_cls, DataArguments, training_cls))
