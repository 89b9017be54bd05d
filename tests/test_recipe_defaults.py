"""The reference recipe's commands (DESIGN §1), given nothing else, parse to the recipe's run (issue 16 point 3)."""

from __future__ import annotations

import shlex

import pytest

from dlm.errors import UsageError
from dlm.training import argument_parser

# DESIGN §1, verbatim (without `accelerate launch` and the script name).
RECIPE_PRETRAIN = ("--experiment_name LDM_Pretraining --working_directory work_dir "
                   "--hf_model_name answerdotai/ModernBERT-large --path_to_prepped_data data/pretrain "
                   "--num_training_steps 500000 --per_gpu_batch_size 64 --gradient_accumulation_steps 2")
RECIPE_SFT = ("--experiment_name LDM_SFT --path_to_pretrained_checkpoint work_dir/LDM_Pretraining/final_model "
              "--working_directory work_dir --hf_model_name answerdotai/ModernBERT-large --path_to_prepped_data data/sft")


def parse(objective: str, command: str):
    return argument_parser(objective).parse_args_into_dataclasses(shlex.split(command))


def test_recipe_pretrain_command_gives_the_recipes_run():
    _, _, t = parse("pretrain", RECIPE_PRETRAIN)
    assert t.output_dir == "work_dir/LDM_Pretraining"
    assert (t.lr_scheduler_type, t.warmup_steps, t.weight_decay, t.learning_rate, t.max_grad_norm) == \
        ("cosine", 1000, 0.01, 5e-5, 1.0)
    assert (t.max_steps, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (500000, 32, 2)
    # Without the batch flags: the recipe's --per_gpu_batch_size 16, no accumulation.
    _, _, bare = parse("pretrain", "--experiment_name x --hf_model_name m --path_to_prepped_data d")
    assert (bare.per_device_train_batch_size, bare.gradient_accumulation_steps, bare.per_device_eval_batch_size) == \
        (16, 1, 16)


def test_recipe_sft_command_gives_the_recipes_run():
    m, _, t = parse("sft", RECIPE_SFT)
    assert m.path_to_pretrained_checkpoint == "work_dir/LDM_Pretraining/final_model"
    assert (t.learning_rate, t.weight_decay, t.max_steps, t.save_steps) == (1e-5, 0.05, 30000, 10000)
    assert (t.lr_scheduler_type, t.warmup_steps, t.per_device_train_batch_size) == ("cosine", 1000, 16)


def test_defaults_are_shown_in_help_and_explicit_flags_win():
    help_text = " ".join(argument_parser("sft").format_help().split())
    for shown in ("(default: cosine)", "(default: 1000)", "(default: 0.05)", "(default: 1e-05)", "(default: 30000)",
                  "(default: 10000)", "(default: 16)"):
        assert shown in help_text
    assert "(default: 0.01)" in " ".join(argument_parser("pretrain").format_help().split())
    # quickstart.sh's own flags (Hugging Face names) keep their meaning
    _, _, t = parse("pretrain", "--output_dir o --hf_model_name m --path_to_prepped_data d --max_steps 20 "
                                "--per_device_train_batch_size 32 --per_device_eval_batch_size 100 "
                                "--learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 0.05 --weight_decay 0.1")
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size, t.warmup_steps, t.weight_decay,
            t.learning_rate, t.max_steps) == (32, 100, 0.05, 0.1, 2e-3, 20)
    with pytest.raises(UsageError, match="--per_gpu_batch_size or --per_device_train_batch_size"):
        parse("pretrain", "--output_dir o --per_gpu_batch_size 64 --per_device_train_batch_size 8")
