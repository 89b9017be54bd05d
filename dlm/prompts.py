"""Prompts as the sampler sees them: text through the chat template, chat messages, or raw ids; `[MASK*n]` spans; stop ids.

Shared by every front end (inference.py, evaluation, the server, the harness), so that a prompt is encoded
exactly as training rendered it.
"""

from __future__ import annotations

from dlm.errors import UsageError
from dlm.tokenization import MASK_SPAN, encode_chat, encode_text, special_ids

Prompt = str | list[int] | list[dict]


def expand_mask_spans(text: str, mask_token: str) -> str:
    """Replace `[MASK*n]` (and `[MASK]`) by n copies of the tokenizer's own mask token (display only:
    `encode_prompt` never tokenizes this string, since the mask token's string is text)."""
    return MASK_SPAN.sub(lambda m: mask_token * int(m.group(1) or 1), text)


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of one prompt: text (through the chat template unless `chat=False`), a list of chat
    messages (always templated, generation prompt added), or ids taken verbatim.

    Text is text: special-token strings in a prompt or message never become special ids, except the
    infill syntax `[MASK*n]` / `[MASK]`, which is n mask ids (in a chat message too)."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        return encode_chat(tokenizer, prompt, add_generation_prompt=True, mask_spans=True)
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                           mask_spans=True)
    ids = encode_text(tokenizer, prompt, mask_spans=True)
    # Without a template the model still expects its start token first, as in training rows.
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def stop_ids_for(tokenizer) -> tuple[int, ...]:
    """End-of-turn and EOS ids (EOS alone for a tokenizer without chat markers)."""
    try:
        return special_ids(tokenizer).stop_ids
    except UsageError:
        return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
