"""pretrain.py / finetune_sft.py end to end: resume after SIGKILL, 2-process gloo, outputs, bad input.

Every run is a real subprocess of the real scripts on tiny models (hidden 32, 2 layers, vocab 512).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "PYTHONPATH": str(ROOT)}
CONTEXT = 32
LORA_EOT_STEPS = 100


def prepare(script: str, args: dict) -> None:
    res = subprocess.run([sys.executable, str(ROOT / script), *(f"--{k}={v}" for k, v in args.items())],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory, tiny_model_dir, corpus_text) -> Path:
    """Real prepare_pretrain_data.py output: rows of CONTEXT tokens with the tiny model's tokenizer."""
    work = tmp_path_factory.mktemp("pt")
    (work / "corpus.txt").write_text(corpus_text)
    prepare("prepare_pretrain_data.py", {"hf_model_name": tiny_model_dir, "data_files": work / "corpus.txt",
                                         "context_length": CONTEXT, "path_to_data_store": work / "data",
                                         "test_split_pct": 0.1})
    return work / "data"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_model_dir) -> Path:
    """Real prepare_sft_data.py output from a small Alpaca-format file."""
    work = tmp_path_factory.mktemp("sft")
    records = [{"instruction": f"What is {a} plus {a % 7}?", "input": "", "output": f"The sum is {a + a % 7}."}
               for a in range(40)]
    (work / "alpaca.json").write_text(json.dumps(records))
    prepare("prepare_sft_data.py", {"hf_model_name": tiny_model_dir, "data_files": work / "alpaca.json",
                                    "context_length": 64, "path_to_data_store": work / "data", "test_split_pct": 0.2})
    return work / "data"


def pretrain_args(model_dir: Path, data: Path, work: Path, name: str, steps: int, **extra) -> list[str]:
    args = {"experiment_name": name, "working_directory": str(work), "hf_model_name": str(model_dir),
            "path_to_prepped_data": str(data), "num_training_steps": steps, "per_gpu_batch_size": 4,
            "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "logging_steps": 1,
            "evaluation_interval": steps, "checkpoint_interval": steps, "eval_on_start": "false",
            "disable_tqdm": "true", "seed": 7, "crop_probability": 0.3, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


def run(script: str, args: list[str], timeout: int = 120, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable]) + [str(ROOT / script)] + args
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, pretrain_data, tmp_path):
    steps = 24
    ref = run("pretrain.py", pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "ref", steps))
    assert ref.returncode == 0, ref.stderr[-3000:]

    # The same run, checkpointing every 3 steps, killed with SIGKILL right after its first checkpoint.
    args = pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "killed", steps, checkpoint_interval=3)
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "killed"
    deadline = time.time() + 90
    while not (out / "checkpoint-3" / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final_model").exists()
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[-1] < steps

    resumed = run("pretrain.py", args + ["--resume_from_checkpoint=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = losses(tmp_path / "ref" / f"checkpoint-{steps}"), losses(out / f"checkpoint-{steps}")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    wa = load_file(str(tmp_path / "ref" / "final_model" / "model.safetensors"))
    wb = load_file(str(out / "final_model" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    assert not torch.equal(wa[next(iter(wa))], load_file(str(tiny_model_dir / "model.safetensors"))[next(iter(wa))])


DRIVER = """
import hashlib, json, sys
from pathlib import Path
from dlm.errors import ArgumentParser
from dlm.training import DataArguments, DiffusionTrainingArguments, ModelArguments, run_training
parser = ArgumentParser((ModelArguments, DataArguments, DiffusionTrainingArguments))
m, d, t = parser.parse_args_into_dataclasses()
trainer = run_training("pretrain", m, d, t)
state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for _, v in sorted(state.items()))).hexdigest()
loader = trainer.get_train_dataloader()
rows = [r for batch, _ in zip(loader, range(3)) for r in batch["input_ids"].tolist()]
Path(t.output_dir, f"rank{trainer.args.process_index}.json").write_text(json.dumps({"digest": digest, "rows": rows}))
"""


def test_two_process_gloo_matches_single_process(tiny_model_dir, pretrain_data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    steps = 4
    # With --prompt_isolation: each row's random prompt/answer split is drawn for the global batch too.
    single = run(str(driver), pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "single", steps,
                                            per_gpu_batch_size=8, prompt_isolation="true"))
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu_multiprocess.yaml"), "--main_process_port", "29533"]
    multi = run(str(driver), pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "multi", steps,
                                           prompt_isolation="true"), launcher=launcher, timeout=180)
    assert multi.returncode == 0, multi.stderr[-3000:]

    out = tmp_path / "multi"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    rows0, rows1 = ({tuple(r) for r in rk["rows"]} for rk in ranks)
    assert rows0 and not rows0 & rows1  # each rank saw its own shard
    # One global batch of 2 ranks x micro-batch 2 is the single process's micro-batch of 4 (same examples).
    single_rows = json.loads((tmp_path / "single" / "rank0.json").read_text())["rows"]
    assert {tuple(r) for r in single_rows[:4]} == {tuple(r) for r in ranks[0]["rows"][:2] + ranks[1]["rows"][:2]}
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{steps}"]
    assert not list(out.glob(".*"))  # no temporary folders left behind
    a, b = losses(tmp_path / "single" / f"checkpoint-{steps}"), losses(out / f"checkpoint-{steps}")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert json.loads((out / "final_model" / "config.json").read_text())["prompt_isolation"] is True
    wa = load_file(str(tmp_path / "single" / "final_model" / "model.safetensors"))
    wb = load_file(str(out / "final_model" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def sft_args(data: Path, work: Path, name: str, steps: int = 4, **extra) -> list[str]:
    args = {"experiment_name": name, "working_directory": str(work), "path_to_prepped_data": str(data),
            "num_training_steps": steps, "per_gpu_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1,
            "evaluation_interval": steps, "checkpoint_interval": steps, "disable_tqdm": "true", **extra}
    return [f"--{k}={v}" for k, v in args.items()]


def test_sft_from_pretrained_checkpoint_writes_loadable_final_model(tiny_model_dir, sft_data, tmp_path, tokenizer):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from dlm.tokenization import CHAT_TEMPLATE

    # a bare model.safetensors plus --hf_model_name, as in the reference recipe
    res = run("finetune_sft.py", sft_args(sft_data, tmp_path, "sft", path_to_pretrained_checkpoint=str(
        tiny_model_dir / "model.safetensors"), hf_model_name=str(tiny_model_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "sft"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert len(evals) == 2 and all(0 < v < 50 for v in evals)  # eval on start and at the end, finite
    model = AutoModelForMaskedLM.from_pretrained(out / "final_model")
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    assert tok.chat_template == CHAT_TEMPLATE and tok.mask_token_id == tokenizer.mask_token_id
    assert not (out / "final_model" / "training_args.bin").exists()
    trained = load_file(str(out / "final_model" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    for k, v in model.state_dict().items():
        if k in trained:
            assert torch.equal(v, trained[k])


def test_lora_sft_saves_a_merged_plain_masked_lm(tiny_model_dir, sft_data, tmp_path, tokenizer):
    from transformers import AutoModelForMaskedLM

    from dlm.tokenization import special_ids

    # LoRA with gradient checkpointing: final_model/ must be a plain masked LM (adapters merged, head kept).
    # Trained with --prompt_isolation, which the merged checkpoint must record for the prompt cache.
    res = run("finetune_sft.py", sft_args(sft_data, tmp_path, "lora", steps=6, hf_model_name=str(tiny_model_dir),
                                          lora="true", lora_r=4, learning_rate=5e-2, gradient_checkpointing="true",
                                          prompt_isolation="true"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trainable params" in res.stdout + res.stderr
    final = tmp_path / "lora" / "final_model"
    trained = load_file(str(final / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(trained) == sorted(start)  # no lora_A/lora_B or base_model.* keys: an ordinary checkpoint
    changed = {k for k in start if not torch.equal(trained[k], start[k])}
    assert any("attn.Wqkv" in k for k in changed) and any("mlp.Wo" in k for k in changed)  # merged deltas
    assert not any("norm" in k for k in changed)  # only adapted linear layers and marker rows moved
    # The chat markers' embedding rows (tied to the decoder) trained; every other row is bit-identical.
    emb = "model.embeddings.tok_embeddings.weight"
    moved = (trained[emb] != start[emb]).any(1).nonzero().flatten().tolist()
    ids = special_ids(tokenizer)
    assert {ids.user, ids.assistant, ids.eot} <= set(moved) <= {ids.system, ids.user, ids.assistant, ids.eot}
    assert changed & {k for k in start if "embeddings" in k} == {emb}
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert type(model).__name__ == "ModernBertForMaskedLM" and not hasattr(model, "peft_config")
    assert "head.dense.weight" in changed and "decoder.bias" in trained  # the MLM head is kept (and adapted)
    for k, v in model.state_dict().items():
        if k in trained:
            assert torch.equal(v, trained[k])
    assert json.loads((final / "dlm.json").read_text())["prompt_isolation"] is True
    assert model.config.prompt_isolation is True  # from config.json: auto = the exact prompt cache


def test_merged_lora_model_ends_its_answers_with_eot_on_the_quickstart_task(tiny_model_dir, tmp_path):
    """LoRA SFT on 2-digit addition from a model whose chat-marker rows were never trained: the merged model
    writes digits then `<|eot|>`. With the marker rows frozen (LoRA on the linear layers only, the old
    behaviour) the `<|eot|>` row cannot move and the model never emits it (bench_lora_markers.py: 0/100)."""
    from dlm.evaluation import load_tasks
    from dlm.modeling import load_checkpoint
    from dlm.prompts import encode_prompt
    from dlm.sampling import SamplerConfig, generate
    from dlm.tokenization import special_ids

    syn = tmp_path / "syn"
    made = subprocess.run([sys.executable, str(ROOT / "make_synthetic_data.py"), "--output_dir", str(syn),
                           "--tasks", "add2", "--num_train", "2000", "--num_heldout", "40"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    prepare("prepare_sft_data.py", {"hf_model_name": tiny_model_dir, "data_files": syn / "train.json",
                                    "context_length": 16, "path_to_data_store": tmp_path / "data",
                                    "test_split_pct": 0.02})
    res = run("finetune_sft.py", sft_args(tmp_path / "data", tmp_path, "lora", steps=LORA_EOT_STEPS,
                                          hf_model_name=str(tiny_model_dir), lora="true", lora_r=8,
                                          lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2,
                                          per_gpu_batch_size=32, logging_steps=50, lr_scheduler_type="cosine"),
              timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model, tokenizer = load_checkpoint(str(tmp_path / "lora" / "final_model"))
    items = load_tasks(syn / "heldout_tasks.jsonl")
    eot = special_ids(tokenizer).eot
    # Held-out problems, the right answer written, the rest masked: the next token is `<|eot|>`. (Whether the
    # model gets the sum right is not the point: 100 LoRA steps on a random base do not teach addition.)
    canvases = [encode_prompt(tokenizer, it.prompt, True) + tokenizer(it.answer, add_special_tokens=False)["input_ids"]
                for it in items]
    width = max(map(len, canvases)) + 3
    ids = torch.tensor([c + [tokenizer.mask_token_id] * (width - len(c)) for c in canvases])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    after = logits[torch.arange(len(items)), torch.tensor([len(c) for c in canvases])].argmax(-1)
    assert (after == eot).float().mean() >= 0.9, after.tolist()
    # and sampling from a blank canvas stops there: the decoded text is the part before `<|eot|>`
    results = generate(model, tokenizer, [it.prompt for it in items], SamplerConfig(gen_length=4), seed=0)
    assert sum(eot in r.output_ids for r in results) >= 0.9 * len(items)
    assert all(r.text == tokenizer.decode(r.output_ids[:r.output_ids.index(eot)], skip_special_tokens=True)
               for r in results if eot in r.output_ids)


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tiny_model_dir, pretrain_data, tmp_path):
    # An absurd learning rate blows the weights up after a few steps; the run must stop, naming the step.
    args = pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "nan", 40, learning_rate=1e12,
                         checkpoint_interval=1, max_grad_norm=0, evaluation_interval=0, lr_scheduler_type="constant")
    res = run("pretrain.py", args)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in last and " at step " in last
    step = int(last.split(" at step ")[1].split(";")[0])
    out = tmp_path / "nan"
    ckpt = out / f"checkpoint-{step - 1}"
    assert (ckpt / "trainer_state.json").is_file() and not (out / f"checkpoint-{step}").exists()
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())
    assert not (out / "final_model").exists()


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory, corpus_text) -> Path:
    """Data prepared (by the library function prepare_pretrain_data.py calls) with a different tokenizer."""
    from dlm.data.packing import PretrainDataArguments, prepare_pretrain
    from dlm.tokenization import train_tokenizer

    work = tmp_path_factory.mktemp("other")
    train_tokenizer(texts=[corpus_text[::-1]], vocab_size=400).save_pretrained(work / "tok")
    (work / "corpus.txt").write_text(corpus_text[:5000])
    prepare_pretrain(PretrainDataArguments(path_to_data_store=str(work / "data"), hf_model_name=str(work / "tok"),
                                           context_length=CONTEXT, data_files=[str(work / "corpus.txt")]))
    return work / "data"


@pytest.fixture(scope="module")
def bert_weights(tmp_path_factory, tokenizer) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64))
    out = tmp_path_factory.mktemp("bert")
    model.save_pretrained(out)
    return out / "model.safetensors"


@pytest.mark.parametrize("case", ["missing_data", "other_tokenizer", "other_architecture", "indivisible_batch"])
def test_bad_input_is_one_line_exit_2(case, tiny_model_dir, pretrain_data, sft_data, other_tokenizer_data,
                                      bert_weights, tmp_path):
    script, expected = "pretrain.py", None
    if case == "missing_data":
        args, expected = pretrain_args(tiny_model_dir, tmp_path / "nope", tmp_path, "x", 2), "--path_to_prepped_data"
    elif case == "other_tokenizer":
        args, expected = pretrain_args(tiny_model_dir, other_tokenizer_data, tmp_path, "x", 2), "another tokenizer"
    elif case == "indivisible_batch":
        args = pretrain_args(tiny_model_dir, pretrain_data, tmp_path, "x", 2, per_gpu_batch_size=5)
        expected = "--per_gpu_batch_size 5 is not divisible by --gradient_accumulation_steps 2"
    else:  # BERT weights into the ModernBERT of --hf_model_name: strict loading names the keys
        script, expected = "finetune_sft.py", "does not fit ModernBertForMaskedLM"
        args = sft_args(sft_data, tmp_path, "x", path_to_pretrained_checkpoint=str(bert_weights),
                        hf_model_name=str(tiny_model_dir))
    res = run(script, args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in res.stderr, res.stderr[-2000:]
    if case == "other_architecture":
        assert "bert.embeddings" in lines[0] or "missing" in lines[0]
    assert not (tmp_path / "x" / "final_model").exists()


def test_missing_report_to_package_is_a_usage_error(monkeypatch):
    from transformers import integrations

    from dlm.errors import UsageError
    from dlm.training import check_reporters

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(integrations, "is_wandb_available", lambda: False)
    with pytest.raises(UsageError, match="--report_to tensorboard needs the tensorboard package"):
        check_reporters(["tensorboard"])
    with pytest.raises(UsageError, match=r"--report_to wandb \(--log_wandb\) needs the wandb package"):
        check_reporters("wandb")
    check_reporters(["none"])
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: True)
    check_reporters(["tensorboard"])



def test_bf16_checkpoint_is_loaded_for_training_in_fp32(tokenizer, tmp_path):
    from transformers import AutoModelForMaskedLM

    from conftest import save_tiny_model
    from dlm.errors import ArgumentParser
    from dlm.training import (DataArguments, DiffusionTrainingArguments, ModelArguments, SFTModelArguments,
                              load_model_for_training)

    # A checkpoint stored in bf16, as a bf16 DeepSpeed run or many hub models write it.
    model = AutoModelForMaskedLM.from_pretrained(save_tiny_model(tokenizer, tmp_path / "fp32"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    for args in (ModelArguments(hf_model_name=str(tmp_path / "bf16")),
                 SFTModelArguments(path_to_pretrained_checkpoint=str(tmp_path / "bf16")),
                 SFTModelArguments(path_to_pretrained_checkpoint=str(tmp_path / "bf16" / "model.safetensors"),
                                   hf_model_name=str(tmp_path / "bf16"))):
        loaded, _ = load_model_for_training(args)
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # fp32 master weights
        state = loaded.state_dict()
        for key, value in stored.items():
            assert torch.equal(state[key], value.float()), key
    help_text = ArgumentParser((ModelArguments, DataArguments, DiffusionTrainingArguments)).format_help()
    assert "fp32 (master weights)" in " ".join(help_text.split())
