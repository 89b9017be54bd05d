"""inference.py end to end: real subprocess runs on a tiny checkpoint (JSON, recipe flags, live view on a
pseudo-terminal, chat history, prompts files) and every bad input as a one-line error with exit status 2.

The runs are independent processes, so they are started together on a small pool when the module
begins; each test then waits for its own run. This keeps the module's wall time near the slowest run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import termios
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "inference.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore", "COLUMNS": "100", "TERM": "xterm-256color"}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _run(args: list[str], stdin: str | None = None) -> Run:
    proc = subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def _run_on_pty(args: list[str]) -> Run:
    """Run with stdout on a pseudo-terminal (100x30), as in an interactive shell."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=300)
    return Run(proc.returncode, b"".join(chunks).decode("utf-8", "replace"), stderr)


PROMPTS = ["What is the sum of 2 and 3?", "Tell me about the sea"]
SAMPLER = ["--gen_length", "12", "--num_steps", "6", "--block_length", "6", "--seed", "3"]


@pytest.fixture(scope="module")
def paths(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inference")
    partial = tmp / "partial"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "config.json", partial)
    nomask = tmp / "nomask"
    shutil.copytree(tiny_model_dir, nomask)
    cfg = json.loads((nomask / "tokenizer_config.json").read_text())
    cfg.pop("mask_token")
    (nomask / "tokenizer_config.json").write_text(json.dumps(cfg))
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"instruction": "Add the numbers", "input": "2 and 3"}) + "\n"
                            + json.dumps({"prompt": PROMPTS[1]}) + "\n")
    return {"model": tiny_model_dir, "partial": partial, "nomask": nomask,
            "prompts_file": prompts_file}


def _bad_inputs(p: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    m = ["--model", str(p["model"]), "--prompt", PROMPTS[0]]
    return {
        "canvas_shorter_than_prompt": ([*m, "--seq_len", "6"], "--seq_len 6 leaves no room to generate: the prompt is"),
        "num_steps_below_one": ([*m, "--num_steps", "0"], "--num_steps must be at least 1, got 0"),
        "steps_do_not_divide": ([*m, "--gen_length", "32", "--block_length", "8", "--num_steps", "6"],
                                "--num_steps 6 does not divide over 4 blocks of 8 (generated length 32): "
                                "use a multiple of 4, such as 4 or 8"),
        "block_longer_than_generation": ([*m, "--gen_length", "16", "--block_length", "32"],
                                         "--block_length 32 is larger than the generated length 16"),
        "top_p_zero": ([*m, "--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
        "top_p_above_one": ([*m, "--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
        "missing_checkpoint": (["--model", str(p["model"]) + "_nope", "--prompt", "x"], "no such file or folder"),
        "partial_checkpoint": (["--model", str(p["partial"]), "--prompt", "x"], "checkpoint has no model.safetensors"),
        "model_without_mask_token": (["--model", str(p["nomask"]), "--prompt", "x"], "the tokenizer has no mask token"),
        "no_prompt": (["--model", str(p["model"])], "no prompt: pass --prompt, --prompts_file or --chat"),
        "seq_len_and_gen_length": ([*m, "--seq_len", "64", "--gen_length", "8"], "exclude each other"),
        "unknown_strategy": ([*m, "--remasking", "greedy"], "invalid choice"),
        "prompt_cache_exact_without_isolation": ([*m, "--prompt_cache", "exact"], "--prompt_cache exact: the model "
                                                 "was trained without --prompt_isolation"),
    }


@pytest.fixture(scope="module")
def runs(paths) -> dict[str, Future]:
    model = str(paths["model"])
    jobs = {
        # The reference recipe's command, as written (smaller sizes), on a terminal: live view, then answers.
        "recipe_live": lambda: _run_on_pty(["--safetensors_path", str(paths["model"] / "model.safetensors"),
                                            "--seq_len", "96", "--num_steps", "96", "--hf_model_name", model,
                                            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]),
        "piped": lambda: _run(["--model", model, "--prompt", PROMPTS[0], "--prompts_file", str(paths["prompts_file"]),
                               *SAMPLER]),
        "chat": lambda: _run(["--model", model, "--chat", "--json", "--no_early_stop", *SAMPLER],
                             stdin="Hello\nHow are you\n/exit\nnever read\n"),
    }
    jobs.update({name: (lambda a=args: _run(a)) for name, (args, _) in _bad_inputs(paths).items()})
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def library(tiny_model_dir):
    from dlm.modeling import load_checkpoint

    return load_checkpoint(str(tiny_model_dir))


def test_recipe_command_on_a_terminal_shows_the_live_view(runs, library):
    from dlm.sampling import SamplerConfig, generate

    run = runs["recipe_live"].result()
    assert run.returncode == 0, run.stderr
    out = run.stdout.replace("\r\n", "\n")
    assert "\x1b[" in out                      # drawn with terminal control sequences
    assert "░" in out                          # undecided positions are visible
    assert " tokens · step " in out and "row 2 · NFE" in out  # progress bar, one panel per row
    model, tokenizer = library
    expected = generate(model, tokenizer, PROMPTS, SamplerConfig(seq_len=96, steps=96), seed=0)
    assert all(len(r.prompt_ids) + len(r.output_ids) == 96 for r in expected)
    # After the (transient) view: the answers, exactly as the library produces them.
    answers = out.split("── 1/2 ──\n")[-1]
    assert answers == f"{expected[0].text}\n── 2/2 ──\n{expected[1].text}\n"


def test_piped_output_is_plain_text_and_reads_prompts_files(runs, library):
    from dlm.sampling import SamplerConfig, generate

    run = runs["piped"].result()
    assert run.returncode == 0, run.stderr
    model, tokenizer = library
    prompts = [PROMPTS[0], "Add the numbers\n\n2 and 3", PROMPTS[1]]  # --prompt first, then the JSONL file
    expected = generate(model, tokenizer, prompts, SamplerConfig(gen_length=12, steps=6, block_length=6), seed=3)
    assert run.stdout == "".join(f"── {i + 1}/3 ──\n{r.text}\n" for i, r in enumerate(expected))
    assert "\x1b[" not in run.stdout and "░" not in run.stdout  # no live view when piped
    stats = [line for line in run.stderr.splitlines() if "NFE" in line]  # one stats line per answer, on stderr
    assert len(stats) == 3
    for line, r in zip(stats, expected):
        assert line.startswith(f"[{r.num_generated} tokens · NFE {r.nfe} · {r.tokens_per_forward:.2f} tokens/forward")


def test_chat_json_fields_and_history_in_the_template(runs, library):
    from dlm.sampling import SamplerConfig, generate
    from dlm.tokenization import encode_chat, render_chat

    run = runs["chat"].result()
    assert run.returncode == 0, run.stderr
    turns = [json.loads(line) for line in run.stdout.splitlines()]
    assert [t["prompt"] for t in turns] == ["Hello", "How are you"]  # stopped at /exit
    model, tokenizer = library
    first, second = turns
    for turn in turns:
        assert set(turn) >= {"text", "prompt_ids", "output_ids", "nfe", "seconds"}
        assert len(turn["output_ids"]) == 12 and turn["nfe"] == 6 and turn["seconds"] > 0
    opening = [{"role": "user", "content": "Hello"}]
    assert first["prompt_ids"] == encode_chat(tokenizer, opening, add_generation_prompt=True)
    exp = generate(model, tokenizer, [opening], SamplerConfig(gen_length=12, steps=6, block_length=6,
                                                              stop_at_eos=False), seed=3)[0]
    assert (first["output_ids"], first["text"]) == (exp.output_ids, exp.text)
    # Turn two re-renders the whole conversation: its prompt extends turn one's.
    assert second["prompt_ids"][:len(first["prompt_ids"])] == first["prompt_ids"]
    history = opening + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "How are you"}]
    assert tokenizer.decode(second["prompt_ids"]) == render_chat(tokenizer, history, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(_bad_inputs({k: Path("/x") for k in
                                                   ("model", "partial", "nomask", "prompts_file")})))
def test_bad_input_is_one_line_exit_2(runs, paths, name):
    run = runs[name].result()
    expected = _bad_inputs(paths)[name][1]
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "error:" in lines[0] and expected in lines[0]


def test_prompts_file_formats(tmp_path):
    from dlm.errors import UsageError
    from inference import read_prompts_file

    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts_file(str(text)) == ["first prompt", "second prompt"]
    records = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"prompt": "Hi"},
               {"messages": [{"role": "user", "content": "Yo"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_list = tmp_path / "alpaca.json"  # an Alpaca-style JSON list, as prepare_sft_data.py reads
    as_list.write_text(json.dumps(records, indent=2))
    expected = ["Add\n\n2 and 3", "Hi", [{"role": "user", "content": "Yo"}]]
    assert read_prompts_file(str(jsonl)) == expected == read_prompts_file(str(as_list))
    jsonl.write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(UsageError, match="line 2: not JSON"):
        read_prompts_file(str(jsonl))
    as_list.write_text(json.dumps([records[0], {"output": "x"}]))
    with pytest.raises(UsageError, match="record 2: expected a `prompt`"):
        read_prompts_file(str(as_list))
