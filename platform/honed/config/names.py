"""Adapter names and registry refs: one rule for the registry, `register.name` and the `model` a request names.

    check_adapter_name("icd10-lora")   # → "icd10-lora"
    parse_ref("icd10-lora@2")          # → ("icd10-lora", 2); `name` and `name@latest` → (name, None)

Bad input raises ValueError saying what is allowed (the registry turns it into RegistryError).
"""

from __future__ import annotations

import re

# Names and versions become directory levels of the registry, so both are checked before any path is built.
ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION = re.compile(r"[1-9][0-9]{0,8}")


def check_adapter_name(name: str) -> str:
    """The name if it is a valid adapter name (`ADAPTER_NAME`, without `..`), else ValueError saying what is allowed."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"adapter name {name!r} is not allowed: use 1-64 characters of a-z 0-9 . _ -, starting "
                         "with a letter or digit, without '..'")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@latest` → (name, None); `name@N` → (name, N); else ValueError saying what is allowed."""
    name, sep, version = ref.partition("@") if isinstance(ref, str) else (ref, "", "")
    check_adapter_name(name)
    if not sep or version == "latest":
        return name, None
    if not VERSION.fullmatch(version):
        raise ValueError(f"ref {ref!r}: the version must be an integer ≥ 1 or 'latest' (name@3, name@latest)")
    return name, int(version)
