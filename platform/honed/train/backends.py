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
import os
from pathlib import Path

import torch

from honed.config import MethodConfig, OptimConfig, TrainConfig
from honed.train.methods import compute_dtype, make_optimizer, param_groups

STATE_FILE = "state.pt"
DS_DIR = "deepspeed"
DS_TAG = "state"


def make_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    schedule = {"constant": "constant_with_warmup"}.get(optim.schedule, optim.schedule)
    return get_scheduler(schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)


def make_backend(model, cfg: TrainConfig, total_steps: int, device: torch.device):
    if cfg.method.deepspeed.enabled:
        return DeepSpeedBackend(model, cfg, total_steps, device)
    return TorchBackend(model, cfg, total_steps, device)


def artifact_name(method: MethodConfig) -> str:
    return "model" if method.name == "full" else "adapter"


class TorchBackend:
    """One process or DDP: gradient accumulation without all-reduce until the boundary, clipping, autocast to
    the compute dtype when it is not fp32, and loss scaling for fp16."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: torch.device):
        import ray.train.torch

        self.model, self.cfg, self.device = model, cfg, device
        self.optimizer = make_optimizer(cfg.optim, param_groups(model, cfg.method, cfg.optim))
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, total_steps)
        self.dtype = compute_dtype(cfg.model.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        # Rotary buffers are constants: skipping their per-step broadcast saves a collective per forward.
        self.module = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def no_sync(self, boundary: bool):
        """Skip DDP's gradient all-reduce on micro-batches before the boundary (they only accumulate)."""
        if boundary or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss = loss / self.cfg.optim.grad_accum_steps
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

    def save(self, directory: str, rank: int) -> None:
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
                     use_gpu: bool) -> dict:
    """The DeepSpeed config generated from honed's method + optim sections, with `deepspeed.config` merged over.

    The optimizer is DeepSpeed's AdamW: torch's implementation when states stay on the device, DeepSpeed's
    CPU Adam (a compiled, vectorised kernel) when they are offloaded."""
    ds = method.deepspeed
    stage = ds.zero_stage
    zero: dict = {"stage": stage}
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


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedBackend:
    """DeepSpeed engine: ZeRO partitioning, offload, accumulation and clipping are DeepSpeed's; the LR schedule
    is the same transformers schedule the PyTorch backend uses."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, device: torch.device):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed
        import torch.distributed as dist

        self.model, self.cfg, self.device = model, cfg, device
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.ds_config = deepspeed_config(cfg.method, cfg.optim, compute_dtype(cfg.model.dtype, device), world,
                                          device.type == "cuda")
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
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
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

    def save(self, directory: str, rank: int) -> None:
        self.engine.save_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG)  # every rank writes its part
        self.artifact(directory, rank)

    def artifact(self, directory: str, rank: int) -> None:
        """Gather the weights (ZeRO-3 partitions are collected layer by layer onto rank 0) and save them in HF
        format. Every rank must call this."""
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.stage == 3 else None
        if rank != 0:
            return
        if state is None:
            state = self.model.state_dict()
        target = os.path.join(directory, artifact_name(self.cfg.method))
        if hasattr(self.model, "peft_config"):
            from peft import get_peft_model_state_dict

            self.model.save_pretrained(target, state_dict=get_peft_model_state_dict(self.model, state_dict=state))
        else:
            self.model.save_pretrained(target, state_dict=state)

    def load(self, directory: str, rank: int) -> None:
        path, _ = self.engine.load_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}/{DS_DIR}")
