"""TuneConfig without Ray: every space key and value is checked against TrainConfig before anything starts, each
bad input is named with what is allowed, and a trial's config is `train` plus its sampled values."""

import pytest

from honed.cli import main
from honed.config import ConfigError, TrainConfig, TuneConfig, load_config

SPACE = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}


def tune_config(**fields) -> TuneConfig:
    return load_config(TuneConfig, None, [f"{k}={v}" for k, v in fields.items()])


@pytest.mark.parametrize("overrides, expected", [
    (["space.optim.lrr={choice: [1]}"],
     "space.optim.lrr.[key] = 'optim.lrr': Value error, unknown key 'lrr'; allowed under optim: lr, weight_decay"),
    (["space.optm.lr={choice: [1]}"], "unknown key 'optm'; allowed at the top: model, method, optim, scaling"),
    (["space.optim={choice: [1]}"], "'optim' is a section; tune one of its keys: optim.lr, optim.weight_decay"),
    (["space.output_dir={choice: [a, b]}"], "'output_dir' is set per trial by honed tune and cannot be tuned"),
    (["space.optim.lr={loguniform: [0, 1]}"], "loguniform: lo must be > 0 (got 0.0)"),
    (["space.optim.lr={uniform: [2, 1]}"], "uniform: lo must be below hi (got [2.0, 1.0])"),
    (["space.optim.lr={uniform: [1, 2], choice: [1]}"],
     "give exactly one of loguniform, uniform, randint, choice, grid (got uniform, choice)"),
    (["space.optim.lr={normal: [1, 2]}"], "space.optim.lr.normal: unknown key; allowed here: loguniform, uniform"),
    (["space.optim.lr={choice: []}"], "space.optim.lr.choice = []: List should have at least 1 item"),
    (["space.method.lora.r={randint: [0, 8]}"],
     "the value 0 makes an invalid train config: method.lora.r = 0: Input should be greater than 0"),
    (["space.method.name={choice: [lora, sgd]}"], "the value 'sgd' makes an invalid train config: method.name = 'sgd'"),
    (["space.optim.lr={grid: [0.1, 0.01]}", "search.algorithm=optuna"],
     "search = {'algorithm': 'optuna'}: Value error, algorithm optuna samples its own points and takes no `grid`"),
    (["search.algorithm=grid"], "algorithm grid runs `grid` domains only; not grid: optim.lr"),
    (["train.output_dir=x"], "train.output_dir is set per trial by honed tune"),
    (["train.register.name=x"], "train.register is set per trial by honed tune"),
    (["metric=loss"], "metric = 'loss': Value error, 'loss' is not a validation metric"),
    (["mode=lowest"], "mode = 'lowest': Input should be 'min' or 'max'"),
    (["scheduler.name=hyperband"], "scheduler.name = 'hyperband': Input should be 'asha' or 'fifo'"),
    (["scheduler.reduction_factor=1"], "scheduler.reduction_factor = 1: Input should be greater than 1"),
    (["trial_cpus=0"], "trial_cpus = 0: Input should be greater than 0"),
    (["space={}"], "space = {}: Value error, the space is empty"),
    (["train.method.name=full", "register.name=best"], "method full exports a whole model, not an adapter"),
    (["space.method.name={choice: [lora, full]}", "register.name=best"], "keep full out of the methods tried"),
])
def test_bad_tune_config_is_named(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TuneConfig, None, overrides)
    assert expected in str(err.value)


def test_nested_and_dotted_space_keys_are_the_same_and_the_cli_override_wins(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text("space:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  method:\n    lora:\n      r: {choice: [4, 8]}\n")
    cfg = load_config(TuneConfig, path, ["space.optim.lr={choice: [0.001, 0.002]}"])
    assert list(cfg.space) == ["optim.lr", "method.lora.r"]
    assert cfg.space["optim.lr"].kind == "choice" and cfg.space["optim.lr"].args == [0.001, 0.002]
    assert cfg.space["method.lora.r"].extremes() == [4, 8]


def test_randint_extremes_exclude_hi_as_tune_does():
    cfg = load_config(TuneConfig, None, ["space.method.lora.r={randint: [1, 9]}"])
    assert cfg.space["method.lora.r"].extremes() == [1, 8]


def test_trial_config_applies_samples_and_per_trial_fields():
    cfg = load_config(TuneConfig, None, ["train.optim.max_steps=30", "train.method.lora.r=4"])
    trial = cfg.trial_config({"optim.lr": 1e-05, "method.lora.alpha": 64}, output_dir="/o/t1", name="t1",
                             validate_at_checkpoints=True)
    assert isinstance(trial, TrainConfig)
    assert (trial.optim.lr, trial.optim.max_steps, trial.method.lora.r, trial.method.lora.alpha) == (1e-05, 30, 4, 64)
    assert (trial.output_dir, trial.name, trial.validate_at_checkpoints) == ("/o/t1", "t1", True)
    assert cfg.train.optim.lr == 2e-3  # the base is left as it was


def test_a_sampled_method_drops_the_sections_it_does_not_use_but_a_sampled_one_fails_the_trial():
    cfg = load_config(TuneConfig, None, ["train.method.lora.r=4", "space.method.name={choice: [lora, ia3]}"])
    assert cfg.trial_config({"method.name": "ia3"}).method.name == "ia3"
    with pytest.raises(ConfigError, match="'lora' settings apply to method lora / qlora / dpo, not 'ia3'"):
        cfg.trial_config({"method.name": "ia3", "method.lora.r": 8})


def test_defaults_search_the_learning_rate():
    cfg = TuneConfig()
    assert list(cfg.space) == ["optim.lr"] and cfg.space["optim.lr"].kind == "loguniform"
    assert (cfg.metric, cfg.mode, cfg.scheduler.name, cfg.search.algorithm) == ("val_loss", "min", "asha", "random")


def test_print_config_shows_only_the_chosen_domain(capsys):
    assert main(["tune", "space.method.lora.r={choice: [4, 8]}", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  method.lora.r:\n    choice:\n    - 4\n    - 8\n" in out and "loguniform: null" not in out
    assert load_config(TuneConfig, None, []).space.keys() == tune_config().space.keys()


def test_cli_exits_2_on_a_bad_space_and_1_without_a_dataset(tmp_path, capsys):
    assert main(["tune", "space.optim.lrr={choice: [1]}"]) == 2
    assert "honed tune: invalid TuneConfig:\n  space.optim.lrr.[key]" in capsys.readouterr().err
    assert main(["tune", f"train.data_dir={tmp_path}"]) == 1
    assert f"no prepared dataset at {tmp_path} (manifest.json not found" in capsys.readouterr().err


def test_missing_mlflow_is_named_before_ray(tmp_path, monkeypatch):
    import importlib.util

    from honed import tune

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert "mlflow is not installed here (pip install mlflow)" in tune.missing_tracking()


def test_optuna_tpe_samples_every_domain_of_the_space_with_asha():
    """The Tune objects honed.tune builds, without a cluster: Optuna (TPE) suggests values of each domain under the
    dotted keys, and every suggestion makes a valid trial config; ASHA counts validations."""
    from ray.tune.schedulers import ASHAScheduler

    from honed import tune

    cfg = load_config(TuneConfig, None, [
        "search.algorithm=optuna", "search.seed=3", "scheduler.max_t=3", "max_concurrent_trials=2",
        "space.optim.lr={loguniform: [1e-4, 1e-2]}", "space.method.lora.r={choice: [4, 8]}",
        "space.method.lora.dropout={uniform: [0.0, 0.1]}", "space.optim.warmup_steps={randint: [0, 5]}"])
    settings = tune.tune_config(cfg)
    assert isinstance(settings.scheduler, ASHAScheduler) and settings.max_concurrent_trials == 2
    search = settings.search_alg
    assert search.set_search_properties("val_loss", "min", tune.param_space(cfg))
    for i in range(6):
        sampled = search.suggest(f"t{i}")
        assert set(sampled) == set(cfg.space)
        assert 1e-4 <= sampled["optim.lr"] <= 1e-2 and sampled["method.lora.r"] in (4, 8)
        assert 0 <= sampled["optim.warmup_steps"] < 5 and 0.0 <= sampled["method.lora.dropout"] <= 0.1
        cfg.trial_config(sampled)


def test_random_and_grid_searches_limit_concurrency_themselves():
    from honed import tune

    cfg = load_config(TuneConfig, None, ["max_concurrent_trials=2", "scheduler.name=fifo",
                                         "space.optim.lr={grid: [0.1, 0.01]}", "search.algorithm=grid"])
    settings = tune.tune_config(cfg)
    # Tune ignores max_concurrent_trials for a generator it is handed; a hung 2-CPU run showed it
    assert settings.search_alg.max_concurrent == 2 and settings.max_concurrent_trials is None
    assert tune.param_space(cfg)["optim.lr"] == {"grid_search": [0.1, 0.01]}
