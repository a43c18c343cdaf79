"""A user's own (non-medical) corpus with every default, on a real local Ray: nothing of the ICD-10-CM demo reaches
its shards, manifest, report, adapter metadata or the prompt honed serves; a text document five times the length
limit is kept as windows (every token, counted in the manifest, one split), its exact copy is dropped once as a
document, and an instruction example over the limit is still dropped as `too_long`."""

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

# ~3-4 min of prepare + train on 2 CPUs; the pieces have fast unit tests (config defaults, chunking, the corpus
# writer), so CI's default set leaves this end-to-end run to `make test-all`.
pytestmark = pytest.mark.slow

LIMIT = 256  # data.max_seq_len's default
DEMO_WORDS = ("icd", "medical", "coding assistant")
WORDS = ("harbour tide lantern rope keel sail gull fog reef anchor mast stern wind shore chart compass cabin deck "
         "current island beacon storm calm wave hull oar net salt cliff bay dune rain star night dawn north").split()


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                    for _ in range(n))


@pytest.fixture(scope="module")
def sailing(tmp_path_factory) -> dict:
    """A sailing corpus: question/answer pairs (one far too long), short notes, one note 5x the limit and its copy;
    and a tiny model whose tokenizer learnt only this corpus (the shared one learnt ICD-10 text)."""
    from honed.models import load_tokenizer, make_tiny_model

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("sailing")
    pairs = [{"prompt": f"What should a sailor do about the {rng.choice(WORDS)} near the {rng.choice(WORDS)}?",
              "response": sentences(rng, 2)} for _ in range(40)]
    pairs.append({"prompt": sentences(rng, 120), "response": "Reef the sail."})
    notes = [sentences(rng, 3) for _ in range(12)]
    model = make_tiny_model(root / "model", corpus=[p["prompt"] + " " + p["response"] for p in pairs] + notes)
    tokenizer = load_tokenizer(model)
    long_doc = sentences(rng, 40)
    while len(tokenizer(long_doc)["input_ids"]) < 5 * LIMIT:
        long_doc += " " + sentences(rng, 10)
    (root / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "notes.txt").write_text("\n\n".join(notes + [long_doc, long_doc]) + "\n")
    long_ids = tokenizer(long_doc)["input_ids"] + [tokenizer.eos_token_id]
    return {"root": root, "model": model, "long_ids": long_ids, "notes": len(notes)}


@pytest.fixture(scope="module")
def own_run(ray_local, sailing) -> dict:
    from honed.config import PrepareConfig, TrainConfig
    from honed.data.pipeline import prepare
    from honed.train.trainer import train

    root = sailing["root"]
    cfg = PrepareConfig.model_validate({"model": {"name_or_path": sailing["model"]}, "output_dir": str(root / "data"),
                                        "data": {"sources": [
                                            {"name": "qa", "kind": "jsonl", "path": str(root / "qa.jsonl")},
                                            {"name": "notes", "kind": "text", "path": str(root / "notes.txt")}]}})
    manifest = prepare(cfg)
    train(TrainConfig.model_validate({
        "model": {"name_or_path": sailing["model"]}, "data_dir": str(root / "data"), "output_dir": str(root / "run"),
        "optim": {"max_steps": 2, "batch_size": 2}, "scaling": {"num_workers": 1}}))
    return {"manifest": manifest, "data": root / "data", "run": root / "run"}


def shard_rows(data: Path) -> list[dict]:
    return [row for split in ("train", "val") for row in pq.read_table(data / "shards" / split).to_pylist()]


def test_nothing_of_the_demo_domain_reaches_a_run_with_every_default(own_run, sailing):
    from honed.generation import render_chat
    from honed.models import load_tokenizer

    files = [p for d in (own_run["data"], own_run["run"]) for p in d.rglob("*")
             if p.suffix in (".json", ".jsonl", ".md", ".yaml") and p.is_file()]
    meta = json.loads((own_run["run"] / "adapter" / "honed.json").read_text())
    assert own_run["manifest"]["template"]["system_prompt"] is None and meta["template"]["system_prompt"] is None
    texts = {str(p): p.read_text() for p in files} | {"shards": json.dumps(shard_rows(own_run["data"]))}
    assert {"manifest.json", "report.md", "prepare.yaml", "honed.json"} <= {Path(p).name for p in texts}
    tokenizer = load_tokenizer(sailing["model"])
    question = [{"role": "user", "content": "When is the tide lowest?"}]
    for name, template in (("manifest prompt", own_run["manifest"]["template"]), ("served prompt", meta["template"])):
        texts[name] = render_chat(tokenizer, question, template)
        assert texts[name] == "<|im_start|>user\nWhen is the tide lowest?<|im_end|>\n<|im_start|>assistant\n"
    for name, text in texts.items():
        for word in DEMO_WORDS:
            assert word not in text.lower(), f"{word!r} in {name}"
    sources = {s["name"]: s for s in own_run["manifest"]["config"]["data"]["sources"]}
    assert sources["qa"]["chapters"] is None and sources["notes"]["chapters"] is None


def test_a_document_five_times_the_limit_is_kept_as_windows(own_run, sailing):
    from honed.data.records import window_spans

    m = own_run["manifest"]
    notes = m["counts"]["by_source"]["notes"]
    assert notes["read"] == sailing["notes"] + 2 and notes["quarantined"] == {}
    assert notes["dropped"] == {"exact_duplicate": 1}  # the copy, caught whole before any window was cut
    assert m["counts"]["by_source"]["qa"]["dropped"] == {"too_long": 1}  # instruction examples are never cut
    n_windows = len(window_spans(len(sailing["long_ids"]), LIMIT, 0))
    assert n_windows >= 5
    assert m["chunk"]["by_source"]["notes"] == {"documents": sailing["notes"] + 1, "chunked": 1, "windows": n_windows}
    assert m["chunk"]["by_source"]["qa"]["chunked"] == 0
    rows = shard_rows(own_run["data"])
    assert len(rows) == m["shards"]["train_rows"] + m["shards"]["val_rows"]
    assert m["shards"]["train_rows"] + m["shards"]["val_rows"] == \
        m["counts"]["total"]["train"] + m["counts"]["total"]["val"] + n_windows - 1
    windows = sorted((r for r in rows if r["source"] == "notes" and r["num_tokens"] == LIMIT),
                     key=lambda r: r["window"])
    assert [r["window"] for r in windows] == list(range(n_windows))
    assert len({(r["id"], r["group"]) for r in windows}) == 1  # one document, one group ...
    split = "train" if windows[0] in pq.read_table(own_run["data"] / "shards" / "train").to_pylist() else "val"
    assert all(r in pq.read_table(own_run["data"] / "shards" / split).to_pylist() for r in windows)  # ... one split
    assert [t for r in windows for t in r["labels"] if t != -100] == sailing["long_ids"]  # every token, once
    assert m["tokens"]["train"]["max"] <= LIMIT and m["tokens"]["val"]["max"] <= LIMIT
    assert "Long text documents cut into windows" in (own_run["data"] / "report.md").read_text()
