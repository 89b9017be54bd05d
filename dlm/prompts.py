"""Prompts as the sampler sees them: text through the chat template, chat messages, or raw ids; `[MASK*n]` spans; stop ids.

Shared by every front end (inference.py, evaluation, the server, the harness), so that a prompt is encoded
exactly as training rendered it.
"""

from __future__ import annotations

import re

from dlm.errors import UsageError
from dlm.tokenization import encode_chat, special_ids

# `[MASK*5]` is five masks to fill in place; a bare `[MASK]` is one.
MASK_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")

Prompt = str | list[int] | list[dict]


def expand_mask_spans(text: str, mask_token: str) -> str:
    """Replace `[MASK*n]` (and `[MASK]`) by n copies of the tokenizer's own mask token."""
    return MASK_SPAN.sub(lambda m: mask_token * int(m.group(1) or 1), text)


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of one prompt: text (through the chat template unless `chat=False`), a list of chat
    messages (always templated, generation prompt added), or ids taken verbatim."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        messages = [{**m, "content": expand_mask_spans(m["content"], tokenizer.mask_token)} for m in prompt]
        return encode_chat(tokenizer, messages, add_generation_prompt=True)
    text = expand_mask_spans(prompt, tokenizer.mask_token)
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Without a template the model still expects its start token first, as in training rows.
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def stop_ids_for(tokenizer) -> tuple[int, ...]:
    """End-of-turn and EOS ids (EOS alone for a tokenizer without chat markers)."""
    try:
        return special_ids(tokenizer).stop_ids
    except UsageError:
        return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
