"""Tokenize a text corpus and pack it into rows of exactly --context_length tokens for pretraining.

    python prepare_pretrain_data.py --hf_model_name answerdotai/ModernBERT-large --context_length 1024 \
        --path_to_data_store data/pretrain --large_dataset
    python prepare_pretrain_data.py --hf_model_name tok/ --data_files corpus/*.txt --path_to_data_store data/pt

Writes a `datasets` DatasetDict (train/test) and metadata.json; see dlm.data.prepare_pretrain.
"""

from __future__ import annotations

import logging

from dlm.data.packing import PretrainDataArguments, prepare_pretrain
from dlm.errors import ArgumentParser, run_main, setup_logging

logger = logging.getLogger("prepare_pretrain_data")


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(PretrainDataArguments).parse_args_into_dataclasses()
    meta = prepare_pretrain(args)
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    logger.info("wrote %s: train %d rows, test %d rows of %d tokens (%s)", args.path_to_data_store,
                train["rows"], test["rows"], meta["context_length"], meta["dtype"])
    return 0


if __name__ == "__main__":
    run_main(main)
