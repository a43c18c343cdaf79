"""`a.b=c` overrides reach list items (`data.sources.0.path=x`), name a bad index or key precisely, and the
override example in the header of every job file under jobs/ (and jobs/submit/) loads and takes effect."""

import os
import shlex
from pathlib import Path

import pytest
import yaml

from honed.cli import parse_command, parser
from honed.config import CONFIGS, ConfigError, DemoConfig, PrepareConfig, apply_override, load_config
from honed.jobs import load_job, resolve_address

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "jobs" / "prepare_corpus.yaml"
JOB_CONFIGS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")
SUBMIT_FILES = sorted((ROOT / "jobs" / "submit").glob("*.yaml"))


def test_list_items_are_addressed_by_number():
    cfg = load_config(PrepareConfig, CORPUS, ["data.sources.0.path=/data/notes/*.jsonl", "data.sources.1.weight=0.5",
                                              "data.sources.0.fields.prompt=q", "data.decontaminate.paths.0=/e.jsonl"])
    notes, dialogues = cfg.data.sources[:2]
    assert (notes.path, notes.fields.prompt, notes.fields.response) == ("/data/notes/*.jsonl", "q", "answer")
    assert dialogues.weight == 0.5 and dialogues.format == "chat"   # the rest of the item is the file's
    assert cfg.data.decontaminate.paths == ["/e.jsonl"]
    assert load_config(PrepareConfig, CORPUS, ["data.sources.2={name: b, kind: kjv}"]).data.sources[2].kind == "kjv"


def test_a_list_the_file_leaves_out_starts_from_the_configs_default():
    cfg = load_config(DemoConfig, None, ["data.sources.0.max_records=50"])
    assert [(s.name, s.max_records) for s in cfg.data.sources] == [("icd10", 50), ("kjv", 200)]
    assert cfg.data.sources[0].chapters == ["4", "9", "10"]
    assert load_config(DemoConfig).data.sources[0].max_records is None  # the default itself is untouched


@pytest.mark.parametrize("config, item, expected", [
    (CORPUS, "data.sources.4.path=x", "override 'data.sources.4.path=x': index 4 is out of range for data.sources, "
                                      "a list of 4 items; allowed indices: 0 to 3 (to add items, set the whole list: "
                                      "data.sources=[...])"),
    (CORPUS, "data.sources.notes.path=x", "data.sources is a list of 4 items, so 'notes' must be an item number; "
                                          "allowed indices: 0 to 3"),
    (CORPUS, "data.sources.-1.path=x", "'-1' must be an item number; allowed indices: 0 to 3"),
    (CORPUS, "data.sources.0.pth=x", "data.sources.0.pth: unknown key; allowed here: name, kind, path, format,"),
    (CORPUS, "data.sources.1.weight=heavy", "data.sources.1.weight = 'heavy': Input should be a valid number"),
    (CORPUS, "data.max_seq_len.0=1", "data.max_seq_len holds the value 1024, not a section or a list"),
    (CORPUS, "data.filters.scripts.2=latin", "index 2 is out of range for data.filters.scripts, a list of 1 items; "
                                             "allowed indices: 0 to 0"),
    (None, "data.sources.0.path=x", "data.sources is not set, so it has no item 0; set the whole list: "
                                    "data.sources=[...]"),
    (None, "data.decontaminate.paths.0=x", "index 0 is out of range for data.decontaminate.paths, a list of 0 "
                                           "items; it is empty: no index is allowed"),
])
def test_bad_list_overrides_name_the_list_its_length_and_the_allowed_indices(config, item, expected):
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, config, [item])
    assert expected in str(err.value)


def test_apply_override_without_a_class_walks_plain_data():
    data = {"a": [{"b": 1}, {"b": 2}]}
    apply_override(data, "a.1.b=[x, y]")
    apply_override(data, "c.d=3")
    assert data == {"a": [{"b": 1}, {"b": ["x", "y"]}], "c": {"d": 3}}


def test_a_missing_required_section_is_named_with_what_it_needs():
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig)
    assert "data: required, has no default (Needs `data.sources`; every other key has a default.)" in str(err.value)


# --------------------------------------------------------------------------------- the job files' headers
def header_example(path: Path) -> list[str]:
    """The `# Override example: honed ...` line of a job file's header (its first comment block), as argv."""
    header = path.read_text().split("\n\n")[0].splitlines()
    examples = [line.split(":", 1)[1] for line in header if line.startswith("# Override example:")]
    assert len(examples) == 1, f"{path.name}: the header needs one '# Override example: honed ...' line"
    argv = shlex.split(examples[0])
    assert argv[0] == "honed", path.name
    return argv[1:]


def value_at(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def assert_took_effect(cfg, overrides: list[str], name: str) -> None:
    for item in overrides:
        key, _, raw = item.partition("=")
        got, wanted = value_at(cfg, key), yaml.safe_load(raw)
        if isinstance(got, float):
            assert got == pytest.approx(float(wanted)), f"{name}: {item} gave {got!r}"
        else:
            assert got == wanted, f"{name}: {item} gave {got!r}"


def test_every_job_file_has_an_override_example():
    assert len(JOB_CONFIGS) >= 10 and len(SUBMIT_FILES) >= 5
    assert "data.sources.0.path=" in " ".join(header_example(CORPUS))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_the_override_example_of_every_job_config_runs(path):
    command, config, overrides = parse_command(header_example(path))
    assert config == f"jobs/{path.name}" and overrides, f"{path.name}: the example must override something"
    plain = load_config(CONFIGS[command], ROOT / config)
    cfg = load_config(CONFIGS[command], ROOT / config, overrides)
    assert_took_effect(cfg, overrides, path.name)
    assert cfg != plain


@pytest.mark.parametrize("path", SUBMIT_FILES, ids=lambda p: p.name)
def test_the_override_example_of_every_submit_file_runs(path):
    args = parser().parse_args(header_example(path))
    assert args.command == "submit" and args.job == f"jobs/submit/{path.name}"
    cwd = os.getcwd()
    os.chdir(ROOT)  # shipped job files are submitted from the repository root
    try:
        job, _ = load_job(args.job, parse_command, args.overrides)
    finally:
        os.chdir(cwd)
    assert_took_effect(job, args.overrides, path.name)
    assert args.overrides or args.address or args.no_wait, f"{path.name}: the example must change something"
    if args.address:
        assert resolve_address(args.address, job.address) == args.address
