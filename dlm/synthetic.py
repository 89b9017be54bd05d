"""Synthetic instruction tasks whose answers can be checked, for training and judging offline.

Each task draws problems with an *identity* (the operands, the list) and renders them in Alpaca
form (`{instruction, input, output}`). The train/held-out split is decided on the identity, by a
seeded hash, so that no held-out problem reaches training in any rendering: for addition the
identity is the unordered pair {a, b} (a+b and b+a are the same problem to a model that has
learned commutativity), for list tasks it is the list itself.

Tasks (all answers are a deterministic function of the problem):
  * `addN`     N-digit addition:            "47+38="            -> "85"
  * `reverse`  reverse a list of letters:    "reverse: q b z k"  -> "k z b q"
  * `sort`     sort a list of digits:        "sort: 7 2 9 2"     -> "2 2 7 9"
  * `fewshot`  2-digit addition after 22 solved examples, one per line (a ~210-token prompt; the
               examples never contain the query pair, and the split is add2's, so a held-out fewshot
               query is a held-out add2 problem): "12+34=46\n...\n47+38="  -> "85"

The renderings are deliberately terse: with a tokenizer that splits digits one per token the
answer of `add2` is two or three tokens, which a tiny model learns in a few CPU minutes.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dlm.errors import UsageError


@dataclass(frozen=True)
class Problem:
    """One checkable problem: its split identity, its Alpaca rendering and its answer."""

    task: str
    key: tuple
    instruction: str
    answer: str
    input: str = ""
    split_as: str = ""  # the task whose train/held-out split this problem follows (default: its own)

    def to_alpaca(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.answer}


@dataclass(frozen=True)
class TaskSpec:
    """How to draw one random problem of a task, and how many distinct identities exist (None = many)."""

    name: str
    draw: Callable[[random.Random], Problem]
    describe: str
    space: int | None = None


def _addition(digits: int) -> TaskSpec:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    name = f"add{digits}"

    def draw(rng: random.Random) -> Problem:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return Problem(name, (min(a, b), max(a, b)), f"{a}+{b}=", str(a + b))

    n = hi - lo + 1
    return TaskSpec(name, draw, f"{digits}-digit addition", space=n * (n + 1) // 2)


def _reverse(min_len: int = 8, max_len: int = 16) -> TaskSpec:
    def draw(rng: random.Random) -> Problem:
        items = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len))]
        return Problem("reverse", tuple(items), "reverse: " + " ".join(items), " ".join(reversed(items)))

    return TaskSpec("reverse", draw, f"reverse a list of {min_len}-{max_len} letters")


def _sort(min_len: int = 4, max_len: int = 10) -> TaskSpec:
    def draw(rng: random.Random) -> Problem:
        items = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
        return Problem("sort", tuple(items), "sort: " + " ".join(map(str, items)),
                       " ".join(map(str, sorted(items))))

    return TaskSpec("sort", draw, f"sort a list of {min_len}-{max_len} digits")


def _fewshot(shots: int = 22) -> TaskSpec:
    base = _addition(2)

    def draw(rng: random.Random) -> Problem:
        query = base.draw(rng)
        examples = []
        while len(examples) < shots:
            ex = base.draw(rng)
            if ex.key != query.key:  # the answer is never in its own prompt
                examples.append(f"{ex.instruction}{ex.answer}")
        return Problem("fewshot", query.key, "\n".join(examples + [query.instruction]), query.answer,
                       split_as=base.name)

    return TaskSpec("fewshot", draw, f"2-digit addition after {shots} solved examples (long prompt)", base.space)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in
                              [_addition(2), _addition(3), _addition(4), _addition(5), _reverse(), _sort(),
                               _fewshot()]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UsageError(f"--tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def is_heldout(problem: Problem, fraction: float, seed: int) -> bool:
    """Whether a problem's identity belongs to the held-out split: a seeded hash, stable across runs."""
    digest = hashlib.sha256(f"{seed}|{problem.split_as or problem.task}|{problem.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def generate_split(task: str, count: int, heldout: bool, fraction: float = 0.1, seed: int = 0,
                   unique: bool = True) -> list[Problem]:
    """`count` problems of one task from one side of the split (held-out or train), reproducibly.

    Held-out problems are always distinct; training problems are distinct while the task's space
    allows it (`unique`), then repeat. Raises `UsageError` when the held-out side is too small.
    """
    spec = get_task(task)
    if not 0 < fraction < 1:
        raise UsageError(f"--heldout_fraction must be in (0, 1), got {fraction}")
    rng = random.Random(f"{seed}|{task}|{'heldout' if heldout else 'train'}")
    out: list[Problem] = []
    seen: set = set()
    misses = 0  # consecutive draws rejected as duplicates: the side's space is exhausted
    for problem in _draws(spec, rng):
        if is_heldout(problem, fraction, seed) != heldout:
            continue
        ident = (problem.key, problem.instruction)
        if (heldout or unique) and ident in seen:
            misses += 1
            if misses > 20_000:
                if heldout:
                    raise UsageError(f"--num_heldout: task {task} has only {len(out)} held-out problems, "
                                     f"fewer than {count}; raise --heldout_fraction")
                unique = False  # the train side of a small task repeats problems, as epochs would
            continue
        misses = 0
        seen.add(ident)
        out.append(problem)
        if len(out) == count:
            return out
    raise AssertionError("unreachable")


def _draws(spec: TaskSpec, rng: random.Random) -> Iterator[Problem]:
    while True:
        yield spec.draw(rng)


def pretraining_lines(problems: list[Problem]) -> list[str]:
    """Plain-text renderings ("47+38=85") of training problems: a corpus for the pretraining stage."""
    return [f"{p.instruction}{'' if p.instruction.endswith('=') else ' -> '}{p.answer}" for p in problems]


_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: trim, and collapse every whitespace run to one space."""
    return _WS.sub(" ", text).strip()


def task_prompt(problem: Problem) -> str:
    """The user turn of a problem exactly as training renders its Alpaca record (dlm.data.alpaca_to_messages)."""
    from dlm.data.chat import alpaca_to_messages

    messages = alpaca_to_messages(problem.to_alpaca())
    return next(m["content"] for m in messages if m["role"] == "user")
