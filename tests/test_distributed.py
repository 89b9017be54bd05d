"""Training over several processes: real 2-process gloo runs (DDP, FSDP sharded) and the launch checks.

The runs use tests/distributed_driver.py, which runs the real run_training with probes (recorded noise
levels, optimizer steps, gathered weights). Each launch costs ~15 s, so each run checks several things.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory, tiny_model_dir, corpus_text) -> Path:
    from dlm.data.packing import PretrainDataArguments, prepare_pretrain

    work = tmp_path_factory.mktemp("dist_data")
    (work / "corpus.txt").write_text(corpus_text[:12000])
    prepare_pretrain(PretrainDataArguments(path_to_data_store=str(work / "data"), hf_model_name=str(tiny_model_dir),
                                           context_length=32, data_files=[str(work / "corpus.txt")]))
    return work / "data"


def launch(config: Path, mode: str, flags: dict, env: dict, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(port), str(ROOT / "tests" / "distributed_driver.py"), mode,
           *(f"--{k}={v}" for k, v in flags.items())]
    return subprocess.run(cmd, env={**ENV, **env}, cwd=ROOT, capture_output=True, text=True, timeout=240)


def base_flags(model: Path, data: Path, work: Path, name: str, **extra) -> dict:
    return {"experiment_name": name, "working_directory": str(work), "hf_model_name": str(model),
            "path_to_prepped_data": str(data), "learning_rate": 3e-3, "logging_steps": 1, "evaluation_interval": 0,
            "eval_on_start": "false", "disable_tqdm": "true", "seed": 11, **extra}


def test_ddp_step_is_one_stratified_set_and_a_nan_on_rank_1_stops_every_rank(tiny_model_dir, pretrain_data, tmp_path):
    # 2 ranks x micro-batch 2 x 3 accumulation steps = 12 rows per optimizer step; rank 1's loss is NaN at step 2.
    flags = base_flags(tiny_model_dir, pretrain_data, tmp_path, "ddp", num_training_steps=3, per_gpu_batch_size=6,
                       gradient_accumulation_steps=3, checkpoint_interval=1, crop_probability=0)
    res = launch(CONFIGS / "cpu_multiprocess.yaml", "strata_nan", flags, {"DLM_TEST_NAN_STEP": "2"}, 29561)
    out = tmp_path / "ddp"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert res.returncode != 0

    # The times of step 1 over both ranks and all 3 micro-batches: (u + i / 12) mod 1, each i once.
    times = sorted(t for rank in ranks for entry in rank["times"] if entry["step"] == 1 for t in entry["t"])
    assert len(times) == 12 and all(len(e["t"]) == 2 for rank in ranks for e in rank["times"])
    assert times[0] < 1 / 12
    assert times == pytest.approx([times[0] + i / 12 for i in range(12)], abs=1e-6)

    # No rank applied step 2: both stop before their optimizer step, with the step in the message.
    for rank in ranks:
        assert rank["stepped"] == [1]
        assert "non-finite training loss on 1 of 2 processes" in rank["error"] and " at step 2;" in rank["error"]
    assert "nan" in ranks[1]["error"] and "nan" not in ranks[0]["error"].split("(here")[1].split(")")[0]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-2").exists() and not (out / "final_model").exists()
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-1" / "model.safetensors")).values())


def test_fsdp_sharded_run_writes_a_full_final_model_and_resumes(tiny_model_dir, pretrain_data, tmp_path):
    from transformers import AutoModelForMaskedLM

    # The shipped sharded config, on 2 CPU processes.
    config = yaml.safe_load((CONFIGS / "fsdp_sharded.yaml").read_text())
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    config.update(num_processes=2, mixed_precision="no", use_cpu=True)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    flags = base_flags(tiny_model_dir, pretrain_data, tmp_path, "fsdp", num_training_steps=4, per_gpu_batch_size=4,
                       gradient_accumulation_steps=2, checkpoint_interval=2)
    res = launch(tmp_path / "fsdp.yaml", "fsdp_resume", flags, {"DLM_TEST_STOP_AT": "2"}, 29563)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "gathered_first.json").read_text())
    assert info == {"distributed_type": "DistributedType.FSDP", "fsdp2": True, "param_type": "DTensor"}

    out = tmp_path / "fsdp"
    # Checkpoints are sharded (one file per rank, no full weights); final_model/ is a full HF folder.
    assert sorted(p.name for p in (out / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert not (out / "checkpoint-2" / "model.safetensors").exists()
    assert "resuming from" in res.stderr and "checkpoint-2" in res.stderr
    final = load_file(str(out / "final_model" / "model.safetensors"))
    model = AutoModelForMaskedLM.from_pretrained(out / "final_model")
    resumed = load_file(str(tmp_path / "gathered_resumed.safetensors"))
    loaded = model.state_dict()
    for key, value in final.items():
        assert torch.equal(value, resumed[key]), key  # exactly the gathered training weights
        assert torch.equal(loaded[key], value), key
    # Resuming from the sharded checkpoint-2 continues exactly where an uninterrupted run would be.
    reference = load_file(str(tmp_path / "gathered_reference.safetensors"))
    first = load_file(str(tmp_path / "gathered_first.safetensors"))
    for key in final:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(first[k], resumed[k]) for k in final)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


def test_several_gpus_in_one_process_are_refused():
    from dlm.distributed import check_launch
    from dlm.errors import UsageError

    with pytest.raises(UsageError, match="nn.DataParallel.*accelerate launch.*torchrun --nproc_per_node 4"):
        check_launch(4, distributed=False)
    check_launch(4, distributed=True)   # accelerate launch / torchrun: one GPU per process
    check_launch(1, distributed=False)
    check_launch(0, distributed=False)


def deepspeed_launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(config), "train.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    return {k: v for k, v in prepare_deepspeed_cmd_env(args)[1].items() if k.startswith("ACCELERATE_")}


def test_deepspeed_zero3_without_gathered_save_is_refused_at_start_up(tmp_path, monkeypatch):
    from dlm.distributed import check_sharded_setup
    from dlm.errors import UsageError

    check_sharded_setup(None)  # no DeepSpeed at all
    for name, refused in (("deepspeed_zero3", False), ("deepspeed_zero2", False), ("zero3_no_gather", True)):
        config = CONFIGS / f"{name}.yaml"
        if name == "zero3_no_gather":
            data = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())
            data["deepspeed_config"]["zero3_save_16bit_model"] = False
            config = tmp_path / "zero3_no_gather.yaml"
            config.write_text(yaml.safe_dump(data))
        env = deepspeed_launch_env(config)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            if refused:
                with pytest.raises(UsageError, match="zero3_save_16bit_model: true") as err:
                    check_sharded_setup(None)
                assert "\n" not in str(err.value)
            else:
                check_sharded_setup(None)
    # A DeepSpeed JSON given to the Trainer (--deepspeed) is read the same way.
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(UsageError, match="stage3_gather_16bit_weights_on_model_save"):
        check_sharded_setup(ds)
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    check_sharded_setup(str(tmp_path / "ds.json"))
