"""A real 2-worker LoRA run (the session's `trained`) reports where its time went, and rank 0's export check
loads the exported files: a tampered adapter fails it."""

import json
import shutil
from pathlib import Path

import pytest
import torch


def test_the_run_records_its_phases(trained):
    phases = json.loads(Path(trained["dir"], "efficiency.json").read_text())["phases"]
    assert phases == trained["final"]["efficiency"]["phases"]
    parts = {k: v for k, v in phases.items() if k not in ("train_s", "fixed_s")}
    assert {"workers_start_s", "worker_setup_s", "training_steps_s", "validation_s", "final_checkpoint_s",
            "export_s", "report_s"} <= set(parts) and all(v >= 0 for v in parts.values())
    assert phases["fixed_s"] == pytest.approx(phases["train_s"] - phases["training_steps_s"], abs=0.02)
    # the parts are disjoint stretches of train(): they cannot exceed it, and miss only the loop's bookkeeping
    assert 0.8 * phases["train_s"] <= sum(parts.values()) <= phases["train_s"] + 0.1


def final_checkpoint(trained) -> Path:
    meta = json.loads(Path(trained["adapter"], "honed.json").read_text())
    return Path(meta["checkpoint"])


def test_rank_zero_checked_the_export_it_wrote(trained):
    probe = torch.load(final_checkpoint(trained) / "probe.pt", weights_only=False)
    check = probe["check"]
    assert check == trained["final"]["export_check"] and check["max_abs_diff"] <= check["tolerance"]
    meta = json.loads(Path(trained["adapter"], "honed.json").read_text())
    assert meta["base_weights_sha256"] == probe["base_weights_sha256"]


def test_a_tampered_adapter_fails_the_export_check(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from honed.models import resolve_model
    from honed.train.checkpointing import export_check
    from honed.train.trainer import ExportMismatch, refuse_mismatch

    tampered = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], tampered)
    weights = load_file(str(tampered / "adapter_model.safetensors"))
    doubled = {k: v * 2 if "lora_B" in k else v for k, v in weights.items()}  # the update twice as large
    save_file(doubled, str(tampered / "adapter_model.safetensors"))
    probe = torch.load(final_checkpoint(trained) / "probe.pt", weights_only=False)
    cfg = trained["config"]
    model_path = resolve_model(cfg.model.name_or_path)
    assert export_check(cfg, model_path, Path(trained["adapter"]), probe, torch.device("cpu"))["max_abs_diff"] \
        <= probe["check"]["tolerance"]
    check = export_check(cfg, model_path, tampered, probe, torch.device("cpu"))
    with pytest.raises(ExportMismatch, match="reloads to logits"):
        refuse_mismatch(check, str(tampered))


def test_ray_data_streams_the_same_steps_as_the_inline_train_set(trained, tmp_path, actors_started):
    """The session's run read its small train set on the driver (`inline_data_mb`); the same run streamed
    through Ray Data (`inline_data_mb: 0`) trains on the same global batches: the same loss curve. Only the
    streamed run starts Ray Train's dataset machinery (its DatasetManager actor): the inline run's trainer
    leaves it out (honed.train.trainer.trainer_class)."""
    from honed.train.trainer import inline_train_rows, train

    cfg = trained["config"].model_copy(update={"output_dir": str(tmp_path / "run"), "inline_data_mb": 0,
                                               "register": None})
    assert inline_train_rows(Path(cfg.data_dir, "shards", "train"), trained["config"].inline_data_mb) is not None
    with actors_started() as streamed:
        train(cfg)
    assert "DatasetManager" in streamed, streamed
    assert any("RayTrainWorker" in name for name in trained["actor_classes"]), trained["actor_classes"]
    assert "DatasetManager" not in trained["actor_classes"], trained["actor_classes"]
    losses = [json.loads(line)["loss"] for line in Path(tmp_path, "run", "metrics.jsonl").read_text().splitlines()]
    inline = [json.loads(line)["loss"] for line in Path(trained["dir"], "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == len(inline) == 6 and losses == pytest.approx(inline, rel=1e-5)


def test_a_rerun_of_the_finished_run_reports_no_phases(trained, tmp_path):
    """Rerunning a finished run (same name and storage) resumes at its last step and trains nothing: the export
    is written again, and no phases are made up from the earlier run's workers (they came out negative)."""
    from honed.train.trainer import train

    cfg = trained["config"]
    rerun = cfg.model_copy(update={"output_dir": str(tmp_path / "rerun"), "register": None,
                                   "storage_path": cfg.storage_path or str(Path(trained["dir"], "checkpoints"))})
    metrics = train(rerun)
    efficiency = json.loads(Path(tmp_path, "rerun", "efficiency.json").read_text())
    assert "phases" not in efficiency and "worker_phases" not in efficiency and "phases" not in metrics["efficiency"]
    assert efficiency["step_time_s"] == trained["final"]["efficiency"]["step_time_s"]  # the run's own figures
    assert Path(tmp_path, "rerun", "adapter", "adapter_model.safetensors").is_file()
