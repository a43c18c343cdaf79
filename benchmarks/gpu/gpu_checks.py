"""What only a GPU can tell about honed, run on one GPU machine that has no Ray (benchmarks/gpu/run_all.sh runs it).

    python benchmarks/gpu/gpu_checks.py                       # every check → benchmarks/results/gpu_<check>.json
    python benchmarks/gpu/gpu_checks.py --cpu-smoke           # the same code on CPU: a tiny model, 2 steps a check
    python benchmarks/gpu/gpu_checks.py --only train,decode --steps 40

The checks, one result file each (top-level `goals: [{name, value, goal, met}]`, as benchmarks/harness.py writes):
  train      bf16 model building and `--steps` optimizer steps of the embedded SmolLM2-135M on ICD-10-CM examples,
             padding-free: LoRA, QLoRA (4-bit NF4 base) and full fine-tuning under DeepSpeed ZeRO-3 on one GPU
             (a torch.distributed group of one); build facts, losses, tokens/s, MFU and peak memory per method
  attention  padding-free batches against padded ones under the kernel `model.attn_implementation: auto` selects
             (flash_attention_2 where flash-attn is installed, else sdpa → honed_varlen): loss and gradients
  eval_merge honed eval's per-model scoring (losses, generated answers, bias probe) of the base and the LoRA
             adapter on the GPU, and honed merge of the LoRA and QLoRA adapters in bf16 within their bounds
  decode     the multi-adapter decoder of a serving replica (BatchDecoder over MultiLora): rows of the base and
             two adapters in one batch against each adapter alone, sampling at temperature > 0 with seeds,
             continuous batching, and a mixed batch's tokens/s against one request at a time
  pytest     `pytest -m gpu tests/gpu` in a subprocess, its outcome per test

No Ray anywhere (the GPU machine cannot install it): the checks drive honed's per-worker and per-replica code
directly — honed.train.methods.build_model, honed.train.backends (TorchBackend without Ray Train: no DDP at world
size 1; DeepSpeedBackend), honed.train.losses / collate, honed.train.efficiency, honed.eval.evaluate.score_model,
honed.merge.merge, honed.generation.BatchDecoder, honed.serve.lora.MultiLora. eval_merge and decode use the adapters
that train writes, so train runs first whenever they are asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(HERE.parent)]  # honed (uninstalled there) and benchmarks/harness.py

import torch  # noqa: E402
from harness import at_least, at_most, commit, log, machine_info, write_result  # noqa: E402

CHECKS = ("train", "attention", "eval_merge", "decode", "pytest")
NEEDS_TRAIN = ("eval_merge", "decode")  # they score, merge and serve the adapters train writes
METHODS = {  # method section and learning rate of each training run; ZeRO-3 last: its zero.Init must end first
    "lora": ({"name": "lora"}, 2e-3),
    "qlora": ({"name": "qlora"}, 2e-3),
    "full_zero3": ({"name": "full", "deepspeed": {"zero_stage": 3}}, 5e-5),
}
SYSTEM_PROMPT = "You are a medical coding assistant. Answer with ICD-10-CM facts only."  # jobs/prepare_icd10.yaml's
GENERAL_TEXT = [  # general English for the forgetting side of eval: scored on every token
    "The river rose after three days of rain, and the farmers moved their cattle to higher ground.",
    "A good bread needs flour, water, salt and time; the yeast does the rest while the dough rests.",
    "The committee met on Tuesday and agreed to publish the report before the end of the month.",
    "Light from the sun takes a little over eight minutes to reach the earth.",
    "She packed a map, a compass and enough water for two days before setting out on the trail.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
]


@dataclass
class Setup:
    """What every check reads: the run's settings, the device, the model and its ICD-10-CM examples."""

    args: argparse.Namespace
    device: torch.device
    model_path: str
    tokenizer: object
    template: dict  # as a dataset manifest records it: chat_template, stop, system_prompt
    train_rows: list[dict]
    val_rows: list[dict]
    work: Path
    adapters: dict[str, str] = field(default_factory=dict)  # method → adapter dir, written by the train check

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compute_dtype(self) -> torch.dtype:
        """`model.dtype: auto` here: bf16 on the GPU, fp32 on CPU."""
        from honed.models import device_dtype

        return device_dtype("auto", self.device)

    def adapter(self, method: str) -> str:
        if method not in self.adapters:
            raise RuntimeError(f"no {method} adapter: this check uses the adapters the train check writes, and its "
                               f"{method} run did not finish (see gpu_train.json)")
        return self.adapters[method]


# ------------------------------------------------------------------------------------------------ set-up
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every check on CPU with a tiny random model and 2 steps (proves the code runs)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks of: {', '.join(CHECKS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training method")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per training step")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (ignored with --cpu-smoke)")
    parser.add_argument("--out-dir", help="result files (default benchmarks/results; WORK/results with --cpu-smoke)")
    parser.add_argument("--work", help="scratch dir (default /tmp/honed-gpu-checks, /tmp/honed-gpu-smoke)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.cpu_smoke:
        args.steps, args.batch_size = 2, 4
    args.work = Path(args.work or ("/tmp/honed-gpu-smoke" if args.cpu_smoke else "/tmp/honed-gpu-checks"))
    args.out_dir = Path(args.out_dir or (args.work / "results" if args.cpu_smoke else ROOT / "benchmarks" / "results"))
    return args


def selected_checks(only: str) -> list[str]:
    """The asked-for checks in run order, with train added when a check needs its adapters."""
    wanted = set(only.split(","))
    if wanted & set(NEEDS_TRAIN):
        wanted.add("train")
    return [c for c in CHECKS if c in wanted]


def make_setup(args: argparse.Namespace) -> Setup:
    from honed.data.templates import resolve_template
    from honed.models import load_tokenizer, make_tiny_model, resolve_model

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device: run with --cpu-smoke on a machine without a GPU")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # shared 2-core machines: more threads per process thrash
    args.work.mkdir(parents=True, exist_ok=True)
    model_path = make_tiny_model(args.work / "tiny") if args.cpu_smoke else resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    template = resolve_template("tokenizer", tokenizer) | {"system_prompt": SYSTEM_PROMPT}
    examples = icd10_examples(tokenizer, template, 8 * args.batch_size + 64)
    return Setup(args, device, model_path, tokenizer, template, examples[64:], examples[:64], args.work)


def icd10_examples(tokenizer, template: dict, n: int) -> list[dict]:
    """`n` ICD-10-CM question/answer examples encoded as honed prepare encodes them (labels on the answer only)."""
    from honed.data.records import encode_example
    from honed.data.sources import icd10_records

    examples = []
    for record in icd10_records(chapters=["4", "9", "10"], max_records=n, seed=0):
        encoded = encode_example({"kind": "instruction", **record}, tokenizer, SYSTEM_PROMPT,
                                 chat_template=template["chat_template"])
        examples.append(encoded | {"source": "icd10", "prompt": record["prompt"], "response": record["response"]})
    return examples


def columns(rows: list[dict]) -> dict:
    """Rows as the numpy columns a Ray Data batch hands the training loop (token lists in object arrays)."""
    from honed.train.dpo import object_column

    return {"input_ids": object_column([r["input_ids"] for r in rows]),
            "labels": object_column([r["labels"] for r in rows])}


@contextlib.contextmanager
def process_group(device: torch.device):
    """A torch.distributed group of one rank (DeepSpeed needs one): NCCL on the GPU, gloo on CPU."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------------ train
def check_train(s: Setup) -> tuple[str, dict, list]:
    from honed.artifacts import write_meta
    from honed.models import weights_hash

    runs, goals = {}, []
    base_sha = weights_hash(s.model_path)
    with process_group(s.device):
        for name, (method, lr) in METHODS.items():
            log(f"train: {name}, {s.args.steps} steps")
            run, cfg = train_method(s, method, lr, s.work / "train" / name)
            runs[name] = run
            goals += train_goals(name, run, s)
            if cfg.method.peft:
                s.adapters[name] = run["artifact"]
                write_meta(run["artifact"], {"base_model": s.model_path, "base_weights_sha256": base_sha,
                                             "method": cfg.method.model_dump(), "template": s.template})
    what = (f"{s.args.steps} optimizer steps of batch {s.args.batch_size} (ICD-10-CM examples, padding-free) per "
            f"method on {s.device.type}: LoRA, QLoRA, full fine-tuning under DeepSpeed ZeRO-3 at world size 1")
    return what, {"model": s.model_path, "runs": runs}, goals


def train_method(s: Setup, method: dict, lr: float, out: Path):
    """Build, train and export one method with honed's per-worker pieces; (figures, its TrainConfig)."""
    from honed.config import TrainConfig
    from honed.train.attention import use_varlen
    from honed.train.backends import make_backend, model_hidden_size, run_deepspeed_config
    from honed.train.checkpointing import seed_everything
    from honed.train.methods import build_model, count_params, sharded_loading

    cfg = TrainConfig(model={"name_or_path": s.model_path}, method=method, scaling={"use_gpu": s.gpu},
                      optim={"lr": lr, "batch_size": s.args.batch_size, "max_steps": s.args.steps,
                             "warmup_steps": min(3, s.args.steps - 1), "padding_free": True})
    release_memory(s.device)
    seed_everything(cfg.seed)  # as a worker does: the same initial LoRA matrices every run
    ds_config = run_deepspeed_config(cfg, s.device, model_hidden_size(s.model_path)) \
        if cfg.method.deepspeed.enabled else None
    zero3 = sharded_loading(ds_config)  # ZeRO-3: the model is created partitioned, as in a training worker
    started = time.perf_counter()
    model = build_model(cfg.method, s.model_path, cfg.model.dtype, s.device, cfg.model.attn_implementation)
    built = build_facts(model, cfg, s.device, time.perf_counter() - started)
    built["padding_free_attention"] = use_varlen(model)  # as the loop's setup does for padding-free batches
    trainable, total = count_params(model)
    backend = make_backend(model, cfg, s.args.steps, s.device, ds_config)
    run = {"build": built, **train_steps(s, cfg, backend, trainable, total)}
    backend.artifact(str(out), 0)
    run["artifact"] = str(out / ("adapter" if cfg.method.peft else "model"))
    run["artifact_mb"] = round(sum(f.stat().st_size for f in Path(run["artifact"]).rglob("*")) / 2**20, 1)
    if ds_config:
        backend.engine.destroy()
    del backend, model, zero3  # transformers holds zero.Init's config weakly: later loads are whole again
    release_memory(s.device)
    return run, cfg


def build_facts(model, cfg, device: torch.device, seconds: float) -> dict:
    """How the method's model came out: dtypes of frozen and trained weights, 4-bit and ZeRO-3 partitioned
    weights, the attention kernel, and the device memory it holds."""
    from honed.train.attention import attention_kernel
    from honed.train.methods import compute_dtype

    def dtypes(trained: bool) -> list[str]:
        return sorted({str(getattr(p, "ds_tensor", p).dtype).removeprefix("torch.")
                       for p in model.parameters() if p.requires_grad == trained})

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    compute = compute_dtype(cfg.model.dtype, device)
    params = list(model.parameters())
    return {"seconds": round(seconds, 2), "compute_dtype": str(compute).removeprefix("torch."),
            "frozen_dtypes": dtypes(False), "trained_dtypes": dtypes(True),
            "four_bit_tensors": sum(type(p).__name__ == "Params4bit" for p in params),
            "zero3_partitioned": sum(hasattr(p, "ds_tensor") for p in params), "tensors": len(params),
            "attention": str(base.config._attn_implementation),
            "expected_attention": attention_kernel(cfg.model.attn_implementation, device, compute),
            "device_memory_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1) if device.type == "cuda"
            else None}


def train_steps(s: Setup, cfg, backend, trainable: int, total: int) -> dict:
    """The optimizer steps of one run, as honed's loop takes them (world size 1: each step's objective is the
    mean over its labelled tokens), and the efficiency report honed writes for a run."""
    from honed.train.efficiency import Meter, device_peak_flops, efficiency_report, matmul_params, peak_memory_mb
    from honed.train.losses import LMObjective

    objective, meter, losses = LMObjective(flat=True), Meter(warmup=min(2, s.args.steps - 1)), []
    backend.train()
    for step in range(s.args.steps):
        started = time.perf_counter()
        inputs = objective.collate(columns(step_rows(s.train_rows, step, s.args.batch_size)),
                                   s.tokenizer.pad_token_id, s.device)
        units = objective.units(inputs)
        with backend.autocast():
            loss_sum, _, _ = objective.loss(backend.module, inputs)
        backend.backward(loss_sum / units, True)
        backend.step()
        losses.append(loss_sum.item() / units)  # waits for the step: the meter times whole steps
        meter.add(time.perf_counter() - started, inputs["input_ids"].numel(), inputs["n_tokens"], units)
    peak, kind = device_peak_flops(s.device, s.compute_dtype, None)
    memory, memory_kind = peak_memory_mb(s.device)
    report = efficiency_report([meter.state()], params=matmul_params(backend.model, total, trainable),
                               total_params=total, trainable_params=trainable, peak_flops=peak, peak_flops_source=kind,
                               memory_mb=[memory], memory_kind=memory_kind, method=cfg.method.name, world_size=1)
    return {"losses": [round(x, 4) for x in losses], "efficiency": report}


def step_rows(rows: list[dict], step: int, batch: int) -> list[dict]:
    start = (step * batch) % max(len(rows) - batch, 1)
    return rows[start:start + batch]


def train_goals(name: str, run: dict, s: Setup) -> list[dict]:
    build, losses = run["build"], run["losses"]
    from honed.train.attention import IMPLEMENTATION, reads_boundaries

    expected = build["expected_attention"]
    flat_kernel = expected if reads_boundaries(expected) else IMPLEMENTATION
    goals = [at_least(f"{name}: every loss finite (1 = yes)", float(all(math.isfinite(x) for x in losses)), 1),
             at_least(f"{name}: loaded with the selected kernel, padding-free rows on its varlen path (1 = yes)",
                      float(build["attention"] == expected and build["padding_free_attention"] == flat_kernel), 1)]
    if name in ("lora", "qlora"):
        goals.append(at_least(f"{name}: adapter weights kept in float32 (1 = yes)",
                              float(build["trained_dtypes"] == ["float32"]), 1))
    if name == "lora":
        goals.append(at_least("lora: frozen base in the compute dtype (1 = yes)",
                              float(build["frozen_dtypes"] == [build["compute_dtype"]]), 1))
    if name == "qlora":
        goals.append(at_least("qlora: 4-bit weight tensors", build["four_bit_tensors"], 1))
    if name == "full_zero3":
        goals.append(at_least("full_zero3: share of tensors ZeRO-3 partitioned",
                              round(build["zero3_partitioned"] / build["tensors"], 3), 1.0))
    if len(losses) >= 10:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        goals.append(at_most(f"{name}: mean loss of the last 5 steps / the first 5", round(last / first, 4), 0.9))
    return goals


# ------------------------------------------------------------------------------------------------ attention
def check_attention(s: Setup) -> tuple[str, dict, list]:
    """Padding-free against padded batches of the same examples, in the compute dtype under autocast, for the
    kernel `auto` selects and (where that is flash attention) for sdpa → honed_varlen too."""
    from honed.train.attention import attention_kernel

    selected = attention_kernel("auto", s.device, s.compute_dtype)
    kernels = [selected] + (["sdpa"] if selected != "sdpa" else [])
    rows = sorted(s.train_rows[: 2 * s.args.batch_size], key=lambda r: len(r["input_ids"]))[:: 2]  # varied lengths
    results, goals = {}, []
    half = s.compute_dtype != torch.float32
    loss_tol, cos_goal = (2e-2, 0.999) if half else (1e-4, 0.99999)  # as tests/gpu/test_gpu_train.py states them
    for kernel in kernels:
        log(f"attention: padding-free vs padded under {kernel}")
        results[kernel] = compare_layouts(s, kernel, rows)
        goals += [at_most(f"{kernel}: |loss flat - padded| / padded", results[kernel]["loss_rel_diff"], loss_tol),
                  at_least(f"{kernel}: cosine(grad flat, grad padded)", results[kernel]["grad_cosine"], cos_goal)]
    what = (f"one batch of {len(rows)} ICD-10-CM examples, padding-free (one row) vs right-padded, full model with "
            f"fp32 master weights under {str(s.compute_dtype).removeprefix('torch.')} autocast: loss, gradients, speed")
    return what, {"selected_kernel": selected, "kernels": results}, goals


def compare_layouts(s: Setup, kernel: str, rows: list[dict]) -> dict:
    from honed.config import MethodConfig
    from honed.train.attention import use_varlen
    from honed.train.collate import collate
    from honed.train.methods import build_model

    out = {"examples": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)}
    for layout in ("padded", "flat"):
        release_memory(s.device)
        model = build_model(MethodConfig(name="full"), s.model_path, "auto", s.device, kernel)
        out[f"{layout}_kernel"] = use_varlen(model) if layout == "flat" else kernel
        inputs = collate(columns(rows), s.tokenizer.pad_token_id, s.device, flat=layout == "flat")
        loss, grads = loss_and_grads(model, inputs, s.compute_dtype)
        out[f"{layout}_loss"], out[f"{layout}_step_s"] = round(loss, 6), step_seconds(model, inputs, s.compute_dtype)
        out[f"_{layout}_grads"] = grads
        del model
    flat, padded = out.pop("_flat_grads"), out.pop("_padded_grads")
    out["loss_rel_diff"] = round(abs(out["flat_loss"] - out["padded_loss"]) / abs(out["padded_loss"]), 6)
    out["grad_cosine"] = round(float(torch.nn.functional.cosine_similarity(flat, padded, dim=0)), 6)
    out["padded_over_flat_time"] = round(out["padded_step_s"] / out["flat_step_s"], 3)
    return out


def loss_and_grads(model, inputs: dict, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    from honed.train.losses import causal_lm_loss

    model.zero_grad()
    with torch.autocast(inputs["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = causal_lm_loss(model, inputs)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def step_seconds(model, inputs: dict, dtype: torch.dtype, repeats: int = 5) -> float:
    """The fastest of `repeats` forward + backward passes (after the one loss_and_grads already ran)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        loss_and_grads(model, inputs, dtype)  # .item() waits for the device
        best = min(best, time.perf_counter() - started)
    return round(best, 5)


# ------------------------------------------------------------------------------------------------ eval + merge
def check_eval_merge(s: Setup) -> tuple[str, dict, list]:
    from honed.eval.bias import load_probes
    from honed.eval.evaluate import score_model

    by_source = {"icd10": s.val_rows, "general": general_rows(s.tokenizer)}
    questions = [{"source": "icd10", "prompt": r["prompt"], "response": r["response"]} for r in s.val_rows[:16]]
    cfg = {"use_gpu": s.gpu, "batch_size": 16, "max_new_tokens": 8 if s.args.cpu_smoke else 32}
    bias = load_probes()
    scores = {}
    for name, adapter in (("base", None), ("lora", s.adapter("lora"))):
        log(f"eval: scoring {name}")
        started = time.perf_counter()
        scored = score_model(s.model_path, "auto", by_source, questions, s.template, cfg, bias, adapter=adapter)
        scores[name] = {"metrics": scored["metrics"], "seconds": round(time.perf_counter() - started, 2),
                        "sample": scored["samples"][:2]}
    merges = {name: run_merge(s, name) for name in ("lora", "qlora")}
    goals = [at_most("eval: icd10 loss, LoRA / base", round(scores["lora"]["metrics"]["loss/icd10"]
                                                             / scores["base"]["metrics"]["loss/icd10"], 4), 1.0)]
    goals += [at_most(f"merge {name}: max |merged - adapter logit| / tolerance", m.get("diff_over_tolerance"), 1.0)
              for name, m in merges.items()]
    what = (f"honed eval's scoring (per-source loss, {len(questions)} generated answers, bias probe) of the base and "
            f"the LoRA adapter, and honed merge of the LoRA and QLoRA adapters, on {s.device.type}")
    return what, {"scores": scores, "merges": merges}, goals


def general_rows(tokenizer) -> list[dict]:
    from honed.data.records import encode_example

    return [encode_example({"kind": "text", "text": t}, tokenizer, None) | {"source": "general"} for t in GENERAL_TEXT]


def run_merge(s: Setup, name: str) -> dict:
    from honed.config import MergeConfig
    from honed.merge import MergeMismatch, merge

    log(f"merge: {name}")
    release_memory(s.device)
    started = time.perf_counter()
    try:
        report = merge(MergeConfig(model={"name_or_path": s.model_path}, adapter=s.adapter(name),
                                   output_dir=str(s.work / "merged" / name), use_gpu=s.gpu))
    except MergeMismatch as err:
        return {"error": str(err)}
    keys = ("device", "dtype", "reference", "max_abs_logit", "max_abs_logit_diff", "tolerance")
    return {k: report[k] for k in keys} | {"seconds": round(time.perf_counter() - started, 2),
                                           "diff_over_tolerance": round(report["max_abs_logit_diff"]
                                                                        / report["tolerance"], 4)}


# ------------------------------------------------------------------------------------------------ decode
class RoutedModel:
    """The replica's decode-loop model (honed.serve.residency.LiveModel does this under Serve, with a lock): each
    forward's rows go to their adapters through MultiLora."""

    def __init__(self, model, lora):
        self.model, self.lora = model, lora

    def parameters(self):
        return self.model.parameters()

    def __call__(self, adapter_names: list[str] | None = None, **inputs):
        from honed.generation import BASE

        self.lora.select(adapter_names or [BASE] * inputs["input_ids"].shape[0], BASE)
        return self.model(**inputs)


def check_decode(s: Setup) -> tuple[str, dict, list]:
    from honed.generation import BASE
    from honed.models import load_model
    from honed.serve.lora import MultiLora

    release_memory(s.device)
    model, tokenizer = load_model(s.model_path, "auto", s.device)
    lora = MultiLora(model.eval())
    for name in ("lora", "qlora"):
        lora.load(name, s.adapter(name))
    routed = RoutedModel(model, lora)
    names = [BASE, "lora", "qlora"]
    rows = per_row_logits(s, routed, names)
    sampled = sampling(s, routed, tokenizer, names)
    speed = batched_vs_alone(s, routed, tokenizer, names)
    goals = [at_most("mixed-batch logits vs each adapter alone (peft): max diff / tolerance",
                     rows["diff_over_tolerance"], 1.0),
             at_most("sampled rows that failed", sampled["errors"], 0),
             at_least("same seeds, same batch: identical texts (1 = yes)", float(sampled["reproducible"]), 1),
             at_least("distinct texts among one adapter's differently seeded rows (min over adapters)",
                      sampled["min_distinct"], 2),
             at_least("mixed batch tokens/s / one request at a time", speed["ratio"], 4.0)]
    what = ("one replica's decoder: the base and two adapters (LoRA, QLoRA-trained) in one batch through MultiLora, "
            "checked against peft alone; sampling at temperature 0.8 with seeds and rows joining mid-decode; "
            f"throughput of a mixed batch of {speed['rows']} against the same requests one at a time")
    return what, {"per_row": rows, "sampling": sampled, "throughput": speed}, goals


def per_row_logits(s: Setup, routed: RoutedModel, names: list[str]) -> dict:
    """One forward of rows naming different adapters (prefill: several tokens a row; decode: one) against the
    same rows through peft with that adapter alone; the bound is merge's for this dtype."""
    from peft import PeftModel

    from honed.generation import BASE
    from honed.merge import tolerance_for
    from honed.models import load_model

    references = {}
    for name in names:
        alone, _ = load_model(s.model_path, "auto", s.device)
        references[name] = (PeftModel.from_pretrained(alone, s.adapter(name)) if name != BASE else alone).eval()
    torch.manual_seed(0)
    order = names + names[:1]
    worst, scale = 0.0, 0.0
    for tokens in (7, 1):
        ids = torch.randint(3, 200, (len(order), tokens), device=s.device)
        with torch.inference_mode():
            mixed = routed(input_ids=ids, adapter_names=order).logits.float()
            for row, name in enumerate(order):
                reference = references[name](input_ids=ids[row:row + 1]).logits.float()[0]
                worst = max(worst, float((mixed[row] - reference).abs().max()))
                scale = max(scale, float(reference.abs().max()))
    tolerance = tolerance_for(s.compute_dtype, scale, quantized=False)
    return {"rows": order, "max_abs_diff": round(worst, 5), "max_abs_logit": round(scale, 3),
            "tolerance": tolerance, "diff_over_tolerance": round(worst / tolerance, 4)}


def decode_job(s: Setup, tokenizer, question: str, adapter: str, temperature: float, max_tokens: int, seed: int = 0):
    from honed.generation import DecodeJob, render_chat

    prompt = render_chat(tokenizer, [{"role": "user", "content": question}], s.template)
    return DecodeJob(tokenizer(prompt, add_special_tokens=False)["input_ids"], max_tokens, temperature,
                     0.95 if temperature else 1.0, list(s.template["stop"]), seed=seed, adapter=adapter)


def run_decoder(routed: RoutedModel, tokenizer, jobs: list, join_after: int | None = None) -> dict:
    """Decode `jobs` in one BatchDecoder, all at once or (`join_after`) the first half at once and the rest joining
    after that many steps (continuous batching): {index: Completion, or the row's error as text}."""
    from honed.generation import BatchDecoder

    decoder = BatchDecoder(routed, tokenizer)
    waiting = len(jobs) // 2 if join_after is not None else len(jobs)
    results, steps = {}, 0
    events = decoder.add(jobs[:waiting], keys=range(waiting))
    while True:
        for key, event in events:
            if "error" in event:
                results[key] = f"error: {event['error']}"
            elif "done" in event:
                results[key] = event["done"]
        if steps == join_after and waiting < len(jobs):
            events, waiting = decoder.add(jobs[waiting:], keys=range(waiting, len(jobs))), len(jobs)
            continue
        if not len(decoder):
            return results
        events = decoder.step()
        steps += 1


def sampling(s: Setup, routed: RoutedModel, tokenizer, names: list[str]) -> dict:
    """One prompt, rows at temperature 0.8 / top-p 0.95 with seeds 0-3 per adapter, half of them joining after 2
    steps; the same batch twice must give the same texts (seeded generators on the device), different seeds
    different ones."""
    question = s.val_rows[0]["prompt"]
    jobs = [decode_job(s, tokenizer, question, names[i % len(names)], 0.8, 6 if s.args.cpu_smoke else 48,
                       seed=i // len(names)) for i in range(4 * len(names))]
    first, second = (run_decoder(routed, tokenizer, jobs, join_after=2) for _ in range(2))
    texts = {i: c if isinstance(c, str) else c.text for i, c in first.items()}
    distinct = {name: len({texts[i] for i in texts if jobs[i].adapter == name}) for name in names}
    return {"rows": len(jobs), "finished": len(first), "errors": sum(isinstance(c, str) for c in first.values()),
            "reproducible": first == second, "distinct_texts": distinct, "min_distinct": min(distinct.values()),
            "sample": {jobs[i].adapter: texts[i] for i in range(len(names))}}


def batched_vs_alone(s: Setup, routed: RoutedModel, tokenizer, names: list[str]) -> dict:
    """Greedy decoding of 16 requests (different questions) over the base and both adapters: as one batch, then
    one at a time; completion tokens a second."""
    jobs = [decode_job(s, tokenizer, s.val_rows[i]["prompt"], names[i % len(names)], 0.0,
                       8 if s.args.cpu_smoke else 64) for i in range(16)]
    run_decoder(routed, tokenizer, jobs[:2])  # warm-up: kernels, allocator
    batched = tokens_per_s(lambda: [run_decoder(routed, tokenizer, jobs)])
    alone = tokens_per_s(lambda: [run_decoder(routed, tokenizer, [job]) for job in jobs])
    return {"rows": len(jobs), "batched_tokens_per_s": batched, "alone_tokens_per_s": alone,
            "ratio": round(batched / alone, 3) if alone else None}


def tokens_per_s(run) -> float:
    started = time.perf_counter()
    done = [c for results in run() for c in results.values() if not isinstance(c, str)]
    return round(sum(c.completion_tokens for c in done) / (time.perf_counter() - started), 1)


# ------------------------------------------------------------------------------------------------ pytest
def check_pytest(s: Setup) -> tuple[str, dict, list]:
    junit = s.work / "gpu-pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    cases = junit_cases(junit) if junit.is_file() else {}
    counts = {k: sum(v == k for v in cases.values()) for k in ("passed", "failed", "skipped")}
    figures = {"command": " ".join(cmd[1:]), "returncode": done.returncode,
               "seconds": round(time.perf_counter() - started, 1), "counts": counts, "cases": cases,
               "output_tail": done.stdout[-3000:] + done.stderr[-1000:]}
    goals = [at_most("tests/gpu failed or errored", counts["failed"] if cases else None, 0)]
    if s.gpu:
        goals.append(at_least("tests/gpu passed", counts["passed"], 1))
    return "pytest -m gpu tests/gpu (skipped where torch sees no CUDA device)", figures, goals


def junit_cases(path: Path) -> dict[str, str]:
    """test id → passed / failed / skipped (errors count as failed), from pytest's JUnit XML."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        cases[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return cases


# ------------------------------------------------------------------------------------------------ results
RUNNERS = {"train": check_train, "attention": check_attention, "eval_merge": check_eval_merge,
           "decode": check_decode, "pytest": check_pytest}


def versions() -> dict:
    """The library versions these results hold for (the machine's own, not this repository's venv)."""
    import importlib.metadata as md

    out = {"torch_cuda": torch.version.cuda, "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available()
           else None}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "pydantic",
                 "flash-attn", "gguf"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def run_check(name: str, s: Setup, machine: dict) -> dict:
    """Run one check and write benchmarks/results/gpu_<name>.json; a check that raises is written as an error
    with an unmet goal, and the others still run."""
    started = time.perf_counter()
    try:
        what, figures, goals = RUNNERS[name](s)
    except Exception as err:  # noqa: BLE001 — one check's failure is its own result; the others still run
        traceback.print_exc()
        what, figures = f"{name} (failed)", {"error": f"{type(err).__name__}: {err}",
                                            "traceback": traceback.format_exc()[-4000:]}
        goals = [at_least(f"{name}: ran to the end (1 = yes)", 0.0, 1)]
    result = {"benchmark": f"gpu_{name}", "what": what, "quick": s.args.cpu_smoke,
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, **commit(),
              "settings": {"steps": s.args.steps, "batch_size": s.args.batch_size, "device": s.device.type},
              "seconds": round(time.perf_counter() - started, 1), **figures, "goals": goals}
    path = write_result(result, s.args.out_dir / f"gpu_{name}.json")
    for g in goals:
        log(f"  {'met' if g['met'] else 'NOT MET'}: {g['name']} = {g['value']} (goal {g['goal']})")
    log(f"{name}: {result['seconds']} s → {path}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    s = make_setup(args)
    machine = machine_info() | {"versions": versions()}
    results = [run_check(name, s, machine) for name in selected_checks(args.only)]
    failed = [r["benchmark"] for r in results if "error" in r]
    unmet = [f"{r['benchmark']}: {g['name']}" for r in results for g in r["goals"] if not g["met"]]
    log(f"done in {time.perf_counter() - started:.0f} s; {len(unmet)} goal(s) not met"
        + "".join(f"\n  not met: {u}" for u in unmet))
    if failed:
        log(f"checks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
