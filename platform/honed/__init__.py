"""honed: turn a general LLM into a domain specialist on Ray.

The public surface is the CLI (`honed --help`) and these names; everything else is internal.
"""

__version__ = "0.1.0"

from honed.config import (  # noqa: E402
    ConfigError, DemoConfig, EvalConfig, MergeConfig, PrepareConfig, ServeConfig, TrainConfig, TuneConfig, load_config,
)

__all__ = [
    "ConfigError", "DemoConfig", "EvalConfig", "MergeConfig", "PrepareConfig", "ServeConfig", "TrainConfig",
    "TuneConfig", "load_config", "__version__",
]
