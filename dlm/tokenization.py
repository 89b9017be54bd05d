"""Special tokens, the chat template, and offline tokenizer training for any masked-LM tokenizer.

The diffusion pipeline needs, from any MLM tokenizer:
  * a mask token (the noise), a pad token, and explicit BOS/EOS (BERT-style [CLS]/[SEP] play those roles);
  * chat markers: one start token per role and one end-of-turn token.

Rendering of a chat (no whitespace is inserted around the markers, so that the generation
prompt is always an exact token prefix of the training rendering, for any tokenizer):

    [BOS]<|system|>You are terse.<|eot|><|user|>Hi<|eot|><|assistant|>Hello!<|eot|>

Chat markers reuse the tokenizer's reserved entries (ModernBERT ships `[unused0]`...) so the
embedding matrix keeps its size; only when there are too few are new tokens added, and then
the model's embedding matrix grows to a multiple of 64 (`modeling.resize_for_tokenizer`).

Text is text: content is tokenized with special-token matching off, so a message, prompt or corpus record
holding the literal string `<|eot|>`, `<|system|>` or `[MASK]` gets ordinary tokens that decode back to that
string; only the template's own markers (and, in inference prompts only, the `[MASK*n]` infill syntax)
become special ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dlm.errors import UsageError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
EOT_TOKEN = "<|eot|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), EOT_TOKEN)

# Reserved-token spellings of common tokenizers, reused (in id order) before adding new tokens.
_UNUSED_PATTERN = re.compile(r"^(\[unused\d+\]|<unused\d+>|<\|reserved_special_token_\d+\|>|<extra_id_\d+>)$")

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('chat role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    # The answer (content and end of turn) is a {% generation %} block: return_assistant_tokens_mask marks it.
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{{- message['content'] + '" + EOT_TOKEN + "' -}}"
    "{%- endgeneration -%}{%- else -%}{{- message['content'] + '" + EOT_TOKEN + "' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

EMBEDDING_MULTIPLE = 64

# `[MASK*5]` is five masks to fill in place, a bare `[MASK]` one: the infill syntax of inference prompts
# (text and chat messages). In training data (corpus and SFT records) it is plain text like any other.
MASK_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the diffusion pipeline relies on."""

    mask: int
    pad: int
    bos: int
    eos: int
    eot: int
    system: int
    user: int
    assistant: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generation (end of turn or end of sequence)."""
        return (self.eot, self.eos)


def special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    """Special ids of a tokenizer prepared by `prepare_tokenizer`."""
    ids = {}
    for name, token in [("eot", EOT_TOKEN), *((role, tok) for role, tok in ROLE_TOKENS.items())]:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == tokenizer.unk_token_id:
            raise UsageError(f"tokenizer has no {token} token: prepare it with tokenizer.py first")
        ids[name] = idx
    if tokenizer.mask_token_id is None:
        raise UsageError("tokenizer has no mask token")
    return SpecialIds(
        mask=tokenizer.mask_token_id,
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        **ids,
    )


def is_prepared(tokenizer: PreTrainedTokenizerFast) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in CHAT_TOKENS) and tokenizer.chat_template == CHAT_TEMPLATE


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a tokenizer from the hub or a folder, as prepared for diffusion (idempotent)."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "vocab.txt", "vocab.json")):
        raise UsageError(f"cannot load a tokenizer from {name_or_path!r}: the folder has no tokenizer files "
                         f"(tokenizer.json, tokenizer_config.json, vocab.txt or vocab.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a tokenizer from {name_or_path!r}: {str(err).splitlines()[0]}") from None
    return prepare_tokenizer(tokenizer, source=name_or_path)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerFast, source: str = "tokenizer") -> PreTrainedTokenizerFast:
    """Make special-token roles explicit, add the chat markers and the chat template."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{source}: a fast (Rust) tokenizer is required")
    if tokenizer.mask_token is None:
        raise UsageError(f"{source}: the tokenizer has no mask token, so it cannot be used as a masked diffusion model")
    if is_prepared(tokenizer):
        return tokenizer

    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    reusable = _unused_tokens(tokenizer)
    renames = dict(zip(reusable, missing))
    if renames:
        tokenizer = _rename_tokens(tokenizer, renames)
        logger.info("reused reserved tokens for %s", ", ".join(f"{a}->{b}" for a, b in renames.items()))
    to_add = missing[len(renames):]
    if to_add:
        logger.info("adding %d new special tokens %s: grow the embeddings to a multiple of %d",
                    len(to_add), to_add, EMBEDDING_MULTIPLE)

    roles = {}
    roles["bos_token"] = tokenizer.bos_token or tokenizer.cls_token
    roles["eos_token"] = tokenizer.eos_token or tokenizer.sep_token
    if roles["bos_token"] is None or roles["eos_token"] is None:
        raise UsageError(f"{source}: the tokenizer has neither BOS/EOS nor [CLS]/[SEP] tokens")
    roles["pad_token"] = tokenizer.pad_token or roles["eos_token"]
    tokenizer.add_special_tokens(roles)
    tokenizer.add_special_tokens({"extra_special_tokens": list(CHAT_TOKENS)}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _unused_tokens(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    found = [(i, t) for t, i in tokenizer.get_vocab().items() if _UNUSED_PATTERN.match(t)]
    return [t for _, t in sorted(found)]


def _rename_tokens(tokenizer: PreTrainedTokenizerFast, renames: dict[str, str]) -> PreTrainedTokenizerFast:
    """Rename reserved tokens in place (same ids) by editing the serialized Rust tokenizer."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for entry in state.get("added_tokens", []):
        if entry["content"] in renames:
            entry["content"] = renames[entry["content"]]
            entry["special"] = True
    vocab = state.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for old, new in renames.items():
            if old in vocab:
                vocab[new] = vocab.pop(old)
    backend = Tokenizer.from_str(json.dumps(state))
    kwargs = {k: getattr(tokenizer, k) for k in
              ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
              if getattr(tokenizer, k, None) is not None}
    new = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length, **kwargs)
    new.padding_side = tokenizer.padding_side
    if hasattr(tokenizer, "model_input_names"):
        new.model_input_names = list(tokenizer.model_input_names)
    return new


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of the vocabulary: data prepared with one tokenizer must not feed another."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def render_chat(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


# Per tokenizer: (its vocabulary size, a copy of its Rust backend that never matches special tokens).
_TEXT_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_backend(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the tokenizer's backend that reads the strings of special tokens as plain text.

    A copy, not the `split_special_tokens` call flag: that flag is a setting of the shared backend, which a
    concurrent call (the server's threads) could flip between setting it and encoding.
    """
    size = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    cached = _TEXT_BACKENDS.get(tokenizer)
    if cached is None or cached[0] != size:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        cached = (size, backend)
        _TEXT_BACKENDS[tokenizer] = cached
    return cached[1]


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, in one batched call, with no special tokens added and none read from the text:
    the literal string of a special token becomes ordinary tokens that decode back to it."""
    if not texts:
        return []
    return [e.ids for e in _text_backend(tokenizer).encode_batch_fast(list(texts), add_special_tokens=False)]


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, mask_spans: bool = False) -> list[int]:
    """Ids of one text (see `encode_texts`); with `mask_spans`, each `[MASK*n]` / `[MASK]` is n mask ids."""
    if not mask_spans:
        return encode_texts(tokenizer, [text])[0]
    parts = MASK_SPAN.split(text)  # [text, n, text, n, ..., text]; n is None for a bare [MASK]
    pieces = encode_texts(tokenizer, [p for p in parts[::2] if p])
    ids, pieces = [], iter(pieces)
    for i, part in enumerate(parts):
        if i % 2:
            ids += [tokenizer.mask_token_id] * int(part or 1)
        elif part:
            ids += next(pieces)
    return ids


def encode_chats(tokenizer: PreTrainedTokenizerFast, chats: Sequence[Sequence[dict]],
                 add_generation_prompt: bool = False,
                 mask_spans: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Ids of chats as `CHAT_TEMPLATE` renders them, and their answer masks (1 on each assistant turn's
    content and end-of-turn), with every message's content tokenized as text (`encode_texts`).

    The template's markers are inserted as ids, so they are the only chat markers in the result; all
    contents of the batch are tokenized in one call. With `mask_spans` (inference prompts), `[MASK*n]` in a
    message is n mask ids.
    """
    ids_of = special_ids(tokenizer)
    markers = {"system": ids_of.system, "user": ids_of.user, "assistant": ids_of.assistant}
    for chat in chats:
        for message in chat:
            if message["role"] not in markers:
                raise UsageError(f"chat role must be system, user or assistant, got {message['role']!r}")
    contents = [m["content"] for chat in chats for m in chat]
    if mask_spans:
        encoded = iter([encode_text(tokenizer, c, mask_spans=True) for c in contents])
    else:
        encoded = iter(encode_texts(tokenizer, contents))
    all_ids, all_masks = [], []
    for chat in chats:
        ids, mask = [ids_of.bos], [0]
        for message in chat:
            content = next(encoded)
            answer = int(message["role"] == "assistant")
            ids += [markers[message["role"]], *content, ids_of.eot]
            mask += [0] + [answer] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(ids_of.assistant)
            mask.append(0)
        all_ids.append(ids)
        all_masks.append(mask)
    return all_ids, all_masks


def encode_chat(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict], add_generation_prompt: bool = False,
                mask_spans: bool = False) -> list[int]:
    """Token ids of a chat as the template renders it: the template's markers are the only special ids
    (content is text, see `encode_chats`)."""
    return encode_chats(tokenizer, [messages], add_generation_prompt, mask_spans)[0][0]


def train_tokenizer(files: Iterable[str | Path] | None = None, vocab_size: int = 8192,
                    texts: Iterable[str] | None = None, num_unused: int = 8) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline (for from-scratch models and tests), ready for diffusion.

    It carries BERT-style special tokens and `num_unused` reserved `[unusedN]` entries, which
    the chat markers then reuse, exactly as with a ModernBERT tokenizer.
    """
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"[unused{i}]" for i in range(num_unused)]
    backend = Tokenizer(models.BPE())
    # One digit per token: numbers then tokenize the same way whatever their length, which is what
    # arithmetic tasks (dlm.synthetic) need; the split runs before the byte-level mapping.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if texts is None:
        paths = [str(p) for p in (files or [])]
        for p in paths:
            if not Path(p).is_file():
                raise UsageError(f"--train_from: {p} is not a readable file")
        backend.train(paths, trainer)
    else:
        backend.train_from_iterator(texts, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                        model_max_length=8192)
    return prepare_tokenizer(tokenizer, source="trained tokenizer")


def load_mlm_tokenizer(name_or_path: str, flag: str = "--hf_model_name",
                       trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """`load_tokenizer` for a model named on the command line, refusing models that are not masked LMs.

    A folder (or hub id) with a model config must describe a masked-LM architecture; a folder that
    holds only tokenizer files (e.g. written by tokenizer.py) is accepted as it is.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {name_or_path}: not a folder (give a hub id or a model/tokenizer folder)")
    if path.is_dir() and not any(path.iterdir()):
        raise UsageError(f"{flag} {name_or_path}: the folder is empty")
    config = None
    if not path.is_dir() or (path / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as err:
            if path.is_dir():  # a local config that cannot be read is an error; a hub miss falls through
                raise UsageError(f"{flag} {name_or_path}: cannot read config.json ({str(err).splitlines()[0]})") from None
    if config is not None and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise UsageError(f"{flag} {name_or_path} is not a masked language model (model type "
                         f"{config.model_type!r}); give an AutoModelForMaskedLM such as ModernBERT")
    try:
        return load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    except UsageError as err:
        msg = str(err)
        raise UsageError(msg if msg.startswith(flag) else f"{flag} {msg}") from None


def smallest_uint_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type (numpy/Arrow name) that holds every id below `vocab_size`."""
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
        if vocab_size <= 1 << bits:
            return name
    return "uint64"


def describe_tokenizer(tokenizer: PreTrainedTokenizerFast, text: str) -> str:
    """Human-readable view of how `text` tokenizes, the special ids, and a rendered two-turn chat."""
    ids = encode_text(tokenizer, text)
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text},
            {"role": "assistant", "content": "OK."}]
    chat_ids = encode_chat(tokenizer, chat)
    prompt_ids = encode_chat(tokenizer, chat[:-1], add_generation_prompt=True)
    specials = special_ids(tokenizer)
    lines = [
        f"vocabulary: {len(tokenizer)} entries",
        "special ids: " + ", ".join(f"{k}={getattr(specials, k)}" for k in specials.__dataclass_fields__),
        f"text: {text!r}",
        f"tokens ({len(ids)}): {tokenizer.convert_ids_to_tokens(ids)}",
        f"ids: {ids}",
        "chat example (training rendering):",
        render_chat(tokenizer, chat),
        f"tokens ({len(chat_ids)}): {tokenizer.convert_ids_to_tokens(chat_ids)}",
        "generation prompt:",
        render_chat(tokenizer, chat[:-1], add_generation_prompt=True),
        f"generation prompt is a token prefix of the training rendering: {chat_ids[:len(prompt_ids)] == prompt_ids}",
    ]
    return "\n".join(lines)
