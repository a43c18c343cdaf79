"""Where stages read and write: a local path or an object-storage URI (s3://, gs://, hdfs://, … through pyarrow.fs).

    is_uri("s3://bucket/runs/data")                        # True; a plain or relative path is local
    join("s3://bucket/runs", "data", "manifest.json")      # "s3://bucket/runs/data/manifest.json"
    with staged("s3://bucket/runs/train") as out:          # a local dir, uploaded to the URI when the block ends
        (out / "report.md").write_text("...")
    local = node_cache("s3://bucket/models/base", "models")   # this node's copy, fetched once under a file lock

S3 endpoints and credentials come from the environment as the AWS SDK reads them (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...): pyarrow's S3 filesystem honours them, which is how tests point it at
a local S3-compatible server. Every node of a cluster needs the same variables (set them per `ray start` or in
the job's runtime_env). Imports no torch and no Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

COMPLETE = ".honed-complete"  # written last into a node-cache copy: a copy without it is refetched


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (object storage or any pyarrow filesystem URI), False for a local path."""
    return "://" in str(path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI; ValueError naming the URI when pyarrow cannot open it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot open '{uri}' ({err}); allowed: a local path or a URI pyarrow opens "
                         "(s3://bucket/dir, gs://bucket/dir, hdfs://host/dir, file:///abs/dir)") from None


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URI or a local path, as a string."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def absolute(path: str | Path) -> str:
    """A URI as it is, a local path made absolute (for work that runs in another directory or process)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def _open(path: str | Path) -> tuple[pafs.FileSystem, str]:
    return filesystem(str(path)) if is_uri(path) else (pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()))


def is_file(path: str | Path) -> bool:
    fs, inner = _open(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    fs, inner = _open(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; FileNotFoundError naming the path when it does not exist."""
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(str(path))
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' does not exist") from None


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file (an object-store PUT is atomic; a local file is written in place)."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return
    fs, inner = filesystem(str(path))
    with fs.open_output_stream(inner) as out:
        out.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def delete_dir(path: str | Path) -> None:
    """Remove a directory (every object under a prefix) if it exists."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(str(path))
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy every file under `uri` into the local directory `local` (created); FileNotFoundError when empty."""
    fs, inner = filesystem(uri)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"'{uri}' is not a directory in object storage (nothing under that prefix)")
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def upload_dir(local: str | Path, uri: str) -> str:
    """Copy every file under the local directory `local` to `uri` (overwriting same-named objects)."""
    fs, inner = filesystem(uri)
    fs.create_dir(inner)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def cache_home() -> Path:
    """This node's honed cache (`HONED_CACHE`, default ~/.cache/honed)."""
    return Path(os.environ.get("HONED_CACHE", Path.home() / ".cache" / "honed"))


def node_cache(uri: str, kind: str, required: str | None = None) -> Path:
    """This node's copy of the directory at `uri` under `HONED_CACHE/<kind>/`, fetched once per node: processes
    that ask at once wait on a file lock and the first one downloads. `required`: a file the copy must hold
    (e.g. config.json), checked before anything is downloaded."""
    from filelock import FileLock

    target = cache_home() / kind / cache_key(uri)
    if (target / COMPLETE).is_file():
        return target
    if required and not is_file(join(uri, required)):
        raise FileNotFoundError(f"'{uri}' has no {required}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / COMPLETE).is_file():
            incoming = target.with_name(f".incoming-{uuid.uuid4().hex}")
            try:
                download_dir(uri, incoming)
                (incoming / COMPLETE).write_text(uri)
                shutil.rmtree(target, ignore_errors=True)
                os.rename(incoming, target)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
    return target


def cache_key(uri: str) -> str:
    """A readable, collision-free directory name for a URI: its last part and a digest of the whole."""
    tail = posixpath.basename(uri.rstrip("/")) or "root"
    return f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def local_copy(path: str | Path):
    """A local directory holding what is at `path`: the path itself when local, else a temporary download
    (removed when the block ends)."""
    if not is_uri(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="honed-") as tmp:
        yield download_dir(str(path), Path(tmp) / "copy")


@contextlib.contextmanager
def staged(output_dir: str | Path):
    """A local directory to write a stage's output into: `output_dir` itself (absolute, created) when local;
    for a URI a temporary directory whose files are uploaded to `output_dir` when the block ends without error."""
    if not is_uri(output_dir):
        out = Path(output_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="honed-stage-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, str(output_dir))
