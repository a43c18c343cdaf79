"""Serving many LoRA adapters from one endpoint: batched across adapters vs one request at a time.

    .venv/bin/python benchmarks/serve_adapters.py            # 8 adapters, 8 and 16 clients x 4 requests x 32 tokens, 2 rounds (~15 min)
    .venv/bin/python benchmarks/serve_adapters.py --quick    # 4 adapters, 4 clients x 2 requests x 8 tokens (a smoke run)

Setup: SmolLM2-135M-Instruct (fp32, CPU), N LoRA adapters (r 16, alpha 32, all linear layers: the demo's
adapter shape; random non-zero weights) registered in a registry dir, one Serve app (`honed.serve.app`) on a
local Ray with one model replica (1 CPU, `--threads` torch threads), driven over HTTP by client threads (as
many as the load level) sending chat requests (greedy, `max_tokens`), each to the adapter its index picks round-robin.

  mixed        per load level (`--loads`, concurrent clients, each sending `--requests-per-client` requests one
               after another), the same request set against the app with `max_batch_size` = the clients
               (continuous batching: requests join the running batch between decode steps, rows of different
               adapters in one forward) and with `max_batch_size` 1 (`@serve.multiplexed` routing, one request
               decoded at a time): completion tokens/s ratio batched / one-at-a-time (goal ≥ 4), p50/p99
               request latency of each. Greedy decoding gives the same tokens both ways (checked:
               `same_answers`), so the work is equal.
  one_adapter  on a fresh batched app, 8 requests from 8 clients all to the base (before any adapter is loaded:
               the base model alone) and then all to one adapter: tokens/s ratio adapter / base (goal ≥ 0.85);
               and 4 requests from one client each way. Each side is warmed first (4-token requests), so the
               adapter's cold load is not in its figure (it is `cold_load`'s).
  cold_load    per adapter, the first request (the replica reads it from the registry and injects it) minus the
               same request once it is resident: the cost of a cold adapter, median and max.

Each round starts fresh apps (batched, then one-at-a-time); ratios are medians over `--repeats` rounds.
Everything (Ray, the replica, the proxy, the clients) shares the machine's CPUs, as on a laptop.
Writes `benchmarks/results/serve_adapters.json`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import MODEL, Measured, at_least, log, main, settings

WORK = Path("/tmp/honed-bench-serve")
QUESTIONS = ["Which ICD-10-CM chapter contains code E11.9?", "What does code I10 describe?",
             "Which chapter holds J45.909?", "What category is K21.9 in?", "Name the chapter of code F32.9.",
             "What does code M54.5 describe?", "Which chapter contains N39.0?", "What is code R51 about?"]
STATES = ("largest_batch", "packed_layers")  # replica stats that are states, not counters: recorded, not differenced
GOALS = {"mixed_batched_over_one_at_a_time": 4.0, "one_adapter_over_base": 0.85}


def make_adapters(model_path: str, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from honed.artifacts import META, write_meta
    from honed.models import load_model, weights_hash

    base_hash, dirs = weights_hash(model_path), []
    for i in range(n):
        target = WORK / "adapters" / f"a{i}"
        if not (target / META).is_file():
            model, _ = load_model(model_path, "float32", "cpu")
            torch.manual_seed(i)
            peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    init_lora_weights=False))
            with torch.no_grad():  # non-zero but small: answers stay text, the compute is the same
                for name, p in peft.named_parameters():
                    if "lora_B" in name:
                        p.mul_(0.02)
            peft.save_pretrained(target)
            template = {"system_prompt": f"You are coding assistant {i}.", "stop": ["<|im_end|>"]}
            write_meta(target, {"base_model": MODEL, "base_weights_sha256": base_hash, "template": template})
        dirs.append(target)
    return dirs


def ask(url: str, model: str, question: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        out = json.loads(response.read())
    return {"model": model, "question": question, "latency_s": time.perf_counter() - t0,
            "tokens": out["usage"]["completion_tokens"], "text": out["choices"][0]["message"]["content"]}


def load(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    """Send every (model, question) with `concurrency` clients; tokens/s over the wall time, latencies."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda r: ask(url, r[0], r[1], max_tokens), requests))
    wall = time.perf_counter() - t0
    latencies = sorted(a["latency_s"] for a in answers)
    tokens = sum(a["tokens"] for a in answers)
    return {"requests": len(answers), "concurrency": concurrency, "completion_tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "answers": {f"{a['model']}|{a['question']}": a["text"] for a in answers}}


def deploy(registry: Path, max_batch_size: int, n_adapters: int, threads: int, port: int, clients: int) -> str:
    """The app; every client's request is accepted by the replica at once (queued inside it when it decodes
    fewer at a time), so neither mode pays Serve's router retries."""
    from honed.config import ServeConfig
    from honed.serve import deploy as serve_deploy

    cfg = ServeConfig(model={"name_or_path": MODEL}, registry=str(registry), max_batch_size=max_batch_size,
                      batch_wait_timeout_s=0.02, max_adapters_per_replica=n_adapters, torch_threads=threads,
                      num_cpus=1, port=port, max_tokens=256, max_ongoing_requests=max(2 * max_batch_size, clients))
    return serve_deploy.start(cfg)


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/honed/stats", timeout=60).read())


def cold_loads(url: str, names: list[str], max_tokens: int) -> list[float]:
    """First request to each adapter minus the same request right after (resident)."""
    costs = []
    for name in names:
        cold = ask(url, name, QUESTIONS[0], max_tokens)["latency_s"]
        warm = ask(url, name, QUESTIONS[0], max_tokens)["latency_s"]
        costs.append(cold - warm)
    return costs


def options(parser) -> None:
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--loads", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16],
                        help="concurrent clients of the mixed load, comma-separated (batched app: max_batch_size = it)")
    parser.add_argument("--requests-per-client", type=int, default=4, help="mixed load: requests = this x clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model replica")
    parser.add_argument("--port", type=int, default=8731)


def measure(args) -> Measured:
    import ray

    from honed.models import resolve_model
    from honed.registry import Registry

    registry_dir = WORK / "registry"
    shutil.rmtree(registry_dir, ignore_errors=True)
    registry = Registry(str(registry_dir))
    names = []
    for i, adapter in enumerate(make_adapters(resolve_model(MODEL), args.adapters)):
        registry.add(f"a{i}", str(adapter))
        names.append(f"a{i}")
    started = time.time()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        rounds = [one_round(r, registry_dir, names, args) for r in range(args.repeats)]
    finally:
        ray.shutdown()
    by_load = {f"{level}_clients": mixed_summary([x["mixed"][level] for x in rounds]) for level in args.loads}
    one = one_adapter_summary(rounds)
    cold = [c for x in rounds for c in x["cold"]]
    figures = {"settings": settings(args), "model": MODEL,
               "mixed": {"goal": GOALS["mixed_batched_over_one_at_a_time"], **by_load},
               "one_adapter": one,
               "cold_load_s": {"median": med(cold), "max": round(max(cold), 3), "each": [round(c, 3) for c in cold]},
               "wall_s": round(time.time() - started, 1)}
    goals = [{**at_least(f"batched / one-at-a-time completion tokens/s at {key.replace('_', ' ')} (same answers)",
                         v["ratio"], GOALS["mixed_batched_over_one_at_a_time"]), "met": v["met"]}
             for key, v in by_load.items()]
    goals.append(at_least("one adapter / base alone tokens/s", one["ratio"], GOALS["one_adapter_over_base"]))
    log("mixed batched/one-at-a-time: " + ", ".join(f"{k.split('_')[0]} clients {v['ratio']:.2f}x (same answers: "
                                                      f"{v['same_answers']})" for k, v in by_load.items()) +
        f"; one adapter/base {one['ratio']:.3f} (one client: {one['ratio_one_client']}); "
        f"cold load median {figures['cold_load_s']['median']} s")
    return Measured("one Serve replica, SmolLM2-135M-Instruct + LoRA adapters from a registry, HTTP clients: a mixed "
                    "load with continuous batching across adapters vs one request at a time; one adapter vs the base; "
                    "adapter cold-load time", figures, goals)


def one_round(r: int, registry: Path, names: list[str], args) -> dict:
    """Fresh apps: a batched one for base / one adapter / cold loads, then per load level batched and
    one-at-a-time on the same requests."""
    from honed.serve import deploy as serve_deploy

    log(f"round {r + 1}/{args.repeats}: batched app (max_batch_size 8) — base alone, one adapter, cold loads")
    single = [("base", q) for q in QUESTIONS]
    on_adapter = [(names[0], q) for _, q in single]
    url = deploy(registry, 8, args.adapters, args.threads, args.port, 8)
    load(url, single, 8, 4)  # warm-up: the first forwards (allocator, threads) are not measured
    one = {"base": measured_load(url, single, 8, args.max_tokens),
           "base_one_client": measured_load(url, single[:4], 1, args.max_tokens)}
    load(url, on_adapter, 8, 4)  # the adapter warmed as the base was: its cold load is measured below, apart
    one |= {"adapter": measured_load(url, on_adapter, 8, args.max_tokens),
            "adapter_one_client": measured_load(url, on_adapter[:4], 1, args.max_tokens)}
    cold = cold_loads(url, names[1:], args.max_tokens)
    serve_deploy.stop()
    mixed = {}
    for level in args.loads:
        requests = [(names[i % len(names)], QUESTIONS[(i // len(names)) % len(QUESTIONS)])
                    for i in range(args.requests_per_client * level)]
        mixed[level] = {}
        for mode, batch in (("batched", level), ("one_at_a_time", 1)):
            log(f"round {r + 1}/{args.repeats}: {level} clients, {len(requests)} requests, {mode} app")
            url = deploy(registry, batch, args.adapters, args.threads, args.port, level)
            load(url, [(name, QUESTIONS[0]) for name in names], min(level, len(names)), 4)  # resident, warm
            mixed[level][mode] = measured_load(url, requests, level, args.max_tokens)
            serve_deploy.stop()
    return {"one": one, "cold": cold, "mixed": mixed}


def measured_load(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    """`load`, with what the replica counted meanwhile (`replica_stats`: steps, rows, and the model thread's
    seconds, which tell its compute from HTTP and the event loop)."""
    before = stats(url)
    out = load(url, requests, concurrency, max_tokens)
    out["replica_stats"] = {k: round(v - before.get(k, 0), 3) if isinstance(v, (int, float)) and k not in STATES
                            else v for k, v in stats(url).items()}
    return out


def mixed_summary(runs: list[dict]) -> dict:
    """One load level over the rounds: the median ratio, and whether both modes answered alike (greedy)."""
    ratios = [x["batched"]["tokens_per_s"] / x["one_at_a_time"]["tokens_per_s"] for x in runs]
    same = all(x["batched"]["answers"] == x["one_at_a_time"]["answers"] == runs[0]["batched"]["answers"]
               for x in runs)
    for x in runs:
        x["batched"].pop("answers"), x["one_at_a_time"].pop("answers")
    return {"ratio": med(ratios), "ratios": [round(v, 3) for v in ratios], "same_answers": same,
            "met": same and med(ratios) >= GOALS["mixed_batched_over_one_at_a_time"], "rounds": runs}


def one_adapter_summary(rounds: list[dict]) -> dict:
    ratios = [x["one"]["adapter"]["tokens_per_s"] / x["one"]["base"]["tokens_per_s"] for x in rounds]
    one_client = [x["one"]["adapter_one_client"]["tokens_per_s"] / x["one"]["base_one_client"]["tokens_per_s"]
                  for x in rounds]
    for x in rounds:
        for part in x["one"].values():
            part.pop("answers")
    return {"ratio": med(ratios), "ratios": [round(v, 3) for v in ratios],
            "ratio_one_client": med(one_client), "ratios_one_client": [round(v, 3) for v in one_client],
            "goal": GOALS["one_adapter_over_base"], "met": med(ratios) >= GOALS["one_adapter_over_base"],
            "rounds": [x["one"] for x in rounds]}


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


if __name__ == "__main__":
    main("serve_adapters", __doc__, measure, options=options, repeats=2,
         quick={"adapters": 4, "loads": [4], "requests_per_client": 2, "max_tokens": 8, "repeats": 1})
