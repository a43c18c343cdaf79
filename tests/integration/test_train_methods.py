"""Every fine-tuning method through a real 2-worker Ray Train fit on the tiny model: the loss falls, the exported
artifact reloads (the way users load it) to the logits the trained model gave, parameter counts and the
efficiency report make sense; ZeRO-3 exports exactly the weights DeepSpeed's own checkpoint holds; every ZeRO
stage trains the model plain DDP trains; and a run stopped after a checkpoint and rerun under the same name
continues on the uninterrupted run's loss curve.

Each run costs ~1.5-3 min on a 2-CPU machine, almost all of it Ray start-up and Ray Data streaming (the steps
themselves take ~0.1 s, up to 3 min for ZeRO-3 with full offload), so the default selection trains one of them
(LoRA with rsLoRA and an adapter learning rate; LoRA is trained again by the shared `trained` fixture) and marks
the others `slow` (`make test-all` runs them: every DeepSpeed stage, the ZeRO-3 gather, the resume curves). A run is trained once per module and shared by the tests that read it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _run_logs import read_jsonl

try:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
except ImportError:  # pragma: no cover - the name Ray 2.60 uses
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME = "checkpoint_manager_snapshot.json"

STEPS = 12
"""Optimizer steps per run: 2 workers x batch 8 = 16 examples a step (the tiny dataset holds 39 steps)."""
CHECKPOINT_EVERY = 6
"""Checkpoints at steps 6 and 12; the resume tests stop a run after the first one."""
STATE_TOL = 1e-5
"""fp32 logits of a reloaded artifact vs the trained model: the same weights and the same arithmetic give equal
logits (measured: 0.0 for every method), so anything above rounding is a saving/loading bug."""
RESUME_REL_TOL = 1e-4
"""Per-step loss of a resumed run vs the uninterrupted run (relative). Steps are deterministic on CPU with one
thread per worker and resume restores weights, optimizer, schedule, RNG and the data position, so the curves
agree to the 5 decimals metrics.jsonl keeps (measured: identical losses and grad norms, bit-identical final
weights, for LoRA with dropout and for ZeRO-2 with CPU Adam). 1e-4 leaves room for rounding only: the losses of
neighbouring steps differ by 1e-2 to 1, so a skipped or replayed batch, a reset optimizer or schedule, or a
different dropout stream shows up far above it."""
BACKEND_REL_TOL = 1e-4
"""Per-step loss of each DeepSpeed ZeRO stage vs plain DDP (relative); measured <= 2.6e-6 (CPU Adam vs torch AdamW
rounding), ZeRO-1 identical."""

# name: (method section, optim overrides, minimum loss drop, default selection)
# Learning rates are large so that 12 steps move the loss clearly; IA3 (a scaling per feature) and prefix
# tuning (16 virtual tokens) have few, weak knobs and need ~3e-1 to move it by more than 0.5 (measured with these
# settings, mean of the last 3 steps vs the first 2: full 2.2, LoRA variants 1.8-2.0, qlora 1.8, ia3 0.69,
# prefix 0.81; at 5e-2 prefix tuning moves it by only 0.2).
CASES: dict[str, tuple[dict, dict, float, bool]] = {
    "full": ({"name": "full"}, {"lr": 3e-3}, 1.0, False),
    "full_zero1": ({"name": "full", "deepspeed": {"zero_stage": 1}}, {"lr": 3e-3}, 1.0, False),
    "full_zero2_offload": ({"name": "full", "deepspeed": {"zero_stage": 2, "offload_optimizer": True}},
                           {"lr": 3e-3}, 1.0, False),
    "full_zero3_offload": ({"name": "full", "deepspeed": {"zero_stage": 3, "offload_optimizer": True,
                                                          "offload_params": True}}, {"lr": 3e-3}, 1.0, False),
    "lora_rslora": ({"name": "lora", "lora": {"use_rslora": True, "lr": 1e-2}}, {"lr": 1e-3}, 1.0, True),
    "lora_dora": ({"name": "lora", "lora": {"use_dora": True}}, {"lr": 1e-2}, 1.0, False),
    "lora_zero2": ({"name": "lora", "deepspeed": {"zero_stage": 2}}, {"lr": 1e-2}, 1.0, False),
    # ZeRO-3 under a frozen base: the checkpoint holds the adapter and its optimizer state only
    "lora_zero3": ({"name": "lora", "deepspeed": {"zero_stage": 3}}, {"lr": 1e-2}, 1.0, False),
    "qlora": ({"name": "qlora", "quant": {"quant_type": "nf4", "double_quant": True}}, {"lr": 1e-2}, 1.0, False),
    # optim.compile: the decoder compiled by inductor in each worker, under DDP
    "full_compiled": ({"name": "full"}, {"lr": 3e-3, "compile": True}, 1.0, False),
    "lora_compiled": ({"name": "lora", "lora": {"lr": 1e-2}}, {"lr": 1e-3, "compile": True}, 1.0, False),
    "prefix": ({"name": "prefix"}, {"lr": 3e-1}, 0.5, False),
    "ia3": ({"name": "ia3"}, {"lr": 3e-1}, 0.5, False),
}


def case_params(names):
    return [pytest.param(n, id=n, marks=() if CASES[n][3] else pytest.mark.slow) for n in names]


def make_config(case: str, tiny_model: str, data_dir: str, out: Path):
    from honed.config import TrainConfig

    method, optim, _, _ = CASES[case]
    return TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": data_dir, "output_dir": str(out), "name": case,
        "method": method,
        "optim": {"max_steps": STEPS, "batch_size": 8, "warmup_steps": 0, "schedule": "cosine"} | optim,
        "scaling": {"num_workers": 2},
        "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2, "val_max_examples": 16,
    })


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model, prepared, tmp_path_factory):
    """`runs(case)`: the case trained once for this module (output dir, config, train()'s result, seconds)."""
    from honed.train.trainer import train

    done: dict[str, dict] = {}

    def get(case: str) -> dict:
        if case not in done:
            out = tmp_path_factory.mktemp(case) / "run"
            cfg = make_config(case, tiny_model, prepared["dir"], out)
            start = time.perf_counter()
            final = train(cfg)
            done[case] = {"out": out, "cfg": cfg, "final": final, "seconds": time.perf_counter() - start}
            print(f"\n[test_train_methods] {case}: trained in {done[case]['seconds']:.0f} s")
        return done[case]

    return get


def final_checkpoint(run: dict) -> Path:
    """The checkpoint the artifact was exported from (recorded in honed.json)."""
    artifact = "model" if run["cfg"].method.name == "full" else "adapter"
    return Path(json.loads((run["out"] / artifact / "honed.json").read_text())["checkpoint"])


def forward_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                     position_ids=inputs.get("position_ids"), use_cache=False).logits.float()


def load_exported(cfg, tiny_model: str, artifact: Path):
    """The artifact loaded the way a user loads it (independently of honed.train.trainer)."""
    from transformers import AutoModelForCausalLM

    if cfg.method.name == "full":
        return AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    from peft import PeftModel

    from honed.train.methods import load_base

    base = load_base(cfg.method, tiny_model, cfg.model.dtype, torch.device("cpu"))
    return PeftModel.from_pretrained(base, artifact).eval()


def load_base_model(cfg, tiny_model: str):
    """The untrained base, as the method holds it (4-bit for qlora)."""
    from honed.train.methods import load_base

    return load_base(cfg.method, tiny_model, cfg.model.dtype, torch.device("cpu")).eval()


def safetensors_numel(directory: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in directory.glob("*.safetensors") for t in load_file(str(f)).values())


# --------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("case", case_params(CASES))
def test_method_trains_and_exports_what_it_trained(case, runs, tiny_model):
    """Loss falls; the artifact reloads to the trained model's logits (and not the base's); settings reach peft;
    trainable/total parameter counts and the efficiency report are right for the method."""
    from transformers import AutoModelForCausalLM

    run = runs(case)
    cfg, out, final = run["cfg"], run["out"], run["final"]
    name = cfg.method.name
    history = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in history]
    assert all(math.isfinite(x) for x in losses), losses
    # log_every=1: each logged window is one optimizer step; average a few to see through batch-to-batch noise
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert last < first - CASES[case][2], f"{case}: loss {first:.3f} -> {last:.3f} ({losses})"
    assert final["step"] == STEPS and final["loss"] == history[-1]["loss"]
    assert math.isfinite(final["val_loss"]) and final["val_loss"] < losses[0] - CASES[case][2] / 2

    # the adapter learning rate drives the LoRA matrices (they are the only trainable weights of plain LoRA)
    if cfg.method.name == "lora" and cfg.method.lora.lr and not cfg.method.lora.use_dora:
        cosine_after_one = 0.5 * (1 + math.cos(math.pi / STEPS))
        assert history[0]["lr"] == pytest.approx(cfg.method.lora.lr * cosine_after_one, rel=1e-6)
        assert cfg.method.lora.lr != cfg.optim.lr

    # the export check train() ran, and the same check done here from the final checkpoint's probe
    assert final["export_check"]["max_abs_diff"] <= STATE_TOL, final["export_check"]
    ckpt = final_checkpoint(run)
    probe = torch.load(ckpt / "probe.pt", weights_only=False)
    artifact = out / ("model" if name == "full" else "adapter")
    model = load_exported(cfg, tiny_model, artifact)
    logits = forward_logits(model, probe["inputs"])
    assert logits.shape == probe["logits"].shape
    diff = float((logits - probe["logits"]).abs().max())
    assert diff <= STATE_TOL, f"{case}: reloaded artifact differs from the trained model by {diff:.2e}"
    # ... and the trained model is not the base model (the check of an untrained export would pass trivially)
    base_logits = forward_logits(load_base_model(cfg, tiny_model), probe["inputs"])
    assert float((base_logits - probe["logits"]).abs().max()) > 0.05

    # parameter counts: full trains every weight; a peft method trains exactly what its adapter file holds
    eff = json.loads((out / "efficiency.json").read_text())
    assert eff == final["efficiency"]
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    if name == "full":
        assert eff["trainable_params"] == eff["total_params"] == base_params
        assert safetensors_numel(artifact) == base_params  # tied lm_head stored once
    else:
        saved = safetensors_numel(artifact)
        assert eff["trainable_params"] == saved
        assert eff["total_params"] == base_params + saved
        assert 0 < eff["trainable_fraction"] < 0.3
        config = json.loads((artifact / "adapter_config.json").read_text())
        if name in ("lora", "qlora"):
            lora = cfg.method.lora
            assert config["use_rslora"] == lora.use_rslora and config["use_dora"] == lora.use_dora
            scaling = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)  # rsLoRA: alpha / sqrt(r)
            scalings = [m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
            assert scalings and all(x == pytest.approx(scaling) for x in scalings), (scaling, set(scalings))
    assert eff["method"] == name and eff["world_size"] == 2
    assert eff["tokens_per_s"] > 0 and eff["peak_memory_mb"] > 0
    assert "mfu_error" not in eff and eff["mfu"] > 0, eff.get("mfu_error")
    assert eff["measured_steps"] == STEPS - 2  # two warm-up steps are excluded from the rates
    assert len(eff["workers"]) == 2 and {w["rank"] for w in eff["workers"]} == {0, 1}
    # a Ray Train worker loads bitsandbytes only for a run that uses it (honed.train.methods.needs_bitsandbytes)
    assert [w["load"]["bitsandbytes_loaded"] for w in eff["workers"]] == [name == "qlora"] * 2
    if cfg.method.deepspeed.enabled:
        assert (ckpt / "deepspeed" / "state").is_dir()


# ----------------------------------------------------------------------------------------- ZeRO-3 gather
@pytest.mark.slow
def test_zero3_export_equals_deepspeeds_fp32_weights(runs, tiny_model):
    """The HF model/ gathered from ZeRO-3 partitions holds exactly the fp32 weights DeepSpeed reconstructs from
    its own sharded checkpoint (the optimizer's master partitions of every rank)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = runs("full_zero3_offload")
    ckpt = final_checkpoint(run)
    exported = {}
    for f in sorted((run["out"] / "model").glob("*.safetensors")):
        exported |= load_file(str(f))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    reference = {k: v for k, v in reference.items() if k != "lm_head.weight"}  # tied to the embeddings
    assert set(exported) == set(reference)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    moved = 0
    for key, weight in reference.items():
        assert exported[key].dtype == torch.float32, key
        assert exported[key].shape == weight.shape, key
        torch.testing.assert_close(exported[key], weight.float(), rtol=0, atol=0, msg=key)
        moved += not torch.equal(weight.float(), base[key])
    assert moved == len(reference)  # every tensor was trained (and gathered, not the initial weights)


@pytest.mark.slow
def test_every_full_backend_trains_the_same_model(runs):
    """Plain DDP, ZeRO-1, ZeRO-2 with CPU Adam and ZeRO-3 with everything offloaded are one optimization: the same
    data per step, the same AdamW and schedule, so the same curve and the same final weights up to float rounding
    (measured: loss rel. diff <= 2.6e-6, weights <= 2.6e-6 abs; ZeRO-1 is bit-identical to DDP)."""
    from safetensors.torch import load_file

    names = ["full", "full_zero1", "full_zero2_offload", "full_zero3_offload"]
    curves = {n: read_jsonl(runs(n)["out"] / "metrics.jsonl") for n in names}
    weights = {n: load_file(str(runs(n)["out"] / "model" / "model.safetensors")) for n in names}
    for name in names[1:]:
        for got, want in zip(curves[name], curves["full"], strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=BACKEND_REL_TOL), (name, got["step"])
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-9, abs=1e-12), (name, got["step"])
        assert set(weights[name]) == set(weights["full"])
        for key, want in weights["full"].items():
            torch.testing.assert_close(weights[name][key], want, rtol=0, atol=1e-5, msg=f"{name}: {key}")


# ------------------------------------------------------------------------------------------------ resume
CHILD = """
import sys, ray
from honed.config import TrainConfig
from honed.runtime import _quiet_data_logs
from honed.train.trainer import train
ray.init(address=sys.argv[1], logging_level="WARNING")
_quiet_data_logs()
train(TrainConfig.model_validate_json(sys.argv[2]))
"""


def registered_checkpoint_step(snapshot: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered: what a rerun restores."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):  # absent, or being rewritten
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def wait_for_free_cpus(ray, want: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < want:
        assert time.monotonic() < deadline, f"the killed run's workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lora_rslora", "full_zero2_offload", "lora_zero3"])
def test_rerun_resumes_on_the_uninterrupted_curve(case, runs, ray_local, tiny_model, prepared, tmp_path):
    """A run killed after its step-6 checkpoint (the driver process gets SIGTERM) and rerun with the identical
    config continues from that checkpoint: the same loss, lr and grad norm per step as a run never stopped,
    and the same final weights. The schedule is untouched (both attempts are configured for STEPS steps)."""
    from honed.train.trainer import train

    reference = runs(case)
    out = tmp_path / "run"
    cfg = make_config(case, tiny_model, prepared["dir"], out)
    snapshot = out / "checkpoints" / case / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    live = out / "progress.jsonl"
    total_cpus = ray_local.cluster_resources()["CPU"]

    # 1. the first attempt, in its own driver process attached to this Ray, stopped once checkpoint 6 is in
    # (exclude_unset: MethodConfig refuses a dump naming every method section, so train.yaml cannot be loaded back)
    argv = [ray_local.get_runtime_context().gcs_address, cfg.model_dump_json(exclude_unset=True)]
    with open(tmp_path / "first_attempt.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 env=os.environ | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        try:
            deadline = time.monotonic() + 600
            while registered_checkpoint_step(snapshot) < CHECKPOINT_EVERY:
                assert child.poll() is None, f"first attempt exited:\n{(tmp_path / 'first_attempt.log').read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
                time.sleep(0.2)
        finally:
            child.send_signal(signal.SIGTERM)  # the driver dies; Ray then ends its controller and workers
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    stopped_at = registered_checkpoint_step(snapshot)
    assert stopped_at == CHECKPOINT_EVERY, "the first attempt ran to its end before it could be stopped"
    assert not (out / "metrics.jsonl").exists()  # it never finished
    wait_for_free_cpus(ray_local, total_cpus)  # Ray reaps the dead driver's controller and workers
    first_attempt = read_jsonl(live)

    # 2. the rerun: same config, same name, same storage
    final = train(cfg)
    events = read_jsonl(live)[len(first_attempt):]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] == CHECKPOINT_EVERY, events[:3]
    assert [e["step"] for e in events if "event" not in e] == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))

    # 3. the curve: the rerun's history (first attempt's steps 1-6 + its own 7-12) vs the uninterrupted run
    got = read_jsonl(out / "metrics.jsonl")
    want = read_jsonl(reference["out"] / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=RESUME_REL_TOL), (g["step"], g["loss"], w["loss"])
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9, abs=1e-12), (g["step"], g["lr"], w["lr"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3, abs=1e-4), g["step"]
    assert final["val_loss"] == pytest.approx(reference["final"]["val_loss"], rel=RESUME_REL_TOL)
    # steps the first attempt trained past the checkpoint were redone identically
    redone = {e["step"]: e["loss"] for e in first_attempt if "event" not in e and e["step"] > CHECKPOINT_EVERY}
    for step, loss in redone.items():
        assert loss == pytest.approx(got[step - 1]["loss"], rel=RESUME_REL_TOL), step

    # 4. the same weights at the end
    from safetensors.torch import load_file

    artifact = "model" if cfg.method.name == "full" else "adapter"
    files = sorted(p.name for p in (reference["out"] / artifact).glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (out / artifact).glob("*.safetensors"))
    resumed_weights = {}
    for name in files:
        a, b = load_file(str(reference["out"] / artifact / name)), load_file(str(out / artifact / name))
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
        resumed_weights |= b

    # 5. rerunning the finished run trains nothing more: it resumes at the end and exports the same artifact
    logged = len(read_jsonl(live))
    again = train(cfg)
    assert again["step"] == STEPS and again["loss"] == final["loss"]
    assert again["export_check"]["max_abs_diff"] <= STATE_TOL
    assert [(e.get("event"), e["step"]) for e in read_jsonl(live)[logged:]] == [("resumed", STEPS)]
    for name in files:
        for key, value in load_file(str(out / artifact / name)).items():
            assert torch.equal(value, resumed_weights[key]), key
