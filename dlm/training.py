"""The Trainer shared by pretraining and SFT, and the wiring of both scripts (their flags: `dlm.training_args`).

`DiffusionTrainer` is a `transformers.Trainer` whose loss is the masked-diffusion objective of
`dlm.diffusion`; everything else (accumulation, mixed precision, DDP/FSDP/DeepSpeed, checkpoints
and exact resume, schedules, logging) is the Trainer's own.

Noise is a pure function of (seed, optimizer step, global row): each draw seeds a fresh generator
instead of drawing from a stateful RNG. So a resumed run draws exactly the noise the uninterrupted
run would have drawn, and the times of one optimizer step are one antithetic set over all its
micro-batches and ranks, each rank drawing only its own rows: a 2-process run has the same times
and masks as a 1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Trainer, default_data_collator

from dlm.checkpoints import AtomicCheckpoints, check_resume_fits, resolve_resume
from dlm.data.collators import KeepRowIndex, RowIndexed, SFTCollator, longest_final_answer
from dlm.data.storage import PRETRAIN_FORMAT, SFT_FORMAT, load_prepared
from dlm.diffusion import EPS, antithetic_times, diffusion_loss, row_elbo_losses
from dlm.distributed import check_launch, check_sharded_setup, count_non_finite, save_final_model
from dlm.errors import UsageError
from dlm.isolation import batch_isolation_mask, check_supported, mark_isolated
from dlm.modeling import MODEL_CONFIGS, build_from_scratch, load_checkpoint, load_masked_lm
from dlm.tokenization import load_tokenizer, special_ids

logger = logging.getLogger(__name__)

from dlm.training_args import (OBJECTIVES, DataArguments, DiffusionTrainingArguments, ModelArguments,  # noqa: F401
                                SFTModelArguments, SFTTrainingArguments, argument_parser)

# ---------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: training stops before the optimizer applies the step."""


def _noise_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of integers (same on every process and every run)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 0x100000001B3 ^ (p & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class DiffusionTrainer(AtomicCheckpoints, Trainer):
    """Trainer with the masked-diffusion loss (DESIGN §4) and a fixed-seed ELBO as eval loss."""

    def __init__(self, *args, mask_id: int, objective: str = "pretrain", sparse_head: bool = True,
                 crop_probability: float = 0.01, mask_eps: float = EPS, prompt_isolation: bool = False, **kwargs):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}")
        super().__init__(*args, **kwargs)
        self.mask_id = mask_id
        self.objective = objective
        self.sparse_head = sparse_head
        self.crop_probability = crop_probability if objective == "pretrain" else 0.0
        self.mask_eps = mask_eps
        self.prompt_isolation = prompt_isolation
        # Our loss is a per-micro-batch mean: let the Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._noise_step, self._micro = -1, 0
        self._eval_rows_seen, self._eval_total = 0, 0
        if self.data_collator is not None:
            self.data_collator = KeepRowIndex(self.data_collator)

    # -- training -----------------------------------------------------------------------------
    def _generator(self, device: torch.device, *parts: int) -> torch.Generator:
        """A fresh generator seeded by (seed, optimizer step, *parts): the same on every rank and every run."""
        return torch.Generator(device=device).manual_seed(_noise_seed(self.args.seed, self.state.global_step, *parts))

    def _micro_index(self) -> int:
        """Index of this micro-batch within the current optimizer step (0 .. gradient_accumulation_steps - 1)."""
        if self.state.global_step != self._noise_step:
            self._noise_step, self._micro = self.state.global_step, 0
        self._micro += 1
        return self._micro - 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        maskable = inputs["answer_mask"].bool() if "answer_mask" in inputs else torch.ones_like(input_ids, dtype=torch.bool)
        if not model.training:  # only reached through Trainer internals; eval goes via prediction_step
            return self._eval_losses(model, inputs).mean()
        device, micro = input_ids.device, self._micro_index()
        world, rank = max(self.args.world_size, 1), self.args.process_index
        accumulation = max(self.args.gradient_accumulation_steps, 1)
        b, length = input_ids.shape
        # The crop decision belongs to the global micro-batch: seeded by (step, micro), all ranks agree.
        # Drawn on the CPU: the host needs it, and a draw on the GPU would stall the host until it is read.
        crop_draw = torch.rand(2, generator=self._generator(torch.device("cpu"), micro)).tolist()
        if crop_draw[0] < self.crop_probability:
            length = 1 + int(crop_draw[1] * length)
            input_ids, maskable = input_ids[:, :length], maskable[:, :length]
        # One stratified set per optimizer step: u is shared by every micro-batch and rank of the step, and
        # the rows of (micro, rank) take strata (micro * world + rank) * b ... of world * b * accumulation.
        first = (micro * world + rank) * b
        t = antithetic_times(b, self._generator(device), offset=first, total=world * b * accumulation)
        # Mask noise per global row: this rank draws only its own rows, identical whatever the world size.
        noise = torch.stack([torch.rand(length, generator=self._generator(device, -1, first + i), device=device)
                             for i in range(b)])
        # Split points (pretraining) from their own generator, shared by the ranks of this micro-batch.
        isolation = batch_isolation_mask(model, input_ids, maskable, self.objective == "pretrain",
                                         self._generator(device, micro, -2), world, rank) \
            if self.prompt_isolation else None
        loss = diffusion_loss(model, input_ids, maskable, self.mask_id, t, noise, sparse=self.sparse_head,
                              eps=self.mask_eps, attention_mask=isolation)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step and agreed by all ranks (gradients are already averaged), so
        # no rank steps and the weights (and every checkpoint) stay finite.
        bad = count_non_finite(loss, self.accelerator)
        if bad:
            world = self.accelerator.num_processes
            which = f" on {bad} of {world} processes (here {loss.item()})" if world > 1 else f" ({loss.item()})"
            raise NonFiniteLossError(
                f"non-finite training loss{which} at step {self.state.global_step + 1}; stopped "
                f"before applying it, the last good checkpoint in {self.args.output_dir} is intact")
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    # The eval loss is a property of the data: the mean over rows of each row's fixed-seed ELBO estimate
    # (`row_elbo_losses`: noise seeded by the row's index, SFT padding neither attended nor scored). The
    # batch size and the number of processes do not change it; every evaluation replays the same noise.
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # the Trainer names one of several eval sets
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._eval_total, self._eval_rows_seen = len(dataset), 0
        return super().evaluate(RowIndexed(dataset), ignore_keys, metric_key_prefix)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop gathers (row index, loss) pairs from every process; each row counts once."""
        import numpy as np
        from transformers.trainer_utils import EvalLoopOutput

        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        if output.predictions is None:
            return output
        metrics = dict(output.metrics)
        pairs = np.asarray(output.predictions, dtype=np.float64).reshape(-1, 2)
        # Distributed samplers pad the last batch with repeats of early rows: keep one copy of each row.
        _, first = np.unique(pairs[:, 0], return_index=True)
        losses = pairs[first, 1]
        metrics[f"{metric_key_prefix}_loss"] = float(losses.mean())
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(losses))

    def _eval_losses(self, model, inputs) -> torch.Tensor:
        """Per-row ELBO estimates [B] of a collated eval batch (rows numbered by `RowIndexed`)."""
        input_ids = inputs["input_ids"]
        maskable = inputs["answer_mask"].bool() if "answer_mask" in inputs else torch.ones_like(input_ids, dtype=torch.bool)
        padding = inputs.get("is_padding")
        if "row_index" in inputs:
            rows = inputs["row_index"].tolist()
        else:  # called outside `evaluate` (e.g. Trainer internals): number the rows as they come
            rows = list(range(self._eval_rows_seen, self._eval_rows_seen + len(input_ids)))
        self._eval_rows_seen = rows[-1] + 1
        isolation = None
        if self.prompt_isolation:  # scored as trained: split points of pretraining rows seeded by the first row
            isolation = batch_isolation_mask(
                model, input_ids, maskable if padding is None else maskable & ~padding, self.objective == "pretrain",
                torch.Generator().manual_seed(_noise_seed(self.args.seed, -2, rows[0])),
                attention_mask=None if padding is None else (~padding).long())
        return row_elbo_losses(model, input_ids, maskable, self.mask_id, rows, max(self._eval_total, rows[-1] + 1),
                               self.args.seed, padding, sparse=self.sparse_head, eps=self.mask_eps,
                               attention_mask=isolation)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """No loss here: (row index, loss) pairs travel as predictions, so `evaluation_loop` can count
        each row once across processes (the Trainer's own loss gathering repeats a batch mean)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses = self._eval_losses(model, inputs)
        rows = inputs["row_index"] if "row_index" in inputs else torch.arange(len(losses))
        return None, torch.stack([rows.to(losses.device, torch.float64), losses.double()], 1), None


# ---------------------------------------------------------------------------------------------
# Wiring shared by pretrain.py and finetune_sft.py
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_loading_bars():
    """Silence the per-tensor "Loading weights" bar: instant locally, and noise around a one-line error."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model_for_training(model_args: ModelArguments, context_length: int | None = None
                            ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The model to train and its (diffusion-prepared) tokenizer, from the model flags."""
    with _no_loading_bars():
        return _load_model_for_training(model_args, context_length)


def _load_model_for_training(model_args: ModelArguments, context_length: int | None
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    # fp32 master weights: a bf16 checkpoint loaded as stored would have the optimizer update bf16
    # parameters, where small updates round away; --bf16/--fp16 only set the compute precision.
    checkpoint = getattr(model_args, "path_to_pretrained_checkpoint", None)
    if checkpoint:
        return load_checkpoint(checkpoint, model_args.hf_model_name, dtype=torch.float32,
                               flag="--path_to_pretrained_checkpoint")
    if not model_args.hf_model_name:
        raise UsageError("--hf_model_name is required (the model to adapt, or the tokenizer source with --from_scratch)")
    tokenizer = load_tokenizer(model_args.hf_model_name, trust_remote_code=model_args.trust_remote_code)
    if model_args.from_scratch:
        return build_from_scratch(model_args.model_config, tokenizer,
                                  max_position_embeddings=max(8192, context_length or 0)), tokenizer
    return load_masked_lm(model_args.hf_model_name, tokenizer, dtype=torch.float32,
                          trust_remote_code=model_args.trust_remote_code), tokenizer


def apply_lora(model: PreTrainedModel, model_args: ModelArguments,
               tokenizer: PreTrainedTokenizerFast | None = None) -> torch.nn.Module:
    """Wrap the model with LoRA adapters on every linear layer except the output projection.

    With a tokenizer, the chat markers' embedding rows (and, tied, their decoder rows) train in full:
    they reuse reserved rows that pretraining never trained, so frozen they would stay noise.
    peft's trainable tokens merge into the plain embedding matrix like the adapters do.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora needs the peft package (pip install peft)") from None
    markers = None
    if tokenizer is not None:
        ids = special_ids(tokenizer)
        markers = sorted({ids.system, ids.user, ids.assistant, ids.eot})
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules="all-linear", trainable_token_indices=markers)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def check_reporters(report_to: list[str] | str | None) -> None:
    """Refuse `--report_to` integrations whose package is missing (the Trainer would fail with a traceback)."""
    from transformers import integrations

    needs = {"tensorboard": (integrations.is_tensorboard_available, "tensorboard"),
             "wandb": (integrations.is_wandb_available, "wandb")}
    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        if name in needs and not needs[name][0]():
            flag = f"--report_to {name}" + (" (--log_wandb)" if name == "wandb" else "")
            raise UsageError(f"{flag} needs the {needs[name][1]} package: pip install {needs[name][1]}")


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Train and eval loss against the optimizer step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and math.isfinite(e["loss"])]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval ELBO loss (fixed seed)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def run_training(objective: str, model_args: ModelArguments, data_args: DataArguments,
                 training_args: DiffusionTrainingArguments) -> DiffusionTrainer:
    """Load model and data, train with the diffusion objective, write final_model/ and loss_curve.png."""
    fmt = PRETRAIN_FORMAT if objective == "pretrain" else SFT_FORMAT
    if not data_args.path_to_prepped_data:
        raise UsageError("--path_to_prepped_data is required")
    if model_args.from_scratch and model_args.model_config not in MODEL_CONFIGS:
        raise UsageError(f"--model_config must be one of {', '.join(MODEL_CONFIGS)}, got {model_args.model_config!r}")
    check_reporters(training_args.report_to)
    check_launch(training_args.n_gpu, training_args.parallel_mode.value != "not_distributed")
    check_sharded_setup(training_args.deepspeed)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    # The tokenizer comes first: prepared data is checked against it before any model is loaded.
    if getattr(model_args, "path_to_pretrained_checkpoint", None) or not model_args.hf_model_name:
        model, tokenizer = load_model_for_training(model_args)
        datasets, meta = load_prepared(data_args.path_to_prepped_data, fmt, tokenizer)
    else:
        tokenizer = load_tokenizer(model_args.hf_model_name, trust_remote_code=model_args.trust_remote_code)
        datasets, meta = load_prepared(data_args.path_to_prepped_data, fmt, tokenizer)
        model, tokenizer = load_model_for_training(model_args, context_length=meta.get("context_length"))
    if resume:
        check_resume_fits(model, resume)
    ids = special_ids(tokenizer)
    train_set = datasets["train"]
    eval_set = datasets["test"] if "test" in datasets and len(datasets["test"]) else None
    if len(train_set) == 0:
        raise UsageError(f"--path_to_prepped_data {data_args.path_to_prepped_data}: the train split is empty")
    if eval_set is None and training_args.eval_strategy != "no":
        logger.warning("no test split: evaluation disabled")
        training_args.eval_strategy = "no"
        training_args.eval_on_start = False
    if data_args.prompt_isolation:
        check_supported(model)
    mark_isolated(model, data_args.prompt_isolation)  # saved in config.json, so inference knows
    if model_args.lora:
        model = apply_lora(model, model_args, tokenizer)
    collator = default_data_collator if objective == "pretrain" else SFTCollator(
        pad_id=ids.eos, pad_to_length=meta.get("context_length") if data_args.pad_answers_to_context else None)

    trainer = DiffusionTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=tokenizer, mask_id=ids.mask, objective=objective, sparse_head=model_args.sparse_head,
        crop_probability=data_args.crop_probability, mask_eps=data_args.mask_eps,
        prompt_isolation=data_args.prompt_isolation)
    trainer.train(resume_from_checkpoint=resume)

    out = Path(training_args.output_dir)
    extra = {"objective": objective, "mask_eps": data_args.mask_eps, "prompt_isolation": data_args.prompt_isolation,
             "prepared_data": str(data_args.path_to_prepped_data),
             "tokenizer_fingerprint": meta.get("tokenizer_fingerprint")}
    if objective == "sft":  # the canvas the model knows: the sampling front ends default to it
        extra["sft_canvas"] = {"longest_answer": longest_final_answer(train_set), "context_length": meta.get(
            "context_length"), "answers_padded_to": "context" if data_args.pad_answers_to_context else "batch"}
    save_final_model(trainer, tokenizer, out / "final_model", extra=extra)
    if trainer.is_world_process_zero():
        plot_loss_curve(trainer.state.log_history, out / "loss_curve.png", title=out.name)
        evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        if evals:
            logger.info("eval loss: first %.4f, last %.4f", evals[0], evals[-1])
    return trainer


def train_main(objective: str, model_cls: type = ModelArguments) -> int:
    """Entry point of both scripts: parse the flags, train, report a non-finite loss in one line."""
    from dlm.errors import setup_logging

    parser = argument_parser(objective, model_cls)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    setup_logging()
    try:
        run_training(objective, model_args, data_args, training_args)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return 1
    return 0
