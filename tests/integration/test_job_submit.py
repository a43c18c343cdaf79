"""`ray job submit -- honed train` against a `ray start --head` cluster started by this test (`head_node`, conftest)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_ray_job_submit_runs_honed_train(head_node, prepared, tiny_model, tmp_path):
    address, env = head_node
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    out = tmp_path / "out"
    (job_dir / "train.yaml").write_text(
        f"model: {{name_or_path: {tiny_model}}}\ndata_dir: {prepared['dir']}\noutput_dir: {out}\n"
        "optim: {max_steps: 4, batch_size: 4}\nlog_every: 2\nname: submitted\n")
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--",
         str(BIN / "honed"), "train", "train.yaml"],
        env=env, capture_output=True, text=True, timeout=600)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "[honed.train] step 4/4" in log                     # worker progress streamed back
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "honed.json").read_text())["final_metrics"]["step"] == 4
    shutil.rmtree(out)
