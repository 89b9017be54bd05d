"""Prepare the tokenizer the diffusion pipeline uses: mask/pad/BOS/EOS roles, chat markers, chat template.

    python tokenizer.py --hf_model_name answerdotai/ModernBERT-large --save_to tok/   # any MLM tokenizer
    python tokenizer.py --hf_model_name tok/ --show "What is 12+7?"                   # inspect it
    python tokenizer.py --train_from corpus.txt --vocab_size 8192 --save_to tok/      # new BPE, offline

The logic lives in dlm.tokenization; this file only parses flags and wires the calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dlm.errors import ArgumentParser, UsageError, atomic_output_dir, run_main, setup_logging

logger = logging.getLogger("tokenizer")

MIN_VOCAB = 300  # 256 byte symbols + BERT specials + reserved + chat markers, with room for merges


@dataclass
class Arguments:
    hf_model_name: str | None = field(default=None, metadata={
        "help": "Hub id or local folder of a masked-LM model or tokenizer to prepare.",
        "aliases": ["--model_name_or_path"]})
    train_from: list[str] | None = field(default=None, metadata={
        "help": "Train a new byte-level BPE tokenizer offline from these text files (instead of --hf_model_name)."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size for --train_from."})
    save_to: str | None = field(default=None, metadata={
        "help": "Folder to write the prepared tokenizer to (written atomically).", "aliases": ["--output_dir"]})
    show: str | None = field(default=None, metadata={
        "help": "Print the tokens and ids of this text, the special ids and a rendered chat example."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --save_to folder."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom tokenizer code from the hub."})


def main() -> int:
    setup_logging()
    (args,) = ArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.train_from and args.hf_model_name:
        raise UsageError("--train_from and --hf_model_name are exclusive: give one of them")
    if not args.train_from and not args.hf_model_name:
        raise UsageError("--hf_model_name or --train_from: give the tokenizer to prepare")
    if not args.save_to and args.show is None:
        raise UsageError("--save_to or --show: nothing to do")
    if args.train_from and args.vocab_size < MIN_VOCAB:
        raise UsageError(f"--vocab_size must be at least {MIN_VOCAB}, got {args.vocab_size}")
    if args.save_to:  # refuse an existing folder before any slow work
        from dlm.errors import check_output_dir
        check_output_dir(args.save_to, "--save_to", args.overwrite)

    from dlm.tokenization import describe_tokenizer, load_mlm_tokenizer, train_tokenizer

    if args.train_from:
        tokenizer = train_tokenizer(files=args.train_from, vocab_size=args.vocab_size)
        source = f"BPE trained on {', '.join(args.train_from)}"
    else:
        tokenizer = load_mlm_tokenizer(args.hf_model_name, trust_remote_code=args.trust_remote_code)
        source = args.hf_model_name
    logger.info("tokenizer from %s: %d entries, chat template and markers ready", source, len(tokenizer))
    _log_embedding_growth(args, tokenizer)

    if args.save_to:
        with atomic_output_dir(args.save_to, "--save_to", args.overwrite) as tmp:
            tokenizer.save_pretrained(tmp)
        logger.info("saved to %s", args.save_to)
    if args.show is not None:
        print(describe_tokenizer(tokenizer, args.show))
    return 0


def _log_embedding_growth(args: Arguments, tokenizer) -> None:
    """Tell the user whether the model's embedding matrix must grow for the added tokens."""
    if not args.hf_model_name:
        return
    from transformers import AutoConfig

    try:
        rows = AutoConfig.from_pretrained(args.hf_model_name, trust_remote_code=args.trust_remote_code).vocab_size
    except (OSError, ValueError, AttributeError):
        return  # a tokenizer-only folder: nothing to compare with
    if len(tokenizer) > rows:
        logger.warning("the tokenizer has %d entries but the model has %d embedding rows: training will grow "
                       "them to the next multiple of 64", len(tokenizer), rows)
    else:
        logger.info("the model's %d embedding rows hold all %d tokenizer entries: no resize needed",
                    rows, len(tokenizer))


if __name__ == "__main__":
    run_main(main)
