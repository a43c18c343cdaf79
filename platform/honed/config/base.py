"""What every config shares: the `Section` base, loading YAML with `a.b=c` overrides, and error messages.

    cfg = load_config(TrainConfig, "jobs/train_lora.yaml", ["optim.lr=3e-4"])
    print(dump_config(cfg))   # the YAML form, which loads back
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_jsonable_python


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
        apply_override(data, item, cls)
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


def apply_override(data: dict[str, Any], item: str, cls: type[BaseModel] | None = None) -> None:
    """`a.b=c`: set data['a']['b'] to c parsed as YAML (so numbers, booleans and lists work). A number picks a list
    item: `data.sources.0.path=x`. With `cls`, a list the YAML leaves out starts from that field's default, so
    `honed demo data.sources.0.max_records=50` edits the demo's own sources."""
    key, sep, raw = item.partition("=")
    parts = key.split(".")
    if not sep or not key or any(not part for part in parts):
        raise ConfigError(f"override '{item}' must look like key=value or a.b.c=value (a number picks a list item: "
                          "data.sources.0.path=x)")
    node: Any = data
    for depth in range(len(parts) - 1):
        node = _child(node, parts, depth, item, cls)
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts[:-1], item)] = _parse_value(raw)
    else:
        node[parts[-1]] = _parse_value(raw)


def _child(node: Any, parts: list[str], depth: int, item: str, cls: type[BaseModel] | None) -> Any:
    """The section or list named by `parts[:depth + 1]` inside `node`, created when the YAML left it out."""
    part, path = parts[depth], parts[:depth + 1]
    if isinstance(node, list):
        child = node[_list_index(node, part, path[:-1], item)]
    elif part in node:
        child = node[part]
    else:
        default = _field_default(cls, path)
        if parts[depth + 1].isdigit() and not isinstance(default, list):
            raise ConfigError(f"override '{item}': {'.'.join(path)} is not set, so it has no item {parts[depth + 1]}; "
                              f"set the whole list: {'.'.join(path)}=[...]")
        child = node[part] = to_jsonable_python(default) if isinstance(default, list) else {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override '{item}': {'.'.join(path)} holds the value {child!r}, not a section or a list")
    return child


def _list_index(items: list, part: str, path: list[str], item: str) -> int:
    """`part` as an index of `items` (the list at `path`), or a ConfigError naming the list and its indices."""
    name = ".".join(path)
    allowed = f"allowed indices: 0 to {len(items) - 1}" if items else "it is empty: no index is allowed"
    if not part.isdigit():
        raise ConfigError(f"override '{item}': {name} is a list of {len(items)} items, so '{part}' must be an item "
                          f"number; {allowed}")
    if int(part) >= len(items):
        raise ConfigError(f"override '{item}': index {part} is out of range for {name}, a list of {len(items)} "
                          f"items; {allowed} (to add items, set the whole list: {name}=[...])")
    return int(part)


def _field_default(cls: type[BaseModel] | None, path: list[str]) -> Any:
    """The default of the field at `path` (field names from `cls`; list item numbers are skipped), or None when
    `cls` has no such field or it has no default."""
    field = None
    for part in path:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part) if cls else None
        if field is None:
            return None
        cls = section_type(field.annotation)
    return None if field is None or field.is_required() else field.get_default(call_default_factory=True)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        return raw


def describe_errors(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(cls, e["loc"][:-1])) or "none"
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        elif e["type"] == "missing":
            section = _section_at(cls, e["loc"][:-1])
            field = section.model_fields.get(str(e["loc"][-1])) if section else None
            about = f" ({' '.join(field.description.split())})" if field and field.description else ""
            lines.append(f"  {key}: required, has no default{about}")
        else:
            lines.append(f"  {key} = {e['input']!r}: {e['msg']}")
    return "\n".join(lines)


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    section = _section_at(cls, loc)
    return list(section.model_fields) if section else []


def _section_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class found by walking `loc` from `cls` (list indexes and the keys of a mapping of sections,
    such as TuneConfig.space, are skipped); None where `loc` leads to a plain value."""
    keyed = False
    for part in loc:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = cls.model_fields.get(part)
        sub = section_type(field.annotation) if field else None
        if sub is None:
            return None
        keyed = getattr(field.annotation, "__origin__", None) is dict
        cls = sub
    return cls


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
