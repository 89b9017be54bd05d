"""Serving throughput: step-level batching vs one request at a time, over real HTTP with the openai client.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --model /work/artifacts/qs/sft/final_model

Two serve.py processes run the same model on 127.0.0.1: `batched` (rows join a running batch, --max_batch_size 32)
and `one-at-a-time` (--max_batch_size 1: a request waits until the one before it is finished). For each
number of concurrent clients the two are measured alternately (`--rounds` times each, best round
reported), every client sending `--requests` completions back to back. Prints a markdown table:
requests/s, p50/p95 latency, and the speed-up; and checks that both servers gave the same answers.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompts_from(path: str | None, count: int) -> list[str]:
    if path and Path(path).is_file():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return [r["prompt"] for r in rows[:count]]
    return [f"{a}+{b}=" for a, b in zip(range(10, 10 + count), range(90, 90 - count, -1))]


def start(model: str, max_batch_size: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    """serve.py in its own process (as deployed: clients do not share its interpreter), on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", model, "--port", str(port),
                             "--max_batch_size", str(max_batch_size), "--max_queue", "1024",
                             "--gen_length", str(max_tokens), "--device", "cpu"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"serve.py did not start (exit status {proc.poll()})")
        time.sleep(0.2)


def client_threads(url: str, name: str, prompts: list[str], clients: list[int], requests: int, max_tokens: int,
                   start_at: float) -> tuple[list[float], dict, float]:
    """One client process: a thread per client, each sending `requests` completions back to back from
    `start_at` (wall clock) on. Returns latencies, answers by prompt and the time the last one finished."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    latencies, answers = [], {}

    def worker(c: int) -> None:
        for r in range(requests):
            prompt = prompts[(c * requests + r) % len(prompts)]
            t = time.perf_counter()
            out = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=max_tokens)
            latencies.append(time.perf_counter() - t)
            answers[prompt] = out.choices[0].text

    time.sleep(max(0.0, start_at - time.time()))
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(worker, clients))
    return latencies, answers, time.time()


def measure(pool: ProcessPoolExecutor, url: str, name: str, prompts: list[str], clients: int, requests: int,
            max_tokens: int):
    """(requests/s, latencies in s, answers by prompt) for `clients` clients spread over the pool's processes
    (one Python process cannot drive 32 HTTP clients at full speed on its own: its GIL would be the bottleneck)."""
    procs = pool._max_workers
    groups = [list(range(clients))[i::procs] for i in range(procs) if list(range(clients))[i::procs]]
    start_at = time.time() + 0.5  # every process starts together, after its pickling and wake-up
    parts = [f.result() for f in [pool.submit(client_threads, url, name, prompts, g, requests, max_tokens, start_at)
                                  for g in groups]]
    latencies = [x for part in parts for x in part[0]]
    answers = {k: v for part in parts for k, v in part[1].items()}
    return clients * requests / (max(part[2] for part in parts) - start_at), latencies, answers


def step_scaling(model_dir: str, prompts: list[str], max_tokens: int, sizes=(1, 8, 32), repeats: int = 3) -> None:
    """The ceiling of batching on this machine: seconds per step of the bare sampler with B rows (no HTTP).
    B rows per step at t(B) against one row at t(1) can at best serve B * t(1) / t(B) times the requests."""
    import torch

    from dlm.modeling import load_checkpoint
    from dlm.sampling import RunningBatch, SamplerConfig, as_denoiser

    model, tokenizer = load_checkpoint(model_dir, dtype=torch.float32)
    denoiser, cfg = as_denoiser(model.eval()), SamplerConfig(gen_length=max_tokens, stop_at_eos=False).validate()
    per_step = {}
    for _ in range(repeats):  # alternate the sizes; keep the best (least disturbed) time of each
        for size in sizes:
            batch = RunningBatch(denoiser, tokenizer)
            for i in range(size):
                batch.add(prompts[i % len(prompts)], cfg, seed=i)
            t, steps = time.perf_counter(), 0
            while batch.step_once():
                steps += 1
            per_step[size] = min(per_step.get(size, float("inf")), (time.perf_counter() - t) / steps)
    print("\n| rows per step | ms per step | ms per row-step | best possible speed-up |\n|---:|---:|---:|---:|")
    for size in sizes:
        print(f"| {size} | {1000 * per_step[size]:.1f} | {1000 * per_step[size] / size:.2f} | "
              f"{size * per_step[sizes[0]] / per_step[size]:.2f}x |")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/work/artifacts/qs/sft/final_model")
    parser.add_argument("--prompts", default="/work/artifacts/qs/data/synthetic/heldout_tasks.jsonl")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="completions per client, back to back")
    parser.add_argument("--max_tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client_processes", type=int, default=1, help="processes the clients are spread over")
    parser.add_argument("--only_step_scaling", action="store_true", help="skip the HTTP measurements")
    args = parser.parse_args()

    if args.only_step_scaling:
        step_scaling(args.model, prompts_from(args.prompts, 300), args.max_tokens)
        return
    name = Path(args.model).name
    modes = {"batched": 32, "one-at-a-time": 1}
    servers = {mode: start(args.model, size, args.max_tokens) for mode, size in modes.items()}
    urls = {mode: url for mode, (_, url) in servers.items()}
    prompts = prompts_from(args.prompts, 300)
    pool = ProcessPoolExecutor(args.client_processes)
    for url in urls.values():  # warm-up: allocator, first forwards, client processes
        measure(pool, url, name, prompts, 8, 2, args.max_tokens)

    print(f"model {args.model}, max_tokens {args.max_tokens}, {args.requests} requests per client, "
          f"best of {args.rounds} alternating rounds, clients spread over {args.client_processes} processes\n")
    print("| clients | server | requests/s | p50 latency (s) | p95 latency (s) | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    same = True
    for clients in args.clients:
        best = {}
        for _ in range(args.rounds):
            for mode in modes:  # alternate, so that load from other jobs hits both alike
                rps, lat, answers = measure(pool, urls[mode], name, prompts, clients, args.requests,
                                            args.max_tokens)
                if mode not in best or rps > best[mode][0]:
                    best[mode] = (rps, lat, answers)
        common = best["batched"][2].keys() & best["one-at-a-time"][2].keys()
        same &= all(best["batched"][2][p] == best["one-at-a-time"][2][p] for p in common)
        for mode in modes:
            rps, lat, _ = best[mode]
            gain = f"{rps / best['one-at-a-time'][0]:.2f}x" if mode == "batched" else ""
            print(f"| {clients} | {mode} | {rps:.2f} | {percentile(lat, 50):.3f} | {percentile(lat, 95):.3f} "
                  f"| {gain} |", flush=True)
    for mode, url in urls.items():
        print(f"{mode} server: {httpx.get(url[:-3] + '/health').json()}", file=sys.stderr)
    print(f"\nsame answers from both servers: {'yes' if same else 'NO'}")
    for proc, _ in servers.values():
        proc.terminate()
        proc.wait(timeout=30)
    step_scaling(args.model, prompts, args.max_tokens)


if __name__ == "__main__":
    main()
