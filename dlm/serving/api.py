"""The HTTP face of the engine: OpenAI-compatible endpoints, the denoise stream, /health and the page.

    GET  /v1/models               the one served model
    POST /v1/completions          prompt(s) -> text (through the chat template unless --no_chat_template)
    POST /v1/chat/completions     messages through the model's chat template -> assistant message
    POST /v1/denoise              server-sent events: the canvas after each step (masks as null), throttled
    GET  /health                  queue depth and rows in flight
    GET  /                        the live denoising page

Streaming sends the settled prefix: text is sent once it and everything before it are decided.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dlm.errors import UsageError
from dlm.prompts import encode_prompt
from dlm.sampling import SamplerConfig
from dlm.serving.engine import Engine, Job, QueueFull
from dlm.serving.schemas import ChatRequest, CompletionRequest, DenoiseRequest, api_message, echo, request_config

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class ClientGone(Exception):
    pass


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(status,
                                                                                                     "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def stable_prefix(text: str, hold: int) -> str:
    """The part of a growing decoded text that later tokens cannot change: not the last `hold` characters
    (they may start a stop string), not an unfinished UTF-8 character, and nothing from the last whitespace
    on (decoding cleans up spaces before punctuation and contractions: " 'll" becomes "'ll")."""
    text = text[:max(len(text) - hold, 0)].rstrip("\ufffd")
    last_space = re.search(r"\s\S*$", text)
    return text[:last_space.start()] if last_space else text


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, defaults: SamplerConfig, model_name: str, chat: bool = True,
               fps: float = 30.0) -> FastAPI:
    """The app around a (not yet started) engine; the engine's worker runs while the app does."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="dlm", lifespan=lifespan)
    tokenizer = engine.tokenizer
    created = int(time.time())
    special = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown field `{where}`", param=where)
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(request, err: HTTPException):
        return error_response(err.status_code, str(err.detail))

    # -- helpers -------------------------------------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    def config_of(body) -> SamplerConfig:
        try:
            return request_config(defaults, body)
        except UsageError as err:
            raise ApiError(400, api_message(str(err))) from None

    async def wait_until(job: Job, request: Request, done) -> None:
        """Until `done()`; a client that leaves meanwhile frees its rows at the next step."""
        while not done():
            try:
                await asyncio.wait_for(job.wait(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ClientGone from None

    async def start(job: Job, request: Request) -> None:
        job.loop = asyncio.get_running_loop()
        job.changed = asyncio.Event()
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, str(err), headers={"Retry-After": str(err.retry_after)}) from None
        except UsageError as err:
            raise ApiError(400, api_message(str(err)), param="n") from None
        await wait_until(job, request, lambda: job.admitted)
        if job.error:
            raise ApiError(job.error_status, api_message(job.error))

    def encode(prompts: list) -> list[list[int]]:
        """Token ids here, on the HTTP side, so that the sampler's thread spends its time stepping."""
        try:
            return [encode_prompt(tokenizer, p, chat) for p in prompts]
        except Exception as err:  # e.g. a chat template that refuses these messages
            raise ApiError(400, f"cannot encode the prompt: {err}", param="prompt") from None

    def usage(job: Job) -> dict:
        mask_id = tokenizer.mask_token_id
        prompt_tokens = sum(len(c.result.prompt_ids) for c in job.choices[::job.n] if c.result)
        completion = 0
        for c in job.choices:
            out = c.result.output_ids if c.result else []
            completion += next((j for j, t in enumerate(out) if t in engine.stop_ids or t == mask_id), len(out))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "nfe": sum(c.nfe for c in job.choices)}

    def extras(job: Job) -> dict:
        return {"usage": usage(job), "sampler": echo(job.config)}

    def streaming(job: Job, chunk, include_usage: bool) -> StreamingResponse:
        """Settled-prefix deltas per choice; a text that may still grow into a stop string is held back."""
        hold = max((len(s) for s in job.stop), default=1) - 1

        async def events():
            sent = [""] * job.rows
            closed = [False] * job.rows
            try:
                for c in job.choices:
                    if (first := chunk(c.index, None, None, opening=True)) is not None:
                        yield sse(first)
                while not all(closed):
                    if job.error:
                        yield sse({"error": {"message": job.error, "type": "server_error"}})
                        break
                    for c in job.choices:
                        if closed[c.index]:
                            continue
                        text = c.text if c.done else stable_prefix(c.text, hold)
                        if len(text) > len(sent[c.index]) and text.startswith(sent[c.index]):
                            yield sse(chunk(c.index, text[len(sent[c.index]):], None))
                            sent[c.index] = text
                        if c.done:
                            closed[c.index] = True
                            last = all(closed)
                            body = chunk(c.index, "", c.finish_reason)
                            if last and not include_usage:
                                body.update(extras(job))
                            yield sse(body)
                    if not all(closed):
                        await job.wait()
                if include_usage and not job.error:
                    yield sse({**chunk(0, "", None), "choices": [], **extras(job)})
                yield sse("[DONE]")
            finally:
                if not job.finished:
                    job.cancelled = True  # the client left mid-stream: free the rows at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generation(body, prompts: list, request: Request, kind: str):
        check_model(body.model)
        cfg = config_of(body)
        job = Job(prompts=encode(prompts), config=cfg, n=body.n, seed=body.seed, stop=body.stops,
                  follow=body.stream)
        try:
            await start(job, request)
            ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            now = int(time.time())
            if body.stream:
                def chunk(index, text, finish, opening=False):
                    if kind == "chat":
                        if opening:
                            delta = {"role": "assistant", "content": ""}
                        else:
                            delta = {"content": text} if text else {}
                        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                        obj = "chat.completion.chunk"
                    else:
                        if opening:
                            return None
                        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                        obj = "text_completion"
                    return {"id": ident, "object": obj, "created": now, "model": model_name, "choices": [choice]}

                return streaming(job, chunk, bool(body.stream_options and body.stream_options.include_usage))
            await wait_until(job, request, lambda: job.finished)
            if job.error:
                raise ApiError(500, job.error)
            choices = []
            for c in job.choices:
                item = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None, "nfe": c.nfe,
                        "steps": c.step}
                if kind == "chat":
                    item["message"] = {"role": "assistant", "content": c.text}
                else:
                    item["text"] = c.text
                choices.append(item)
            obj = "chat.completion" if kind == "chat" else "text_completion"
            return {"id": ident, "object": obj, "created": now, "model": model_name, "choices": choices,
                    **extras(job)}
        except ClientGone:
            return JSONResponse({}, status_code=499)

    # -- routes -------------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dlm"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dlm"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await generation(body, prompts, request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await generation(body, [[m.as_dict() for m in body.messages]], request, "chat")

    @lru_cache(maxsize=65536)
    def piece(token: int) -> str | None:
        if token == tokenizer.mask_token_id:
            return None
        return "" if token in special else tokenizer.decode([token])

    @app.post("/v1/denoise")
    async def denoise(body: DenoiseRequest, request: Request):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "pass one of `prompt` or `messages`", param="prompt")
        prompt = body.prompt if body.messages is None else [m.as_dict() for m in body.messages]
        job = Job(prompts=encode([prompt]), config=config_of(body), seed=body.seed, watch=True)
        try:
            await start(job, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        interval = 1.0 / fps

        def event(canvas: list[int], step: int, nfe: int, seconds: float, done: bool) -> dict:
            return {"step": step, "nfe": nfe, "seconds": round(seconds, 4), "done": done,
                    "masks": sum(t == tokenizer.mask_token_id for t in canvas), "canvas": [piece(t) for t in canvas]}

        async def events():
            c, last = job.choices[0], time.perf_counter()
            yield sse(event(c.blank, 0, 0, 0.0, False))
            try:
                while True:
                    if job.error:
                        yield sse({"error": {"message": job.error, "type": "server_error"}})
                        break
                    if c.canvas is not None:
                        wait = interval - (time.perf_counter() - last)
                        if not c.done and wait > 0:  # coalesce: draw the newest canvas, never a backlog
                            await asyncio.sleep(wait)
                        last = time.perf_counter()
                        now = event(c.canvas, c.step, c.nfe, last - job.t0, c.done)
                        if c.done:
                            now.update(text=c.text, finish_reason=c.finish_reason, **extras(job))
                            yield sse(now)
                            yield sse("[DONE]")
                            break
                        yield sse(now)
                    await job.wait()
            finally:
                if not job.finished:
                    job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {**engine.health(), "model": model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        settings = {"model": model_name, **echo(defaults)}
        return PAGE.read_text(encoding="utf-8").replace("__DEFAULTS__", json.dumps(settings))

    return app
