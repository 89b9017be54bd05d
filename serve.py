"""Serve a diffusion LM: an OpenAI-compatible API with step-level batching, and a live denoising page.

    python serve.py --model work_dir/LDM_SFT/final_model [--host 127.0.0.1] [--port 8000]
    python serve.py --model M --threshold 0.9 --block_length 32 --gen_length 64     # sampler defaults

The sampler flags of inference.py are the server's defaults; a request may override them in its body
(OpenAI's max_tokens / temperature / top_p / seed, and steps, block_length, strategy, threshold,
entropy_bound, top_k, cfg_scale). Open http://HOST:PORT/ for the page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dlm.cli import ModelSourceArguments
from dlm.errors import ArgumentParser, UsageError, run_main, setup_logging

logger = logging.getLogger("serve")


@dataclass
class ServeArguments(ModelSourceArguments):
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free port)."})
    served_model_name: str | None = field(default=None, metadata={
        "help": "The model id in /v1/models and requests (default: the checkpoint folder's name)."})
    max_batch_size: int = field(default=32, metadata={
        "help": "Rows denoised together (step-level batching); 1 serves one request at a time."})
    max_queue: int = field(default=256, metadata={
        "help": "Requests that may wait for a row; more are answered 429 with Retry-After."})
    fps: float = field(default=30.0, metadata={"help": "Most canvas events per second on /v1/denoise."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "Where to run the model."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Model weights dtype (auto: bfloat16 on a GPU that supports it, else float32)."})


def main() -> int:
    setup_logging(logging.INFO)
    (args,) = ArgumentParser(ServeArguments).parse_args_into_dataclasses()
    for flag in ("max_batch_size", "max_queue"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    config = args.to_config(default_gen_length=128)

    from inference import load_model, model_source  # the same checkpoint loading as inference.py

    source, flag, local = model_source(args)
    import uvicorn

    from dlm.serving import Engine, create_app

    model, tokenizer = load_model(args, source, flag, local)
    name = args.served_model_name or (Path(source).name if local else source)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue, defaults=config)
    app = create_app(engine, config, name, chat=not args.no_chat_template, fps=args.fps)
    logger.info("serving %s on http://%s:%d (max %d rows per step)", name, args.host, args.port,
                args.max_batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)
