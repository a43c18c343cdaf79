"""A worker's checkpoint: written by every rank at checkpoint steps, read back on resume.

    save_checkpoint(worker, state, metrics, efficiency, final)   # every rank; Ray Train merges the dirs
    state = restore(worker)                                      # RunState from Ray Train's latest checkpoint

A checkpoint dir holds the backend's part (`adapter/` or `model/` and its resume state: honed.train.backends),
one RNG state per rank, and from rank 0 the run state (`progress.json`), `metrics.jsonl`, and at the end
`efficiency.json` and the export check's probe logits (`probe.pt`, which for an adapter also holds rank 0's check
of the exported files: `check`, `base_weights_sha256`); file names are honed.artifacts'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from honed.artifacts import PROBE_FILE, PROGRESS_FILE, RNG_DIR, write_efficiency, write_metrics
from honed.train import session
from honed.train.backends import artifact_name
from honed.train.collate import collate
from honed.train.efficiency import Meter


@dataclasses.dataclass
class RunState:
    """What the loop carries from step to step and a checkpoint carries across restarts."""

    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    meter: Meter = dataclasses.field(default_factory=Meter)

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "history": self.history, "meter": self.meter.state()})

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        data = json.loads(text)
        meter = Meter()
        meter.restore(data["meter"])
        return cls(step=data["step"], history=data["history"], meter=meter)


def restore(worker) -> RunState | None:
    """The run state (and model, optimizer and RNG state) of Ray Train's latest checkpoint, which it hands back
    after a worker failure or a rerun of the same run; None when the run starts fresh."""
    checkpoint = session.checkpoint()
    if not checkpoint:
        return None
    with rank_files(checkpoint, worker.rank, worker.world) as ckpt_dir:
        worker.backend.load(ckpt_dir, worker.rank)
        state = RunState.from_json(Path(ckpt_dir, PROGRESS_FILE).read_text())
        rng = Path(ckpt_dir, RNG_DIR, f"rank{worker.rank}.pt")
        if rng.is_file():  # absent when the run resumes with more workers than it had
            set_rng_state(torch.load(rng, weights_only=False))
    return state


def save_checkpoint(worker, state: RunState, metrics: dict, efficiency: dict | None, final: bool) -> None:
    """Every rank writes its part (its RNG; DeepSpeed partitions) and reports; Ray Train merges the
    directories into one checkpoint in `storage_path`."""
    # the final checkpoint is exported, and with checkpoint_metric any kept one may be the best
    export = final or bool(worker.cfg.checkpoint_metric)
    with tempfile.TemporaryDirectory() as tmp:
        worker.backend.save(tmp, worker.rank, export=export)
        Path(tmp, RNG_DIR).mkdir()
        torch.save(rng_state(), Path(tmp, RNG_DIR, f"rank{worker.rank}.pt"))
        probe = probe_logits(worker) if final else None
        if probe and worker.rank == 0 and worker.cfg.method.peft and not worker.cfg.method.deepspeed.enabled:
            probe |= checked_on_worker(worker, Path(tmp, artifact_name(worker.cfg.method)), probe)
        if worker.rank == 0:
            Path(tmp, PROGRESS_FILE).write_text(state.to_json())
            write_metrics(tmp, state.history)
            if efficiency:
                write_efficiency(tmp, efficiency)
            if probe:
                torch.save(probe, Path(tmp, PROBE_FILE))
        session.report(metrics, checkpoint_dir=tmp)


PROBE_TOKENS = 32
RANK_FILE = re.compile(r"(?:zero_pp_rank_|^rank)(\d+)[_.]")  # DeepSpeed's per-rank shards, rng/rank<N>.pt


def rank_of(relative_path: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for a file every rank reads."""
    match = RANK_FILE.search(Path(relative_path).name)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def rank_files(checkpoint, rank: int, world: int):
    """A local directory with what `rank` reads of a checkpoint: the shared files and its own shards, not the
    other ranks' (on a cluster each node would otherwise download every rank's optimizer partitions). A local
    checkpoint is read in place; a checkpoint written by another number of ranks is fetched whole, since
    DeepSpeed then re-partitions from every shard."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield root
        return
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    relative = [f.path[len(root):].lstrip("/") for f in files]
    ranks = {r for r in map(rank_of, relative) if r is not None}
    keep = [p for p in relative if rank_of(p) in (None, rank)] if ranks == set(range(world)) else relative
    with tempfile.TemporaryDirectory() as tmp:
        for path in keep:
            Path(tmp, path).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root}/{path}", str(Path(tmp, path)), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        yield tmp


@torch.no_grad()
def probe_logits(worker) -> dict:
    """Logits of the trained model on the first two validation rows: the export is checked against them."""
    inputs = collate({k: v[:2] for k, v in worker.val_rows.items()}, worker.pad_id, worker.device)
    # causal: the first PROBE_TOKENS positions depend on nothing after them, and the probe stays small
    # (2 x 32 x vocabulary floats: 33 MB for a 128k vocabulary, where whole rows would be hundreds)
    inputs = {k: v[:, :PROBE_TOKENS] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    backend = worker.backend
    backend.train(False)
    with backend.autocast():
        logits = backend.module(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                position_ids=inputs.get("position_ids"), use_cache=False).logits
    backend.train(True)
    keep = {k: v.cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return {"inputs": keep, "logits": logits.float().cpu()}


def checked_on_worker(worker, artifact: Path, probe: dict) -> dict:
    """`export_check` of the adapter just written, here on rank 0 (a fresh base from the node's copy plus the
    adapter files: ~2 s, where a cold Ray task after the run took ~8 s), and the base weights' sha256; {} when
    the device has no room for the second base beside the training state (the driver then checks in a task)."""
    import time

    from honed.models import weights_hash

    start = time.perf_counter()
    try:
        check = export_check(worker.cfg, worker.plan.model_path, artifact, probe, worker.device)
    except torch.OutOfMemoryError:
        return {}
    check["seconds"] = round(time.perf_counter() - start, 3)
    return {"check": check, "base_weights_sha256": weights_hash(worker.plan.model_path)}


def export_check(cfg, model_path: str, artifact: Path, probe: dict, device: torch.device) -> dict:
    """The exported artifact (a local dir), loaded the way users load it in the dtype it trained in, against the
    logits the trained model gave on the probe rows (same autocast as training): the largest difference and the
    tolerance by dtype (honed.merge.tolerance_for: fp32 1e-3; bf16/fp16 a share of the logits). The caller
    refuses a difference over the tolerance (honed.train.trainer.refuse_mismatch)."""
    from honed.merge import tolerance_for
    from honed.train.methods import compute_dtype

    compute = compute_dtype(cfg.model.dtype, device)
    model = load_artifact(cfg, model_path, artifact, device).eval()
    inputs = {k: v.to(device) for k, v in probe["inputs"].items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False).logits.float().cpu()
    diff, scale = float((logits - probe["logits"]).abs().max()), float(probe["logits"].abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rows": int(inputs["input_ids"].shape[0]),
            "tolerance": tolerance_for(compute, scale, quantized=False), "dtype": str(compute).removeprefix("torch."),
            "device": device.type}


def load_artifact(cfg, model_path: str, artifact: Path, device: torch.device):
    """The exported artifact as a model on `device`, loaded the way users load it (base + adapter, or the full
    dir) in the dtype it trained in."""
    from honed.train.methods import compute_dtype, load_base, weights_dtype

    if cfg.method.name == "full":
        from transformers import AutoModelForCausalLM

        dtype = weights_dtype(cfg.method, compute_dtype(cfg.model.dtype, device))
        return AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype, device_map={"": device})
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(cfg.method, model_path, cfg.model.dtype, device), artifact)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
