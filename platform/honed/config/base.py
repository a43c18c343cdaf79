"""What every config shares: the `Section` base, loading YAML with `a.b=c` overrides, and error messages.

    cfg = load_config(TrainConfig, "jobs/train_lora.yaml", ["optim.lr=3e-4"])
    print(dump_config(cfg))   # the YAML form, which loads back
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config could not be loaded; the message names each bad key, its value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def load_config(cls: type[Section], path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read YAML (a Serve config file gives its first application's `args`), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if "applications" in data:
            data = dict(data["applications"][0].get("args") or {})
    for item in overrides:
        apply_override(data, item)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {cls.__name__}{where}:\n" + describe_errors(cls, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b=c`: set data['a']['b'] to c parsed as YAML (so numbers, booleans and lists work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like key=value or a.b.c=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' holds a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        node[parts[-1]] = raw


def describe_errors(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(cls, e["loc"][:-1])) or "none"
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        else:
            lines.append(f"  {key} = {e['input']!r}: {e['msg']}")
    return "\n".join(lines)


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section found by walking `loc` from `cls` (list indexes and the keys of a mapping of
    sections, such as TuneConfig.space, are skipped)."""
    keyed = False
    for part in loc:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = cls.model_fields.get(part)
        sub = section_type(field.annotation) if field else None
        if sub is None:
            return []
        keyed = getattr(field.annotation, "__origin__", None) is dict
        cls = sub
    return list(cls.model_fields)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class an annotation holds (`X`, `X | None`, `dict[str, X]`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = section_type(arg)
        if found:
            return found
    return None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
