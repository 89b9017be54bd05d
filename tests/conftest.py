"""Shared fixtures: a tokenizer trained offline and tiny ModernBERT folders, built once per session."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def make_corpus(n_chars: int = 30_000, seed: int = 0) -> str:
    """Real text when ../shared/data is present, otherwise generated English-like text.

    The generated text draws a few thousand distinct words from syllables (Zipf-like frequencies), so a
    BPE tokenizer trained on it reaches the same vocabulary sizes (512 and more) as on real text.
    """
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")[:n_chars]
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "ing", "er", "ou", "ea"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    lines = []
    while sum(len(line) + 1 for line in lines) < n_chars:
        line = " ".join(rng.choices(words, weights, k=rng.randint(4, 14))).capitalize()
        lines.append(line + rng.choice([".", ",", "!", "?", ";", ":"]))
    return "\n".join(lines)[:n_chars]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_text) -> Path:
    from dlm.tokenization import train_tokenizer

    tok = train_tokenizer(texts=[corpus_text, "0123456789 +-=*/ What is the sum? Answer:"], vocab_size=512)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from dlm.tokenization import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def save_tiny_model(tokenizer, out: Path, max_position_embeddings: int = 512) -> Path:
    """A very small ModernBERT (2 layers, hidden 32), seeded, saved with its tokenizer as a HF folder."""
    import torch

    from dlm.modeling import build_from_scratch

    torch.manual_seed(0)
    model = build_from_scratch("tiny", tokenizer, max_position_embeddings=max_position_embeddings, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_model"))
