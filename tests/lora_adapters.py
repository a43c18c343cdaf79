"""A LoRA adapter to serve in tests, written as `honed train` exports one (peft files + honed.json).

    from lora_adapters import write_adapter      # tests/ is on sys.path (its conftest.py sits there)
    write_adapter(tiny_model, tmp_path / "a", seed=1)                    # random non-zero factors
    write_adapter(tiny_model, tmp_path / "d", seed=2, fill=1e38)         # diverged: its activations overflow
"""

import json
from pathlib import Path

import torch


def write_adapter(base: str, target: Path, seed: int, fill: float | None = None, meta: dict | None = None,
                  target_modules: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4) -> str:
    """`fill`: every factor of layer 0's v_proj B set to it (a run that diverged); `meta`: honed.json's fields
    (default: the base's weights hash only)."""
    from peft import LoraConfig, get_peft_model

    from honed.models import load_model, weights_hash

    model, _ = load_model(base, "float32", "cpu")
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                                            init_lora_weights=False))
    if fill is not None:
        with torch.no_grad():
            peft.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.fill_(fill)
    peft.save_pretrained(target)
    (Path(target) / "honed.json").write_text(json.dumps({"base_weights_sha256": weights_hash(base)} | (meta or {})))
    return str(target)
