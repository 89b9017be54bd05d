"""Serving a diffusion LM: step-level batching (`engine`), the OpenAI-compatible API (`api`, `schemas`), the page.

`create_app(Engine(model, tokenizer), defaults, name)` is the whole server; serve.py only parses flags,
loads the checkpoint and runs it under uvicorn.
"""

from dlm.serving.api import create_app
from dlm.serving.engine import Engine, Job, QueueFull

__all__ = ["Engine", "Job", "QueueFull", "create_app"]
