"""Request bodies of the API (OpenAI's fields + the diffusion sampler's), and how they become a SamplerConfig.

Every body refuses unknown fields, negative or non-finite numbers and wrong types; the app turns those
refusals into 400 answers with an OpenAI-style error object.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dlm.sampler_config import PROMPT_CACHE_MODES, STRATEGIES, SamplerConfig

Strategy = Literal[STRATEGIES]
CacheMode = Literal[PROMPT_CACHE_MODES]

# The sampler's fields that a request may set, by their API names (`steps` is --num_steps).
SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "steps", "block_length", "strategy", "threshold",
                  "entropy_bound", "cfg_scale", "prompt_cache")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplerFields(_Strict):
    """What every generating endpoint accepts: OpenAI's sampling fields and the diffusion extras."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="Masks on the canvas after the prompt.")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1, description="Fixed-step budget over all blocks (--num_steps).")
    block_length: int | None = Field(None, ge=1)
    strategy: Strategy | None = None
    threshold: float | None = Field(None, gt=0, le=1)
    entropy_bound: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    prompt_cache: CacheMode | None = Field(
        None, description="The prompt cache for this request (inference.py --prompt_cache); rows whose caches "
                          "agree share forward passes.")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(SamplerFields):
    n: int = Field(1, ge=1, le=64)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stop if s]


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)


class DenoiseRequest(SamplerFields):
    """One prompt (text, or chat messages), watched step by step."""

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)


def request_config(defaults: SamplerConfig, body: SamplerFields) -> SamplerConfig:
    """The server's default settings with the request's own on top (validated; errors name API fields)."""
    cfg = replace(defaults)
    if body.max_tokens is not None:
        cfg.gen_length, cfg.seq_len = body.max_tokens, None
    for name in SAMPLER_FIELDS:
        if getattr(body, name) is not None:
            setattr(cfg, name, getattr(body, name))
    # A commit rule chosen by the request replaces the server's default rule rather than clashing with it.
    if body.threshold is not None and body.entropy_bound is None:
        cfg.entropy_bound = None
    if body.entropy_bound is not None and body.threshold is None:
        cfg.threshold = None
    # A default block longer than this request's canvas means "one block" here.
    if body.block_length is None and cfg.block_length and cfg.seq_len is None and cfg.block_length > cfg.gen_length:
        cfg.block_length = None
    return cfg.validate()


_FLAG_NAMES = {"num_steps": "steps", "gen_length": "max_tokens", "seq_len": "max_tokens"}


def api_message(message: str) -> str:
    """A sampler error in the API's words: `--num_steps 6` -> `steps 6`."""
    return re.sub(r"--(\w+)", lambda m: _FLAG_NAMES.get(m[1], m[1]), message)


def echo(cfg: SamplerConfig) -> dict:
    """The settings a request ran with, as the API names them (returned with every answer)."""
    out = {"max_tokens": cfg.gen_length if cfg.seq_len is None else None, "seq_len": cfg.seq_len}
    out.update({name: getattr(cfg, name) for name in SAMPLER_FIELDS})
    return out
