"""What a training run cost: throughput, step time, MFU, peak memory — written as `efficiency.json`.

    report = efficiency_report(meters, params=matmul_params(model, total, trainable), peak_flops=..., ...)
    print(format_report(report))

Model FLOPs per token (MFU's numerator), by method — N counts the model's parameters, N_trained the trained
ones:
    full                        6·N               forward 2·N, backward 4·N (input and weight gradients)
    lora, qlora, ia3, prefix    4·N + 2·N_trained forward 2·N, backward through every weight 2·N (frozen weights
                                                  pass the gradient down), weight gradients of trained ones 2·N_trained
    dpo                         6·N + 2·N_trained the reference model's forward 2·N, then as lora
An input-embedding table not shared with the output head is a lookup and left out of N; the output head counts
at labelled tokens only (honed asks for logits there: honed.train.losses), the rest of N at every non-pad
token. Attention scores (QKᵀ, AV) and activation-checkpoint recomputation are left out, as in PaLM's MFU.

The peak (MFU's denominator, per worker) is `efficiency.peak_flops` when given, else the datasheet figure of a
known GPU (`GPU_DATASHEET`, dense, in the compute dtype), else a large matmul measured on the worker's device
with its thread count: the best figure its node has measured (kept in `HONED_CACHE/peak_flops.json`). An MFU
above 100 % means a wrong peak or FLOPs count: it is reported as `mfu: null` with `mfu_error` saying why, never
as a figure.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from honed.train.collate import RowCost

# The FLOPs per token of each method, as stated in every report (see the module docstring).
_COUNTED = ("; N = the model's parameters (an untied input embedding is a lookup, left out), the output head "
            "counted at labelled tokens only, the rest at every non-pad token; attention scores and activation "
            "recomputation left out")
_PEFT = "4·N + 2·N_trained per token: forward 2·N, backward through every weight 2·N, weight gradients 2·N_trained"
FLOPS_CONVENTIONS = {
    "full": "6·N per token: forward 2·N, backward 4·N (input and weight gradients)" + _COUNTED,
    "lora": _PEFT + _COUNTED, "qlora": _PEFT + _COUNTED, "ia3": _PEFT + _COUNTED, "prefix": _PEFT + _COUNTED,
    "dpo": "6·N + 2·N_trained per token: the reference model's forward 2·N, forward 2·N, backward through every "
           "weight 2·N, weight gradients 2·N_trained" + _COUNTED,
}

# Dense (no sparsity) peak FLOP/s from the vendors' datasheets: (bf16 / fp16, tf32, fp32). A row applies when all
# its words are words of torch.cuda.get_device_name(); the first such row wins, so variants come first.
GPU_DATASHEET = {
    ("h100", "nvl"): (835.5e12, 417.5e12, 60e12),
    ("h100", "pcie"): (756e12, 378e12, 51.2e12),
    ("h100",): (989.4e12, 494.7e12, 66.9e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", "nvl"): (835.5e12, 417.5e12, 60e12),
    ("h200",): (989.4e12, 494.7e12, 66.9e12),  # SXM: the H100's compute with more memory
    ("gh200",): (989.4e12, 494.7e12, 66.9e12),
    ("a100",): (312e12, 156e12, 19.5e12),  # 40 and 80 GB, SXM and PCIe alike
    ("l40s",): (362.05e12, 183e12, 91.6e12),
    ("l40",): (181.05e12, 90.5e12, 90.5e12),
    ("l4",): (121e12, 60e12, 30.3e12),
    ("a10g",): (125e12, 62.5e12, 31.2e12),  # AWS's A10 variant: NVIDIA publishes the A10's figures only
    ("a10",): (125e12, 62.5e12, 31.2e12),
    ("mi300x",): (1307.4e12, 653.7e12, 163.4e12),
}
HALF = (torch.bfloat16, torch.float16)


class MatmulParams(NamedTuple):
    """Parameter values as the FLOPs count sees them: the output head (run at labelled tokens) apart from the
    rest (the body, run at every non-pad token); `*_trained`: of those, the trained ones."""

    body: int
    body_trained: int
    head: int = 0
    head_trained: int = 0


def matmul_params(model, total: int, trainable: int) -> MatmulParams:
    """Split a model's (total, trainable) parameter values (honed.train.methods.count_params) for the FLOPs count:
    the output head apart, an input-embedding table not shared with the head left out. `model`: a transformers
    causal LM or a peft wrapper of one, ZeRO-3 partitioned or not."""
    head = model.get_output_embeddings().weight
    table = model.get_input_embeddings().weight
    lookup = [] if table is head else [table]
    n_head = _values(head)
    head_trained = n_head if head.requires_grad else 0
    return MatmulParams(body=total - n_head - sum(_values(t) for t in lookup),
                        body_trained=trainable - head_trained - sum(_values(t) for t in lookup if t.requires_grad),
                        head=n_head, head_trained=head_trained)


def _values(weight: torch.nn.Parameter) -> int:
    return weight.ds_numel if hasattr(weight, "ds_numel") else weight.numel()  # ZeRO-3 keeps the full size there


def flops_per_token(method: str, params: MatmulParams) -> tuple[int, int]:
    """Model FLOPs per non-pad token (the body) and per labelled token (the head) of one training step of
    `method` (conventions: `FLOPS_CONVENTIONS`)."""
    if method not in FLOPS_CONVENTIONS:
        raise ValueError(f"no FLOPs convention for method '{method}'; methods: {', '.join(FLOPS_CONVENTIONS)}")
    forwards = 2 if method == "dpo" else 1  # dpo runs the reference model forward too

    def cost(n: int, trained: int) -> int:
        return 2 * n * forwards + 2 * n + 2 * trained

    return cost(params.body, params.body_trained), cost(params.head, params.head_trained)


def row_cost(model, method: str, params: MatmulParams, training: bool = True) -> RowCost:
    """A row's compute beyond its tokens, relative to one token's FLOPs through the body, for splitting a global
    batch between ranks (honed.train.collate.rank_split): a labelled token adds the output head's FLOPs
    (`flops_per_token`, or the forward's 2·N when not `training`), and an example of n tokens adds causal
    attention's ~n²/2 query-key pairs, each 4 FLOPs per attention width and layer forward (scores, then values)
    and 3 times that with the backward (dpo: the reference model's forward too). A model whose config names no
    layers or heads gets the head's part only."""
    body, head = flops_per_token(method, params) if training else (2 * params.body, 2 * params.head)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not (body and layers and heads):
        return RowCost(labelled=head / body if body else 0.0)
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    passes = (4 if method == "dpo" else 3) if training else 1
    return RowCost(labelled=head / body, squared=4 * layers * width * passes / 2 / body)


def datasheet_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """The datasheet's dense peak FLOP/s of a GPU (`torch.cuda.get_device_name()`) in `dtype` (fp32 matmuls on
    tensor cores when `tf32`), or None for a GPU or dtype the table does not know."""
    words = set("".join(c if c.isalnum() else " " for c in device_name.lower()).split())
    for key, (half, tf32_peak, fp32) in GPU_DATASHEET.items():
        if set(key) <= words:
            if dtype in HALF:
                return half
            return (tf32_peak if tf32 else fp32) if dtype == torch.float32 else None
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                       repeats: int = 3) -> float:
    """Matmul FLOP/s of this process on `device` with its current torch thread count: the best of `repeats`
    `size`² matmuls after a warm-up one. Default size (`peak_matmul_size`): 2048 on CPU, within a few % of
    4096²'s rate at an eighth of its time (~0.1 s a run on one core), 8192 on GPU, where launch overhead is
    then noise."""
    size = size or peak_matmul_size(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernels, clocks
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def device_peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None,
                      before_measuring=lambda: None, everyone=lambda mine: mine) -> tuple[float, str]:
    """(peak FLOP/s of one worker, where it comes from): `configured` (efficiency.peak_flops), else the datasheet
    of a known GPU, else measured: the best this node has measured for this device, dtype, thread count and torch
    version (`HONED_CACHE/peak_flops.json`). A node measures again while any worker lacks a figure: `everyone`
    says whether every worker has one (an all-reduce, so all of them measure or none does), and
    `before_measuring` runs first (a barrier: every worker measures at once, sharing the machine as it will while
    training). A peak is a maximum: a measurement taken while the machine was busy never lowers the figure, and
    a job no longer spends its set-up on the matmuls (~1 s a worker on a CPU core)."""
    name = str(dtype).removeprefix("torch.")
    if configured:
        return configured, "config (efficiency.peak_flops)"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        sheet = datasheet_peak_flops(gpu, dtype, tf32)
        if sheet:
            return sheet, f"datasheet {gpu}, dense {'tf32' if dtype == torch.float32 and tf32 else name}"
    size = peak_matmul_size(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    source = f"measured {size}² matmul ({name}{threads}), the best of this node's runs"
    key = peak_key(device, dtype)
    known = remembered_peak(key)
    if everyone(known is not None):
        return known, source
    before_measuring()
    return remember_peak(key, measure_peak_flops(device, dtype, size)), source


PEAK_FILE = "peak_flops.json"


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak holds for: the device (CPU model and thread count, or GPU name and TF32), the dtype
    and torch's version."""
    from honed.runtime import cpu_model

    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)}, tf32 {torch.backends.cuda.matmul.allow_tf32}"
    else:
        what = f"{cpu_model()}, {torch.get_num_threads()} thread(s)"
    return f"{device.type}: {what}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"


def kept_peaks() -> dict:
    """This node's kept peaks by `peak_key` ({} when the file is missing or unreadable)."""
    import json

    from honed.storage import cache_home

    try:
        kept = json.loads((cache_home() / PEAK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def remembered_peak(key: str, kept: dict | None = None) -> float | None:
    """The best peak this node measured for `key` (in `kept`, else read), or None."""
    value = (kept_peaks() if kept is None else kept).get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def remember_peak(key: str, flops: float) -> float:
    """Keep the larger of `flops` and the figure already kept for `key`; returns it. Written to a temporary file
    and renamed, so workers of a node writing at once never leave a torn file."""
    import json
    import os
    import tempfile

    from honed.storage import cache_home

    kept = kept_peaks()
    best = max(flops, remembered_peak(key, kept) or 0.0)
    path = cache_home() / PEAK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PEAK_FILE)
        with os.fdopen(fd, "w") as fh:
            json.dump(kept | {key: best}, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the figure holds for this run only
    return best


def mfu_or_error(model_flops: float, seconds: float, peak: float, source: str) -> tuple[float | None, str | None]:
    """(MFU, None), or (None, why not): nothing measured, or a figure above 1, which only a wrong peak or FLOPs
    count can give."""
    if not seconds or not model_flops or not peak:
        return None, "no optimizer step was measured after the warm-up steps"
    mfu = model_flops / seconds / peak
    if mfu <= 1:
        return round(mfu, 4), None
    if source.startswith("config"):
        why = "efficiency.peak_flops is below what this device sustained; give its datasheet figure"
    elif source.startswith("datasheet"):
        why = "the datasheet figure does not fit this device; set efficiency.peak_flops"
    else:
        why = ("the peak matmul ran slower than training did (the cores or GPU were busy with something else "
               "while it was measured); set efficiency.peak_flops to the device's figure")
    return None, f"measurement error: {mfu:.0%} of the peak ({source}); {why}"


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


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref.proxy whose referent is gone: isinstance reads its __class__
        return False


def tensor_mb(device_type: str = "cpu") -> float:
    """MB of tensor storage alive in this process on `device_type`, each storage counted once (views and
    parameters share theirs): between two steps, the model state as the backend holds it — parameters (under
    ZeRO-3 this rank's partition), gradients, optimizer moments, fp32 master copies and the backend's flat
    buffers. Only tensors Python can reach are seen: DDP's gradient buckets, held in C++, are not."""
    import gc
    import warnings

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated objects and data_ptr on fake tensors warn
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if _is_tensor(obj)]
        for t in tensors:
            try:
                if t.device.type != device_type or t.layout != torch.strided:  # sparse tensors have no one storage
                    continue
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # fake and functional tensors (torch.compile's) hold no data
                continue
            if ptr and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total / 2**20


def rss_anon_mb() -> float:
    """This process's anonymous resident memory (RssAnon, Linux): heap and tensors, not the file-backed pages of
    memory-mapped safetensors, which the kernel can drop. NaN where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class AnonPeak:
    """The peak of `rss_anon_mb` while the block runs, sampled by a thread every `interval` seconds.

        with AnonPeak() as load:
            model = build_model(...)
        load.baseline_mb, load.peak_mb"""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline_mb = self.peak_mb = rss_anon_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_anon_mb())

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_anon_mb())


def held_params(model) -> int:
    """Parameter values this rank holds in memory: its partition of ZeRO-3 partitioned weights, all of others."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def efficiency_report(meters: list[dict], *, params: MatmulParams, total_params: int, trainable_params: int,
                      peak_flops: float, peak_flops_source: str, memory_mb: list[float], memory_kind: str,
                      method: str, world_size: int) -> dict:
    """Combine the per-worker meters (gathered on rank 0) into the run's report."""
    measured_steps = min(m["steps"] - m["warmup"] for m in meters)
    seconds = max(m["seconds"] for m in meters)  # workers step in lockstep: the slowest one is the run's time
    tokens = sum(m["tokens"] for m in meters)
    real = sum(m["real_tokens"] for m in meters)
    labelled = sum(m["loss_tokens"] for m in meters)
    per_token, per_labelled = flops_per_token(method, params)
    model_flops = per_token * real + per_labelled * labelled
    mfu, mfu_error = mfu_or_error(model_flops, seconds, peak_flops * world_size, peak_flops_source)
    return {
        "method": method,
        "world_size": world_size,
        "measured_steps": measured_steps,
        "step_time_s": round(seconds / measured_steps, 4) if measured_steps > 0 else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "nonpad_tokens_per_s": round(real / seconds, 1) if seconds else 0.0,
        "padding_fraction": round(1 - real / tokens, 4) if tokens else None,
        "labelled_tokens": labelled,
        "mfu": mfu,
        **({"mfu_error": mfu_error} if mfu_error else {}),
        "model_flops_per_s": round(model_flops / seconds) if seconds else 0,
        "flops_per_token": per_token,
        "flops_per_labelled_token": per_labelled,
        "flops_convention": FLOPS_CONVENTIONS[method],
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
    formula = r["flops_convention"].partition(" per token")[0]
    mfu = (f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else f"MFU not reported ({r['mfu_error']})")
    return (f"efficiency: {r['tokens_per_s']:.0f} tok/s ({r['nonpad_tokens_per_s']:.0f} non-pad) on "
            f"{r['world_size']} worker(s), {step}, {mfu} at {formula} FLOPs/token of "
            f"{r['peak_flops_per_worker'] / 1e9:.1f} GFLOP/s per worker ({r['peak_flops_source']}), peak memory "
            f"{r['peak_memory_mb']:.0f} MB ({r['memory_kind']}), trainable {r['trainable_params']:,} of "
            f"{r['total_params']:,} params")
