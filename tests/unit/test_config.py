"""Configs: defaults validate, overrides win, bad input names the key, value and what is allowed, every
shipped YAML validates, and the CLI refuses a bad config before any Ray work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from honed.config import (
    CONFIGS,
    METHOD_SECTION_NAMES,
    METHOD_SECTIONS,
    ConfigError,
    DemoConfig,
    ServeConfig,
    TrainConfig,
    apply_override,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
SOURCES = "data.sources=[{name: icd10, kind: icd10, chapters: ['4']}, {name: kjv, kind: kjv, eval_only: true}]"


@pytest.mark.parametrize("command", sorted(set(CONFIGS) - {"prepare"}))
def test_defaults_validate(command):
    assert load_config(CONFIGS[command]) is not None


def test_prepare_needs_only_its_sources():
    # honed ships no default corpus: `honed prepare` names the one key it needs, every other key has a default
    with pytest.raises(ConfigError, match=r"data: required, has no default \(Needs `data.sources`"):
        load_config(CONFIGS["prepare"])
    assert load_config(CONFIGS["prepare"], None, [SOURCES]).data.sources[0].chapters == ["4"]


def test_generic_defaults_hold_nothing_of_the_demo_domain():
    from honed.config import DataConfig, PrepareConfig, SourceConfig

    cfg = load_config(PrepareConfig, None, ["data.sources=[{name: notes, kind: jsonl, path: x.jsonl}]"])
    assert cfg.data.system_prompt is None and cfg.data.sources[0].chapters is None
    assert DataConfig.model_fields["sources"].is_required()
    assert SourceConfig.model_fields["chapters"].default is None
    text = dump_config(cfg)
    for domain in ("ICD", "medical", "chapters: [", "'4'"):
        assert domain not in text


def test_the_demo_keeps_its_domain_defaults():
    cfg = load_config(DemoConfig)
    assert cfg.data.system_prompt == "You are a medical coding assistant. Answer with ICD-10-CM facts only."
    assert [(s.name, s.kind, s.chapters, s.max_records, s.eval_only) for s in cfg.data.sources] == [
        ("icd10", "icd10", ["4", "9", "10"], None, False), ("kjv", "kjv", None, 200, True)]
    assert cfg.data.decontaminate.sources == ["kjv"]
    # jobs/demo.yaml says the same as `make demo` (DemoConfig's defaults), as do the ICD-10 prepare configs
    assert load_config(DemoConfig, ROOT / "jobs" / "demo.yaml").data == cfg.data
    from honed.config import PrepareConfig

    icd10 = load_config(PrepareConfig, ROOT / "jobs" / "prepare_icd10.yaml").data
    assert (icd10.system_prompt, icd10.sources) == (cfg.data.system_prompt, cfg.data.sources)


@pytest.mark.parametrize("source, expected", [
    ("{name: a, kind: icd10}", "source 'a': kind 'icd10' needs `chapters`, ICD-10-CM chapter numbers 1-22"),
    ("{name: a, kind: icd10_pairs, chapters: []}", "kind 'icd10_pairs' needs `chapters`"),
    ("{name: a, kind: jsonl, path: x, chapters: ['4']}", "source 'a': `chapters` is for kinds icd10 and icd10_pairs "
                                                         "only, not 'jsonl'"),
])
def test_chapters_belong_to_the_icd10_kinds(source, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS["prepare"], None, [f"data.sources=[{source}]"])
    assert expected in str(err.value)


def test_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 0.1\n  batch_size: 4\n")
    cfg = load_config(TrainConfig, path, ["optim.lr=3e-4", "method.lora.target_modules=[q_proj,v_proj]",
                                          "scaling.use_gpu=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.batch_size == 4
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.scaling.use_gpu is True


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", ["optim.lrr", "unknown key", "allowed here: lr,"]),
    ("optim.lr=fast", ["optim.lr = 'fast'", "valid number"]),
    ("method.name=dora", ["method.name = 'dora'", "'full', 'lora', 'qlora', 'prefix', 'ia3' or 'dpo'"]),
    ("method.lora.r=0", ["method.lora.r = 0", "greater than 0"]),
    ("scaling.num_workers=-1", ["scaling.num_workers = -1", "greater than 0"]),
    ("optim.schedule=step", ["optim.schedule = 'step'", "'cosine', 'linear' or 'constant'"]),
])
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    for text in expected:
        assert text in str(err.value)


def test_nested_unknown_key_lists_that_sections_fields():
    with pytest.raises(ConfigError, match=r"data.sources.0.chapter: unknown key; allowed here: name, kind"):
        load_config(DemoConfig, None, ["data.sources=[{name: a, kind: icd10, chapter: ['4']}]"])


def test_jsonl_source_needs_a_path():
    with pytest.raises(ConfigError, match="kind 'jsonl' needs `path`"):
        load_config(DemoConfig, None, ["data.sources=[{name: a, kind: jsonl}]"])


def test_serve_adapter_name_cannot_shadow_the_base():
    with pytest.raises(ConfigError, match="collides with base_name"):
        load_config(ServeConfig, None, ["adapters={base: /x}"])


@pytest.mark.parametrize("item", ["noequals", "=3", "a..b=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_override({}, item)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, bad)


def shipped_job_configs():
    return sorted(p for p in (ROOT / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")


def test_runtime_env_ships_the_package():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["py_modules"] == ["platform/honed"] and (ROOT / env["py_modules"][0] / "__init__.py").is_file()
    assert ".venv" in env["excludes"]


def test_there_are_shipped_configs():
    assert len(shipped_job_configs()) >= 4
    assert sorted((ROOT / "serving").glob("*.yaml"))


@pytest.mark.parametrize("path", shipped_job_configs(), ids=lambda p: p.name)
def test_every_job_config_validates_and_is_headed_by_its_command(path):
    command = path.stem.split("_")[0]
    assert command in CONFIGS, f"{path.name}: name must start with one of {sorted(CONFIGS)}"
    load_config(CONFIGS[command], path)
    assert f"honed {command} jobs/{path.name}" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", sorted((ROOT / "serving").glob("*.yaml")), ids=lambda p: p.name)
def test_every_serve_config_validates(path):
    spec = yaml.safe_load(path.read_text())
    for app in spec["applications"]:
        assert app["import_path"] == "honed.serve.app:build_app"
        ServeConfig.model_validate(app["args"])


def test_cli_rejects_bad_config_before_ray_starts():
    # A fresh interpreter: the CLI must exit 2 with the message without even importing Ray.
    code = ("import sys; from honed.cli import main; rc = main(['train', 'optim.lr=-1']); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.lr = -1" in proc.stderr and "greater than 0" in proc.stderr
    assert proc.stdout.strip() == "no ray"


@pytest.mark.parametrize("argv, message", [
    (["train", "data_dir=/no/such/dir"], "no prepared dataset at /no/such/dir (manifest.json not found; `honed prepare` writes one)"),
    (["merge", "adapter=/no/adapter"], "no adapter at /no/adapter (adapter_config.json not found"),
    (["prepare", "data.sources=[{name: notes, kind: csv, path: /no/notes/*.csv}]"],
     "source 'notes': no csv file at '/no/notes/*.csv'"),
    (["prepare", SOURCES, "data.decontaminate.paths=[/no/eval.jsonl]"],
     "source 'decontaminate': no jsonl file at '/no/eval.jsonl'"),
    (["eval", "model.name_or_path=/no/model"], "model '/no/model' is neither a builtin nor a model directory"),
    (["merge", "model.name_or_path=/no/model", "adapter=/no/adapter"], "model '/no/model' is neither a builtin"),
    (["serve", "model.name_or_path=/no/model"], "model '/no/model' is neither a builtin"),
    (["eval", "model.name_or_path=smollm2-135m-instruct", "model.revision=v1"],
     "model.revision 'v1' applies to Hugging Face Hub IDs only"),
])
def test_cli_refuses_missing_inputs_before_ray_starts(argv, message, capsys):
    import sys as _sys

    from honed.cli import main

    had_ray = "ray" in _sys.modules
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert ("ray" in _sys.modules) == had_ray


def test_cli_print_config_roundtrips(own_output):
    from honed.cli import main

    assert main(["train", "optim.lr=0.5", "--print-config"]) == 0
    assert yaml.safe_load(own_output().out)["optim"]["lr"] == 0.5


@pytest.mark.parametrize("cls", [TrainConfig, DemoConfig])
@pytest.mark.parametrize("method, settings", [
    ("full", ["method.deepspeed.zero_stage=3", "method.deepspeed.offload_optimizer=true"]),
    ("lora", ["method.lora.r=4", "method.lora.use_rslora=true"]),
    ("qlora", ["method.quant.double_quant=false", "method.lora.alpha=8"]),
    ("prefix", ["method.prefix.num_virtual_tokens=7"]),
    ("ia3", ["method.activation_checkpointing=true"]),
])
def test_written_config_loads_back_for_every_method(cls, method, settings, tmp_path):
    """What `--print-config` prints and a run writes (train.yaml) is a config that loads to the same value:
    sections the method does not use are left out of it, since loading them is an error."""
    cfg = load_config(cls, overrides=[f"method.name={method}", *settings])
    written = tmp_path / "config.yaml"
    written.write_text(dump_config(cfg))
    assert load_config(cls, written) == cfg
    assert set(yaml.safe_load(written.read_text())["method"]) - {"name", "activation_checkpointing"} == \
        METHOD_SECTIONS[method]
    assert set(cfg.method.model_dump()) >= METHOD_SECTION_NAMES  # the code still sees every section


@pytest.mark.parametrize("overrides, expected", [
    (["data.sources=[{name: a, kind: parquet}]"], "kind 'parquet' needs `path`"),
    (["data.sources=[{name: a, kind: icd10, path: x.jsonl}]"], "kind 'icd10' is bundled and takes no `path`"),
    (["data.sources=[{name: a, kind: icd10, chapters: ['4']}, {name: a, kind: kjv}]"],
     "source names must be unique; repeated: a"),
    ([SOURCES, "data.decontaminate.sources=[icd10]"], "'icd10' is not an eval_only source; those are: kjv"),
    ([SOURCES, "data.pack.seq_len=64"], "pack.seq_len = 64 is below max_seq_len = 256"),
    (["data.dedup.bands=4"], "give both `bands` and `rows`"),
    (["data.dedup.bands=20", "data.dedup.rows=10"], "bands × rows = 200 exceeds num_perm = 128"),
    (["data.dedup.threshold=1.5"], "data.dedup.threshold = 1.5"),
    (["data.filters.scripts=[klingon]"], "data.filters.scripts.0 = 'klingon'"),
    (["data.pii.types=[ssn]"], "data.pii.types.0 = 'ssn'"),
    (["data.template.name=vicuna"], "'tokenizer', 'chatml', 'llama3', 'alpaca' or 'plain'"),
    (["data.sources=[{name: a, kind: text, path: x, text_unit: page}]"], "'file', 'paragraph' or 'line'"),
])
def test_bad_data_configs_name_what_is_wrong(overrides, expected):
    from honed.config import PrepareConfig

    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, None, overrides)
    assert expected in str(err.value)


def test_every_pipeline_stage_can_be_switched_off():
    from honed.config import PrepareConfig

    cfg = load_config(PrepareConfig, None, [
        SOURCES, "data.chunk.enabled=false",
        "data.filters.enabled=false", "data.pii.enabled=false", "data.dedup.exact=false", "data.dedup.near=false",
        "data.normalize.unicode=none", "data.pack.enabled=false", "data.filters.max_symbol_ratio=null"])
    assert not cfg.data.filters.enabled and cfg.data.filters.max_symbol_ratio is None and not cfg.data.dedup.near
    assert not cfg.data.chunk.enabled


def test_config_imports_no_other_honed_module():
    # The registry, the stages and the CLI import the configs; a config importing them back would be a cycle.
    for path in sorted((ROOT / "platform" / "honed" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] != "honed" or name.startswith("honed.config"), f"{path.name} imports {name}"
