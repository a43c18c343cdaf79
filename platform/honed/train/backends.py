"""How a step is taken and how state is saved: plain PyTorch (DDP) or DeepSpeed ZeRO.

Both backends offer the same small surface to the loop:

    backend = make_backend(model, cfg, total_steps, device)    # cfg: the validated TrainConfig
    with backend.autocast():
        loss = ...                                # forward through backend.module
    backend.backward(loss, boundary)              # boundary: the last micro-batch of an optimizer step
    if boundary: grad_norm = backend.step()
    backend.save(dir, rank)  /  backend.load(dir, rank)   # artifact + resume state
    backend.artifact(dir, rank)                   # adapter/ (peft methods) or model/ (full), HF format

A checkpoint directory holds `adapter/` or `model/` (always loadable by transformers/peft) and the resume
state: `state.pt` (optimizer, scheduler, loss scaler) for PyTorch, `deepspeed/` (DeepSpeed's own sharded
checkpoint: every rank writes its partition) for DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch

from honed.config import MethodConfig, OptimConfig, TrainConfig
from honed.train import session
from honed.train.methods import compute_dtype, make_optimizer, param_groups

STATE_FILE = "state.pt"
DS_DIR = "deepspeed"
DS_TAG = "state"


def make_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    schedule = {"constant": "constant_with_warmup"}.get(optim.schedule, optim.schedule)
    return get_scheduler(schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)


def make_backend(model, cfg: TrainConfig, total_steps: int, device: torch.device, ds_config: dict | None = None):
    """DeepSpeed when the method asks for it (`ds_config`: the config the model was loaded under, see
    `run_deepspeed_config`), else plain PyTorch / DDP."""
    if cfg.method.deepspeed.enabled:
        return DeepSpeedBackend(model, cfg, total_steps, device,
                                ds_config or run_deepspeed_config(cfg, device, model.config.hidden_size))
    return TorchBackend(model, cfg, total_steps, device)


def run_deepspeed_config(cfg: TrainConfig, device: torch.device, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config of this run in this worker group (None-safe to call only with DeepSpeed enabled);
    `hidden_size` (the model config's) sizes ZeRO's communication buckets to the model.
    Sets DeepSpeed's accelerator first: it is read once, when deepspeed is first imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return deepspeed_config(cfg.method, cfg.optim, compute_dtype(cfg.model.dtype, device), world,
                            device.type == "cuda", hidden_size)


def artifact_name(method: MethodConfig) -> str:
    return "model" if method.name == "full" else "adapter"


def prepare_module(model, device: torch.device):
    """The module the loop runs forwards through. In a Ray Train worker: Ray's `prepare_model` (the worker's
    device, DDP over the worker group). Anywhere else (a plain process, torchrun, benchmarks/gpu/gpu_checks.py):
    the same by hand, the model on `device` and in DDP only when a torch.distributed group of more than one rank
    is up. Rotary buffers are constants: skipping DDP's per-step buffer broadcast saves a collective per forward.
    Frozen parameters are DDP's to ignore: its start-up sync broadcast every parameter from rank 0, the whole
    frozen base under LoRA (540 MB for the demo's model: 2.1 s of DDP construction on 2 CPU workers, 0.08 s
    ignoring them), which every rank reads from the same files; they take no gradient to reduce either."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    if session.in_ray_train_worker():
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    import torch.distributed as dist

    model = model.to(device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


class TorchBackend:
    """One process or DDP: gradient accumulation without all-reduce until the boundary, clipping, autocast to
    the compute dtype when it is not fp32, and loss scaling for fp16."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = make_optimizer(cfg.optim, param_groups(model, cfg.method, cfg.optim))
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, total_steps)
        self.dtype = compute_dtype(cfg.model.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.module = prepare_module(model, device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def no_sync(self, boundary: bool):
        """Skip DDP's gradient all-reduce on micro-batches before the boundary (they only accumulate)."""
        if boundary or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """`loss`: this micro-batch's share of the step's objective, scaled for DDP's gradient averaging (see
        honed.train.loop.objective_share)."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        clip = self.cfg.optim.grad_clip
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: str, rank: int, export: bool = True) -> None:
        """Rank 0 writes the artifact and the optimizer, schedule and scaler state (DDP replicas are equal)."""
        if rank != 0:
            return
        self.artifact(directory, rank)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, os.path.join(directory, STATE_FILE))

    def artifact(self, directory: str, rank: int) -> None:
        if rank == 0:
            # peft would also write the frozen DPO reference adapter (a subdirectory); the artifact is the trained one
            extra = {"selected_adapters": ["default"]} if hasattr(self.model, "peft_config") else {}
            self.model.save_pretrained(os.path.join(directory, artifact_name(self.cfg.method)), **extra)

    def load(self, directory: str, rank: int) -> None:
        from safetensors.torch import load_file

        art = Path(directory) / artifact_name(self.cfg.method)
        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(art / "adapter_model.safetensors")))
        else:
            weights = {}
            for f in sorted(art.glob("*.safetensors")):
                weights |= load_file(str(f))
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            # tied weights (lm_head = embeddings) are saved once
            missing = [k for k in missing if k not in {"lm_head.weight"}]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {art} does not match the model: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=False, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(method: MethodConfig, optim: OptimConfig, dtype: torch.dtype, world_size: int,
                     use_gpu: bool, hidden_size: int | None = None) -> dict:
    """The DeepSpeed config generated from honed's method + optim sections, with `deepspeed.config` merged over.

    The optimizer is DeepSpeed's AdamW: torch's implementation when states stay on the device, DeepSpeed's
    CPU Adam (a compiled, vectorised kernel) when they are offloaded. With `hidden_size`, ZeRO's buckets are
    sized to the model (`zero_buckets`)."""
    ds = method.deepspeed
    stage = ds.zero_stage
    zero: dict = {"stage": stage, **zero_buckets(stage, hidden_size)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    generated = {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "train_batch_size": optim.batch_size * optim.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "weight_decay": optim.weight_decay,
            **({} if ds.offload_optimizer else {"torch_adam": True})}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(generated, ds.config)


def model_hidden_size(model_path: str) -> int | None:
    """The hidden size in a model directory's config.json (a multimodal config keeps it under text_config)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")


def zero_buckets(stage: int, hidden_size: int | None) -> dict:
    """Communication buckets sized to the model, as transformers' `auto` values size them. DeepSpeed's defaults
    are 5e8 elements per reduce and all-gather bucket, up to a 2 GB buffer each in fp32 whatever the model or the
    world size, which on a small or mid-sized model can outweigh the partition ZeRO saves. `deepspeed.config`
    may still set any of them."""
    if not hidden_size:
        return {}
    square = hidden_size * hidden_size
    if stage == 3:
        # live parameters and reuse distance default to 1e9 elements: more than a whole 400 M model, so every
        # layer gathered in a step may stay gathered on every rank — one full model copy besides the partition.
        # One layer's worth (~12·hidden² in a decoder block) bounds what a rank keeps gathered.
        return {"reduce_bucket_size": square, "stage3_prefetch_bucket_size": int(0.9 * square),
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_max_live_parameters": 12 * square, "stage3_max_reuse_distance": 12 * square}
    return {"reduce_bucket_size": square, "allgather_bucket_size": square}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedBackend:
    """DeepSpeed engine: ZeRO partitioning, offload, accumulation and clipping are DeepSpeed's; the LR schedule
    is the same transformers schedule the PyTorch backend uses."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: torch.device, ds_config: dict):
        import deepspeed

        self.model, self.cfg, self.device, self.ds_config = model, cfg, device, ds_config
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.method, cfg.optim), config=self.ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, cfg.optim, total_steps))
        self.module = self.engine

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed's bf16/fp16 modes cast the module itself

    def no_sync(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself; the loop's share already accounts for it
        self.engine.backward(loss * self.cfg.optim.grad_accum_steps)
        if not boundary:
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed and honed disagree on the accumulation boundary")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: str, rank: int, export: bool = True) -> None:
        """Every rank writes its part of DeepSpeed's checkpoint; a peft method's frozen base is left out (it is
        the model on disk), so a LoRA checkpoint holds the adapter and its optimizer state only. `export`: also
        the HF artifact (for full fine-tuning under ZeRO-3 a 16-bit gather of the whole model, so only where
        the checkpoint may become the exported model)."""
        self.engine.save_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG,
                                    exclude_frozen_parameters=self.cfg.method.peft)
        if export or self.cfg.method.peft:
            self.artifact(directory, rank)

    def artifact(self, directory: str, rank: int) -> None:
        """The trained weights in HF format on rank 0; every rank must call this. Under ZeRO-3 the partitions
        are gathered: a peft method's trainable weights only, a full fine-tune's whole model layer by layer."""
        target = os.path.join(directory, artifact_name(self.cfg.method))
        if self.cfg.method.peft:
            state = self.trainable_state()
            if rank == 0:
                from peft import get_peft_model_state_dict

                self.model.save_pretrained(target, state_dict=get_peft_model_state_dict(self.model, state_dict=state),
                                           selected_adapters=["default"])
            return
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.stage == 3 else None
        if rank == 0:
            self.model.save_pretrained(target, state_dict=self.model.state_dict() if state is None else state)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name, whole on every rank (gathered from their ZeRO-3 partitions)."""
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        with zero3_gathered([p for _, p in named], self.stage):
            return {name: p.detach().cpu().clone() for name, p in named}

    def load(self, directory: str, rank: int) -> None:
        path, _ = self.engine.load_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG,
                                              load_module_strict=not self.cfg.method.peft)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}/{DS_DIR}")


def zero3_gathered(params: list, stage: int):
    """Whole parameters inside the block under ZeRO-3 (each rank gathers them), the parameters as they are
    otherwise."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
