"""Supervised fine-tuning of a diffusion LM (DESIGN §4 SFT loss: prompt never masked) on prepare_sft_data.py output.

    accelerate launch finetune_sft.py --experiment_name LDM_SFT --working_directory work_dir \
        --path_to_pretrained_checkpoint work_dir/LDM_Pretraining/final_model \
        --hf_model_name answerdotai/ModernBERT-large --path_to_prepped_data data/sft

--path_to_pretrained_checkpoint takes a checkpoint folder or a bare model.safetensors (loaded strictly
into --hf_model_name's architecture); without it --hf_model_name itself is fine-tuned.
"""

from dlm.errors import run_main
from dlm.training import SFTModelArguments, train_main


def main() -> int:
    return train_main("sft", SFTModelArguments)


if __name__ == "__main__":
    run_main(main)
