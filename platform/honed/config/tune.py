"""`honed tune`'s config: a train config, a search space over its keys, the search and the scheduler.

Every space key and the extremes of every domain are checked against TrainConfig at load time:

    cfg = load_config(TuneConfig, "jobs/tune_lora.yaml", ["space.optim.lr={loguniform: [1e-4, 1e-2]}"])
    train = cfg.trial_config({"optim.lr": 3e-4}, output_dir="runs/tune/trials/t0")
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from honed.config.base import ConfigError, Section, describe_errors, section_type
from honed.config.method import METHOD_SECTION_NAMES, METHOD_SECTIONS
from honed.config.train import RegisterConfig, TrainConfig

SEARCH_DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
PER_TRIAL_KEYS = ("output_dir", "storage_path", "name", "register")
"""Train keys `honed tune` sets for each trial; tuning or setting them in `train` is refused."""


class SearchDomain(Section):
    """One dimension of the search space: exactly one of these keys, handed to the `ray.tune` function of its name."""

    loguniform: tuple[float, float] | None = None
    """[lo, hi] with 0 < lo < hi, sampled uniformly in log space (learning rates)."""
    uniform: tuple[float, float] | None = None
    """[lo, hi], lo < hi."""
    randint: tuple[int, int] | None = None
    """[lo, hi): an integer, hi excluded (as `tune.randint`)."""
    choice: list[Any] | None = Field(default=None, min_length=1)
    """Values sampled with equal probability."""
    grid: list[Any] | None = Field(default=None, min_length=1)
    """Every value is run (`tune.grid_search`); crossed with the other grid keys and, for `random`, the samples."""

    @model_validator(mode="after")
    def _one_domain(self) -> "SearchDomain":
        given = [k for k in SEARCH_DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_DOMAINS)} (got {', '.join(given) or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: lo must be below hi (got {list(bounds)})")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: lo must be > 0 (got {self.loguniform[0]})")
        return self

    @model_serializer(mode="wrap")
    def _only_the_domain(self, handler, info):
        return {self.kind: handler(self)[self.kind]}

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_DOMAINS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def extremes(self) -> list[Any]:
        """The values to check against the train config before any trial runs: every listed value, or the bounds."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return list(self.args)


class SearchSettings(Section):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    """`random`: each trial samples every domain (`grid` keys are crossed with the samples); `grid`: every
    combination of the space's `grid` values (only `grid` domains allowed); `optuna`: Optuna's TPE sampler
    (`ray.tune.search.optuna.OptunaSearch`; `grid` not allowed)."""
    num_samples: int = Field(default=8, gt=0)
    """Trials for random and optuna; for grid, how many times the whole grid is run."""
    seed: int | None = 0
    """Seeds the sampler (null: a different search every run)."""


class SchedulerSettings(Section):
    """Stopping weak trials early on `metric`; time is counted in validations (one every `train.checkpoint_every`
    steps, and one at the end)."""

    name: Literal["asha", "fifo"] = "asha"
    """`asha`: `ray.tune.schedulers.ASHAScheduler` stops a trial whose metric at a rung is not among the best
    1/reduction_factor of the trials that reached it; `fifo`: every trial runs to its end."""
    grace_period: int = Field(default=1, gt=0)
    """Validations every trial gets before it can be stopped (the first rung)."""
    reduction_factor: float = Field(default=2, gt=1)
    """Rungs are at grace_period x reduction_factor^k validations."""
    max_t: int | None = Field(default=None, gt=0)
    """Validations that bound the rungs; default: one fewer than a full trial of `train` has, so that no rung falls
    on a trial's final validation (a trial that reached its end is always exported)."""


class TrackingSettings(Section):
    mlflow_uri: str | None = None
    """Also log every trial to this MLflow tracking URI through Ray's `MLflowLoggerCallback` (needs
    `pip install mlflow`). TensorBoard event files are always written, by Tune's `TBXLoggerCallback`."""
    mlflow_experiment: str | None = None
    """MLflow experiment name; default: the tune `name`."""


def check_space_key(key: str) -> str:
    """The key if it names a tunable value of TrainConfig (dotted), else ValueError saying what is allowed there."""
    cls: type[BaseModel] = TrainConfig
    parts = key.split(".")
    if parts[0] in PER_TRIAL_KEYS:
        raise ValueError(f"'{parts[0]}' is set per trial by honed tune and cannot be tuned")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        field = cls.model_fields.get(part)
        if field is None:
            allowed = ", ".join(cls.model_fields)
            raise ValueError(f"unknown key '{part}'; allowed {f'under {where}' if where else 'at the top'}: {allowed}")
        sub = section_type(field.annotation)
        last = i == len(parts) - 1
        if last and sub is not None:
            raise ValueError(f"'{key}' is a section; tune one of its keys: "
                             + ", ".join(f"{key}.{f}" for f in sub.model_fields))
        if not last and sub is None:
            raise ValueError(f"'{'.'.join(parts[:i + 1])}' holds a value, not a section")
        cls = sub or cls
    return key


def trial_train_config(train: TrainConfig, sampled: dict[str, Any], **fields: Any) -> TrainConfig:
    """`train` with the sampled values (dotted keys) and `fields` (output_dir, name, ...) set. When the method is
    sampled, the method sections it does not use are dropped unless sampled too. ConfigError if invalid."""
    data = train.model_dump(mode="json", exclude_unset=True)
    for dotted, value in sampled.items():
        *sections, leaf = dotted.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    method = sampled.get("method.name")
    if method in METHOD_SECTIONS:
        kept = {key.split(".")[1] for key in sampled if key.startswith("method.") and key.count(".") >= 2}
        for section in METHOD_SECTION_NAMES - METHOD_SECTIONS[method] - kept:
            data.get("method", {}).pop(section, None)
    data.update(fields)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"trial config {sampled}:\n" + describe_errors(TrainConfig, err)) from None


# As in train.py: `register` shadows only ABCMeta.register, which nobody calls on a config.
warnings.filterwarnings("ignore", message='Field name "register" in "TuneConfig" shadows', category=UserWarning)


class TuneConfig(Section):
    """`honed tune`: Ray Tune over `honed train` runs → `output_dir/{results.csv, results.md, best_train.yaml,
    report.md, plots/, trials/<trial>/}`."""

    train: TrainConfig = TrainConfig()
    """The train config every trial starts from (its `output_dir`, `storage_path`, `name` and `register` are set
    per trial and may not be given)."""
    space: dict[Annotated[str, AfterValidator(check_space_key)], SearchDomain] = Field(
        default_factory=lambda: {"optim.lr": SearchDomain(loguniform=(1e-4, 1e-2))})
    """Dotted train-config key → domain, e.g. `optim.lr: {loguniform: [1e-4, 1e-2]}`, `method.lora.r: {choice:
    [8, 16]}`, `method.name: {choice: [lora, ia3]}` (a trial drops the method sections its method does not use;
    a sampled combination the train config refuses fails that trial). Nested sections work too (`optim: {lr:
    {...}}`), and so does `space.optim.lr=...` on the command line."""
    search: SearchSettings = SearchSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    metric: str = "val_loss"
    """A validation metric reported at every checkpoint (`val_loss`, `val_loss/<source>`, ...): what the search and
    the scheduler optimise and the results are sorted by."""
    mode: Literal["min", "max"] = "min"
    """`min`: lower `metric` is better (losses); `max`: higher is better (accuracies)."""
    max_concurrent_trials: int = Field(default=1, gt=0)
    """Trials (each a whole Ray Train run with `train.scaling` workers) running at once."""
    trial_cpus: float = Field(default=0.1, gt=0)
    """CPUs of each trial's driver (it only launches and watches the TorchTrainer); above 0, so that Ray places it.
    A trial trained in its own process holds these plus its one worker's `train.scaling.cpus_per_worker`."""
    trials_in_process: bool = True
    """Trials of one worker (`train.scaling.num_workers: 1`, not searched) train in the trial's own process, which
    Tune hands to the next trial (`reuse_actors`): imports and Ray Train's start-up are paid once per concurrent
    trial, not per trial (honed.train.in_process). false, or trials of several workers: each trial fits its own
    Ray Train worker group."""
    output_dir: str = "runs/tune"
    """Where the trials' runs (trials/<trial>/), the results and best_train.yaml go: a local path or an
    object-storage URI (s3://bucket/tune, gs://...), which every node of a cluster then writes to."""
    storage_path: str | None = None
    """Ray Tune experiment storage (local path or cloud URI); default: `output_dir`. Experiment dir: storage/name."""
    name: str = Field(default="honed-tune", pattern=r"^[A-Za-z0-9._-]+$")
    """Experiment name: rerunning the same name continues the experiment (`Tuner.restore`)."""
    register: RegisterConfig | None = None
    """Register the best trial's adapter in an adapter registry, e.g. {name: icd10-lora}."""
    tracking: TrackingSettings = TrackingSettings()

    @field_validator("train")
    @classmethod
    def _no_per_trial_keys(cls, train: TrainConfig) -> TrainConfig:
        fixed = [k for k in PER_TRIAL_KEYS if k in train.model_fields_set]
        if fixed:
            raise ValueError(f"train.{fixed[0]} is set per trial by honed tune (trials run under "
                             "output_dir/trials/<trial>); remove it (the best trial is registered by the top-level "
                             "`register`)")
        return train

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, value: Any) -> Any:
        """Nested sections are read as dotted keys, so `optim: {lr: {...}}` and the CLI's `space.optim.lr=...` name
        `optim.lr` too (a later entry wins)."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, domain in value.items():
            # a section holds mappings (domains or sections); a domain holds lists
            nested = isinstance(domain, dict) and domain and all(isinstance(v, dict) for v in domain.values())
            flat.update({f"{key}.{k}": v for k, v in cls._flatten_space(domain).items()} if nested else {key: domain})
        return flat

    @field_validator("space")
    @classmethod
    def _check_values(cls, space: dict[str, SearchDomain], info: ValidationInfo) -> dict[str, SearchDomain]:
        if not space:
            raise ValueError("the space is empty; give at least one train key to search, e.g. "
                             "space: {optim.lr: {loguniform: [1e-4, 1e-2]}}")
        train = info.data.get("train")
        for key, domain in space.items() if train else ():
            for value in domain.extremes():
                try:
                    trial_train_config(train, {key: value})
                except ConfigError as err:
                    detail = str(err).split("\n", 1)[1].strip()
                    raise ValueError(f"{key}: the value {value!r} makes an invalid train config: {detail}") from None
        return space

    @field_validator("search")
    @classmethod
    def _fits_space(cls, search: SearchSettings, info: ValidationInfo) -> SearchSettings:
        kinds = {key: domain.kind for key, domain in (info.data.get("space") or {}).items()}
        if search.algorithm == "grid" and set(kinds.values()) - {"grid"}:
            raise ValueError("algorithm grid runs `grid` domains only; not grid: "
                             + ", ".join(k for k, kind in kinds.items() if kind != "grid"))
        if search.algorithm == "optuna" and "grid" in kinds.values():
            raise ValueError("algorithm optuna samples its own points and takes no `grid` domain ("
                             + ", ".join(k for k, kind in kinds.items() if kind == "grid") + "); use choice")
        return search

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val_"):
            raise ValueError(f"'{metric}' is not a validation metric (reported at each checkpoint); use val_loss, "
                             "val_loss/<source> or another val_ metric")
        return metric

    @field_validator("register")
    @classmethod
    def _adapters_only(cls, register: RegisterConfig | None, info: ValidationInfo) -> RegisterConfig | None:
        train, space = info.data.get("train"), info.data.get("space") or {}
        methods = set(space["method.name"].extremes()) if "method.name" in space else {train and train.method.name}
        if register and "full" in methods:
            raise ValueError("method full exports a whole model, not an adapter; remove `register` or keep full out "
                             "of the methods tried")
        return register

    def trial_config(self, sampled: dict[str, Any], **fields: Any) -> TrainConfig:
        """`train` with the sampled values and `fields` set (see trial_train_config); ConfigError if invalid."""
        return trial_train_config(self.train, sampled, **fields)

