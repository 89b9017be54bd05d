"""Prompt-cached denoisers for encoders (ModernBERT, BERT, RoBERTa), behind the sampler's `Denoiser` seam.

Every denoising step of the plain sampler runs the whole canvas (prompt + answer) through every layer.
In an encoder the prompt attends to the canvas, so its hidden states change from step to step, and a
cache of them is only *exact* for a model trained with the prompt-isolation mask (`dlm.isolation`):

  exact   (model trained with --prompt_isolation) the first step runs the full isolated forward and
          keeps each layer's keys/values of the prompt positions (after RoPE for ModernBERT); every
          later step runs only the positions after the prompt, attending to [prompt K/V ; own K/V] at
          their true positions, with padding and ModernBERT's sliding window applied as in the full
          forward. The logits equal the full isolated forward's (tests: 1e-5 in fp32).
  approx  (any model; Fast-dLLM's prefix cache) at the start of each block the full plain forward runs
          and the K/V of everything before the block (prompt + finished blocks) are kept; the steps
          inside the block run the block and the masks after it against them. The prefix's states are
          those of the block start, so results may differ from `off`; the cost is measured in
          benchmarks/RESULTS.md. (Fast-dLLM's dual cache, which also freezes the masks after the block,
          is not implemented: with 64-token answers it would save little next to the prompt.)
  off     the full forward every step (with the isolation mask when the model was trained with it).

Rows are tracked by the sampler's row numbers: a row's prompt is what precedes its first mask the first
time the row is seen (the sampler's region start), and a row whose cached prefix no longer matches its
canvas is recomputed, so rows may leave (or a new prompt take a number) without stale state. Rows with
different prompt lengths share one batched pass: prefixes are right-padded and masked. The cache lives
as long as the denoiser, i.e. one `generate` batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dlm.errors import UsageError
from dlm.isolation import is_isolated, isolation_attention_mask
from dlm.modeling import SPARSE_HEAD_MODULES, selected_logits, unwrap
from dlm.sampler_config import PROMPT_CACHE_MODES as MODES

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------
# Architectures: the few per-model operations the cached layer loop needs, using the model's own modules


class _ModernBert:
    """ModernBERT: pre-norm layers, fused Wqkv, RoPE (per layer type), sliding-window local layers."""

    def __init__(self, lm: torch.nn.Module):
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        cfg = lm.config
        self.lm, self.enc, self.layers = lm, lm.model, lm.model.layers
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
        self._rotate = apply_rotary_pos_emb
        self._rope: dict = {}

    def positions(self, canvas: torch.Tensor) -> torch.Tensor:
        return torch.arange(canvas.shape[1], device=canvas.device).expand_as(canvas)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.enc.embeddings(input_ids=ids)
        self._rope = {t: self.enc.rotary_emb(h, positions, t) for t in set(self.lm.config.layer_types)}
        return h

    def qkv(self, i: int, h: torch.Tensor):
        layer = self.layers[i]
        b, t, _ = h.shape
        q, k, v = layer.attn.Wqkv(layer.attn_norm(h)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self._rope[layer.attention_type]
        q, k = self._rotate(q, k, cos, sin)
        return q, k, v

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.attn.out_drop(layer.attn.Wo(attn))
        return h + layer.mlp(layer.mlp_norm(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.decoder(self.lm.head(self.enc.final_norm(h)))


class _Bert:
    """BERT and RoBERTa: post-norm layers, separate q/k/v, absolute position embeddings."""

    def __init__(self, lm: torch.nn.Module):
        cfg = lm.config
        self.lm, self.enc = lm, getattr(lm, lm.base_model_prefix)
        self.layers = self.enc.encoder.layer
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.windows = [None] * len(self.layers)
        self._head = getattr(lm, SPARSE_HEAD_MODULES[type(lm).__name__])

    def positions(self, canvas: torch.Tensor) -> torch.Tensor:
        emb = self.enc.embeddings
        if hasattr(emb, "create_position_ids_from_input_ids"):  # RoBERTa: padding_idx + 1 + index
            return emb.create_position_ids_from_input_ids(canvas, emb.padding_idx)
        return torch.arange(canvas.shape[1], device=canvas.device).expand_as(canvas)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.enc.embeddings(input_ids=ids, position_ids=positions)

    def qkv(self, i: int, h: torch.Tensor):
        sa = self.layers[i].attention.self
        b, t, _ = h.shape
        return tuple(lin(h).view(b, t, self.heads, self.head_dim).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return layer.feed_forward_chunk(layer.attention.output(attn, h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self._head(h)


_ARCHITECTURES = {"ModernBertForMaskedLM": _ModernBert, "BertForMaskedLM": _Bert, "RobertaForMaskedLM": _Bert,
                  "XLMRobertaForMaskedLM": _Bert, "CamembertForMaskedLM": _Bert}


def cacheable(model: torch.nn.Module) -> bool:
    """True when the cached forward knows this architecture (and its attention takes a mask)."""
    base = unwrap(model)
    impl = getattr(base.config, "_attn_implementation", None) or "sdpa"
    return type(base).__name__ in _ARCHITECTURES and "flash" not in impl


# ---------------------------------------------------------------------------------------------------------
# Denoisers


class _Rows:
    """Per-row prompt lengths, fixed the first time a row is seen (its first mask = the sampler's region start)."""

    def __init__(self, model: torch.nn.Module, mask_id: int):
        self.model, self.mask_id = model, mask_id
        self.device = next(model.parameters()).device
        self.max_positions = getattr(unwrap(model).config, "max_position_embeddings", None)
        self.prompts: dict[int, torch.Tensor] = {}  # row number -> its prompt ids

    def prompt_lengths(self, canvas: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> list[int]:
        cols = torch.arange(canvas.shape[1], device=canvas.device).expand_as(canvas)
        first_mask = torch.where((canvas == self.mask_id) & attention_mask.bool(), cols, canvas.shape[1]).amin(1)
        out = []
        for b, r in enumerate(rows.tolist()):
            known = self.prompts.get(r)
            if known is None or not torch.equal(canvas[b, :len(known)], known):
                known = self.prompts[r] = canvas[b, :int(first_mask[b])].clone()
            out.append(len(known))
        return out

    def forget(self, rows: list[int]) -> None:
        """These row ids left the batch for good (a server's rows come and go): drop their state."""
        for r in rows:
            self.prompts.pop(r, None)


class IsolatedDenoiser(_Rows):
    """The full forward with the prompt-isolation mask (`--prompt_cache off` on an isolated model)."""

    def logits(self, canvas, attention_mask, select, rows):
        p = torch.tensor(self.prompt_lengths(canvas, attention_mask, rows), device=canvas.device)
        mask = isolation_attention_mask(self.model, canvas, p, attention_mask)
        return selected_logits(self.model, canvas, select, mask)


class _Segment:
    """Keys/values of the prefixes of the rows refreshed together: per layer [rows, heads, longest, head_dim]."""

    def __init__(self, kv: list, lengths: torch.Tensor):
        self.kv, self.lengths = kv, lengths


class PromptCacheDenoiser(_Rows):
    """The cached forward (see the module docstring): `exact` for isolated models, `approx` for any."""

    def __init__(self, model: torch.nn.Module, mask_id: int, mode: str = "exact", block_length: int | None = None):
        super().__init__(model, mask_id)
        if mode not in ("exact", "approx"):
            raise ValueError(f"mode must be exact or approx, got {mode!r}")
        self.arch = _ARCHITECTURES[type(unwrap(model)).__name__](unwrap(model))
        self.mode, self.block_length = mode, block_length
        self.scale = self.arch.head_dim ** -0.5
        # row number -> (prefix ids the K/V were computed for, block index, segment, slot)
        self.entries: dict[int, tuple[torch.Tensor, int, _Segment, int]] = {}
        self._gathered: tuple | None = None  # (key, kv, lengths) of the last batched prefix
        self.refreshed_rows = self.cached_rows = 0  # counters for tests and benchmarks

    def forget(self, rows: list[int]) -> None:
        super().forget(rows)
        for r in rows:
            self.entries.pop(r, None)  # a segment is freed with the last row that uses it
        self._gathered = None

    def _prefix(self, b: int, r: int, canvas: torch.Tensor, select: torch.Tensor, prompt_len: int) -> tuple[int, int]:
        """(prefix length, block index) this row should use now."""
        if self.mode == "exact":
            return prompt_len, 0
        selected = select[b].nonzero()
        if not len(selected) or not self.block_length:
            return prompt_len, 0
        block = (int(selected[0]) - prompt_len) // self.block_length
        return prompt_len + block * self.block_length, block

    @torch.no_grad()
    def logits(self, canvas, attention_mask, select, rows):
        prompt_lens = self.prompt_lengths(canvas, attention_mask, rows)
        refresh, cached, wants = [], [], []
        for b, r in enumerate(rows.tolist()):
            c, block = self._prefix(b, r, canvas, select, prompt_lens[b])
            entry = self.entries.get(r)
            fresh = (entry is not None and entry[1] == block and len(entry[0]) == c
                     and torch.equal(canvas[b, :c], entry[0]))
            (cached if fresh else refresh).append(b)
            wants.append((c, block))
        lengths = attention_mask.sum(1)
        out = None
        owner = select.nonzero()[:, 0]  # batch row of each selected position, row-major
        parts = []
        if refresh:
            parts.append((refresh, self._refresh(canvas, lengths, select, rows, refresh, wants, prompt_lens)))
        if cached:
            parts.append((cached, self._cached(canvas, lengths, select, rows, cached)))
        for group, logits in parts:
            if out is None:
                out = logits.new_empty((owner.shape[0], logits.shape[1]))
            out[torch.isin(owner, torch.tensor(group, device=owner.device))] = logits
        self.refreshed_rows += len(refresh)
        self.cached_rows += len(cached)
        return out

    def _refresh(self, canvas, lengths, select, rows, group, wants, prompt_lens) -> torch.Tensor:
        """Full forward of these rows (isolated in exact mode); keep the K/V of each row's prefix."""
        idx = torch.tensor(group, device=canvas.device)
        width = int(lengths[idx].max())
        ids, sel = canvas[idx, :width], select[idx, :width]
        n = lengths[idx]
        cols = torch.arange(width, device=canvas.device).expand(len(group), width)
        keep = torch.tensor([wants[b][0] for b in group], device=canvas.device)
        isolate = torch.tensor([prompt_lens[b] for b in group], device=canvas.device) if self.mode == "exact" else None
        hidden, kv = self._layers(ids, self.arch.positions(ids), cols, cols < n[:, None], None, None, isolate,
                                  capture=int(keep.max()))
        segment = _Segment(kv, keep)
        row_numbers = rows.tolist()
        for slot, b in enumerate(group):
            c, block = wants[b]
            self.entries[row_numbers[b]] = (canvas[b, :c].clone(), block, segment, slot)
        self._gathered = None
        return self.arch.head(hidden[sel])

    def _cached(self, canvas, lengths, select, rows, group) -> torch.Tensor:
        """Run only the positions after each row's cached prefix, attending to [prefix K/V ; own K/V]."""
        device = canvas.device
        row_numbers = rows.tolist()
        entries = [self.entries[row_numbers[b]] for b in group]
        kv, prefix_len = self._prefix_batch(tuple(row_numbers[b] for b in group), entries)
        idx = torch.tensor(group, device=device)
        start = prefix_len
        span = lengths[idx] - start
        width = int(span.max())
        cols = start[:, None] + torch.arange(width, device=device)                # canvas index of each query
        valid = cols < lengths[idx][:, None]
        cols_in = cols.clamp(max=canvas.shape[1] - 1)
        ids = canvas[idx].gather(1, cols_in)
        positions = self.arch.positions(canvas[idx]).gather(1, cols_in)
        hidden, _ = self._layers(ids, positions, cols, valid, kv, prefix_len, None, capture=None)
        sel = select[idx].gather(1, cols_in) & valid
        return self.arch.head(hidden[sel])

    def _prefix_batch(self, key: tuple, entries: list) -> tuple[list, torch.Tensor]:
        """The rows' prefix K/V as one right-padded batch; no copy when they are one segment in order."""
        segments = {id(e[2]) for e in entries}
        if len(segments) == 1 and [e[3] for e in entries] == list(range(len(entries[0][2].lengths))):
            return entries[0][2].kv, entries[0][2].lengths
        key = tuple((r, id(e[2]), e[3]) for r, e in zip(key, entries))
        if self._gathered is None or self._gathered[0] != key:
            longest = max(len(e[0]) for e in entries)
            kv = []
            for i in range(len(self.arch.layers)):
                ks, vs = [], []
                for _, _, seg, slot in entries:
                    k, v = seg.kv[i]
                    pad = longest - k.shape[2]
                    ks.append(F.pad(k[slot], (0, 0, 0, max(pad, 0)))[:, :longest])
                    vs.append(F.pad(v[slot], (0, 0, 0, max(pad, 0)))[:, :longest])
                kv.append((torch.stack(ks), torch.stack(vs)))
            lengths = torch.tensor([len(e[0]) for e in entries], device=self.device)
            self._gathered = (key, kv, lengths)
        return self._gathered[1], self._gathered[2]

    def _layers(self, ids, positions, cols, valid, prefix_kv, prefix_len, isolate, capture: int | None):
        """The encoder layers for queries `ids` [B, T] at canvas indices `cols`, optionally after a cached prefix.

        Returns the final hidden states [B, T, H] and, unless `capture` is None, each layer's K/V of the
        first `capture` query positions.
        """
        b, t = ids.shape
        if prefix_kv is not None:
            longest = prefix_kv[0][0].shape[2]
            prefix_cols = torch.arange(longest, device=ids.device).expand(b, longest)
            key_cols = torch.cat([prefix_cols, cols], 1)
            key_valid = torch.cat([prefix_cols < prefix_len[:, None], valid], 1)
        else:
            key_cols, key_valid = cols, valid
        allowed = key_valid[:, None, :].expand(b, t, key_cols.shape[1])
        if isolate is not None:  # prompt queries see prompt keys only
            allowed = allowed & ((key_cols[:, None, :] < isolate[:, None, None]) | (cols[:, :, None] >= isolate[:, None, None]))
        masks = {}
        for w in set(self.arch.windows):
            m = allowed if w is None else allowed & ((cols[:, :, None] - key_cols[:, None, :]).abs() <= w)
            masks[w] = (m | ~valid[:, :, None])[:, None]  # padding queries attend anywhere: no NaN rows
        h = self.arch.embed(ids, positions)
        captured = []
        for i in range(len(self.arch.layers)):
            q, k, v = self.arch.qkv(i, h)
            if capture is not None:
                captured.append((k[:, :, :capture].contiguous(), v[:, :, :capture].contiguous()))
            if prefix_kv is not None:
                k, v = torch.cat([prefix_kv[i][0], k], 2), torch.cat([prefix_kv[i][1], v], 2)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[self.arch.windows[i]], scale=self.scale)
            h = self.arch.finish(i, h, attn.transpose(1, 2).reshape(b, t, -1))
        return h, captured


def resolve_mode(model: torch.nn.Module, mode: str, block_length: int | None = None) -> tuple[str, int | None]:
    """What `--prompt_cache mode` runs on this model: ("off" | "exact" | "approx", the block length an
    approx cache refreshes at, else None). Two settings with the same answer share one denoiser.

    auto = exact when the model was trained with prompt isolation, off otherwise. `exact` on a model
    trained without isolation is refused (its outputs would silently change); `approx` on an isolated
    model is the exact cache (its prompt K/V would be recomputed to the same values); an architecture
    without a cache runs the full forward (one warning).
    """
    if mode not in MODES:
        raise UsageError(f"--prompt_cache must be one of {', '.join(MODES)}, got {mode!r}")
    isolated = is_isolated(model)
    if mode == "exact" and not isolated:
        raise UsageError("--prompt_cache exact: the model was trained without --prompt_isolation, so a cached "
                         "prompt would change its outputs; use --prompt_cache approx (approximate) or off")
    if mode == "off" or (mode == "auto" and not isolated):
        return "off", None
    if not cacheable(model):
        logger.warning("prompt cache: not available for %s; running the full forward", type(unwrap(model)).__name__)
        return "off", None
    return ("exact", None) if isolated else ("approx", block_length)


def select_denoiser(model: torch.nn.Module, mode: str, mask_id: int, block_length: int | None = None):
    """The denoiser for `--prompt_cache mode` (see `resolve_mode`), or None for the plain full forward."""
    kind, block = resolve_mode(model, mode, block_length)
    if kind == "off":
        return IsolatedDenoiser(model, mask_id) if is_isolated(model) else None
    return PromptCacheDenoiser(model, mask_id, kind, block)
