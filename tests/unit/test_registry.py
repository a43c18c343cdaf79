"""The adapter registry on a real (untrained) PEFT LoRA adapter of the tiny model: versions, refs, listing,
removal, the refusals (bad names, traversal, pickle weights, symlinks out of the registry), a `file://`
registry downloaded into a cache and checked against its hash, the `honed registry` CLI, and `register` in the
train config."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from honed.cli import main
from honed.config import ConfigError, TrainConfig, load_config
from honed.models import weights_hash
from honed.registry import AdapterNotFound, Registry, RegistryError, parse_ref

TEMPLATE = {"system_prompt": "You code diagnoses.", "stop": ["<|im_end|>"], "eos": "<|im_end|>"}
BAD_REFS = ["", "../x", "..", "a/b", "a\\b", "/etc/passwd", "%2e%2e", "%2e%2e/x", "Upper", "name@0", "name@-1",
            "name@1.5", "name@@2", "name@", "a\0b", "name@1\0", ".hidden", "a..b", "x" * 65, "name\n", "name@01x"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model) -> Path:
    """A LoRA adapter as `honed train` exports it: save_pretrained safetensors plus honed.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    meta = {"base_model": tiny_model, "base_weights_sha256": weights_hash(tiny_model), "method": {"name": "lora"},
            "template": TEMPLATE, "data_manifest_sha256": "d" * 64}
    (out / "honed.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(str(tmp_path / "registry"))


def copy_adapter(adapter_dir: Path, to: Path) -> Path:
    shutil.copytree(adapter_dir, to)
    return to


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_add_numbers_versions_and_show_resolve_list_read_them(registry, adapter_dir):
    assert registry.add("icd10-lora", str(adapter_dir)) == "icd10-lora@1"
    assert registry.add("icd10-lora", str(adapter_dir), eval_results={"scores": {"tuned": {"token_f1": 0.5}}}) \
        == "icd10-lora@2"
    assert registry.add("other.v2_x", str(adapter_dir)) == "other.v2_x@1"

    meta = registry.show("icd10-lora")
    assert meta["version"] == 2 and meta == registry.show("icd10-lora@latest") == registry.show("icd10-lora@2")
    source = json.loads((adapter_dir / "honed.json").read_text())
    assert {k: meta[k] for k in source} == source  # what training recorded travels unchanged
    assert meta["adapter_sha256"] == weights_hash(str(adapter_dir)) and meta["promotable"] is True
    assert meta["eval"] == {"scores": {"tuned": {"token_f1": 0.5}}} and registry.show("icd10-lora@1")["eval"] is None
    assert meta["registered_at"].endswith("+00:00")
    assert registry.resolve("icd10-lora") == "icd10-lora@2" and registry.resolve("icd10-lora@1") == "icd10-lora@1"

    rows = registry.list()
    assert [(r["name"], r["version"]) for r in rows] == [("icd10-lora", 1), ("icd10-lora", 2), ("other.v2_x", 1)]
    assert rows[0]["base_weights_sha256"] == source["base_weights_sha256"][:12]
    assert rows[1]["token_f1"] == 0.5 and "token_f1" not in rows[0]
    files = sorted(os.listdir(Path(registry.root) / "icd10-lora" / "2"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "honed.json"]


def test_local_dir_loads_the_same_adapter(registry, adapter_dir, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry.add("icd10-lora", str(adapter_dir))
    path = registry.local_dir("icd10-lora")
    assert path == str(Path(registry.root) / "icd10-lora" / "1")
    original = lora_weights(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir))
    loaded = lora_weights(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path))
    assert original.keys() == loaded.keys() and original
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert any(v.abs().sum() > 0 for v in loaded.values())  # not the all-zero B of a default LoRA init


def test_remove_one_version_then_all(registry, adapter_dir):
    for _ in range(3):
        registry.add("icd10-lora", str(adapter_dir))
    assert registry.remove("icd10-lora@2") == ["icd10-lora@2"]
    assert registry.versions("icd10-lora") == [1, 3]
    assert registry.add("icd10-lora", str(adapter_dir)) == "icd10-lora@4"  # numbers are never reused
    with pytest.raises(AdapterNotFound, match="icd10-lora@1, icd10-lora@3, icd10-lora@4"):
        registry.show("icd10-lora@2")
    assert registry.remove("icd10-lora@latest") == ["icd10-lora@4"]
    assert registry.remove("icd10-lora") == ["icd10-lora@1", "icd10-lora@3"]
    assert registry.list() == [] and not (Path(registry.root) / "icd10-lora").exists()
    with pytest.raises(AdapterNotFound):
        registry.remove("icd10-lora")


@pytest.mark.parametrize("ref", BAD_REFS)
def test_bad_names_and_traversal_refs_are_refused(registry, adapter_dir, ref):
    registry.add("icd10-lora", str(adapter_dir))
    with pytest.raises(RegistryError):
        parse_ref(ref)
    for call in (registry.show, registry.resolve, registry.local_dir, registry.remove):
        with pytest.raises(RegistryError):
            call(ref)
    if "@" not in ref:
        with pytest.raises(RegistryError, match="a-z 0-9"):
            registry.add(ref, str(adapter_dir))
    assert registry.versions("icd10-lora") == [1]


def test_parse_ref_accepts_the_documented_forms():
    assert parse_ref("icd10-lora") == ("icd10-lora", None)
    assert parse_ref("icd10-lora@latest") == ("icd10-lora", None)
    assert parse_ref("a.b_c-1@12") == ("a.b_c-1", 12)


def test_unknown_names_list_the_known_ones(registry, adapter_dir):
    registry.add("alpha", str(adapter_dir))
    registry.add("beta", str(adapter_dir))
    with pytest.raises(AdapterNotFound, match="known: alpha, beta"):
        registry.show("gamma")


@pytest.mark.parametrize("bad", ["adapter_model.bin", "extra.pt", "nested/opt.pth", "state.pkl"])
def test_pickle_weights_are_refused(tmp_path, registry, adapter_dir, bad):
    source = copy_adapter(adapter_dir, tmp_path / "a")
    (source / bad).parent.mkdir(exist_ok=True)
    (source / bad).write_bytes(b"\x80\x04pickle")
    with pytest.raises(RegistryError, match="safetensors weights only"):
        registry.add("icd10-lora", str(source))
    assert registry.list() == []


def test_incomplete_adapter_dirs_are_refused(tmp_path, registry, adapter_dir):
    no_config = copy_adapter(adapter_dir, tmp_path / "a")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(RegistryError, match="adapter_config.json missing"):
        registry.add("x", str(no_config))
    no_weights = copy_adapter(adapter_dir, tmp_path / "b")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(RegistryError, match="no \\*.safetensors"):
        registry.add("x", str(no_weights))
    no_base = copy_adapter(adapter_dir, tmp_path / "c")
    (no_base / "honed.json").unlink()
    with pytest.raises(RegistryError, match="honed train"):
        registry.add("x", str(no_base))
    assert registry.add("x", str(no_base), base_weights_sha256="b" * 64) == "x@1"
    assert registry.show("x")["base_weights_sha256"] == "b" * 64


def test_symlinks_out_of_the_registry_are_not_followed(tmp_path, registry, adapter_dir):
    registry.add("icd10-lora", str(adapter_dir))
    outside = Registry(str(tmp_path / "outside"))
    outside.add("evil", str(adapter_dir))
    (Path(registry.root) / "evil").symlink_to(Path(outside.root) / "evil")
    for call in (registry.show, registry.local_dir, registry.remove):
        with pytest.raises(RegistryError, match="outside the registry"):
            call("evil")
    assert outside.versions("evil") == [1]  # remove did not delete through the link
    weights = Path(registry.root) / "icd10-lora" / "1" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(Path(outside.root) / "evil" / "1" / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="outside the registry"):
        registry.local_dir("icd10-lora")


def test_half_written_versions_are_not_listed(registry, adapter_dir):
    registry.add("icd10-lora", str(adapter_dir))
    (Path(registry.root) / "icd10-lora" / "2").mkdir()  # a copy that died before honed.json
    (Path(registry.root) / "icd10-lora" / ".incoming-abc").mkdir()
    assert registry.versions("icd10-lora") == [1] and registry.resolve("icd10-lora") == "icd10-lora@1"
    assert registry.add("icd10-lora", str(adapter_dir)) == "icd10-lora@3"


def test_set_promotable_rewrites_only_that_version(registry, adapter_dir):
    registry.add("icd10-lora", str(adapter_dir))
    registry.add("icd10-lora", str(adapter_dir))
    registry.set_promotable("icd10-lora@2", False, reason="token_f1 fell 0.1 below @1")
    assert registry.show("icd10-lora@2")["promotable"] is False
    assert registry.show("icd10-lora@2")["promotable_reason"] == "token_f1 fell 0.1 below @1"
    assert registry.show("icd10-lora@1")["promotable"] is True
    assert [r["promotable"] for r in registry.list()] == [True, False]


def test_file_uri_registry_downloads_and_verifies(tmp_path, adapter_dir):
    store = tmp_path / "store"
    remote = Registry(f"file://{store}", cache_dir=str(tmp_path / "cache"))
    assert remote.add("icd10-lora", str(adapter_dir)) == "icd10-lora@1"
    assert remote.add("icd10-lora", str(adapter_dir)) == "icd10-lora@2"
    assert [r["version"] for r in Registry(str(store)).list()] == [1, 2]  # the same layout as a local registry

    path = Path(remote.local_dir("icd10-lora@1"))
    assert path == tmp_path / "cache" / "icd10-lora" / "1"
    assert weights_hash(str(path)) == remote.show("icd10-lora@1")["adapter_sha256"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"]  # no temporary dirs left behind

    cached = path / "adapter_model.safetensors"
    good = cached.read_bytes()
    cached.write_bytes(good[:-4] + b"\0\0\0\0")  # a tampered cache is fetched again
    assert remote.local_dir("icd10-lora@1") == str(path) and cached.read_bytes() == good

    stored = store / "icd10-lora" / "2" / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RegistryError, match="not the registered adapter_sha256"):
        remote.local_dir("icd10-lora@2")
    assert not (tmp_path / "cache" / "icd10-lora" / "2").exists()


def test_default_cache_dir_is_per_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("HONED_CACHE", str(tmp_path))
    one, two = Registry(f"file://{tmp_path}/one"), Registry(f"file://{tmp_path}/two")
    assert one.cache_dir.parent == two.cache_dir.parent == tmp_path / "registry"
    assert one.cache_dir != two.cache_dir and len(one.cache_dir.name) == 16


# ------------------------------------------------------------------------------------------------ CLI
def honed(own_output, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = own_output()
    return code, out.out, out.err


def test_cli_add_list_show_remove(tmp_path, own_output, adapter_dir, monkeypatch):
    uri = str(tmp_path / "reg")
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps({"scores": {"base": {"token_f1": 0.1}, "tuned": {"token_f1": 0.4,
                                                                                      "exact_match": 0.25}}}))
    assert honed(own_output, "registry", "add", "icd10-lora", str(adapter_dir), "--registry", uri) == \
        (0, "icd10-lora@1\n", "")
    code, out, _ = honed(own_output, "registry", "add", "icd10-lora", str(adapter_dir), "--eval", str(eval_file),
                         "--registry", uri)
    assert (code, out) == (0, "icd10-lora@2\n")

    monkeypatch.setenv("HONED_REGISTRY", uri)  # the default registry when --registry is not given
    code, out, _ = honed(own_output, "registry", "list")
    header, first, second = out.splitlines()
    assert code == 0 and header.split() == ["name", "version", "base_model", "base_weights_sha256",
                                            "adapter_sha256", "registered_at", "promotable", "exact_match",
                                            "token_f1"]
    assert header.index("version") == first.index(" 1 ") + 1 == second.index(" 2 ") + 1  # aligned columns
    assert second.split()[-2:] == ["0.25", "0.4"]
    code, out, _ = honed(own_output, "registry", "list", "--json")
    assert [r["version"] for r in json.loads(out)] == [1, 2]
    code, out, _ = honed(own_output, "registry", "show", "icd10-lora")
    assert json.loads(out)["eval"]["scores"]["tuned"]["exact_match"] == 0.25
    assert honed(own_output, "registry", "remove", "icd10-lora@1") == (0, "removed icd10-lora@1\n", "")


def test_cli_publish_writes_the_flat_layout_vllm_reads(tmp_path, own_output, adapter_dir):
    uri = str(tmp_path / "reg")
    honed(own_output, "registry", "add", "icd10-lora", str(adapter_dir), "--registry", uri)
    assert honed(own_output, "registry", "publish", "icd10-lora", "--registry", uri) == (0, "icd10-lora@1\n", "")
    flat = tmp_path / "reg" / "_vllm" / "icd10-lora@1"  # the default root: where engine: vllm publishes
    assert {p.name for p in flat.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "honed.json"}
    assert json.loads((flat / "honed.json").read_text())["version"] == 1
    assert honed(own_output, "registry", "list", "--registry", uri)[1].count("icd10-lora") == 1  # _vllm not listed
    code, out, _ = honed(own_output, "registry", "publish", "icd10-lora@1", "--to", str(tmp_path / "elsewhere"),
                         "--registry", uri)
    assert (code, out) == (0, "icd10-lora@1\n") and (tmp_path / "elsewhere" / "icd10-lora@1" / "honed.json").is_file()
    code, _, err = honed(own_output, "registry", "publish", "nope", "--registry", uri)
    assert code == 2 and "no adapter named 'nope'" in err


@pytest.mark.parametrize("argv, message", [
    (["show", "../etc"], "not allowed"),
    (["show", "nope"], "no adapter named 'nope'"),
    (["remove", "nope@3"], "no adapter named 'nope'"),
    (["add", "x", "/no/such/dir"], "adapter_config.json missing"),
    (["add", "x", "ADAPTER", "--eval", "/no/such/eval.json"], "No such file"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, own_output, adapter_dir, argv, message):
    argv = [str(adapter_dir) if a == "ADAPTER" else a for a in argv]
    code, out, err = honed(own_output, "registry", *argv, "--registry", str(tmp_path / "reg"))
    assert code == 2 and out == "" and err.startswith("honed registry: ") and message in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- config
def test_train_config_register():
    cfg = load_config(TrainConfig, None, ["register.name=icd10-lora"])
    assert cfg.register.registry == "runs/registry" and cfg.register.name == "icd10-lora"
    with pytest.raises(ConfigError, match="served as a merged model"):
        load_config(TrainConfig, None, ["register.name=icd10-lora", "method.name=full"])
    for bad in ("../x", "Upper", "a..b"):
        with pytest.raises(ConfigError, match="register.name"):
            load_config(TrainConfig, None, [f"register.name={bad}"])
    with pytest.raises(ConfigError, match="register.name"):
        load_config(TrainConfig, None, ["register.registry=s3://b/r"])
