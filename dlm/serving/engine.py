"""Step-level batching: one worker thread drives the running batches; requests are rows that join them.

Every request (a `Job`) becomes `n` rows per prompt. The worker loop is

    admit queued jobs whose rows fit (they join at this step boundary)
    drop the rows of jobs whose client left
    one step for every row in flight (one forward pass per running batch: rows whose prompt caches agree,
    `dlm.cache.resolve_mode`, share a batch; a request's `prompt_cache` picks its batch)
    publish: settled text / canvas snapshots to streaming jobs; finished rows leave at once

so a request waits for a free row, never for the other requests to finish. A row's tokens do not depend
on the rows next to it (DESIGN §4 "Serving"), so a served answer equals an unbatched `generate` call.
The HTTP side (asyncio) and the worker meet only through `Job`: the worker writes a job's state and
wakes its event loop; readers coalesce, so a slow client never slows the sampler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dlm.cache import resolve_mode
from dlm.errors import UsageError
from dlm.prompts import Prompt, stop_ids_for
from dlm.sampling import RunningBatch, SampleResult, SamplerConfig, as_denoiser

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests waiting: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s until a row is likely free")
        self.retry_after = retry_after


@dataclass
class Choice:
    """One row's answer as the client sees it."""

    index: int
    text: str = ""            # settled text so far; the final text once `done`
    done: bool = False
    finish_reason: str | None = None
    result: SampleResult | None = None
    canvas: list[int] | None = None   # latest region snapshot (denoise jobs only), mask id where undecided
    blank: list[int] | None = None    # the region when the row joined (denoise jobs only)
    step: int = 0
    nfe: int = 0


@dataclass
class Job:
    """A request: prompts x n rows with one config; the worker fills it in, the HTTP side reads it.

    `prompts` are token ids (`dlm.prompts.encode_prompt`), or text/messages encoded with `chat`."""

    prompts: list[Prompt]
    config: SamplerConfig
    n: int = 1
    seed: int | None = None
    chat: bool = True
    stop: list[str] = field(default_factory=list)
    follow: bool = False       # keep the settled text up to date every step (streaming)
    watch: bool = False        # keep a canvas snapshot per step (the denoise endpoint)
    loop: asyncio.AbstractEventLoop | None = None
    choices: list[Choice] = field(default_factory=list)
    admitted: bool = False
    error: str | None = None
    error_status: int = 400    # 400: the request's fault (canvas too long...); 500: ours
    cancelled: bool = False
    t0: float = field(default_factory=time.perf_counter)
    changed: asyncio.Event | None = None

    def __post_init__(self):
        self.choices = [Choice(index=i) for i in range(len(self.prompts) * self.n)]
        if self.loop is not None:
            self.changed = asyncio.Event()

    @property
    def rows(self) -> int:
        return len(self.choices)

    @property
    def finished(self) -> bool:
        return self.error is not None or all(c.done for c in self.choices)

    def notify(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.changed.set)

    async def wait(self) -> None:
        """Until the worker changed something (call again for the next change)."""
        await self.changed.wait()
        self.changed.clear()


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine:
    """The scheduler: a queue of jobs in front of one running batch of at most `max_batch_size` rows.

    `max_batch_size=1` serves one request at a time (the baseline that step-level batching is measured
    against). `submit` raises `QueueFull` when `max_queue` jobs are already waiting.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_queue: int = 256,
                 defaults: SamplerConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.mask_id = tokenizer.mask_token_id
        self.stop_ids = set(stop_ids_for(tokenizer))
        # One running batch per denoiser (prompt-cache mode): (mode, block_length) -> its key, key -> batch.
        # Row ids come from one counter, so they are unique across batches; `home` says where a row runs.
        self.ids = itertools.count()
        self.keys: dict[tuple, tuple] = {}
        self.batches: dict[tuple, RunningBatch] = {}
        self.home: dict[int, RunningBatch] = {}
        self.max_positions = self._batch_for(defaults or SamplerConfig()).denoiser.max_positions
        self.pending: deque[Job] = deque()
        self.owners: dict[int, tuple[Job, Choice]] = {}   # row id -> (job, choice)
        self.settled_len: dict[int, int] = {}              # row id -> settled tokens last decoded
        self.steps_run = 0
        self.step_seconds = 0.0   # time inside step_once (the forward passes and decisions)
        self.rows_stepped = 0     # rows in flight summed over steps: / steps_run = mean batch size
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dlm-sampler", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue a job; its rows join the batch at a step boundary once they fit."""
        if job.rows > self.max_batch_size:
            raise UsageError(f"n x prompts = {job.rows} rows, more than the server's --max_batch_size "
                             f"{self.max_batch_size}")
        with self._wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(retry_after=max(1, round(self.expected_wait())))
            self.pending.append(job)
            self._wake.notify()

    def expected_wait(self) -> float:
        """A rough time until queued work drains: recent seconds per step x steps of the queued rows."""
        per_step = self.step_seconds / max(self.steps_run, 1)
        queued_rows = sum(j.rows for j in self.pending)
        return per_step * 64 * (1 + queued_rows / self.max_batch_size)

    def health(self) -> dict:
        steps = max(self.steps_run, 1)
        return {"status": "ok", "queue_depth": len(self.pending), "rows_in_flight": len(self.owners),
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, "steps": self.steps_run,
                "mean_rows_per_step": round(self.rows_stepped / steps, 2),
                "seconds_per_step": round(self.step_seconds / steps, 5)}

    # -- the worker ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._closing and not self.pending and not self.owners:
                    self._wake.wait()
                if self._closing:
                    break
                admit = self._take_admissible()
            for job in admit:
                self._admit(job)
            self._drop_cancelled()
            if not self.owners:
                continue
            try:
                for batch in [b for b in self.batches.values() if b.rows]:
                    t = time.perf_counter()
                    self.rows_stepped += len(batch.rows)
                    batch.step_once()
                    self.step_seconds += time.perf_counter() - t
                    self.steps_run += 1
                    self._publish(batch)
                for key in [k for k, b in self.batches.items() if not b.rows]:
                    del self.batches[key]  # remade (cheap) when a request asks for that mode again
            except Exception as err:  # never let one bad step wedge the server: fail its rows, carry on
                logger.exception("sampler step failed")
                self._fail_all(f"internal error: {err}")

    def _take_admissible(self) -> list[Job]:
        """Queued jobs, in order, whose rows fit next to the rows in flight (called under the lock)."""
        taken, free = [], self.max_batch_size - len(self.owners)
        while self.pending and (self.pending[0].rows <= free or self.pending[0].cancelled):
            job = self.pending.popleft()
            if not job.cancelled:
                free -= job.rows
                taken.append(job)
        return taken

    def _admit(self, job: Job) -> None:
        base = job.seed if job.seed is not None else int(torch.randint(0, 2**62, ()).item())
        added: list[int] = []
        try:
            # Choice p * n + j draws from seed + j, as `generate([prompt] * n, seed=seed)` does.
            batch = self._batch_for(job.config)
            for (p, prompt), j in itertools.product(enumerate(job.prompts), range(job.n)):
                row_id = batch.add(prompt, job.config, chat=job.chat, seed=base + j)
                added.append(row_id)
                self.owners[row_id] = (job, job.choices[p * job.n + j])
                self.home[row_id] = batch
                if job.watch:  # the blank canvas is the first thing a watcher sees
                    job.choices[p * job.n + j].blank = batch.region(row_id)
        except Exception as err:  # a bad request must not take the worker down with it
            for row_id in added:
                self._leave(row_id)
            job.error = str(err) if isinstance(err, UsageError) else f"internal error: {err}"
            if not isinstance(err, UsageError):
                logger.exception("could not admit a request")
                job.error_status = 500
        job.admitted = True
        job.notify()

    def _batch_for(self, cfg: SamplerConfig) -> RunningBatch:
        """The running batch whose denoiser is the one `cfg.prompt_cache` asks for (made when first needed;
        a refused mode raises UsageError)."""
        wanted = (cfg.prompt_cache, cfg.block_length)
        if wanted not in self.keys:
            if len(self.keys) > 256:  # every block length a client sent: keep the table small
                self.keys.clear()
            module = isinstance(self.model, torch.nn.Module)  # else a ready-made denoiser: one batch
            self.keys[wanted] = resolve_mode(self.model, *wanted) if module else ()
        key = self.keys[wanted]
        if key not in self.batches:
            self.batches[key] = RunningBatch(as_denoiser(self.model, cfg, self.mask_id), self.tokenizer, ids=self.ids)
        return self.batches[key]

    def _leave(self, row_id: int) -> None:
        batch = self.home.pop(row_id, None)
        if batch is not None:
            batch.release(row_id)
        self.owners.pop(row_id, None)
        self.settled_len.pop(row_id, None)

    def _drop_cancelled(self) -> None:
        for row_id, (job, _) in list(self.owners.items()):
            if job.cancelled:
                self._leave(row_id)

    def _fail_all(self, message: str) -> None:
        for job, _ in self.owners.values():
            job.error, job.error_status = message, 500
            job.notify()
        self.owners.clear()
        self.settled_len.clear()
        self.home.clear()
        self.batches.clear()  # they may be half-stepped: new ones are made for the next requests

    def _publish(self, batch: RunningBatch) -> None:
        for row in list(batch.rows):
            job, choice = self.owners[row.id]
            choice.step, choice.nfe = row.steps, row.nfe
            if row.done:
                result = batch.result(row.id)
                text, hit = cut_at_stop(result.text, job.stop)
                choice.text, choice.result, choice.done = text, result, True
                ended = hit or any(t in self.stop_ids for t in result.output_ids)
                choice.finish_reason = "stop" if ended else "length"
                if job.watch:
                    choice.canvas = result.output_ids
                self._leave(row.id)
            else:
                follows = job.follow or bool(job.stop)  # a stop string may end the row early
                if not (follows or job.watch):
                    continue
                region = batch.region(row.id)
                if job.watch:
                    choice.canvas = region
                if not (follows and self._settle(row.id, region, job, choice)) and not job.watch:
                    continue
            job.notify()

    def _settle(self, row_id: int, region: list[int], job: Job, choice: Choice) -> bool:
        """Update the settled text (decided prefix up to the first end-of-turn); a stop string in it
        finishes the choice now. True when the job's readers have something new."""
        settled = region.index(self.mask_id) if self.mask_id in region else len(region)
        if settled == self.settled_len.get(row_id, -1):
            return False
        self.settled_len[row_id] = settled
        end = next((j for j, t in enumerate(region[:settled]) if t in self.stop_ids), settled)
        text = self.tokenizer.decode(region[:end], skip_special_tokens=True)
        text, hit = cut_at_stop(text, job.stop)
        choice.text = text
        if hit:  # the rest cannot change the text before the stop string: free the row
            choice.result = self.home[row_id].result(row_id)
            choice.done, choice.finish_reason = True, "stop"
            self._leave(row_id)
        return True
