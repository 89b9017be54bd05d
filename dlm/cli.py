"""Command-line flags shared by the front ends (inference.py, evaluate.py, serve.py).

`SamplerArguments` are the sampler's flags; they stay free of torch so that bad flags are refused before
heavy imports, and `to_config` turns them into the sampler's validated `SamplerConfig`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dlm.errors import UsageError

logger = logging.getLogger(__name__)


def trained_canvas(model: str | None) -> dict | None:
    """The SFT canvas recorded in a checkpoint's dlm.json (`longest_answer`, `context_length`), if any.

    `model` is a checkpoint folder or a .safetensors file inside one; hub ids and older checkpoints
    have no record (None).
    """
    if not model:
        return None
    folder = Path(model) if Path(model).is_dir() else Path(model).parent
    try:
        canvas = json.loads((folder / "dlm.json").read_text()).get("sft_canvas")
    except (OSError, ValueError, AttributeError):
        return None
    return canvas if isinstance(canvas, dict) and canvas.get("longest_answer") else None


@dataclass
class SamplerArguments:
    """The sampler's command-line flags, shared by inference.py and evaluate.py (`to_config` checks them)."""

    seq_len: int | None = field(default=None, metadata={
        "help": "Total canvas length (prompt + generated), as in the reference recipe."})
    gen_length: int | None = field(default=None, metadata={
        "help": "Masks to generate after the prompt (excludes --seq_len). Default: the longest answer the "
                "checkpoint was fine-tuned on (recorded in its dlm.json), else 128 in inference.py, 16 in evaluate.py."})
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
    prompt_cache: Literal["auto", "off", "exact", "approx"] = field(default="auto", metadata={
        "help": "Prompt key/value cache: exact (model trained with --prompt_isolation: same tokens, the prompt "
                "runs once), approx (any model: prompt and finished blocks cached at each block start, "
                "Fast-dLLM's prefix cache; outputs may change), off, or auto (exact when the model was "
                "trained isolated, off otherwise)."})

    def to_config(self, default_gen_length: int, trained: dict | None = None):
        """The validated `SamplerConfig` of these flags (a `UsageError` names the bad flag).

        `trained` (see `trained_canvas`) is the canvas the model was fine-tuned on: it gives the default
        --gen_length, and a one-line warning when the canvas asked for is much longer than any it knows.
        """
        from dlm.sampling import SamplerConfig  # torch: imported only once the flags are parsed

        if self.seq_len is not None and self.gen_length is not None:
            raise UsageError("--seq_len (total canvas) and --gen_length (generated part) exclude each other: pass one")
        gen_length = self.gen_length
        if gen_length is None:
            gen_length = int(trained["longest_answer"]) if trained else default_gen_length
        if trained:
            longest, context = int(trained["longest_answer"]), trained.get("context_length")
            known = f"(its longest answer was {longest} tokens with the end-of-turn, in rows of at most {context})"
            # Answers padded with EOS to the context length taught every canvas up to it.
            limit = context if trained.get("answers_padded_to") == "context" and context else max(2 * longest, longest + 8)
            if self.seq_len is None and gen_length > limit:
                logger.warning("--gen_length %d is much longer than the canvases this model was fine-tuned on %s: "
                               "the extra masks may hurt its answers (default: %d)", gen_length, known, longest)
            elif self.seq_len is not None and context and self.seq_len > context:
                logger.warning("--seq_len %d is longer than the rows this model was fine-tuned on %s: the extra "
                               "masks may hurt its answers (default: --gen_length %d)", self.seq_len, known, longest)
        return SamplerConfig(
            gen_length=gen_length, seq_len=self.seq_len,
            steps=self.num_steps, block_length=self.block_length, strategy=self.strategy, threshold=self.threshold,
            entropy_bound=self.entropy_bound, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            cfg_scale=self.cfg_scale, stop_at_eos=not self.no_early_stop, prompt_cache=self.prompt_cache).validate()


@dataclass
class ModelSourceArguments(SamplerArguments):
    """Where the model comes from, for the front ends that generate (inference.py, serve.py), plus the sampler flags."""

    model: str | None = field(default=None, metadata={
        "aliases": ["--model_name_or_path"],
        "help": "Checkpoint folder (config.json, model.safetensors, tokenizer), a .safetensors file, or a hub id."})
    safetensors_path: str | None = field(default=None, metadata={
        "help": "Bare model.safetensors (reference recipe); its config and tokenizer come from --hf_model_name."})
    hf_model_name: str | None = field(default=None, metadata={
        "help": "Hub id or folder giving the config and tokenizer for --safetensors_path (or the model itself)."})
