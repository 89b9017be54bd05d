"""Measuring a diffusion LM: ELBO likelihood on prepared data, and exact-match accuracy on checkable tasks.

ELBO. For each test row, `dlm.diffusion.likelihood_nll` gives a stratified Monte-Carlo upper bound
on -log p(maskable tokens). The draws of a row are split into `mc_groups` independent stratified
groups, so that besides the usual standard error over rows (data + Monte Carlo: how well the
number generalises) we also get the Monte-Carlo-only standard error (conditional on these rows:
how far the number may sit from the exact ELBO of this very data, e.g. from the Trainer's eval loss).

Two normalisations are reported:
  * `nll_per_token` = sum_b nll_b / sum_b n_b, the per-token NLL behind the perplexity bound;
  * `loss`          = mean_b nll_b / n_b, what the Trainer's eval loss estimates (`elbo_loss` is a
                      per-row mean; for fixed-length pretraining rows the two coincide).
The scored region of a row is fixed by the row alone (DESIGN §4): every token of a pretraining row; in
SFT the answer as prepared (each assistant turn and its end-of-turn). The EOS padding that batching adds
is neither attended nor scored, and each row draws its noise from a generator seeded by (seed, row
index), so a row's estimate, and every figure here, is the same at any batch size. The Trainer's eval
loss scores the same region.

Tasks. Exact match after whitespace normalisation, with the accuracy's binomial standard error,
forward passes (NFE) per generated token and tokens per second.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dlm.errors import UsageError
from dlm.synthetic import normalize_answer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def exact_match(prediction: str, answer: str) -> bool:
    """Equal after trimming and collapsing whitespace runs (see `normalize_answer`)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error (sample std / sqrt(n)); stderr is nan for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_and_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """R = sum(x) / sum(y) and its delta-method standard error over the n (x_i, y_i) pairs.

    The per-token NLL is such a ratio (nats over tokens, rows of different lengths); treating rows
    as the independent units gives var(R) ~ n / (n - 1) * sum (x_i - R y_i)^2 / (sum y)^2.
    """
    n = len(numerators)
    if n == 0 or n != len(denominators):
        raise ValueError("ratio_and_stderr needs equally many numerators and denominators, at least one")
    total_y = math.fsum(denominators)
    ratio = math.fsum(numerators) / total_y
    if n < 2:
        return ratio, float("nan")
    resid = math.fsum((x - ratio * y) ** 2 for x, y in zip(numerators, denominators))
    return ratio, math.sqrt(n / (n - 1) * resid) / total_y


def binomial_stderr(successes: int, n: int) -> float:
    """Standard error of an accuracy k / n: sqrt(p (1 - p) / n)."""
    if n == 0:
        return float("nan")
    p = successes / n
    return math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------
# ELBO on prepared data
# ---------------------------------------------------------------------------------------------

@dataclass
class ElboResult:
    nll_per_token: float
    stderr: float  # over rows: data + Monte Carlo
    mc_stderr: float  # Monte Carlo only, conditional on these rows
    perplexity_bound: float
    loss: float  # mean over rows of the per-token NLL: the Trainer's eval-loss normalisation
    loss_stderr: float
    loss_mc_stderr: float
    rows: int
    tokens: int
    num_samples: int
    seed: int
    split: str
    format: str


def elbo_rows(model: torch.nn.Module, batch_iter, mask_id: int, num_samples: int, seed: int,
              mc_groups: int = 2, sparse: bool = True, progress=None) -> tuple[list[float], list[float], list[float]]:
    """Per-row ELBO NLL (nats), scored-token counts and Monte-Carlo variance of the NLL estimate.

    `batch_iter` yields collated batches (`input_ids`, optional `answer_mask`, `is_padding` and
    `attention_mask`). Row i (counted over all batches) draws from `row_generator(seed, i)`. Each row gets
    `num_samples` draws in `mc_groups` independently stratified groups; the spread of the group means
    estimates the Monte-Carlo variance of their average (unbiased, per row).
    """
    from dlm.diffusion import likelihood_nll, row_generator
    from dlm.isolation import is_isolated, isolation_attention_mask, prompt_lengths

    if num_samples < mc_groups or num_samples % mc_groups:
        raise UsageError(f"--num_samples {num_samples} must be a positive multiple of --mc_groups {mc_groups}")
    device = next(model.parameters()).device
    nlls, counts, mc_vars = [], [], []
    for batch in batch_iter:
        ids = batch["input_ids"].to(device)
        maskable = batch["answer_mask"].bool().to(device) if "answer_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        # Rows of different lengths (the harness's requests) carry an attention mask; SFT batch padding is
        # not part of any row: neither attended nor scored.
        attention = batch["attention_mask"].to(device) if "attention_mask" in batch else None
        if "is_padding" in batch:
            padding = batch["is_padding"].to(device)
            maskable, attention = maskable & ~padding, (~padding).long()
        lengths = attention.sum(1).tolist() if attention is not None else None
        if is_isolated(model):  # a model trained with prompt isolation is scored as it was trained (and samples)
            attention = isolation_attention_mask(model, ids, prompt_lengths(maskable), attention)
        generators = [row_generator(seed, len(nlls) + b) for b in range(len(ids))]
        groups = torch.stack([likelihood_nll(model, ids, maskable, mask_id, num_samples // mc_groups, generators,
                                             sparse=sparse, attention_mask=attention, lengths=lengths).double().cpu()
                              for _ in range(mc_groups)])
        mean = groups.mean(0)
        var = groups.var(0, unbiased=True) / mc_groups if mc_groups > 1 else torch.full_like(mean, float("nan"))
        nlls += mean.tolist()
        counts += maskable.sum(1).cpu().tolist()
        mc_vars += var.tolist()
        if progress is not None:
            progress(len(nlls))
    return nlls, counts, mc_vars


def summarize_elbo(nlls: Sequence[float], counts: Sequence[float], mc_vars: Sequence[float], **info) -> ElboResult:
    """Both normalisations of the ELBO with their data and Monte-Carlo standard errors."""
    per_token, se = ratio_and_stderr(nlls, counts)
    total = math.fsum(counts)
    mc_se = math.sqrt(math.fsum(mc_vars)) / total
    per_row = [x / n for x, n in zip(nlls, counts)]
    loss, loss_se = mean_and_stderr(per_row)
    loss_mc_se = math.sqrt(math.fsum(v / n ** 2 for v, n in zip(mc_vars, counts))) / len(per_row)
    return ElboResult(nll_per_token=per_token, stderr=se, mc_stderr=mc_se, perplexity_bound=math.exp(per_token),
                      loss=loss, loss_stderr=loss_se, loss_mc_stderr=loss_mc_se, rows=len(nlls),
                      tokens=int(total), **info)


def prepared_format(data_path: str | Path) -> str:
    """The format (pretraining or SFT) of a prepared folder, checked before any model is loaded."""
    from dlm.data.storage import METADATA_FILE, PRETRAIN_FORMAT, SFT_FORMAT, load_prepared

    meta_path = Path(data_path) / METADATA_FILE
    fmt = PRETRAIN_FORMAT
    if meta_path.is_file():
        try:
            fmt = json.loads(meta_path.read_text()).get("format")
        except json.JSONDecodeError as err:
            raise UsageError(f"--path_to_prepped_data {meta_path}: malformed JSON ({err})") from None
    fmt = fmt if fmt in (PRETRAIN_FORMAT, SFT_FORMAT) else PRETRAIN_FORMAT
    load_prepared(data_path, fmt)  # raises the one-line error for a missing or foreign folder
    return fmt


def evaluate_elbo(model: torch.nn.Module, tokenizer, data_path: str | Path, split: str = "test",
                  batch_size: int = 8, num_samples: int = 32, mc_groups: int = 2, seed: int = 0,
                  max_rows: int | None = None, sparse: bool = True) -> ElboResult:
    """ELBO per-token NLL of a prepared split (pretraining or SFT folder), seeded per row; the batch size
    changes the speed, not the figures."""
    from transformers import default_data_collator

    from dlm.data.collators import SFTCollator
    from dlm.data.storage import SFT_FORMAT, load_prepared
    from dlm.tokenization import special_ids

    fmt = prepared_format(data_path)
    data, meta = load_prepared(data_path, fmt, tokenizer)
    if split not in data:
        raise UsageError(f"--split {split!r}: the prepared data has splits {', '.join(data)}")
    rows = data[split]
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        raise UsageError(f"--path_to_prepped_data {data_path}: split {split!r} is empty")
    ids = special_ids(tokenizer)
    collate = SFTCollator(pad_id=ids.eos) if fmt == SFT_FORMAT else default_data_collator  # as in training
    columns = ["input_ids", "answer_mask"] if fmt == SFT_FORMAT else ["input_ids"]

    def batches():
        for start in range(0, len(rows), batch_size):
            chunk = rows.select(range(start, min(start + batch_size, len(rows))))
            yield collate([{c: r[c] for c in columns} for r in chunk])

    model.eval()
    nlls, counts, mc_vars = elbo_rows(model, batches(), ids.mask, num_samples, seed, mc_groups, sparse)
    return summarize_elbo(nlls, counts, mc_vars, num_samples=num_samples, seed=seed, split=split, format=fmt)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned), readable on a terminal and in a log."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)])


# ---------------------------------------------------------------------------------------------
# Generation accuracy on checkable tasks
# ---------------------------------------------------------------------------------------------

@dataclass
class TaskItem:
    prompt: str | list
    answer: str
    task: str = "task"


@dataclass
class TaskResult:
    """Accuracy and speed of one sampler setting over a task file."""

    accuracy: float
    stderr: float
    correct: int
    n: int
    nfe: int  # forward passes, all rows
    answer_tokens: int  # generated tokens up to and including the first end-of-turn/EOS, all rows
    nfe_per_token: float
    tokens_per_forward: float
    tokens_per_second: float
    seconds: float
    per_task: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


def load_tasks(path: str | Path, limit: int | None = None, flag: str = "--tasks") -> list[TaskItem]:
    """Read a JSONL of {prompt, answer[, task]} (prompt: text, or a list of chat messages)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file")
    items = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{flag} {p}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
            raise UsageError(f"{flag} {p}:{lineno}: expected an object with \"prompt\" and \"answer\"")
        items.append(TaskItem(rec["prompt"], str(rec["answer"]), str(rec.get("task", "task"))))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UsageError(f"{flag} {p}: no tasks in the file")
    return items


def answer_length(output_ids: Sequence[int], stop_ids: Sequence[int]) -> int:
    """Generated tokens that carry the answer: up to and including the first stop token.

    The EOS tail after it is filled for free by early stopping, so it is not counted as work done.
    """
    stops = set(stop_ids)
    return next((i + 1 for i, t in enumerate(output_ids) if t in stops), len(output_ids))


def evaluate_tasks(model: torch.nn.Module, tokenizer, items: Sequence[TaskItem], config, *, chat: bool = True,
                   seed: int = 0, batch_size: int = 64, on_step=None) -> TaskResult:
    """Generate an answer for each item with `dlm.sampling.generate` and score exact match and speed."""
    from dlm.prompts import stop_ids_for
    from dlm.sampling import generate

    stop_ids = stop_ids_for(tokenizer)
    start = time.perf_counter()
    results = generate(model, tokenizer, [it.prompt for it in items], config, chat=chat, seed=seed,
                       batch_size=batch_size, on_step=on_step)
    seconds = time.perf_counter() - start
    predictions, per_task = [], {}
    for it, res in zip(items, results):
        ok = exact_match(res.text, it.answer)
        predictions.append({"prompt": it.prompt, "answer": it.answer, "prediction": res.text, "correct": ok,
                            "nfe": res.nfe, "task": it.task})
        per_task.setdefault(it.task, []).append(ok)
    correct = sum(p["correct"] for p in predictions)
    nfe = sum(r.nfe for r in results)
    tokens = sum(answer_length(r.output_ids, stop_ids) for r in results)
    return TaskResult(
        accuracy=correct / len(items), stderr=binomial_stderr(correct, len(items)), correct=correct, n=len(items),
        nfe=nfe, answer_tokens=tokens, nfe_per_token=nfe / max(tokens, 1), tokens_per_forward=tokens / max(nfe, 1),
        tokens_per_second=tokens / seconds if seconds > 0 else float("inf"), seconds=seconds,
        per_task={k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_task.items())},
        predictions=predictions)
