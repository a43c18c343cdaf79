"""File readers on small hand-made files, without Ray: every record becomes (row, origin, raw JSON, error)."""

import csv
import datetime
import decimal
import gzip
import io
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from honed.config import SourceConfig
from honed.data import sources
from honed.data.sources import FileReader, builtin_rows, list_files, read_lines, record_id


def read(kind: str, path, max_bytes: int = 1000, **options) -> list[tuple[int, str, str, str]]:
    source = SourceConfig(name="src", kind=kind, path=str(path), **options)
    return list(FileReader(source, 0, max_bytes).records(str(path)))


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def text_raw(text: str) -> str:
    return json.dumps({"text": text}, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ JSONL
def test_jsonl_skips_blank_lines_numbers_from_one_and_accepts_crlf_and_no_final_newline(tmp_path):
    p = write(tmp_path / "a.jsonl", b'{"text": "a"}\r\n\r\n\n{"text": "b"}\r\n   \n{"text": "c"}')
    assert read("jsonl", p) == [
        (1, f"{p}:1", '{"text": "a"}', ""),
        (4, f"{p}:4", '{"text": "b"}', ""),
        (6, f"{p}:6", '{"text": "c"}', ""),
    ]


def test_jsonl_byte_order_mark_is_dropped(tmp_path):
    p = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [json.loads(raw) for _, _, raw, _ in read("jsonl", p)] == [{"text": "a"}, {"text": "b"}]


def test_jsonl_non_utf8_line_is_flagged_alone(tmp_path):
    p = write(tmp_path / "a.jsonl", b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    rows = read("jsonl", p)
    assert [(n, error) for n, _, _, error in rows] == [(1, ""), (2, "not_utf8"), (3, "")]
    assert "caf\\xe9" in rows[1][2]
    assert rows[0][2] == '{"text": "one"}' and rows[2][2] == '{"text": "three"}'


@pytest.mark.parametrize("chunk", [7, 8 << 20])
def test_jsonl_too_large_line_does_not_disturb_the_next_lines(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    long_line = '{"text": "' + "x" * 100 + '"}'
    lines = ['{"t": 1}', long_line, '{"t": 3}', "", '{"t": 5}']
    p = write(tmp_path / "a.jsonl", "\n".join(lines).encode())
    rows = read("jsonl", p, max_bytes=20)
    assert rows == [
        (1, f"{p}:1", '{"t": 1}', ""),
        (2, f"{p}:2", long_line[:20], "too_large"),
        (3, f"{p}:3", '{"t": 3}', ""),
        (5, f"{p}:5", '{"t": 5}', ""),
    ]


@pytest.mark.parametrize("chunk", [1, 2, 7, 64])
def test_size_limit_counts_the_line_without_its_line_ending(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    p = write(tmp_path / "a.jsonl", b'"1234567890"\r\n"12345678901"\r\n"12345"')
    assert [(raw, error) for _, _, raw, error in read("jsonl", p, max_bytes=12)] == [
        ('"1234567890"', ""), ('"12345678901', "too_large"), ('"12345"', "")]


def reference_lines(data: bytes, max_bytes: int) -> list[tuple[int, bytes, bool]]:
    """What `read_lines` must give, from the whole input at once."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix(b"\r")
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        out.append((number, line[:max_bytes], len(line) > max_bytes))
    return out


def test_read_lines_matches_a_whole_input_split_at_any_chunk_size(monkeypatch):
    rng = random.Random(0)
    pieces = [b"a", b"bc", b"\n", b"\r", b"\r\n", b"\xff", b"\n\n", b"x" * 9]
    for case in range(600):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        if case % 5 == 0:
            data = b"\xef\xbb\xbf" + data
        max_bytes, chunk = rng.randint(1, 12), rng.randint(1, 9)
        monkeypatch.setattr(sources, "_CHUNK", chunk)
        got = list(read_lines(io.BytesIO(data), max_bytes))
        assert got == reference_lines(data, max_bytes), (data, max_bytes, chunk)


def test_jsonl_gz_reads_like_plain_jsonl(tmp_path):
    data = b'{"text": "a"}\n\n{"text": "b"}\n'
    plain = write(tmp_path / "a.jsonl", data)
    packed = tmp_path / "a.jsonl.gz"
    with gzip.open(packed, "wb") as f:
        f.write(data)
    strip = [(n, raw, error) for n, _, raw, error in read("jsonl", plain)]
    assert strip == [(n, raw, error) for n, _, raw, error in read("jsonl", packed)]
    assert read("jsonl", packed)[1][1] == f"{packed}:3"


# -------------------------------------------------------------------------------------------------- CSV
def test_csv_header_names_fields_and_rows_are_numbered_by_their_first_line(tmp_path):
    p = write(tmp_path / "a.csv", b'text,group\r\n"hello, world",g1\r\n"two\nlines\nhere",g2\r\nplain,g3\r\n')
    rows = read("csv", p)
    assert [(n, origin, error) for n, origin, _, error in rows] == [
        (2, f"{p}:2", ""), (3, f"{p}:3", ""), (6, f"{p}:6", "")]
    assert [json.loads(raw) for _, _, raw, _ in rows] == [
        {"text": "hello, world", "group": "g1"},
        {"text": "two\nlines\nhere", "group": "g2"},
        {"text": "plain", "group": "g3"},
    ]


def test_csv_wrong_column_count_is_malformed_and_blank_lines_are_skipped(tmp_path):
    p = write(tmp_path / "a.csv", b"text,group\none,g1\n\ntwo,g2,extra\nthree\nfour,g4\n\n")
    rows = read("csv", p)
    assert [(n, error) for n, _, _, error in rows] == [
        (2, ""), (4, "malformed_csv"), (5, "malformed_csv"), (6, "")]
    assert rows[1][2] == "two,g2,extra"
    assert json.loads(rows[3][2]) == {"text": "four", "group": "g4"}


def test_csv_non_utf8_row_is_flagged_alone(tmp_path):
    p = write(tmp_path / "a.csv", b"text,group\none,g1\ncaf\xe9,g2\nthree,g3\n")
    rows = read("csv", p)
    assert [(n, error) for n, _, _, error in rows] == [(2, ""), (3, "not_utf8"), (4, "")]
    assert rows[1][2] == repr(b"caf\xe9,g2")


def test_tsv_uses_tabs_also_gzipped(tmp_path):
    data = b"text\tgroup\na, b\tg1\n"
    plain = write(tmp_path / "a.tsv", data)
    packed = tmp_path / "a.tsv.gz"
    with gzip.open(packed, "wb") as f:
        f.write(data)
    for p in (plain, packed):
        assert [json.loads(raw) for _, _, raw, _ in read("csv", p)] == [{"text": "a, b", "group": "g1"}]
    assert (tmp_path / "a.tsv.gz").name.endswith(sources.EXTENSIONS["csv"])


def test_csv_byte_order_mark_does_not_rename_the_first_column(tmp_path):
    p = write(tmp_path / "excel.csv", b"\xef\xbb\xbftext,group\nhi,g\n")
    assert json.loads(read("csv", p)[0][2]) == {"text": "hi", "group": "g"}


def test_csv_row_over_the_size_limit_is_too_large(tmp_path):
    p = write(tmp_path / "a.csv", ("text\n" + "é" * 20 + "\nshort\n").encode())
    # JSON text {"text": "éé…"} is 32 characters but 52 UTF-8 bytes
    assert [(n, error) for n, _, _, error in read("csv", p, max_bytes=40)] == [(2, "too_large"), (3, "")]


@pytest.fixture
def csv_field_limit():
    old = csv.field_size_limit()
    csv.field_size_limit(100)
    yield
    csv.field_size_limit(old)


def test_csv_field_over_the_csv_module_limit(tmp_path, csv_field_limit):
    p = write(tmp_path / "a.csv", ("text,group\n" + "y" * 300 + ",g\nnext,g\n").encode())
    # our limit above the csv module's: the module's is raised, the field is read
    assert [error for *_, error in read("csv", p, max_bytes=1000)] == ["", ""]
    csv.field_size_limit(100)
    # our limit below it: the module refuses the field; that row is too large, the next one reads fine
    assert [(n, error) for n, _, _, error in read("csv", p, max_bytes=50)] == [(2, "too_large"), (3, "")]


def test_csv_header_problems(tmp_path):
    assert read("csv", write(tmp_path / "empty.csv", b"")) == []
    with pytest.raises(ValueError, match="header is not UTF-8"):
        read("csv", write(tmp_path / "bad.csv", b"t\xe9xt\nhi\n"))


# ---------------------------------------------------------------------------------------------- Parquet
def test_parquet_rows_are_numbered_across_row_groups_and_batches(tmp_path):
    p = tmp_path / "a.parquet"
    table = pa.table({"text": [f"row {i}" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, p, row_group_size=700)
    assert pq.ParquetFile(p).num_row_groups == 4
    rows = read("parquet", p)
    assert [(n, origin) for n, origin, _, _ in rows] == [(i, f"{p}#{i}") for i in range(2500)]
    assert all(error == "" for *_, error in rows)
    assert [json.loads(raw) for _, _, raw, _ in rows[698:702]] == table.select(["text"]).slice(698, 4).to_pylist()


@pytest.mark.parametrize("column, python_type", [
    (pa.array([datetime.datetime(2024, 1, 2, 3, 4)]), datetime.datetime),
    (pa.array([b"\x00\x01"], pa.binary()), bytes),
    (pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)), decimal.Decimal),
])
def test_parquet_value_json_cannot_hold_is_unsupported(tmp_path, column, python_type):
    p = tmp_path / "a.parquet"
    table = pa.table({"text": ["hi"], "odd": column, "other": column})
    value = table.to_pylist()[0]["odd"]
    assert type(value) is python_type
    with pytest.raises(TypeError):
        json.dumps(value)
    pq.write_table(table, p)
    [(number, origin, raw, error)] = read("parquet", p, fields={"group": "odd"})
    assert (number, origin) == (0, f"{p}#0")
    assert error.startswith("unsupported_value: ") and python_type.__name__ in error
    [(_, _, raw, error)] = read("parquet", p)          # unmapped columns are not read at all
    assert error == "" and json.loads(raw) == {"text": "hi"}
    assert "hi" in raw


def test_parquet_row_over_the_size_limit_is_too_large(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["é" * 20, "ok"]}), p)
    # {"text": "éé…"} is 32 characters but 52 UTF-8 bytes
    assert [(n, error) for n, _, _, error in read("parquet", p, max_bytes=40)] == [(0, "too_large"), (1, "")]


# ------------------------------------------------------------------------------------------------- text
TEXT = b"First para\r\nline two\n\n\nSecond\n   \nThird\n"


def test_text_paragraphs_start_at_their_first_line(tmp_path):
    p = write(tmp_path / "a.txt", TEXT)
    assert read("text", p) == [
        (1, f"{p}:1", text_raw("First para\nline two"), ""),
        (5, f"{p}:5", text_raw("Second"), ""),
        (7, f"{p}:7", text_raw("Third"), ""),
    ]


def test_text_lines(tmp_path):
    p = write(tmp_path / "a.txt", TEXT)
    assert [(n, raw) for n, _, raw, _ in read("text", p, text_unit="line")] == [
        (1, text_raw("First para")), (2, text_raw("line two")), (5, text_raw("Second")), (7, text_raw("Third"))]


def test_text_whole_file(tmp_path):
    p = write(tmp_path / "a.md", "# Título\n\nbody\n".encode())
    assert read("text", p, text_unit="file") == [(1, f"{p}:1", text_raw("# Título\n\nbody\n"), "")]
    assert [error for *_, error in read("text", p, max_bytes=10, text_unit="file")] == ["too_large"]
    assert read("text", write(tmp_path / "blank.txt", b" \n\n"), text_unit="file") == []


def test_text_non_utf8_paragraph_is_flagged_alone(tmp_path):
    p = write(tmp_path / "a.txt", b"good one\n\nbad \xff here\nstill bad\n\ngood two\n")
    rows = read("text", p)
    assert [(n, error) for n, _, _, error in rows] == [(1, ""), (3, "not_utf8"), (6, "")]
    assert rows[2][2] == text_raw("good two")


def test_text_oversized_paragraph_is_one_record(tmp_path):
    p = write(tmp_path / "a.txt", b"aaaaaaa\nbbbbbbb\nccccccc\nddddddd\n\nshort\n")
    rows = read("text", p, max_bytes=20)
    assert [(n, error) for n, _, _, error in rows] == [(1, "too_large"), (6, "")]
    assert rows[0][2].startswith("aaaaaaa\nbbbbbbb")


# ---------------------------------------------------------------------------------------------- listing
@pytest.fixture
def tree(tmp_path):
    d = tmp_path / "data"
    (d / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "notes.txt", "sub/c.jsonl.gz", "sub/deeper/d.json", "sub/e.csv"):
        (d / name).write_bytes(b"")
    return d


def source(path, kind="jsonl") -> SourceConfig:
    return SourceConfig(name="corpus", kind=kind, path=str(path))


def test_list_a_file_even_with_glob_characters_in_its_name(tmp_path):
    p = write(tmp_path / "part[1].jsonl", b"")
    assert list_files(source(p)) == [str(p)]


def test_list_a_directory_gives_the_kinds_extensions_recursively_sorted_absolute(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    expected = [str(tree / n) for n in ("a.jsonl", "b.jsonl", "sub/c.jsonl.gz", "sub/deeper/d.json")]
    assert list_files(source("data")) == expected
    assert list_files(source("data", kind="text")) == [str(tree / "notes.txt")]


def test_list_a_glob(tree):
    assert list_files(source(tree / "*.jsonl")) == [str(tree / "a.jsonl"), str(tree / "b.jsonl")]
    assert list_files(source(tree / "**" / "*.json*")) == [
        str(tree / n) for n in ("a.jsonl", "b.jsonl", "sub/c.jsonl.gz", "sub/deeper/d.json")]


@pytest.mark.parametrize("path", ["missing", "missing/*.jsonl", "file://{tmp}/missing", "file://{tmp}/missing/*.jsonl"])
def test_list_nothing_there_names_the_source_and_path(tmp_path, path):
    path = path.format(tmp=tmp_path) if "://" in path else str(tmp_path / path)
    with pytest.raises(FileNotFoundError, match=f"source 'corpus'.*'{re.escape(path)}'"):
        list_files(source(path))


def test_list_a_directory_with_only_other_kinds(tree):
    with pytest.raises(FileNotFoundError, match="parquet"):
        list_files(source(tree, kind="parquet"))


def test_list_uri_directory_and_glob_agree_with_local(tree):
    def uris(pattern):
        return list_files(source(f"file://{pattern}"))

    def local(pattern):
        return ["file://" + f for f in list_files(source(pattern))]

    assert uris(tree) == local(tree)
    assert uris(f"{tree}/*.jsonl") == local(f"{tree}/*.jsonl")  # `*` stays in one directory
    assert uris(f"{tree}/**/*.json*") == local(f"{tree}/**/*.json*")
    assert uris(f"{tree}/sub/?.jsonl.gz") == [f"file://{tree}/sub/c.jsonl.gz"]
    assert uris(tree / "a.jsonl") == [f"file://{tree}/a.jsonl"]


def write_all_kinds(d):
    write(d / "a.jsonl", b'{"text": "j1"}\n{"text": "j2"}\n')
    with gzip.open(d / "b.jsonl.gz", "wb") as f:
        f.write(b'{"text": "g1"}\n')
    write(d / "c.csv", b"text\nc1\n")
    write(d / "d.txt", b"t1\n\nt2\n")
    pq.write_table(pa.table({"text": ["p1", "p2"]}), d / "e.parquet")


@pytest.mark.parametrize("kind, path, texts", [
    ("jsonl", "", ["j1", "j2", "g1"]),
    ("csv", "c.csv", ["c1"]),
    ("text", "*.txt", ["t1", "t2"]),
    ("parquet", "e.parquet", ["p1", "p2"]),
])
def test_reading_through_a_file_uri(tmp_path, kind, path, texts):
    write_all_kinds(tmp_path)
    uri = f"file://{tmp_path}/{path}".rstrip("/")
    files = list_files(source(uri, kind=kind))
    assert all(f.startswith("file:///") for f in files)
    reader = FileReader(source(uri, kind=kind), 0, 1000)
    rows = [(f, row) for f in files for row in reader.records(f)]
    assert [json.loads(raw)["text"] for _, (_, _, raw, _) in rows] == texts
    assert all(error == "" and origin == f"{f}{'#' if kind == 'parquet' else ':'}{n}"
               for f, (n, origin, _, error) in rows)


# ------------------------------------------------------------------------------------------- ids, batches
def test_record_ids_follow_reading_order_and_stay_in_range():
    assert record_id(0, 0, 2**32 - 1) < record_id(0, 1, 0) < record_id(1, 0, 0) < record_id(255, 2**23 - 1, 2**32 - 1)
    assert record_id(255, 2**23 - 1, 2**32 - 1) == 2**63 - 1
    for bad in [(256, 0, 0), (0, 2**23, 0), (0, 0, 2**32), (0, 0, -1)]:
        with pytest.raises(ValueError, match="out of range"):
            record_id(*bad)


def test_file_reader_batches_carry_ids_in_reading_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "ROWS_PER_BATCH", 2)
    first = write(tmp_path / "a.jsonl", b'{"text": "1"}\n\n{"text": "2"}\n\xff\n{"text": "3"}\n')
    second = write(tmp_path / "b.jsonl", b'{"text": "4"}\n{"text": "5"}\n')
    reader = FileReader(source(first), 3, 1000)
    batches = list(reader({"path": [str(first), str(second)], "file_index": [0, 1]}))
    assert [len(b["id"]) for b in batches] == [2, 2, 2]  # a batch never mixes files
    columns = {key: [v for b in batches for v in b[key]] for key in batches[0]}
    assert set(columns) == {"source", "id", "origin", "raw", "error"}
    assert columns["id"] == [record_id(3, 0, n) for n in (1, 3, 4, 5)] + [record_id(3, 1, n) for n in (1, 2)]
    assert columns["id"] == sorted(set(columns["id"]))
    assert columns["error"] == ["", "", "not_utf8", "", "", ""]
    assert columns["source"] == ["corpus"] * 6
    assert columns["origin"][4] == f"{second}:1"


def test_builtin_rows_have_the_file_row_shape():
    rows = builtin_rows(SourceConfig(name="kjv", kind="kjv", max_records=5), 2, seed=0)
    assert len(rows) == 5
    assert all(set(r) == {"source", "id", "origin", "raw", "error"} for r in rows)
    assert [r["id"] for r in rows] == [record_id(2, 0, i) for i in range(5)]
    assert [r["origin"] for r in rows] == [f"kjv:{i}" for i in range(5)]
    assert all(r["source"] == "kjv" and r["error"] == "" and json.loads(r["raw"])["text"] for r in rows)
    assert rows == builtin_rows(SourceConfig(name="kjv", kind="kjv", max_records=5), 2, seed=0)
