"""Loading sources, tokenizing, packing, answer masks, collators.

Prepared-data contract (what training reads): a `DatasetDict.save_to_disk` folder with
`train` and `test` splits and a `metadata.json` beside `dataset_dict.json`.
  * pretraining rows: `input_ids`, all exactly `context_length` long (packed, EOS-separated);
  * SFT rows: `input_ids` (a rendered chat), `answer_mask` (1 on assistant tokens and their
    end-of-turn), `length`.

`metadata.json` (written last, atomically, by the preparation scripts):
  {"format": "dlm-pretrain" | "dlm-sft", "tokenizer": <name or path>, "tokenizer_fingerprint": <hash>,
   "vocab_size": len(tokenizer), "special_ids": {mask, pad, bos, eos, eot, system, user, assistant},
   "context_length": <row length (pretrain) or max length (sft)>, "dtype": <input_ids storage type>,
   "splits": {"train": {"rows": n, "tokens": n, ...}, "test": {...}}, "sources": [...], "seed": n, ...}
  Extra keys written by the tools: pretraining splits also hold `documents`, `empty_documents`,
  `source_tokens` (document tokens + one EOS each) and `dropped_tail_tokens` (the final partial row,
  so source_tokens == tokens + dropped_tail_tokens); SFT splits hold `answer_tokens` and `max_length`,
  and SFT metadata has `record_format` and `overlong: {policy, dropped, truncated}`.

Entry points: `prepare_pretrain(PretrainDataArguments)` and `prepare_sft(SFTDataArguments)` (the
scripts are thin wrappers), and for building prompts identical to training ones:
`alpaca_to_messages`, `record_to_messages`, `records_to_messages`, `detect_format`, `encode_sft_batch`.
"""
