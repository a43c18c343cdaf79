"""The adapter registry: versioned PEFT adapters with what serving needs to trust them, in a directory or bucket.

    honed registry add icd10-lora runs/train/adapter --eval runs/eval/eval.json   # → icd10-lora@1
    honed registry list --registry s3://bucket/registry
    honed registry show icd10-lora@latest | honed registry remove icd10-lora@1

    registry = Registry("runs/registry")
    path = registry.local_dir("icd10-lora")            # the latest version's files, downloaded when remote
    base = registry.show("icd10-lora@2")["base_weights_sha256"]

Layout: `<root>/<name>/<N>/{adapter_config.json, *.safetensors, honed.json[, README.md]}`. honed.json is the
one `honed train` wrote (base model and its weights hash, template with stop tokens, dataset manifest hash)
plus name, version, adapter_sha256, registered_at, promotable and eval. Versions are immutable except for
`promotable` (set by an eval gate). A version is listed only once its honed.json exists: locally it is
written under a temporary name and renamed into place; on object stores honed.json is written last.
Refs are `name`, `name@N` or `name@latest`; names and versions are validated before any path is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from honed.artifacts import META, read_meta
from honed.config.names import VERSION, check_adapter_name
from honed.config.names import parse_ref as parse_adapter_ref
from honed.storage import cache_home

DEFAULT_REGISTRY = "runs/registry"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
EVAL_FIGURES = ("exact_match", "token_f1", "rouge_l")


class RegistryError(ValueError):
    """A bad name, ref or adapter directory; the message says what was wrong and what is allowed."""


class AdapterNotFound(RegistryError):
    """An unknown adapter name or version; the message lists the known ones."""


def check_name(name: str) -> str:
    """The name if it is a valid adapter name, else RegistryError saying what is allowed."""
    try:
        return check_adapter_name(name)
    except ValueError as err:
        raise RegistryError(str(err)) from None


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@latest` → (name, None); `name@N` → (name, N); else RegistryError saying what is allowed."""
    try:
        return parse_adapter_ref(ref)
    except ValueError as err:
        raise RegistryError(str(err)) from None


def safetensors_sha256(directory: str | Path) -> str:
    """sha256 over the directory's *.safetensors bytes in name order (what `adapter_sha256` records)."""
    from honed.models import weights_hash  # the same digest as a base model's; imported late: it pulls in torch

    return weights_hash(str(directory))


def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of an adapter directory that a version holds (honed.json apart); RegistryError for anything else."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(f"'{adapter_dir}' is not a PEFT adapter directory (adapter_config.json missing)")
    pickled = sorted(str(p.relative_to(adapter_dir)) for p in adapter_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise RegistryError(f"'{adapter_dir}' holds pickle files ({', '.join(pickled)}); the registry takes "
                            "safetensors weights only (save_pretrained(..., safe_serialization=True))")
    weights = sorted(adapter_dir.glob("*.safetensors"))
    if not weights:
        raise RegistryError(f"'{adapter_dir}' has no *.safetensors weight file")
    readme = [adapter_dir / "README.md"] if (adapter_dir / "README.md").is_file() else []
    return [adapter_dir / "adapter_config.json", *weights, *readme]


class Registry:
    """Adapters under a local directory or a URI that pyarrow opens (file://, s3://, gs://, hdfs://, ...)."""

    def __init__(self, uri: str, cache_dir: str | None = None):
        self.uri = uri
        self.remote = "://" in uri
        if self.remote:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(uri).resolve())
        self.root = root.rstrip("/")
        self.local_fs = isinstance(self.fs, pafs.LocalFileSystem)  # where symlinks could lead reads astray
        default = cache_home() / "registry" / hashlib.sha256(uri.encode()).hexdigest()[:16]  # this node's copies
        self.cache_dir = Path(cache_dir) if cache_dir else default

    # ------------------------------------------------------------------------------------------- the API
    def add(self, name: str, adapter_dir: str, eval_results: dict | None = None,
            base_weights_sha256: str | None = None) -> str:
        """Register `adapter_dir` (as `honed train` exports it) as the next version of `name`; returns `name@N`."""
        check_name(name)
        source = Path(adapter_dir)
        files = adapter_files(source)
        meta = read_meta(source)
        meta["base_weights_sha256"] = base_weights_sha256 or meta.get("base_weights_sha256")
        if not meta["base_weights_sha256"]:
            raise RegistryError(f"'{adapter_dir}' has no base_weights_sha256 in {META}: register adapters that "
                                "`honed train` exported, or give base_weights_sha256 (honed.models.weights_hash)")
        version = max(self._version_dirs(name), default=0) + 1
        meta |= {"name": name, "version": version, "adapter_sha256": safetensors_sha256(source),
                 "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "promotable": True, "eval": eval_results if eval_results is not None else meta.get("eval")}
        self._write_version(name, version, files, meta)
        return f"{name}@{version}"

    def list(self) -> list[dict]:
        """One summary row per complete version, by name then version."""
        return [list_row(self._meta(name, version)) for name in self.names() for version in self.versions(name)]

    def show(self, ref: str) -> dict:
        """The honed.json of a version (the latest without one)."""
        return self._meta(*self._find(ref))

    def resolve(self, ref: str) -> str:
        """The canonical `name@N` of a ref (`name` and `name@latest` give the highest complete version)."""
        name, version = self._find(ref)
        return f"{name}@{version}"

    def local_dir(self, ref: str) -> str:
        """A local directory holding the version's files: the version itself for a local registry, else a copy
        under `cache_dir` whose weights match the registered adapter_sha256."""
        name, version = self._find(ref)
        if not self.remote:
            path = self._path(name, version)
            for f in self.fs.get_file_info(pafs.FileSelector(path)):
                self._inside(f.path)
            return path
        expected = self._meta(name, version)["adapter_sha256"]
        target = self.cache_dir / name / str(version)
        if target.is_dir() and safetensors_sha256(target) == expected:
            return str(target)
        return str(self._download(name, version, target, expected))

    def publish(self, ref: str, root: str) -> str:
        """Copy a version to `<root>/<name@N>/`: the flat layout vLLM reads adapters from (Ray Serve LLM's
        `dynamic_lora_loading_path`, an s3:// or gs:// URI). Returns that adapter id, `name@N`."""
        name, version = self._find(ref)
        source = self._path(name, version)
        files = [self._inside(f.path) for f in self.fs.get_file_info(pafs.FileSelector(source))
                 if f.type == pafs.FileType.File]
        return publish_adapter(self.fs, files, root, f"{name}@{version}", self._meta(name, version))

    def remove(self, ref: str) -> list[str]:
        """Delete one version (`name@N`, `name@latest`) or every version of `name`; returns the refs removed."""
        if "@" not in ref:
            name = check_name(ref)
            removed = [f"{name}@{v}" for v in self._require_versions(name)]
            self.fs.delete_dir(self._inside(self._path(name)))
            return removed
        name, version = self._find(ref)
        self.fs.delete_dir(self._inside(self._path(name, version)))
        return [f"{name}@{version}"]

    def set_promotable(self, ref: str, promotable: bool, reason: str | None = None) -> dict:
        """Mark a version (not) promotable, e.g. by an eval gate; the one change a registered version allows."""
        name, version = self._find(ref)
        meta = self._meta(name, version) | {"promotable": bool(promotable), "promotable_reason": reason}
        self._write_json(f"{self._path(name, version)}/{META}", meta)
        return meta

    def names(self) -> list[str]:
        return sorted(name for name in self._children(self.root) if _valid_name(name) and self.versions(name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of `name` (those whose honed.json exists), ascending."""
        return [v for v in self._version_dirs(name) if self._is_file(f"{self._path(name, v)}/{META}")]

    # --------------------------------------------------------------------------------------------- paths
    def _path(self, name: str, version: int | None = None) -> str:
        """`<root>/<name>[/<version>]` from a validated name and an int version, checked to stay under the root."""
        parts = [check_name(name)] + ([] if version is None else [str(int(version))])
        path = posixpath.normpath(posixpath.join(self.root, *parts))
        if not path.startswith(self.root + "/"):
            raise RegistryError(f"'{path}' is outside the registry {self.uri}")
        return path

    def _inside(self, path: str) -> str:
        """Refuse a local path that resolves (through a symlink) outside the registry root."""
        if self.local_fs:
            real, root = os.path.realpath(path), os.path.realpath(self.root)
            if real != root and not real.startswith(root + os.sep):
                raise RegistryError(f"'{path}' leads outside the registry {self.uri} (to {real}); refusing to read it")
        return path

    def _find(self, ref: str) -> tuple[str, int]:
        name, version = parse_ref(ref)
        versions = self._require_versions(name)
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise AdapterNotFound(f"adapter {name} has no version {version}; known: "
                                  f"{', '.join(f'{name}@{v}' for v in versions)}")
        return name, version

    def _require_versions(self, name: str) -> list[int]:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise AdapterNotFound(f"no adapter named '{name}' in the registry {self.uri}; known: {known}")
        return versions

    # -------------------------------------------------------------------------------------------- storage
    def _children(self, path: str) -> list[str]:
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except NotADirectoryError:
            return []
        return [posixpath.basename(e.path) for e in entries if e.type == pafs.FileType.Directory]

    def _version_dirs(self, name: str) -> list[int]:
        """Every version directory of `name`, complete or not (a new version numbers past both)."""
        return sorted(int(v) for v in self._children(self._path(name)) if VERSION.fullmatch(v))

    def _is_file(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _meta(self, name: str, version: int) -> dict:
        path = self._inside(f"{self._path(name, version)}/{META}")
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def _write_json(self, path: str, data: dict) -> None:
        """Whole or not at all: a local file is replaced by rename, an object store PUT is atomic already."""
        body = json.dumps(data, indent=2).encode()
        if self.remote:
            with self.fs.open_output_stream(path) as out:
                out.write(body)
            return
        tmp = f"{self._inside(path)}.{uuid.uuid4().hex}.tmp"
        Path(tmp).write_bytes(body)
        os.replace(tmp, path)

    def _write_version(self, name: str, version: int, files: list[Path], meta: dict) -> None:
        final = self._path(name, version)
        # Locally the version is built under a name that is never listed, then renamed into place (atomic; it
        # fails if a concurrent add took the number). Object stores have no rename: honed.json goes last.
        target = final if self.remote else f"{self._path(name)}/.incoming-{uuid.uuid4().hex}"
        self.fs.create_dir(target)
        try:
            for f in files:
                with open(f, "rb") as src, self.fs.open_output_stream(f"{target}/{f.name}") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
            with self.fs.open_output_stream(f"{target}/{META}") as out:
                out.write(json.dumps(meta, indent=2).encode())
            if not self.remote:
                os.rename(target, final)
        except BaseException:
            self.fs.delete_dir(target)
            raise

    def _download(self, name: str, version: int, target: Path, expected: str) -> Path:
        """Copy a remote version into the cache under a temporary name, check its weights, rename into place."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".incoming-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            pafs.copy_files(self._path(name, version), str(tmp), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            got = safetensors_sha256(tmp)
            if got != expected:
                raise RegistryError(f"{name}@{version}: the downloaded weights hash to {got[:12]}…, not the "
                                    f"registered adapter_sha256 {expected[:12]}…; the registry copy was altered")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def publish_adapter(fs: pafs.FileSystem, files: list[str], root: str, adapter_id: str, meta: dict) -> str:
    """Copy an adapter's `files` (paths on `fs`) to `<root>/<adapter_id>/` with `meta` as honed.json, written last
    so a half-copied adapter never looks complete. A copy there whose honed.json has the same adapter_sha256 is
    kept as it is. Returns `adapter_id`."""
    dest_fs, dest_root = pafs.FileSystem.from_uri(root)
    target = f"{dest_root.rstrip('/')}/{adapter_id}"
    if dest_fs.get_file_info(f"{target}/{META}").type == pafs.FileType.File:
        with dest_fs.open_input_stream(f"{target}/{META}") as stream:
            if json.loads(stream.read()).get("adapter_sha256") == meta["adapter_sha256"]:
                return adapter_id
    dest_fs.create_dir(target)
    for path in files:
        if posixpath.basename(path) != META:
            with fs.open_input_stream(path) as src, dest_fs.open_output_stream(
                    f"{target}/{posixpath.basename(path)}") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    with dest_fs.open_output_stream(f"{target}/{META}") as out:
        out.write(json.dumps(meta, indent=2).encode())
    return adapter_id


def _valid_name(name: str) -> bool:
    try:
        return bool(check_adapter_name(name))
    except ValueError:
        return False


def list_row(meta: dict) -> dict:
    """A `list` row: identity, hashes (12 hex digits), promotable, and the tuned model's headline eval figures."""
    scores = (meta.get("eval") or {}).get("scores") or {}
    tuned = scores.get("tuned") or {}
    row = {"name": meta["name"], "version": meta["version"], "base_model": meta.get("base_model"),
           "base_weights_sha256": meta["base_weights_sha256"][:12], "adapter_sha256": meta["adapter_sha256"][:12],
           "registered_at": meta.get("registered_at"), "promotable": meta.get("promotable", True)}
    return row | {k: tuned[k] for k in EVAL_FIGURES if k in tuned}


def list_table(rows: list[dict]) -> str:
    """`list` rows as aligned columns, as `honed registry list` prints them."""
    if not rows:
        return "(no adapters)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [columns] + [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)
