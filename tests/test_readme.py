"""Every command in the README runs, so none of them rots.

Each line of a ```bash block is one command. The setup and test commands are what CI (`.ci/run`)
runs; `bash quickstart.sh` is run (shortened) by test_quickstart.py; every other command runs here,
in README order, in one scratch folder, as written except for tiny sizes: the hub model becomes a tiny
local ModernBERT, hub datasets become local files, step counts and lengths shrink, and GPU accelerate
configs become the 2-process CPU (gloo) config. A command this file does not know how to shrink fails
the test rather than being skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT.parent / "shared" / "DESIGN.md"
SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca_sample.json"
HUB_MODELS = ("answerdotai/ModernBERT-large", "answerdotai/ModernBERT-base")

# Flag values that shrink a GPU-sized command to a CPU-sized one (every other value is kept as written).
TINY_VALUES = {
    "--context_length": "128", "--num_workers": "2", "--num_training_steps": "4", "--per_gpu_batch_size": "4",
    "--num_warmup_steps": "1", "--evaluation_interval": "2", "--checkpoint_interval": "2", "--seq_len": "48",
    "--num_steps": "16", "--gen_length": "24", "--block_length": "8", "--num_train": "300", "--num_heldout": "10",
    "--num_processes": "2", "--limit": "2",
}
# accelerate launch options that only mean something on a real multi-node cluster.
CLUSTER_OPTIONS = {"--machine_rank", "--main_process_ip", "--num_machines", "--main_process_port"}
CI_COMMANDS = ("pip install -r requirements.txt", "python -m pytest -q")


def code_commands(text: str, language: str = "bash") -> list[str]:
    """The commands of a markdown text's fenced blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(rf"```{language}\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = shlex.join(shlex.split(line, comments=True))
            if line:
                commands.append(line)
    return commands


def readme_commands() -> list[str]:
    return code_commands(README.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smaller(value: str, tiny: str) -> str:
    """The README's value, or the tiny one when that is smaller (`--gen_length 0` stays 0)."""
    return tiny if float(tiny) < float(value) else value


def shrink(command: str, model_dir: Path, corpus: Path, alpaca: Path) -> list[str]:
    """The README command as an argv that runs offline on 2 CPU cores in seconds."""
    argv = shlex.split(command)
    if argv[:2] == ["accelerate", "launch"]:
        head = [sys.executable, "-m", "accelerate.commands.launch"]
        rest = argv[2:]
        while rest and not rest[0].endswith(".py"):
            option = rest.pop(0)
            value = rest.pop(0)
            if option == "--config_file":
                assert (ROOT / value).is_file(), f"README names a missing accelerate config: {value}"
                value = str(ROOT / "configs/accelerate/cpu_multiprocess.yaml")
            elif option in TINY_VALUES:
                value = smaller(value, TINY_VALUES[option])
            if option not in CLUSTER_OPTIONS:
                head += [option, value]
        head += ["--main_process_port", str(free_port())]
        argv = ["python"] + rest
    elif argv[0] == "python":
        head = [sys.executable]
    else:
        raise AssertionError(f"README command this test cannot run: {command}")
    if argv[1] == "-m":  # a module of the package (python -m dlm.harness ...)
        module = argv[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"README runs a missing module: {module}"
        argv = [argv[0], module] + argv[3:]
        out = head + ["-m", module]
    else:
        script = ROOT / argv[1]
        assert script.is_file(), f"README runs a missing script: {argv[1]}"
        out = head + [str(script)]
    args = argv[2:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--large_dataset":
            out += ["--data_files", str(corpus)]
        elif arg == "--dataset":
            out += ["--data_files", str(corpus if "prepare_pretrain" in argv[1] else alpaca)]
            i += 1
        elif arg in TINY_VALUES and i + 1 < len(args):
            out += [arg, smaller(args[i + 1], TINY_VALUES[arg])]
            i += 1
        else:
            out.append(str(model_dir) if arg in HUB_MODELS else arg)
        i += 1
    if argv[1] == "prepare_sft_data.py" and "--data_files" not in out:
        out += ["--data_files", str(alpaca)]  # the default is tatsu-lab/alpaca on the hub
    if argv[1] == "prepare_sft_data.py" and "--context_length" not in out:
        # The default, 1024, keeps Alpaca answers of hundreds of tokens: the SFT canvas that inference.py then
        # defaults to would make every later command sample hundreds of positions one at a time.
        out += ["--context_length", TINY_VALUES["--context_length"]]
    step_flags = ("--num_training_steps", "--max_steps")
    if argv[1] in ("pretrain.py", "finetune_sft.py") and not any(f in out for f in step_flags):
        out += ["--max_steps", TINY_VALUES["--num_training_steps"]]  # the recipe's default is 30,000 SFT steps
    return out


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory, tokenizer) -> Path:
    """The tiny ModernBERT with room for the README's 1024-token SFT default."""
    return save_tiny_model(tokenizer, tmp_path_factory.mktemp("readme_model"), max_position_embeddings=1024)


def test_setup_and_test_commands_are_what_ci_runs():
    commands = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in CI_COMMANDS:
        assert command in commands, f"README lost its command: {command}"
    assert "python3 -m pip install --quiet -r requirements.txt" in ci and "python3 -m pytest -q" in ci
    quick = [c for c in commands if c.startswith("bash ")]
    assert quick == ["bash quickstart.sh"]
    assert "quickstart.sh" in (ROOT / "tests" / "test_quickstart.py").read_text()


def run_tiny(commands: list[str], work: Path, model_dir: Path, corpus_text: str) -> list[tuple[str, str]]:
    """Run `commands` in order in `work`, shrunk; every one must succeed. Returns (command, stdout) pairs."""
    corpus = work / "corpus.txt"
    corpus.write_text(corpus_text)
    alpaca = work / "alpaca.json"
    if SHARED_ALPACA.is_file():
        alpaca.write_text(SHARED_ALPACA.read_text())
    else:
        alpaca.write_text(json.dumps([{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)}
                                      for a in range(60)]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "PYTHONPATH": str(ROOT)}
    ran = []
    for command in commands:
        argv = shrink(command, model_dir, corpus, alpaca)
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{command}\n-> {shlex.join(argv)}\n{proc.stderr[-3000:]}"
        ran.append((command, proc.stdout))
    return ran


def test_every_readme_command_runs_with_tiny_sizes(tmp_path, readme_model, corpus_text):
    commands = [c for c in readme_commands() if c not in CI_COMMANDS and not c.startswith("bash ")]
    assert len(commands) >= 10
    ran = run_tiny(commands, tmp_path, readme_model, corpus_text)

    # What the commands left behind is what the README says they leave.
    for name in ("LDM_Pretraining", "LDM_SFT"):
        run_dir = tmp_path / "work_dir" / name
        assert (run_dir / "final_model" / "model.safetensors").is_file()
        assert (run_dir / "loss_curve.png").is_file()
        assert list(run_dir.glob("checkpoint-*"))
    assert json.loads((tmp_path / "data" / "pretrain" / "metadata.json").read_text())["context_length"] == 128
    assert (tmp_path / "work_dir" / "tokenizer" / "tokenizer.json").is_file()
    json_runs = [out for c, out in ran if "--json" in c and "inference.py" in c]
    assert json_runs and all({"text", "prompt_ids", "output_ids", "nfe"} <= json.loads(line).keys()
                             for out in json_runs for line in out.splitlines())
    evaluation = [out for c, out in ran if "evaluate.py" in c]
    assert evaluation and "exact match" in evaluation[0] and "ELBO NLL" in evaluation[0]
    harness = [out for c, out in ran if c.startswith("python -m dlm.harness ")]
    assert harness and "dlm_add_mc" in harness[0] and "dlm_add_gen" in harness[0]
    assert list((tmp_path / "harness_out").rglob("results_*.json"))
    assert list((tmp_path / "harness_out").rglob("samples_dlm_add_mc_*.jsonl"))  # --log_samples


@pytest.mark.skipif(not DESIGN.is_file(), reason="../shared/DESIGN.md absent")
def test_design_recipe_commands_run_verbatim_with_tiny_sizes(tmp_path, readme_model, corpus_text):
    """DESIGN §1: the reference recipe's commands, flag for flag, with a local tiny model as the hub model."""
    section = DESIGN.read_text(encoding="utf-8").split("## 2.")[0]
    commands = code_commands(section, language="")
    assert [shlex.split(c)[1 if c.startswith("python") else 2] for c in commands] == [
        "prepare_pretrain_data.py", "pretrain.py", "prepare_sft_data.py", "finetune_sft.py", "inference.py",
        "inference.py"]
    run_tiny(commands, tmp_path, readme_model, corpus_text)
    assert (tmp_path / "work_dir" / "LDM_SFT" / "final_model" / "model.safetensors").is_file()


def test_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                "multi_node": "MULTI_GPU", "cpu_multiprocess": "MULTI_GPU",
                "fsdp_sharded": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    found = {p.stem: p for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert sorted(found) == sorted(expected)
    for name, path in found.items():
        config = load_config_from_file(str(path))
        assert str(config.distributed_type).split(".")[-1] == expected[name], name
        assert config.num_processes >= 1
    assert load_config_from_file(str(found["multi_node"])).num_machines == 2
