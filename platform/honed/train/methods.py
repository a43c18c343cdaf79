"""One model builder for every fine-tuning method, plus its optimizer.

    model = build_model(method, model_path, dtype="auto", device=torch.device("cpu"))
    optimizer = make_optimizer(optim, param_groups(model, method, optim))

`method` and `optim` are the plain-dict forms of `MethodConfig` and `OptimConfig`; the library configs
(`peft.LoraConfig`, `PrefixTuningConfig`, `IA3Config`, `transformers.BitsAndBytesConfig`) are built from them
one-to-one, nothing re-invented.

Precision: `full` keeps fp32 master weights (mixed precision comes from autocast, or from DeepSpeed's
bf16/fp16 modes); the peft methods load the frozen base in the compute dtype and keep the small trained
weights in fp32 (peft casts adapters up), `qlora` stores the base in 4 bits and dequantizes per matmul.
"""

from __future__ import annotations

import torch

from honed.models import device_dtype


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return device_dtype(dtype, device)


def build_model(method: dict, model_path: str, dtype: str, device: torch.device):
    """The base model with the method applied; trainable weights have requires_grad."""
    base = load_base(method, model_path, dtype, device)
    if method["name"] == "full":
        return base
    from peft import get_peft_model

    return get_peft_model(base, peft_config(method))


def load_base(method: dict, model_path: str, dtype: str, device: torch.device):
    """The base model as the method trains on it: fp32 master weights (full), 4-bit (qlora, prepared for
    k-bit training), or frozen in the compute dtype (other peft methods)."""
    from transformers import AutoModelForCausalLM

    name = method["name"]
    compute = compute_dtype(dtype, device)
    if name == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = method["quant"]
        q_dtype = compute if quant["compute_dtype"] == "auto" else getattr(torch, quant["compute_dtype"])
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                 bnb_4bit_use_double_quant=quant["double_quant"], bnb_4bit_compute_dtype=q_dtype)
        base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=q_dtype,
                                                    device_map={"": device})
        for module in base.modules():
            # bitsandbytes' CPU inference shortcut repacks 4-bit weights with bf16 block scales on the first
            # eval forward: logits then drift from the training path (~3e-2 here) and the export check fails.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=method["activation_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # full fine-tuning keeps fp32 master weights; a frozen base can live in the compute dtype
        weights = torch.float32 if name == "full" else compute
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights).to(device)
        if method["activation_checkpointing"]:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if name != "full":
                base.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    base.config.use_cache = False
    return base


def peft_config(method: dict):
    """The peft config of a method (`lora`, `qlora`, `prefix`, `ia3`)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    name = method["name"]
    if name in ("lora", "qlora"):
        lora = method["lora"]
        return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          target_modules=lora["target_modules"], use_rslora=lora["use_rslora"],
                          use_dora=lora["use_dora"], task_type="CAUSAL_LM")
    if name == "prefix":
        prefix = method["prefix"]
        return PrefixTuningConfig(num_virtual_tokens=prefix["num_virtual_tokens"],
                                  prefix_projection=prefix["prefix_projection"], task_type="CAUSAL_LM")
    if name == "ia3":
        ia3 = method["ia3"]
        return IA3Config(target_modules=ia3["target_modules"], feedforward_modules=ia3["feedforward_modules"],
                         task_type="CAUSAL_LM")
    raise ValueError(f"method '{name}' has no peft config; peft methods are lora, qlora, prefix, ia3")


def param_groups(model, method: dict, optim: dict) -> list[dict]:
    """Trainable weights grouped by learning rate and weight decay.

    Weight decay applies to matrices only (not norms, biases or IA3/DoRA scale vectors); LoRA matrices take
    `lora.lr` when it is set."""
    adapter_lr = method.get("lora", {}).get("lr") if method["name"] in ("lora", "qlora") else None
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = adapter_lr if adapter_lr and ("lora_A" in name or "lora_B" in name) else optim["lr"]
        decay = optim["weight_decay"] if p.ndim >= 2 and min(p.shape) > 1 else 0.0  # IA3 vectors are (n, 1)
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(optim: dict, groups: list[dict]) -> torch.optim.Optimizer:
    """torch AdamW or a bitsandbytes 8-bit / paged AdamW over the given parameter groups."""
    kwargs = {"lr": optim["lr"], "betas": tuple(optim["betas"]), "weight_decay": optim["weight_decay"]}
    name = optim["optimizer"]
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
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


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What a peft method trains (the adapter), or every weight for full fine-tuning."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()
