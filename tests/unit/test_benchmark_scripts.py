"""The benchmark scripts parse their options and resolve their settings without running (`--dry-run`), and
the GPU runner lists one `--gpu` command per training benchmark: the flow a GPU machine would run, checked
here on CPU. The measurements themselves are benchmarks, never tests."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ["train_overhead", "train_vs_hf_trainer", "train_mfu", "train_memory", "packing"]


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("flags, expect", [([], {"quick": False, "gpu": False}),
                                           (["--quick", "--gpu"], {"quick": True, "gpu": True})])
def test_training_benchmark_resolves_its_settings(name, flags, expect):
    settings, stderr = resolved(name, *flags)
    assert {k: settings[k] for k in expect} == expect
    assert "torch" not in stderr  # the drivers import neither torch nor Ray themselves


def test_gpu_runner_lists_every_training_benchmark_with_gpu_flags():
    done = subprocess.run(["bash", "benchmarks/gpu/run_train_benchmarks.sh", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = [line for line in done.stdout.splitlines() if "benchmarks/" in line and line.endswith(".json")]
    assert [Path(c.split()[1]).stem for c in commands] == TRAINING
    assert all("--gpu" in c and "--out benchmarks/results/gpu/" in c for c in commands)
    resolved = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(resolved) == len(TRAINING) and all(r["gpu"] for r in resolved)


def test_gpu_runner_refuses_unknown_arguments():
    done = subprocess.run(["bash", "benchmarks/gpu/run_train_benchmarks.sh", "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown argument: --fast" in done.stderr


@pytest.mark.parametrize("flags, expect", [([], {"adapters": 8, "loads": [8, 16], "repeats": 2}),
                                           (["--quick"], {"adapters": 4, "loads": [4], "repeats": 1}),
                                           (["--loads", "4,12"], {"loads": [4, 12]})])
def test_serving_benchmark_resolves_its_settings(flags, expect):
    settings, _ = resolved("serve_adapters", *flags)
    assert {k: settings[k] for k in expect} == expect


@pytest.mark.parametrize("flags, expect", [([], {"short_steps": 24, "long_steps": 80, "mixed_steps": 8,
                                                 "mixed_repeats": 3, "sides": "honed,trl,hf", "batch_size": 16,
                                                 "threads": 2}),
                                           (["--quick"], {"short_steps": 6, "long_steps": 0, "mixed_steps": 4,
                                                          "mixed_repeats": 1, "sides": "honed,trl"}),
                                           (["--trl-precision", "bf16"], {"precision": "fp32",
                                                                          "trl_precision": "bf16"})])
def test_train_vs_trl_resolves_its_settings(flags, expect):
    settings, stderr = resolved("train_vs_trl", *flags)
    assert {k: settings[k] for k in expect} == expect
    assert "torch" not in stderr


def resolved(name: str, *flags: str) -> tuple[dict, str]:
    """benchmarks/NAME.py FLAGS --dry-run: its resolved settings and its stderr."""
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", *flags, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture()
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def side(rate: float, wall: float, tokens: list[int]) -> dict:
    return {"nonpad_tokens_per_s": rate, "process_wall_s": wall, "tokens_per_step": tokens, "losses": [1.0]}


def test_train_vs_trl_states_the_issues_goals_from_its_jobs(benchmarks):
    import train_vs_trl

    tokens = [{"nonpad": n} for n in (10, 12)]
    honed = side(300.0, 100.0, []) | {"_run": {"live_times": []}, "live_times": []}
    short = train_vs_trl.job_figures({"honed": honed, "trl": side(150.0, 110.0, [10, 12])}, tokens)
    assert short["ratios"] == {"steady_honed_over_trl": 2.0, "wall_trl_over_honed": 1.1}
    assert short["sides"]["trl"]["same_batches_as_honed"]
    failed = train_vs_trl.job_figures({"honed": honed, "trl": {"error": "killed for memory"}}, tokens)
    assert failed["ratios"] == {} and failed["sides"]["trl"] == {"error": "killed for memory"}
    long = train_vs_trl.job_figures({"honed": honed, "trl": side(250.0, 120.0, [10, 13])}, tokens)
    assert not long["sides"]["trl"]["same_batches_as_honed"]
    results = {"demo_24": short | {"corpus": "demo", "steps": 24}, "demo_80": long | {"corpus": "demo", "steps": 80}}
    args = SimpleNamespace(short_steps=24, long_steps=80, mixed_steps=8)
    goals = train_vs_trl.goals(results, args)
    assert [(g["value"], g["met"]) for g in goals] == [(1.2, False), (None, False), (1.1, True), (1.2, False)]
    assert all(g["name"] and g["goal"].startswith(">=") for g in goals)
    assert "24-step" in goals[2]["name"] and "80-step" in goals[3]["name"]
    only_long = train_vs_trl.goals({"demo_80": results["demo_80"]}, SimpleNamespace(short_steps=0, long_steps=80,
                                                                                    mixed_steps=0))
    assert [g["value"] for g in only_long] == [1.2, None, None, 1.2]  # the long job never stands in for the short


def test_train_vs_trl_takes_a_repeated_jobs_ratios_as_medians_of_back_to_back_pairs(benchmarks):
    import train_vs_trl

    tokens = [{"nonpad": n} for n in (10, 12)]

    def repeat(order, honed_rate, trl_rate, trl_wall):
        honed = side(honed_rate, 100.0, []) | {"_run": {"live_times": []}, "live_times": []}
        trl = side(trl_rate, trl_wall, [10, 12])
        return order, train_vs_trl.job_figures({"honed": honed, "trl": trl}, tokens)

    rounds = [repeat(["honed", "trl"], 200.0, 100.0, 130.0), repeat(["trl", "honed"], 180.0, 60.0, 150.0),
              repeat(["honed", "trl"], 250.0, 100.0, 110.0)]
    job = train_vs_trl.over_repeats(rounds)
    assert job["ratios"] == {"steady_honed_over_trl": 2.5, "wall_trl_over_honed": 1.3}  # medians of 2, 3, 2.5 / ...
    assert job["sides_of_repeat"] == 3 and job["sides"]["trl"]["nonpad_tokens_per_s"] == 100.0  # the 2.5 repeat's
    assert [r["order"] for r in job["repeats"]] == [["honed", "trl"], ["trl", "honed"], ["honed", "trl"]]
    assert [r["nonpad_tokens_per_s"]["trl"] for r in job["repeats"]] == [100.0, 60.0, 100.0]
    one = train_vs_trl.over_repeats(rounds[:1])
    assert one["ratios"] == {"steady_honed_over_trl": 2.0, "wall_trl_over_honed": 1.3} and "repeats" not in one
    failed = train_vs_trl.over_repeats([rounds[0], (["trl", "honed"], train_vs_trl.job_figures(
        {"honed": rounds[0][1]["sides"]["honed"] | {"_run": {"live_times": []}}, "trl": {"error": "killed"}}, tokens))])
    assert failed["ratios"]["steady_honed_over_trl"] == 2.0  # a failed repeat has no ratio to count


def test_length_profile_reports_the_padding_of_padded_batches(benchmarks, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import train_runs

    (tmp_path / "shards" / "train").mkdir(parents=True)
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (2, 4, 4, 8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shards" / "train" / "0.parquet")
    profile = train_runs.length_profile(tmp_path, batch_size=2, batches=2)
    assert (profile["min"], profile["max"], profile["rows"]) == (2, 8, 4)
    assert profile["padding_fraction"] == round(1 - 18 / (2 * 4 + 2 * 8), 4)


def test_mixed_corpus_documents_vary_in_length_and_never_overlap(benchmarks, tmp_path, monkeypatch):
    import train_runs

    monkeypatch.setitem(train_runs.MIXED, "documents", 6)
    train_runs.write_kjv_documents(tmp_path)
    docs = [p.read_text() for p in sorted(tmp_path.glob("*.txt"))]
    words = [len(d.split()) for d in docs]
    assert len(docs) == 6 and len(set(words)) > 3 and min(words) >= train_runs.MIXED["min_words"]
    assert len({d[:80] for d in docs}) == 6


def test_packing_takes_the_mixed_corpus_and_refuses_others():
    assert resolved("packing", "--corpus", "mixed")[0]["corpus"] == "mixed"
    done = subprocess.run([sys.executable, "benchmarks/packing.py", "--corpus", "wiki", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "invalid choice: 'wiki'" in done.stderr


@pytest.mark.parametrize("flags, steps, repeats", [([], 8, 3), (["--quick"], 4, 1), (["--repeats", "5"], 8, 5)])
def test_train_fixed_cost_resolves_its_settings(flags, steps, repeats):
    settings, stderr = resolved("train_fixed_cost", *flags)
    assert settings["steps"] == steps and settings["repeats"] == repeats and "torch" not in stderr


def test_train_fixed_cost_goal_is_the_median_job(benchmarks):
    import train_fixed_cost

    jobs = [{"fixed_s": s, "id": i} for i, s in enumerate((41.0, 29.5, 33.0, 30.0))]
    assert train_fixed_cost.median_job(jobs)["id"] == 3  # the lower middle of four: 30.0
    assert train_fixed_cost.median_job(jobs[:3])["id"] == 2


def test_train_fixed_cost_takes_the_steps_out_of_the_whole_job(benchmarks):
    import train_fixed_cost

    efficiency = {"step_time_s": 4.0, "phases": {"training_steps_s": 32.0, "train_s": 60.0, "validation_s": 9.0}}
    job = train_fixed_cost.job_figures(efficiency, wall=70.5)
    assert job["fixed_s"] == 38.5 and job["outside_train_s"] == 10.5 and job["phases"]["validation_s"] == 9.0
