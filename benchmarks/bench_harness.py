"""The lm-eval model `dlm` on a trained checkpoint: accuracy and speed of both likelihoods, generation vs evaluate.py.

    python benchmarks/bench_harness.py --model quickstart_out/sft/final_model \
        --tasks quickstart_out/data/synthetic/heldout_tasks.jsonl --limit 300

Through `lm_eval.simple_evaluate` with `--apply_chat_template` semantics, on the offline tasks of
`dlm.harness_tasks` (the right sum against 3 wrong ones; the generation task):
  * multiple choice: accuracy and loglikelihood requests/s with likelihood=mc and likelihood=chain_rule
    (whole simple_evaluate call, and the model's own time), measured alternately (`--repeats`) because the
    machine is shared; forward calls and rows (sequences through the network) per request;
  * mc against chain_rule on every request: the share within 2 and 3 Monte-Carlo standard errors;
  * generation: the harness's exact match and evaluate.py's (`dlm.evaluation.evaluate_tasks`) on the same
    problems with the same sampler, and how many predictions agree.
Prints a JSON report (also written to --save_json).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Req:
    def __init__(self, *args):
        self.args = args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", required=True, help="JSONL of {prompt, answer} (held-out problems)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--mc_samples", type=int, default=32)
    parser.add_argument("--mc_groups", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--gen_length", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9, help="0: the reference one-token-per-step sampler")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save_json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dlm.evaluation import evaluate_tasks, load_tasks
    from dlm.harness import DLMEvalModel
    from dlm.harness_tasks import write_tasks
    from dlm.sampling import SamplerConfig

    threshold = args.threshold if args.threshold > 0 else None
    items = load_tasks(args.tasks, args.limit)
    folder = Path(tempfile.mkdtemp(prefix="dlm_harness_tasks_"))
    write_tasks(folder, [{"prompt": it.prompt, "answer": it.answer} for it in items])
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = DLMEvalModel(pretrained=args.model, device="cpu", batch_size=args.batch_size, mc_samples=args.mc_samples,
                      mc_groups=args.mc_groups, greedy=False, gen_length=args.gen_length, threshold=threshold)
    report: dict = {"model": args.model, "problems": len(items), "mc_samples": args.mc_samples,
                    "mc_groups": args.mc_groups, "batch_size": args.batch_size, "runs": {}}

    # Multiple choice, both likelihoods, alternating.
    runs: dict[str, list[dict]] = {"mc": [], "chain_rule": []}
    for _ in range(args.repeats):
        for method in ("mc", "chain_rule"):
            lm.likelihood = method
            calls, rows = lm.passes["forward_calls"], lm.passes["rows"]
            model_seconds = lm.totals["loglikelihood_seconds"]
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=["dlm_add_mc"], task_manager=manager, apply_chat_template=True,
                                  bootstrap_iters=0)
            seconds = time.perf_counter() - start
            requests = 4 * len(items)
            runs[method].append({"acc": out["results"]["dlm_add_mc"]["acc,none"], "seconds": seconds,
                                 "requests_per_s": requests / seconds,
                                 "model_requests_per_s":
                                     requests / (lm.totals["loglikelihood_seconds"] - model_seconds),
                                 "forward_calls_per_request": (lm.passes["forward_calls"] - calls) / requests,
                                 "rows_per_request": (lm.passes["rows"] - rows) / requests})
    for method, rs in runs.items():
        report["runs"][method] = {"acc": rs[0]["acc"],
                                  "requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
                                  "requests_per_s_all": [round(r["requests_per_s"], 1) for r in rs],
                                  "model_requests_per_s": statistics.median(r["model_requests_per_s"] for r in rs),
                                  "forward_calls_per_request": rs[0]["forward_calls_per_request"],
                                  "rows_per_request": rs[0]["rows_per_request"]}

    # mc against chain_rule on the same requests.
    rows = [json.loads(line) for line in (folder / "dlm_add_mc.jsonl").read_text().splitlines()]
    reqs = [Req(lm.apply_chat_template([{"role": "user", "content": r["prompt"]}]), c)
            for r in rows for c in r["choices"]]
    lm.likelihood = "chain_rule"
    lm.loglikelihood(reqs)
    exact = [d["logprob"] for d in lm.last_loglikelihoods]
    lm.likelihood = "mc"
    lm.loglikelihood(reqs)
    approx = lm.last_loglikelihoods
    z = [abs(a["logprob"] - e) / a["stderr"] if a["stderr"] > 0 else (0.0 if a["logprob"] == e else float("inf"))
         for a, e in zip(approx, exact)]
    report["mc_vs_chain_rule"] = {"within_2_stderr": sum(v <= 2 for v in z) / len(z),
                                  "within_3_stderr": sum(v <= 3 for v in z) / len(z),
                                  "median_stderr": statistics.median(a["stderr"] for a in approx),
                                  "median_abs_diff": statistics.median(abs(a["logprob"] - e)
                                                                       for a, e in zip(approx, exact))}

    # Generation: the harness against evaluate.py on the same problems and sampler.
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["dlm_add_gen"], task_manager=manager, apply_chat_template=True,
                          log_samples=True, bootstrap_iters=0)
    harness_seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["dlm_add_gen"], key=lambda s: s["doc_id"])
    harness_pred = [s["filtered_resps"][0] for s in samples]
    nfe = sum(g["nfe"] for g in lm.last_generations)
    ref = evaluate_tasks(lm.model, lm.tokenizer, items, SamplerConfig(gen_length=args.gen_length, threshold=threshold),
                         chat=True)
    report["generation"] = {"harness_exact_match": out["results"]["dlm_add_gen"]["exact_match,none"],
                            "evaluate_py_exact_match": ref.accuracy,
                            "same_prediction": sum(h.strip() == p["prediction"].strip()
                                                   for h, p in zip(harness_pred, ref.predictions)) / len(items),
                            "harness_nfe": nfe, "evaluate_py_nfe": ref.nfe, "harness_seconds": harness_seconds}
    text = json.dumps(report, indent=2)
    print(text)
    if args.save_json:
        Path(args.save_json).write_text(text + "\n")


if __name__ == "__main__":
    main()
