"""What a training run cost: throughput, step time, MFU, peak memory — written as `efficiency.json`.

MFU follows the PaLM convention: model FLOPs per token = 6 · N (N = every parameter of the model, trained or
frozen: a frozen weight still costs its forward and input-gradient matmuls; only its weight gradient is
skipped, so peft methods really need ~4·N and their MFU reads low by that factor, stated in the report).
Attention's own FLOPs (12·layers·hidden·seq) are left out, as in the convention. The peak is measured on the
worker's device (a large square matmul in the compute dtype, best of several runs) unless `peak_flops` is
given, e.g. 989e12 for an H100's dense bf16.
"""

from __future__ import annotations

import resource
import time

import torch

FLOPS_CONVENTION = "6 * total_params per token (PaLM); attention FLOPs excluded"


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                       seconds: float = 1.0) -> float:
    """Matmul FLOP/s of this process on `device` (with its current torch thread count): best of repeated
    runs of a `size`² matmul over about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3
    best = float("inf")
    torch.matmul(a, b)  # warm-up: thread pool, kernels
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return flops / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this worker: CUDA max allocated on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # Linux: KiB


class Meter:
    """Accumulates the run's step times and token counts on one worker (the first `warmup` optimizer steps
    are excluded from the rates: they hold allocator growth and one-off compilation)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.steps = 0
        self.seconds = 0.0
        self.tokens = 0
        self.real_tokens = 0
        self.loss_tokens = 0

    def add(self, seconds: float, tokens: int, real_tokens: int, loss_tokens: int) -> None:
        """One optimizer step on this worker: padded tokens fed, non-pad tokens, labelled tokens."""
        self.steps += 1
        if self.steps <= self.warmup:
            return
        self.seconds += seconds
        self.tokens += tokens
        self.real_tokens += real_tokens
        self.loss_tokens += loss_tokens

    def state(self) -> dict:
        return dict(vars(self))

    def restore(self, state: dict) -> None:
        vars(self).update(state)


def efficiency_report(meters: list[dict], *, total_params: int, trainable_params: int, peak_flops: float,
                      peak_flops_source: str, memory_mb: list[float], memory_kind: str, method: str,
                      world_size: int) -> dict:
    """Combine the per-worker meters (gathered on rank 0) into the run's report."""
    measured_steps = min(m["steps"] - m["warmup"] for m in meters)
    seconds = max(m["seconds"] for m in meters)  # workers step in lockstep: the slowest one is the run's time
    tokens = sum(m["tokens"] for m in meters)
    real = sum(m["real_tokens"] for m in meters)
    per_s = tokens / seconds if seconds else 0.0
    real_per_s = real / seconds if seconds else 0.0
    flops_per_token = 6 * total_params
    mfu = flops_per_token * real_per_s / (peak_flops * world_size) if peak_flops and seconds else 0.0
    return {
        "method": method,
        "world_size": world_size,
        "measured_steps": measured_steps,
        "step_time_s": round(seconds / measured_steps, 4) if measured_steps > 0 else None,
        "tokens_per_s": round(per_s, 1),
        "nonpad_tokens_per_s": round(real_per_s, 1),
        "padding_fraction": round(1 - real / tokens, 4) if tokens else None,
        "labelled_tokens": sum(m["loss_tokens"] for m in meters),
        "mfu": round(mfu, 4),
        "flops_per_token": flops_per_token,
        "flops_convention": FLOPS_CONVENTION,
        "peak_flops_per_worker": peak_flops,
        "peak_flops_source": peak_flops_source,
        "peak_memory_mb": round(max(memory_mb), 1),
        "peak_memory_mb_per_worker": [round(m, 1) for m in memory_mb],
        "memory_kind": memory_kind,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "trainable_fraction": round(trainable_params / total_params, 6) if total_params else None,
    }


def format_report(r: dict) -> str:
    step = f"{r['step_time_s']:.3f} s/step" if r["step_time_s"] else "n/a s/step"
    return (f"efficiency: {r['tokens_per_s']:.0f} tok/s ({r['nonpad_tokens_per_s']:.0f} non-pad) on "
            f"{r['world_size']} worker(s), {step}, MFU {100 * r['mfu']:.1f}% of "
            f"{r['peak_flops_per_worker'] / 1e9:.1f} GFLOP/s per worker ({r['peak_flops_source']}), peak memory "
            f"{r['peak_memory_mb']:.0f} MB ({r['memory_kind']}), trainable {r['trainable_params']:,} of "
            f"{r['total_params']:,} params")
