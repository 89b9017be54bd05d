"""Loading and saving any masked LM, from-scratch configs, and the sparse MLM head.

Sparse head: a diffusion step only needs logits at the masked positions, and for a 50k
vocabulary the output projection is a large share of the compute and memory. Instead of
re-implementing each architecture's head, `selected_logits` puts a forward pre-hook on the
module that receives the final hidden states (`head` in ModernBERT, `cls` in BERT, `lm_head`
in RoBERTa): the hook gathers the selected rows, so the head and the vocabulary projection
run on N rows instead of B*L. Because it is a hook on the real submodule, it works through
DDP/FSDP/PEFT wrappers, gradient flow is unchanged, and state-dict keys are untouched.
Architectures not in the table fall back to full logits followed by the same gather.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM,
                          PreTrainedModel, PreTrainedTokenizerFast)

from dlm.errors import UsageError, atomic_output_dir
from dlm.tokenization import embedding_size_for, load_tokenizer

logger = logging.getLogger(__name__)

# Attribute of the MLM head that receives the encoder's [B, L, H] hidden states, per architecture.
SPARSE_HEAD_MODULES = {
    "ModernBertForMaskedLM": "head",
    "BertForMaskedLM": "cls",
    "RobertaForMaskedLM": "lm_head",
    "XLMRobertaForMaskedLM": "lm_head",
    "CamembertForMaskedLM": "lm_head",
    "DebertaV2ForMaskedLM": "cls",
    "ElectraForMaskedLM": "generator_predictions",
}

# ModernBERT sizes for --from_scratch. "base" is ModernBERT-base's shape.
MODEL_CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=384, intermediate_size=576, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model inside DDP/FSDP/DeepSpeed/PEFT/compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def sparse_head_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The head submodule that the sparse-logits hook attaches to, or None (full-logits fallback)."""
    base = unwrap(model)
    name = SPARSE_HEAD_MODULES.get(type(base).__name__)
    return getattr(base, name, None) if name else None


# A training step pads its selected-row count up to one of at most this many sizes per batch shape, so the
# head, the logits and their gradients come in a few shapes only: allocators (glibc on CPU, the CUDA caching
# allocator) then reuse freed blocks instead of keeping ever new ones, and torch.compile sees few shapes.
ROW_BUCKETS = 32


def padded_row_count(n: int, total: int, buckets: int = ROW_BUCKETS) -> int:
    """`n` rounded up to the next multiple of ceil(total / buckets) (a multiple of 8), at most `total`."""
    step = -(-max(1, -(-total // buckets)) // 8) * 8
    return min(total, max(step, -(-n // step) * step))


def selected_rows(select: torch.Tensor, static: bool = False) -> tuple[torch.Tensor, int]:
    """Row-major flat positions of the True entries of `select` [B, L], and their count n.

    With `static=True` the positions are padded (with position 0) up to `padded_row_count`: rows n and
    after are padding, which the caller must ignore. The count is the one host sync a sparse step needs.
    """
    index = select.flatten().nonzero().squeeze(1)
    n = index.numel()
    if static:
        pad = padded_row_count(n, select.numel()) - n
        if pad:
            index = torch.cat([index, index.new_zeros(pad)])
    return index, n


def selected_logits(model: torch.nn.Module, input_ids: torch.Tensor, select: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, sparse: bool = True,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the positions where `select` [B, L] is True, as [N, V] in row-major order.

    `model` may be wrapped (DDP, FSDP, PEFT): it is always called through its own forward.
    With `sparse=False` (or an architecture without a known head) the full [B, L, V] logits
    are computed and gathered: same values, more compute. `index` (from `selected_rows`, possibly
    padded) gives the flat positions to gather instead of `select`, one output row per entry.
    """
    if index is None:
        index, _ = selected_rows(select)
    head = sparse_head_module(model) if sparse else None
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.flatten(0, 1).index_select(0, index)

    def gather_rows(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == select.shape:
            return (hidden.flatten(0, 1).index_select(0, index),) + tuple(args[1:])
        # Some attention kernels return unpadded [T, H] states: map the positions onto the kept tokens.
        if attention_mask is not None and hidden.dim() == 2 and hidden.shape[0] == int(attention_mask.sum()):
            kept = attention_mask.flatten().bool().cumsum(0) - 1
            return (hidden.index_select(0, kept.clamp(min=0)[index]),) + tuple(args[1:])
        raise RuntimeError(f"sparse head: unexpected hidden-state shape {tuple(hidden.shape)}")

    handle = head.register_forward_pre_hook(gather_rows)
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()


def is_masked_lm(model: torch.nn.Module) -> bool:
    return type(unwrap(model)).__name__.endswith("ForMaskedLM")


def build_from_scratch(size: str, tokenizer: PreTrainedTokenizerFast, max_position_embeddings: int = 8192,
                       **overrides) -> ModernBertForMaskedLM:
    """A freshly initialised ModernBERT of a named size, with the tokenizer's vocabulary."""
    if size not in MODEL_CONFIGS:
        raise UsageError(f"--model_config must be one of {', '.join(MODEL_CONFIGS)}, got {size!r}")
    vocab = embedding_size_for(tokenizer, 0)  # len(tokenizer) rounded up to a multiple of 64
    cfg = ModernBertConfig(
        vocab_size=vocab, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        **{**MODEL_CONFIGS[size], **overrides})
    return ModernBertForMaskedLM(cfg)


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Grow the embeddings (to a multiple of 64) only when the tokenizer has more tokens than rows."""
    current = model.get_input_embeddings().weight.shape[0]
    target = embedding_size_for(tokenizer, current)
    if target != current:
        logger.info("resizing embeddings %d -> %d for %d tokenizer entries", current, target, len(tokenizer))
        model.resize_token_embeddings(target)
    return model


def load_masked_lm(name_or_path: str, tokenizer: PreTrainedTokenizerFast | None = None,
                   dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                   flag: str = "--hf_model_name") -> PreTrainedModel:
    """Load any AutoModelForMaskedLM (hub id or folder); refuse models that are not masked LMs."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {name_or_path!r}: cannot load a model config ({str(err).splitlines()[0]})") from None
    try:
        model = AutoModelForMaskedLM.from_pretrained(name_or_path, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UsageError(f"{flag} {name_or_path!r} is not a masked language model "
                         f"({type(config).__name__}): {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise UsageError(f"{flag} {name_or_path!r}: cannot load weights ({str(err).splitlines()[0]})") from None
    if tokenizer is not None:
        resize_for_tokenizer(model, tokenizer)
    return model


def load_weights_strict(model: PreTrainedModel, safetensors_path: str | Path,
                        flag: str = "--path_to_pretrained_checkpoint") -> None:
    """Load a bare safetensors file into `model`; any missing, unexpected or mis-shaped key is an error."""
    path = Path(safetensors_path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise UsageError(f"{flag} {path}: not a readable safetensors file ({err})") from None
    own = model.state_dict()
    tied = _tied_keys(model)
    missing = sorted(k for k in own if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise UsageError(f"{flag} {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _tied_keys(model: PreTrainedModel) -> set[str]:
    """State-dict keys that are tied to another parameter (absent from safetensors on purpose)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.add(name)
        else:
            seen[ptr] = name
    return tied


def load_checkpoint(path: str, hf_model_name: str | None = None, dtype: torch.dtype | None = None,
                    flag: str = "--model") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer from a checkpoint folder, or from a bare model.safetensors plus --hf_model_name."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag} {p}: not a checkpoint folder (no config.json)")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.safetensors.index.json")):
            raise UsageError(f"{flag} {p}: checkpoint has no model.safetensors (partial or pickle-only checkpoint)")
        tokenizer = load_tokenizer(str(p))
        return load_masked_lm(str(p), tokenizer, dtype=dtype, flag=flag), tokenizer
    if p.suffix == ".safetensors":
        if not hf_model_name:
            raise UsageError(f"{flag} {p} is a bare weights file: pass --hf_model_name for its config and tokenizer")
        tokenizer = load_tokenizer(hf_model_name)
        model = load_masked_lm(hf_model_name, tokenizer, flag="--hf_model_name")
        load_weights_strict(model, p, flag=flag)
        if dtype is not None:
            model = model.to(dtype)
        return model, tokenizer
    raise UsageError(f"{flag} {p}: expected a checkpoint folder or a .safetensors file")


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: str | Path,
                           extra: dict | None = None, save_fn: Callable[[Path], None] | None = None) -> None:
    """Write a complete Hugging Face folder (safetensors, config, tokenizer with chat template) atomically."""
    with atomic_output_dir(folder, flag="output", overwrite=True) as tmp:
        (save_fn or (lambda d: unwrap(model).save_pretrained(d, safe_serialization=True)))(tmp)
        tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "dlm.json").write_text(json.dumps(extra, indent=2))
