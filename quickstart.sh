#!/usr/bin/env bash
# The whole pipeline, offline, on a laptop CPU, in a few minutes: synthetic 2-digit addition data ->
# tokenizer -> tiny ModernBERT pretrained from scratch as a diffusion LM -> SFT -> held-out
# exact-match accuracy -> one answer drawn with the live view.
#
#     bash quickstart.sh [OUTPUT_DIR]          (default: quickstart_out)
#
# It calls the same scripts as the GPU recipes (README), only with tiny sizes. The sizes can be
# overridden through the environment (the test suite runs a shortened version this way):
#   QS_TASKS, QS_NUM_TRAIN, QS_NUM_HELDOUT, QS_PRETRAIN_STEPS, QS_PRETRAIN_BATCH, QS_SFT_STEPS, QS_BATCH,
#   QS_LR, QS_WD, QS_SEED, QS_EVAL_BATCH, QS_GEN_LENGTH, QS_PROMPT, QS_SKIP_INFERENCE=1
#   (benchmarks/bench_sampling.py trains its 5-digit-addition model this way).
set -euo pipefail
cd "$(dirname "$0")"

OUT="${1:-quickstart_out}"
TASKS="${QS_TASKS:-add2}"
NUM_TRAIN="${QS_NUM_TRAIN:-20000}"        # training problems (add2 has 7.3k distinct ones: they repeat)
NUM_HELDOUT="${QS_NUM_HELDOUT:-300}"      # held-out problems, never seen in pretraining or SFT
PRETRAIN_STEPS="${QS_PRETRAIN_STEPS:-20}"  # short: longer pretraining on the equations made SFT memorise (see report)
PRETRAIN_BATCH="${QS_PRETRAIN_BATCH:-32}"  # rows of 64 tokens
SFT_STEPS="${QS_SFT_STEPS:-3000}"
BATCH="${QS_BATCH:-128}"
LR="${QS_LR:-2e-3}"
WD="${QS_WD:-0.1}"                       # weight decay: what makes SFT generalise instead of memorise (see report)
SEED="${QS_SEED:-0}"
EVAL_BATCH="${QS_EVAL_BATCH:-100}"
GEN_LENGTH="${QS_GEN_LENGTH:-4}"          # "123" + end-of-turn
PROMPT="${QS_PROMPT:-38+47=}"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
PY="${PYTHON:-python}"
START=$(date +%s)
stage() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# The output folder is ours to replace only if an earlier quickstart made it.
if [ -e "$OUT" ] && [ ! -e "$OUT/.dlm-quickstart" ]; then
    echo "error: $OUT exists and was not made by quickstart.sh; pass another folder" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.dlm-quickstart"

TRAIN_FLAGS=(--per_device_eval_batch_size "$EVAL_BATCH" --learning_rate "$LR" --lr_scheduler_type cosine
             --warmup_steps 0.05 --weight_decay "$WD"
             --save_strategy no --eval_on_start false --logging_steps 250 --report_to none --seed "$SEED"
             --disable_tqdm true --dataloader_num_workers 0)

stage "1/7 synthetic data ($TASKS): train and held-out problems, split on the problem (the (a, b) pair)"
$PY make_synthetic_data.py --output_dir "$OUT/data/synthetic" --tasks "$TASKS" \
    --num_train "$NUM_TRAIN" --num_heldout "$NUM_HELDOUT" --seed "$SEED"

stage "2/7 tokenizer: byte-level BPE trained on the corpus, digits one per token"
$PY tokenizer.py --train_from "$OUT/data/synthetic/pretrain.txt" --vocab_size 320 --save_to "$OUT/tokenizer"

stage "3/7 pretraining data: corpus lines packed into rows of 64 tokens"
$PY prepare_pretrain_data.py --hf_model_name "$OUT/tokenizer" --data_files "$OUT/data/synthetic/pretrain.txt" \
    --txt_split_by line --context_length 64 --test_split_pct 0.02 --path_to_data_store "$OUT/data/pretrain"

stage "4/7 pretraining a tiny ModernBERT from scratch with the masked-diffusion ELBO ($PRETRAIN_STEPS steps)"
$PY pretrain.py --from_scratch --model_config tiny --hf_model_name "$OUT/tokenizer" \
    --path_to_prepped_data "$OUT/data/pretrain" --output_dir "$OUT/pretrain" \
    --max_steps "$PRETRAIN_STEPS" --eval_steps "$PRETRAIN_STEPS" --per_device_train_batch_size "$PRETRAIN_BATCH" \
    "${TRAIN_FLAGS[@]}"

stage "5/7 SFT data and fine-tuning ($SFT_STEPS steps; the loss sees only the answer)"
$PY prepare_sft_data.py --hf_model_name "$OUT/tokenizer" --data_files "$OUT/data/synthetic/train.json" \
    --context_length 64 --test_split_pct 0.02 --path_to_data_store "$OUT/data/sft"
$PY finetune_sft.py --path_to_pretrained_checkpoint "$OUT/pretrain/final_model" \
    --path_to_prepped_data "$OUT/data/sft" --output_dir "$OUT/sft" \
    --max_steps "$SFT_STEPS" --eval_steps "$(( SFT_STEPS / 2 ))" --per_device_train_batch_size "$BATCH" \
    "${TRAIN_FLAGS[@]}"

stage "6/7 evaluation: ELBO on the SFT test split, exact match on $NUM_HELDOUT held-out problems"
$PY evaluate.py --model "$OUT/sft/final_model" --path_to_prepped_data "$OUT/data/sft" --num_samples 8 \
    --tasks "$OUT/data/synthetic/heldout_tasks.jsonl" --gen_length "$GEN_LENGTH" --batch_size "$EVAL_BATCH" \
    --save_json "$OUT/eval.json" --save_predictions "$OUT/predictions.jsonl"

if [ -z "${QS_SKIP_INFERENCE:-}" ]; then
    stage "7/7 inference with the live view (on a terminal the canvas fills in, masks shown until decided)"
    echo "prompt: $PROMPT"
    $PY inference.py --model "$OUT/sft/final_model" --prompt "$PROMPT" --gen_length "$GEN_LENGTH" --seed 0
fi

stage "done: model in $OUT/sft/final_model, report in $OUT/eval.json"
