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
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from transformers import (AutoConfig, AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM,
                          PreTrainedModel, PreTrainedTokenizerFast)

from dlm.errors import UsageError, atomic_output_dir
from dlm.tokenization import EMBEDDING_MULTIPLE, load_tokenizer

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
    """The underlying transformers model inside DDP/FSDP/DeepSpeed/compile wrappers and a PEFT wrapper.

    What `accelerator.unwrap_model` does (accelerate's own function), then peft's `get_base_model`,
    for callers (the sampler, the sparse head) that hold a model but no accelerator.
    """
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    # The padding resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64) gives, without a model to resize.
    vocab = math.ceil(len(tokenizer) / EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    cfg = ModernBertConfig(
        vocab_size=vocab, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        **{**MODEL_CONFIGS[size], **overrides})
    return ModernBertForMaskedLM(cfg)


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Grow the embeddings (to a multiple of 64) only when the tokenizer has more tokens than rows.

    The guard is what the library call lacks: resize_token_embeddings(n, pad_to_multiple_of=64) also
    *shrinks* a model whose padded vocabulary is larger than the tokenizer (ModernBERT: 50368 rows).
    """
    current = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > current:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
        logger.info("resized embeddings %d -> %d for %d tokenizer entries", current,
                    model.get_input_embeddings().weight.shape[0], len(tokenizer))
    return model


def load_masked_lm(name_or_path: str, tokenizer: PreTrainedTokenizerFast | None = None,
                   dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                   flag: str = "--hf_model_name") -> PreTrainedModel:
    """Load any AutoModelForMaskedLM (hub id or folder); refuse models that are not masked LMs.

    `dtype=None` keeps the checkpoint's stored dtype (transformers' "auto"): right for inference;
    training passes torch.float32 so that the optimizer updates fp32 master weights.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {name_or_path!r}: cannot load a model config ({str(err).splitlines()[0]})") from None
    try:
        # use_safetensors: never fall back to unpickling a pytorch_model.bin (DESIGN §3: no pickle is loaded)
        model = AutoModelForMaskedLM.from_pretrained(name_or_path, config=config, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UsageError(f"{flag} {name_or_path!r} is not a masked language model "
                         f"({type(config).__name__}): {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise UsageError(f"{flag} {name_or_path!r}: cannot load weights ({str(err).splitlines()[0]})") from None
    if tokenizer is not None:
        resize_for_tokenizer(model, tokenizer)
    return model


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete safetensors file (None if it is).

    `safe_open` reads only the header and checks that it parses and covers the file exactly, so a
    file cut short by a full disk or a killed copy is caught for the cost of a few KB read.
    """
    path = Path(path)
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        return f"{path.name} is truncated or not a safetensors file ({str(err).split('header: ')[-1]})"
    return None


def weights_problem(folder: str | Path) -> str | None:
    """Why a model folder has no complete safetensors weights (None if it has them).

    The weights are `model.safetensors`, or the sharded index and every shard it lists (transformers'
    own names); a stray `junk.safetensors` next to a `pytorch_model.bin` does not count.
    """
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return safetensors_problem(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{index.name} is not a safetensors index ({err})"
        for shard in shards:
            if not (folder / shard).is_file():
                return f"{shard}, listed in {index.name}, is missing"
            if problem := safetensors_problem(folder / shard):
                return problem
        return None
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    found = f" (found {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles else ""
    return f"checkpoint has no model.safetensors (nor model.safetensors.index.json): partial or pickle-only{found}"


def header_mismatches(model: torch.nn.Module, files: list[Path]) -> tuple[list[str], list[str]]:
    """(mis-shaped, unexpected) keys of safetensors `files` against `model`, read from their headers only."""
    own = unwrap(model).state_dict()
    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    mismatched = sorted(f"{k} {shapes[k]} vs {tuple(own[k].shape)}"
                        for k in shapes if k in own and shapes[k] != tuple(own[k].shape))
    return mismatched, sorted(k for k in shapes if k not in own)


def describe_key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """'missing 2: a, b; mis-shaped 1: c (7,) vs (32,)': a few names of each kind, in one line."""
    parts = []
    for label, keys in (("missing", sorted(missing)), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            parts.append(f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    return "; ".join(parts)


def load_weights_strict(model: PreTrainedModel, safetensors_path: str | Path,
                        flag: str = "--path_to_pretrained_checkpoint") -> None:
    """Load a bare safetensors file into `model`; any missing, unexpected or mis-shaped key is an error.

    safetensors' `load_model` does the loading and the tied-weight bookkeeping; what it lacks is a
    one-line report (its error is a multi-line RuntimeError, and a shape mismatch is torch's own
    size-mismatch traceback), so shapes are checked from the header first. On error the model may be
    partly loaded: discard it.
    """
    path = Path(safetensors_path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    if problem := safetensors_problem(path):
        raise UsageError(f"{flag} {path}: {problem}")
    mismatched, unexpected = header_mismatches(model, [path])
    missing = []
    if not mismatched:
        missing, found_unexpected = load_model(model, str(path), strict=False)
        # load_model calls a tied alias that the file also holds "unexpected"; it was loaded (shared storage).
        unexpected = sorted(k for k in found_unexpected if k not in model.state_dict())
    if missing or unexpected or mismatched:
        raise UsageError(f"{flag} {path} does not fit {type(model).__name__}: "
                         + describe_key_problems(missing, unexpected, mismatched))


def load_checkpoint(path: str, hf_model_name: str | None = None, dtype: torch.dtype | None = None,
                    flag: str = "--model") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer from a checkpoint folder, or from a bare model.safetensors plus --hf_model_name."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag} {p}: not a checkpoint folder (no config.json)")
        if problem := weights_problem(p):
            raise UsageError(f"{flag} {p}: {problem}")
        tokenizer = load_tokenizer(str(p))
        return load_masked_lm(str(p), tokenizer, dtype=dtype, flag=flag), tokenizer
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise UsageError(f"{flag} {p}: no such file")
        if not hf_model_name:
            raise UsageError(f"{flag} {p} is a bare weights file: pass --hf_model_name for its config and tokenizer")
        tokenizer = load_tokenizer(hf_model_name)
        # Built in the requested dtype before the weights arrive: a bf16 --hf_model_name would otherwise
        # round an fp32 file to bf16 on its way into an fp32 training run.
        model = load_masked_lm(hf_model_name, tokenizer, dtype=dtype, flag="--hf_model_name")
        load_weights_strict(model, p, flag=flag)
        record = p.parent / "dlm.json"  # the training record next to the weights (e.g. prompt isolation)
        if record.is_file() and json.loads(record.read_text()).get("prompt_isolation"):
            model.config.prompt_isolation = True
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
