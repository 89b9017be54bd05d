#!/usr/bin/env bash
# Does prompt-isolated SFT (--prompt_isolation, what the exact prompt cache needs) cost accuracy?
# Normal vs isolated SFT at the same budget on two tasks, then held-out exact match per --prompt_cache:
#   add2     the quickstart task (prompt ~10 tokens)
#   fewshot  2-digit addition after 22 solved examples (prompt ~220 tokens, make_synthetic_data.py --tasks
#            fewshot; its held-out queries are add2's held-out pairs)
# Both arms start from the same model, $START (default: the quickstart's pretrained model), and train the
# same steps with the same data, seed and schedule; they differ only in --prompt_isolation. The fewshot
# arms continue from the add2 arm of their own kind (normal after normal, isolated after isolated).
#
#     bash benchmarks/cache_quality.sh [OUT]        (needs a finished quickstart.sh output in $QS)
#
# Budgets are reduced for a shared 2-core CPU (ADD2_STEPS, FEWSHOT_STEPS, batch sizes below).
set -euo pipefail
cd "$(dirname "$0")/.."
QS="${QS:-/work/artifacts/qs}"
OUT="${1:-work_dir/cache_quality}"
START="${START:-$QS/pretrain/final_model}"
ADD2_STEPS="${ADD2_STEPS:-1500}"
ADD2_BATCH="${ADD2_BATCH:-32}"
FEWSHOT_STEPS="${FEWSHOT_STEPS:-150}"
FEWSHOT_BATCH="${FEWSHOT_BATCH:-8}"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
FLAGS=(--learning_rate 2e-3 --lr_scheduler_type cosine --warmup_steps 0.05 --weight_decay 0.1 --save_strategy no
       --eval_on_start false --logging_steps 50 --report_to none --seed 0 --disable_tqdm true
       --dataloader_num_workers 0)
mkdir -p "$OUT"

# sft NAME MODE START DATA STEPS BATCH: one SFT run (normal or isolated), skipped when its model exists.
sft() {
    local iso=(); [ "$2" = isolated ] && iso=(--prompt_isolation)
    [ -e "$OUT/$1_$2/final_model/dlm.json" ] || $PY finetune_sft.py \
        --path_to_pretrained_checkpoint "$3" --path_to_prepped_data "$4" \
        --output_dir "$OUT/$1_$2" --max_steps "$5" --eval_steps "$5" \
        --per_device_train_batch_size "$6" "${iso[@]}" "${FLAGS[@]}"
}

for mode in normal isolated; do
    sft add2 "$mode" "$START" "$QS/data/sft" "$ADD2_STEPS" "$ADD2_BATCH"
done

[ -e "$OUT/data/fewshot/train.json" ] || $PY make_synthetic_data.py --output_dir "$OUT/data/fewshot" \
    --tasks fewshot --num_train 20000 --num_heldout 300 --seed 0
[ -e "$OUT/data/fewshot_sft/metadata.json" ] || $PY prepare_sft_data.py --hf_model_name "$QS/tokenizer" \
    --data_files "$OUT/data/fewshot/train.json" --context_length 256 --test_split_pct 0.02 \
    --path_to_data_store "$OUT/data/fewshot_sft"
for mode in normal isolated; do
    sft fewshot "$mode" "$OUT/add2_$mode/final_model" "$OUT/data/fewshot_sft" "$FEWSHOT_STEPS" "$FEWSHOT_BATCH"
done

# Held-out exact match and the ELBO of the SFT test split (each model scored as it was trained): normal
# models with the full forward and with the approximate cache, isolated ones with the full isolated
# forward and with the exact cache.
for task in add2 fewshot; do
    tasks="$QS/data/synthetic/heldout_tasks.jsonl"; data="$QS/data/sft"
    [ "$task" = fewshot ] && tasks="$OUT/data/fewshot/heldout_tasks.jsonl" && data="$OUT/data/fewshot_sft"
    for run in normal:off normal:approx isolated:off isolated:exact; do
        mode="${run%%:*}"; cache="${run##*:}"
        elbo=(); [ "$cache" = off ] && elbo=(--path_to_prepped_data "$data" --num_samples 8)
        $PY evaluate.py --model "$OUT/${task}_$mode/final_model" --tasks "$tasks" --gen_length 4 --batch_size 50 \
            --prompt_cache "$cache" "${elbo[@]}" --save_json "$OUT/eval_${task}_${mode}_${cache}.json" > /dev/null
        $PY -c "import json,sys; j=json.load(open(sys.argv[1])); r=j['tasks']; e=j.get('elbo'); print(sys.argv[2], '%.1f%%' % (100*r['accuracy']), r['correct'], '/', r['n'], '%.1f tok/s' % r['tokens_per_second'], 'ELBO %.4f +- %.4f' % (e['nll_per_token'], e['stderr']) if e else '')" \
            "$OUT/eval_${task}_${mode}_${cache}.json" "$task $mode $cache"
    done
done
