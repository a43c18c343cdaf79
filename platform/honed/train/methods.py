"""One model builder for every fine-tuning method, plus its optimizer.

    model = build_model(cfg.method, model_path, dtype="auto", device=torch.device("cpu"))
    optimizer = make_optimizer(cfg.optim, param_groups(model, cfg.method, cfg.optim))

`cfg.method` and `cfg.optim` are a validated `MethodConfig` and `OptimConfig`; the library configs
(`peft.LoraConfig`, `PrefixTuningConfig`, `IA3Config`, `transformers.BitsAndBytesConfig`) are built from them
one-to-one, nothing re-invented.

Precision: `full` keeps fp32 master weights (mixed precision comes from autocast, or from DeepSpeed's
bf16/fp16 modes); the peft methods load the frozen base in the compute dtype and keep the small trained
weights in fp32 (peft casts adapters up), `qlora` stores the base in 4 bits and dequantizes per matmul.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from honed.config import MethodConfig, OptimConfig, QuantSettings
from honed.models import device_dtype
from honed.train.attention import attention_kernel


def needs_bitsandbytes(method: MethodConfig, optim: OptimConfig) -> bool:
    """Whether a run uses bitsandbytes: a 4-bit base (qlora), or an optimizer other than torch's AdamW (every
    other choice is bitsandbytes': `make_optimizer`)."""
    return method.name == "qlora" or optim.optimizer != "adamw"


def keep_bitsandbytes_out() -> None:
    """Mark bitsandbytes absent in this process, so that peft takes it for not installed.

    peft imports bitsandbytes whenever it is installed (to register its quantized LoRA layers), and that import
    wraps its kernels in torch.compile and asks a kernel hub for CPU kernels: 0.75 s of a core per process on the
    demo's CPU, in every worker of every run, twice that while the workers' imports contend. `find_spec` answers
    None for a module whose `sys.modules` entry is None, which is how peft and transformers ask.

    Only for a process that ends with its run and runs nothing else: a Ray Train worker (its actor is killed with
    the worker group) of a run that does not need it (`needs_bitsandbytes`). Never in a Tune trial's process,
    which may run a qlora trial next. A module already imported stays."""
    sys.modules.setdefault("bitsandbytes", None)


def bitsandbytes_loaded() -> bool:
    return sys.modules.get("bitsandbytes") is not None


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return device_dtype(dtype, device)


def build_model(method: MethodConfig, model_path: str, dtype: str, device: torch.device,
                attn_implementation: str = "auto"):
    """The base model with the method applied; trainable weights have requires_grad. `attn_implementation` is
    `model.attn_implementation` (resolved by `attention_kernel`)."""
    base = load_base(method, model_path, dtype, device, attn_implementation)
    if method.name == "full":
        return base
    from peft import get_peft_model

    sft = method.name == "dpo" and method.dpo.adapter
    model = from_sft_adapter(base, sft) if sft else get_peft_model(base, peft_config(method))
    if device.type == "cpu":
        use_fast_dropout(model)
    return model


class FastDropout(torch.nn.Dropout):
    """Dropout on CPU whose mask comes from 16-bit random integers instead of `bernoulli_`.

    torch's per-element Bernoulli sampling on CPU costs several times the rest of the dropout, and LoRA
    drops out the input of every adapted layer (12 % of a SmolLM2-135M LoRA step went to `bernoulli_`).
    The mask is drawn by numpy's SFC64 from one 62-bit seed taken from torch's generator, so
    `torch.manual_seed`, checkpointed RNG states and activation-checkpoint recomputation reproduce it; it is
    kept for backward as one byte a value, as `nn.Dropout` keeps its boolean mask. Same distribution up to
    rounding p to a multiple of 2^-16 (0.05 -> 0.0500031), same 1 / (1 - p) scaling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p == 1.0:
            return super().forward(x)
        return _SeededDropout.apply(x, self.p, int(torch.randint(0, 2**62, (1,))))


def seeded_keep_mask(seed: int, p: float, shape: torch.Size) -> torch.Tensor:
    """A uint8 mask of `shape`: 1 (kept) with probability 1 - p, from the seed alone."""
    import numpy as np

    n = shape.numel()
    bits = np.frombuffer(np.random.Generator(np.random.SFC64(seed)).bytes(2 * n), dtype=np.int16)
    keep = bits >= round(p * 65536) - 32768  # int16 bits are uniform on [-32768, 32767]
    return torch.from_numpy(keep.view(np.uint8)).view(shape)


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        keep = seeded_keep_mask(seed, p, x.shape)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep.to(x.dtype).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


def swap_lora_dropout(model, replace) -> int:
    """Replace each adapter dropout `drop` of a peft model (`lora_dropout`) by `replace(drop)` unless that
    returns None; returns how many were replaced."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key, drop in drops.items():
                new = replace(drop)
                if new is not None:
                    drops[key] = new
                    swapped += 1
    return swapped


def use_fast_dropout(model) -> int:
    """Swap the `nn.Dropout` modules of a peft model's adapters for `FastDropout`; returns how many."""
    return swap_lora_dropout(model, lambda d: FastDropout(d.p) if type(d) is torch.nn.Dropout and d.p > 0 else None)


def compile_decoder(model) -> torch.nn.Module:
    """`optim.compile`: compile the decoder stack of `model` (a transformers causal LM or a peft wrapper of
    one) in place with inductor and dynamic shapes; returns the compiled module.

    In place (`nn.Module.compile`), so parameter names, state dicts, checkpoints and exports are unchanged;
    the vocabulary projection and the loss stay eager, where honed gathers the labelled positions (a
    data-dependent shape). `FastDropout` draws its masks with numpy, which no graph can hold, so compiled
    adapters go back to `nn.Dropout`, whose random numbers inductor generates inside its fused kernels."""
    swap_lora_dropout(model, lambda d: torch.nn.Dropout(d.p) if isinstance(d, FastDropout) else None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    decoder.compile(dynamic=True)
    return decoder


def from_sft_adapter(base, adapter_dir: str):
    """DPO from an SFT adapter: its weights twice, as the trained adapter (`default`) and as the frozen
    reference (`reference`, see honed.train.dpo); the base weights stay one copy."""
    from peft import PeftModel

    from honed.train.dpo import REFERENCE_ADAPTER

    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.load_adapter(adapter_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")
    for name, p in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            p.requires_grad_(False)
    return model


def load_base(method: MethodConfig, model_path: str, dtype: str, device: torch.device,
              attn_implementation: str = "auto"):
    """The base model as the method trains on it, loaded straight in that form: fp32 master weights (full under
    DDP), the compute dtype (full under DeepSpeed, partitioned from the first byte under ZeRO-3; frozen bases of
    peft methods), or 4-bit (qlora, prepared for k-bit training)."""
    from transformers import AutoModelForCausalLM

    name = method.name
    compute = compute_dtype(dtype, device)
    if name == "qlora":
        from peft import prepare_model_for_kbit_training

        base = load_4bit(model_path, method.quant, compute, device)
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=method.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights_dtype(method, compute),
                                                    **placement(method, device))
        if method.activation_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if name != "full":
                base.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    # by the compute dtype: fp32 master weights under bf16 autocast still attend in bf16
    base.set_attn_implementation(attention_kernel(attn_implementation, device, compute))
    base.config.use_cache = False
    return base


def load_4bit(model_path: str, quant: QuantSettings, compute: torch.dtype, device: torch.device):
    """The base with 4-bit weights (bitsandbytes NF4/FP4), dequantized per matmul to the quant compute dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q_dtype = compute if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                             bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=q_dtype)
    base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=q_dtype,
                                                device_map={"": device})
    for module in base.modules():
        # bitsandbytes' CPU inference shortcut repacks 4-bit weights with bf16 block scales on the first
        # eval forward: logits then drift from the training path (~3e-2 here) and the export check fails.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return base


def weights_dtype(method: MethodConfig, compute: torch.dtype) -> torch.dtype:
    """The dtype the model is loaded in: fp32 master weights for full fine-tuning under DDP (mixed precision
    comes from autocast); the compute dtype under DeepSpeed (which keeps the fp32 master copy in its optimizer)
    and for a frozen base."""
    return torch.float32 if method.name == "full" and not method.deepspeed.enabled else compute


def placement(method: MethodConfig, device: torch.device) -> dict:
    """from_pretrained's placement: straight onto the device, or, while `sharded_loading` is alive (ZeRO-3 in a
    training worker), nowhere at all: transformers then creates the model inside `deepspeed.zero.Init` and each
    rank keeps only its partition of every weight. Outside training (the export check) it loads whole."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if method.deepspeed.zero_stage == 3 and is_deepspeed_zero3_enabled():
        return {}
    return {"device_map": {"": device}}


def sharded_loading(ds_config: dict | None):
    """Under ZeRO-3, the object that makes transformers' `from_pretrained` build the model inside DeepSpeed's
    `zero.Init` (None otherwise). transformers holds it through a weak reference: keep it alive as long as the
    model (honed's Worker does), or later `from_pretrained` and peft calls forget that weights are partitioned."""
    if not ds_config or ds_config["zero_optimization"]["stage"] != 3:
        return None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # adopts the process group Ray Train made: zero.Init partitions over its ranks
    return HfDeepSpeedConfig(ds_config)


# glibc's mallopt parameter and its ceiling for the dynamic mmap threshold on 64-bit systems
M_MMAP_THRESHOLD, DYNAMIC_MMAP_CEILING = -3, 32 << 20


@contextlib.contextmanager
def big_allocations_mapped(enabled: bool = True, threshold: int = 1 << 20):
    """While the block runs, glibc serves allocations of `threshold` bytes or more with their own mmap, so each
    one freed goes back to the OS at once. Under ZeRO-3 every layer is gathered whole, filled and partitioned
    again while the model loads; with glibc's default rule (a threshold that rises to the size of what was
    freed) those buffers stay in its heap, and on the 400 M model at 2 CPU ranks each process grew by 1,300 MB
    of a 1,538 MB fp32 model instead of 892 MB (its 769 MB partition and a layer). Afterwards the threshold
    stays at glibc's ceiling for the dynamic rule. A no-op where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None) if enabled else None
    if mallopt:
        mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if mallopt:
            mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_CEILING)


def peft_config(method: MethodConfig):
    """The peft config of a method (`lora`, `qlora`, `dpo` (a fresh LoRA adapter), `prefix`, `ia3`)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    name = method.name
    if name in ("lora", "qlora", "dpo"):
        lora = method.lora
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                          use_dora=lora.use_dora, task_type="CAUSAL_LM")
    if name == "prefix":
        prefix = method.prefix
        return PrefixTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens,
                                  prefix_projection=prefix.prefix_projection, task_type="CAUSAL_LM")
    if name == "ia3":
        return IA3Config(target_modules=method.ia3.target_modules, feedforward_modules=method.ia3.feedforward_modules,
                         task_type="CAUSAL_LM")
    raise ValueError(f"method '{name}' has no peft config; peft methods are lora, qlora, prefix, ia3, dpo")


def param_groups(model, method: MethodConfig, optim: OptimConfig) -> list[dict]:
    """Trainable weights grouped by learning rate and weight decay.

    Weight decay applies to matrices only (not norms, biases or IA3/DoRA scale vectors); LoRA matrices take
    `lora.lr` when it is set."""
    adapter_lr = method.lora.lr if method.name in ("lora", "qlora", "dpo") else None
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = adapter_lr if adapter_lr and ("lora_A" in name or "lora_B" in name) else optim.lr
        decay = optim.weight_decay if p.ndim >= 2 and min(p.shape) > 1 else 0.0  # IA3 vectors are (n, 1)
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(optim: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """torch AdamW or a bitsandbytes 8-bit / paged AdamW over the given parameter groups.

    torch AdamW runs its fused kernel when every parameter is a floating tensor on CPU or CUDA: one pass
    over each tensor instead of a dozen elementwise ops (on CPU, 0.16 s instead of 0.50 s a step for the
    135M model's full fine-tuning)."""
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "weight_decay": optim.weight_decay}
    name = optim.optimizer
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    import bitsandbytes as bnb

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[name](groups, **kwargs)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked number of values."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:  # bitsandbytes Params4bit packs two values per byte
            n = p.quant_state.shape.numel()
        elif hasattr(p, "ds_numel"):  # a ZeRO-3 partitioned parameter
            n = p.ds_numel
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
