"""Render instruction/chat data with the chat template and mark the answer tokens, for SFT.

    python prepare_sft_data.py --hf_model_name answerdotai/ModernBERT-large --path_to_data_store data/sft  # Alpaca
    python prepare_sft_data.py --hf_model_name tok/ --data_files train.json --path_to_data_store data/sft

Formats (detected from the columns, or --format): Alpaca, OpenOrca, chat `messages`, ShareGPT
`conversations`. Writes a DatasetDict (train/test) of input_ids, answer_mask, length and
metadata.json; see dlm.data.prepare_sft.
"""

from __future__ import annotations

from dlm.data.chat import SFTDataArguments, prepare_sft
from dlm.errors import ArgumentParser, run_main, setup_logging


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(SFTDataArguments).parse_args_into_dataclasses()
    prepare_sft(args)
    return 0


if __name__ == "__main__":
    run_main(main)
