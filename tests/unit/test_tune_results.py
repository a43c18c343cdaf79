"""honed.tune's result files from hand-made trial rows, without Ray: the tables are sorted best first, best_train.yaml
is the best completed trial's train config and loads as one, an interrupted or fruitless search is named."""

import csv

import pytest

from honed.config import TrainConfig, TuneConfig, load_config
from honed.tune import write_results


def row(name: str, status: str, lr: float, curve: list[float], **extra) -> dict:
    steps = [3 * (i + 1) for i in range(len(curve))]
    return {"trial": name, "status": status, "config": {"optim.lr": lr}, "final": curve[-1] if curve else None,
            "best": min(curve) if curve else None, "validations": len(curve),
            "last_step": steps[-1] if steps else None, "curve": (steps, curve), "dir": f"/runs/{name}",
            "error": ""} | extra


@pytest.fixture
def cfg(tmp_path) -> TuneConfig:
    return load_config(TuneConfig, None, [f"output_dir={tmp_path}", "name=exp", "train.optim.max_steps=12",
                                          "space.optim.lr={choice: [0.1, 0.01, 0.001]}"])


def test_results_are_sorted_and_the_best_completed_trial_becomes_a_train_config(cfg, tmp_path):
    rows = [row("t_good", "completed", 0.01, [2.0, 1.5, 1.2, 1.0]),
            row("t_slow", "stopped early", 0.001, [3.9]),
            row("t_ok", "completed", 0.1, [2.1, 1.8, 1.6, 1.4]),
            row("t_bad", "error", 0.1, [], error="ConfigError: trial config")]
    summary = write_results(cfg, rows)
    assert summary["best"]["trial"] == "t_good"
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == ["t_good", "t_ok", "t_slow", "t_bad"]
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"] and table[0]["val_loss"] == "1.0"
    assert table[2]["status"] == "stopped early" and table[2]["validations"] == "1"
    best = load_config(TrainConfig, tmp_path / "best_train.yaml")
    assert best.optim.lr == 0.01 and best.optim.max_steps == 12
    assert best.output_dir == str(tmp_path / "best") and best.name == "exp-best"
    assert (tmp_path / "best_train.yaml").read_text().startswith(f"# honed train {tmp_path / 'best_train.yaml'}\n")
    report = (tmp_path / "report.md").read_text()
    assert "4 trials (2 completed, 1 stopped early, 1 error)" in report
    assert "Best: **t_good**, val_loss = 1 at step 12 with optim.lr = 0.01." in report
    assert (tmp_path / "plots" / "trials.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert md.index("t_good") < md.index("t_ok") < md.index("t_slow") < md.index("t_bad")
    assert "error: ConfigError: trial config" in md


def test_no_completed_trial_is_an_error_after_the_tables_are_written(cfg, tmp_path):
    with pytest.raises(ValueError, match="no trial of exp completed \\(error, stopped early\\)"):
        write_results(cfg, [row("a", "stopped early", 0.1, [3.0]), row("b", "error", 0.01, [], error="x")])
    assert (tmp_path / "results.md").is_file() and not (tmp_path / "best_train.yaml").exists()


def test_an_interrupted_search_says_how_to_continue(cfg, tmp_path):
    with pytest.raises(ValueError, match="interrupted with 1 trial\\(s\\) unfinished; run the same command again"):
        write_results(cfg, [row("a", "completed", 0.1, [2.0, 1.0]), row("b", "unfinished", 0.01, [2.5])])
    assert "1 unfinished" in (tmp_path / "report.md").read_text()
