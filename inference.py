"""Generate text with a diffusion LM: a canvas of masks filled in over a few parallel steps (DESIGN §4).

    python inference.py --model work_dir/LDM_SFT/final_model --prompt "What is artificial intelligence"
    python inference.py --safetensors_path work_dir/LDM_SFT/final_model/model.safetensors --seq_len 512 \
        --num_steps 512 --hf_model_name answerdotai/ModernBERT-large --prompt "What is artificial intelligence"
    python inference.py --model M --prompt "The capital of France is [MASK*3]." --gen_length 0 --no_chat_template
    python inference.py --model M --threshold 0.9 --block_length 32 --prompts_file questions.jsonl --json
    python inference.py --model M --chat

On a terminal the canvas is drawn live (masks visible) with a progress bar; piped output is plain text,
or one JSON object per prompt with --json.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dlm.cli import ModelSourceArguments, trained_canvas
from dlm.errors import ArgumentParser, UsageError, run_main, setup_logging

logger = logging.getLogger("inference")


@dataclass
class InferenceArguments(ModelSourceArguments):
    prompt: str | None = field(default=None, metadata={
        "action": "append", "help": "A prompt; repeat the flag for several. `[MASK*n]` marks n positions to fill in."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "One prompt per line, or JSONL / a JSON list of records with `prompt`, `instruction` (+ `input`) "
                "or `messages`."})
    seed: int | None = field(default=None, metadata={
        "help": "Random seed (prompt i uses seed + i; default: fresh randomness). Unused at temperature 0."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "Where to run the model."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Model weights dtype (auto: bfloat16 on a GPU that supports it, else float32)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts denoised together in one forward pass."})
    system: str | None = field(default=None, metadata={"help": "System message for chat-template prompts."})
    chat: bool = field(default=False, metadata={
        "help": "Interactive multi-turn chat on stdin (history kept in the chat template; /reset, /exit)."})
    json: bool = field(default=False, metadata={
        "help": "Print one JSON object per prompt: text, prompt_ids, output_ids, nfe, steps, seconds."})
    live: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "Live denoising view: auto = on when stdout is a terminal and --json is off."})


def read_prompts_file(path: str) -> list:
    """Prompts from a text file (one per line), JSONL, or a JSON list; a JSON record gives its `prompt`,
    `instruction` (+ `input`, as Alpaca) or `messages`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--prompts_file {p}: no such file")
    text = p.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if p.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--prompts_file {p}: not JSON ({err})") from None
        if not isinstance(rows, list):
            raise UsageError(f"--prompts_file {p}: expected a JSON list of records")
        where = [f"record {n}" for n in range(1, len(rows) + 1)]
    elif p.suffix == ".jsonl" or (lines and all(line.lstrip().startswith("{") for line in lines)):
        rows, where = [], []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"--prompts_file {p} line {n}: not JSON ({err})") from None
            where.append(f"line {n}")
    else:
        return lines
    prompts = []
    for row, at in zip(rows, where):
        if isinstance(row, dict) and "messages" in row:
            prompts.append(row["messages"])
        elif isinstance(row, dict) and ("prompt" in row or "instruction" in row):
            prompt = row.get("prompt") or row["instruction"]
            if row.get("input"):
                prompt = f"{prompt}\n\n{row['input']}"
            prompts.append(prompt)
        else:
            raise UsageError(f"--prompts_file {p} {at}: expected a `prompt`, `instruction` or `messages` key")
    return prompts


def model_source(args: InferenceArguments) -> tuple[str, str, bool]:
    """(path or hub id, flag naming it, is local) — checked before any heavy import."""
    if args.model and args.safetensors_path:
        raise UsageError("pass --model or --safetensors_path, not both")
    flag = "--safetensors_path" if args.safetensors_path else "--model" if args.model else "--hf_model_name"
    source = args.safetensors_path or args.model or args.hf_model_name
    if not source:
        raise UsageError("no model: pass --model FOLDER, or --safetensors_path FILE with --hf_model_name")
    local = Path(source).exists()
    # Anything that looks like a path must exist; a bare `org/name` may be a hub id.
    if not local and (flag == "--safetensors_path" or source.endswith(".safetensors")
                      or source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UsageError(f"{flag} {source}: no such file or folder")
    return source, flag, local


def load_model(args: InferenceArguments, source: str, flag: str, local: bool):
    import torch
    import transformers

    from dlm.modeling import load_checkpoint, load_masked_lm
    from dlm.tokenization import load_tokenizer

    transformers.utils.logging.disable_progress_bar()  # keep stderr to our own one-line messages
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if local:
        model, tokenizer = load_checkpoint(source, args.hf_model_name, dtype=dtype, flag=flag)
    else:  # a hub id
        tokenizer = load_tokenizer(source)
        model = load_masked_lm(source, tokenizer, dtype=dtype, flag=flag)
    logger.info("loaded %s (%s) on %s", type(model).__name__, dtype, device)
    return model.to(device).eval(), tokenizer


def with_system(prompt, system: str | None):
    """A text prompt as a chat with a system message (the sampler templates message lists)."""
    if system is None or not isinstance(prompt, str):
        return prompt
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def emit(result, prompt, args: InferenceArguments, index: int, count: int) -> None:
    if args.json:
        print(json.dumps({"prompt": prompt, "text": result.text, "prompt_ids": result.prompt_ids,
                          "output_ids": result.output_ids, "nfe": result.nfe, "steps": result.steps,
                          "seconds": round(result.seconds, 4)}, ensure_ascii=False), flush=True)
        return
    if count > 1:
        print(f"── {index + 1}/{count} ──")
    print(result.text, flush=True)
    # Stats go to stderr so that stdout stays the bare text when piped.
    print(f"[{result.num_generated} tokens · NFE {result.nfe} · {result.tokens_per_forward:.2f} tokens/forward · "
          f"{result.seconds:.2f}s]", file=sys.stderr, flush=True)


def _offset(seed: int | None, offset: int) -> int | None:
    """Prompt i (or chat turn i) uses seed + i, as in `generate`; no seed means fresh randomness."""
    return None if seed is None else seed + offset


def run_prompts(model, tokenizer, prompts: list, config, args: InferenceArguments, live: bool) -> None:
    from dlm.display import LiveView
    from dlm.sampling import generate

    chat = not args.no_chat_template
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        inputs = [with_system(p, args.system) if chat else p for p in batch]
        if live:
            with LiveView(tokenizer) as view:
                results = generate(model, tokenizer, inputs, config, chat=chat, seed=_offset(args.seed, start),
                                   on_step=view)
        else:
            results = generate(model, tokenizer, inputs, config, chat=chat, seed=_offset(args.seed, start))
        for i, (prompt, result) in enumerate(zip(batch, results)):
            emit(result, prompt, args, start + i, len(prompts))


def run_chat(model, tokenizer, opening: list, config, args: InferenceArguments, live: bool) -> None:
    """Multi-turn chat: every turn re-renders the whole history through the chat template."""
    from dlm.display import LiveView
    from dlm.sampling import generate

    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = iter(opening)
    turn = 0
    while True:
        line = next(turns, None)
        if line is None:
            try:
                line = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        try:
            if live:
                with LiveView(tokenizer, title="assistant") as view:
                    result = generate(model, tokenizer, [messages], config, seed=_offset(args.seed, turn),
                                      on_step=view)[0]
            else:
                result = generate(model, tokenizer, [messages], config, seed=_offset(args.seed, turn))[0]
        except UsageError as err:  # e.g. the history outgrew --seq_len: say so, keep chatting
            sys.stderr.write(f"error: {err}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": result.text})
        if args.json:
            emit(result, line, args, turn, 1)
        else:
            print(f"assistant> {result.text}", flush=True)
        turn += 1


def main() -> int:
    setup_logging(logging.WARNING)
    (args,) = ArgumentParser(InferenceArguments).parse_args_into_dataclasses()
    # Cheap checks first: a typo in a flag should not wait for a model to load.
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    # The canvas defaults to the one the checkpoint was fine-tuned on (dlm.json), else 128 masks.
    config = args.to_config(default_gen_length=128, trained=trained_canvas(args.model or args.safetensors_path))
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if args.chat and args.no_chat_template:
        raise UsageError("--chat needs the chat template: drop --no_chat_template")
    if not prompts and not args.chat:
        raise UsageError("no prompt: pass --prompt, --prompts_file or --chat")
    source, flag, local = model_source(args)
    live = args.live == "on" or (args.live == "auto" and sys.stdout.isatty() and not args.json)

    model, tokenizer = load_model(args, source, flag, local)
    if args.chat:
        run_chat(model, tokenizer, prompts, config, args, live)
    else:
        run_prompts(model, tokenizer, prompts, config, args, live)
    return 0


if __name__ == "__main__":
    run_main(main)
