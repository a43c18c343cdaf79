"""Typed job configs: YAML gives values, `a.b=c` overrides win, validation happens before any Ray work.

    cfg = load_config(TrainConfig, "jobs/train_lora.yaml", ["optim.lr=3e-4"])

A bad key, type or value raises `ConfigError` naming the key, the value and what is allowed. One module per stage;
each field is documented where it is defined.
"""

from honed.config.base import ConfigError, Section, apply_override, describe_errors, dump_config, load_config, read_yaml
from honed.config.data import (
    DEFAULT_SYSTEM_PROMPT,
    FILE_KINDS,
    PII_TYPES,
    SOURCE_KINDS,
    DataConfig,
    DecontamConfig,
    DedupConfig,
    FieldMap,
    FilterConfig,
    NormalizeConfig,
    PackConfig,
    PIIConfig,
    PrepareConfig,
    SourceConfig,
    TemplateConfig,
)
from honed.config.demo import DemoConfig, DemoData, DemoDPOOptim, DemoDPOSettings, DemoOptim
from honed.config.eval import BiasSettings, EvalConfig, GateSettings
from honed.config.merge import MergeConfig
from honed.config.method import (
    METHOD_SECTION_NAMES,
    METHOD_SECTIONS,
    METHODS,
    DeepSpeedSettings,
    DPOSettings,
    IA3Settings,
    LoraSettings,
    MethodConfig,
    PrefixSettings,
    QuantSettings,
)
from honed.config.data import ChunkConfig
from honed.config.demo import DEMO_SYSTEM_PROMPT
from honed.config.eval import BootstrapSettings
from honed.config.index import DEFAULT_RETRIEVAL_TEMPLATE, IndexConfig, RetrievalSettings
from honed.config.model import DEFAULT_MODEL, ModelConfig
from honed.config.names import ADAPTER_NAME, check_adapter_name, parse_ref
from honed.config.serve import AutoscalingSettings, ServeConfig
from honed.config.train import (
    OPTIMIZERS,
    EarlyStopping,
    EfficiencySettings,
    OptimConfig,
    RegisterConfig,
    ScalingSettings,
    TrainConfig,
    is_val_metric,
)
from honed.config.tune import (
    PER_TRIAL_KEYS,
    SEARCH_DOMAINS,
    SchedulerSettings,
    SearchDomain,
    SearchSettings,
    TrackingSettings,
    TuneConfig,
    check_space_key,
    trial_train_config,
)

# The config of each `honed <command>`.
CONFIGS: dict[str, type[Section]] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "eval": EvalConfig,
    "merge": MergeConfig,
    "serve": ServeConfig,
    "demo": DemoConfig,
    "index": IndexConfig,
}

__all__ = [
    "BootstrapSettings", "ChunkConfig", "DEMO_SYSTEM_PROMPT",
    "DEFAULT_RETRIEVAL_TEMPLATE", "IndexConfig", "RetrievalSettings",
    "ADAPTER_NAME", "AutoscalingSettings", "BiasSettings", "CONFIGS", "ConfigError", "DEFAULT_MODEL",
    "DEFAULT_SYSTEM_PROMPT", "DPOSettings", "DataConfig", "DecontamConfig", "DedupConfig", "DeepSpeedSettings",
    "DemoConfig", "DemoDPOOptim", "DemoDPOSettings", "DemoData", "DemoOptim", "EarlyStopping", "EfficiencySettings",
    "EvalConfig",
    "FILE_KINDS", "FieldMap", "FilterConfig", "GateSettings", "IA3Settings", "LoraSettings", "METHODS",
    "METHOD_SECTIONS", "METHOD_SECTION_NAMES", "MergeConfig", "MethodConfig", "ModelConfig", "NormalizeConfig",
    "OPTIMIZERS", "OptimConfig", "PER_TRIAL_KEYS", "PIIConfig", "PII_TYPES", "PackConfig", "PrefixSettings",
    "PrepareConfig", "QuantSettings", "RegisterConfig", "SEARCH_DOMAINS", "SOURCE_KINDS", "ScalingSettings",
    "SchedulerSettings", "SearchDomain", "SearchSettings", "Section", "ServeConfig", "SourceConfig", "TemplateConfig",
    "TrackingSettings", "TrainConfig", "TuneConfig", "apply_override", "check_adapter_name", "check_space_key",
    "describe_errors", "dump_config", "is_val_metric", "load_config", "parse_ref", "read_yaml", "trial_train_config",
]
