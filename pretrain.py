"""Pretrain a masked LM as a diffusion LM (DESIGN §4 pretraining loss) on data from prepare_pretrain_data.py.

    accelerate launch pretrain.py --experiment_name LDM_Pretraining --working_directory work_dir \
        --hf_model_name answerdotai/ModernBERT-large --path_to_prepped_data data/pretrain \
        --num_training_steps 500000 --per_gpu_batch_size 64 --gradient_accumulation_steps 2

Add `--from_scratch --model_config tiny|small|base` to train a fresh ModernBERT (the tokenizer still
comes from --hf_model_name), `--resume_from_checkpoint auto` to continue a killed run.
"""

from dlm.errors import run_main
from dlm.training import ModelArguments, train_main


def main() -> int:
    return train_main("pretrain", ModelArguments)


if __name__ == "__main__":
    run_main(main)
