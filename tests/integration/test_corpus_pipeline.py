"""The whole corpus pipeline on a real local Ray (2 CPUs) over every input format with planted problems:
bad records of each kind, PII, exact and near duplicates, low-quality text, an eval-set overlap, weighted
mixing and packing. Counts reconcile per source and per stage, every problem lands where it should, the
packed shards train under Ray Train, and a rerun gives byte-identical shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from honed.data.synthetic import synthetic_corpus

EMAIL, PHONE = "jane.doe@example-clinic.org", "+1 (555) 123-4567"
LEAK = ("the patient was advised to rest for two weeks and to return to the clinic if the fever persisted "
        "beyond three days")


def paragraphs(n: int, seed: int, **kw) -> list[dict]:
    docs = synthetic_corpus(n, seed=seed, words_per_doc=(60, 120), **kw)
    for d in docs:
        d["text"] = "\n".join(line for line in d["text"].splitlines() if line.strip())
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    answers = paragraphs(60, seed=1, near_dup_rate=0.0, exact_dup_rate=0.0)
    rows = [{"question": f"Case {i}: what is the plan?", "answer": a["text"][:300], "topic": f"t{i % 20}"}
            for i, a in enumerate(answers)]
    rows[7]["answer"] = None                                                    # wrong_type
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), root / "qa.parquet", row_group_size=25)

    lines = ["prompt,response"]
    lines += [f'"Note {i}: summarise the visit","Stable on visit {i}; no change to medication {i * 7}."'
              for i in range(30)]
    lines += [f'"Who do I contact?","Write to {EMAIL} or call {PHONE} before noon."',
              f'"What did the note say?","In short, {LEAK} without complications."',
              '"one","two","three"']                                              # malformed_csv
    (root / "notes.csv").write_text("\n".join(lines) + "\n")

    general = paragraphs(80, seed=2, near_dup_rate=0.15, exact_dup_rate=0.08)
    body = [d["text"].encode() for d in general]
    body += ["Привет мир, это текст на русском языке без латиницы вообще.".encode(),   # quality_script
             b"### ### ### ... ### ... ### ### ### ...",                              # symbols / no words
             b"caf\xe9 latin-1 bytes are not utf-8 \xff"]                             # not_utf8
    (root / "general.txt").write_bytes(b"\n\n".join(body) + b"\n")

    chats = [{"messages": [{"role": "user", "content": f"Dose question {i}?"},
                           {"role": "assistant", "content": f"Take {i} mg twice daily with food."},
                           {"role": "user", "content": "And if I miss one?"},
                           {"role": "assistant", "content": f"Skip it; do not double dose {i}."}]}
             for i in range(20)]
    chats.append({"messages": [{"role": "user", "content": "no answer here"}]})   # bad_messages
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "eval.jsonl").write_text(json.dumps({"prompt": "Summarise", "response": LEAK}) + "\n")
    planted = {"exact": sum(d["kind"] == "exact" for d in general), "near": sum(d["kind"] == "near" for d in general)}
    return {"root": root, "planted": planted}


def corpus_config(tiny_model, corpus, out):
    from honed.config import PrepareConfig

    root = corpus["root"]
    return PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "output_dir": str(out),
        "data": {
            "max_seq_len": 480, "val_fraction": 0.1, "seed": 3,
            "sources": [
                {"name": "qa", "kind": "parquet", "path": str(root / "qa.parquet"), "weight": 3,
                 "fields": {"prompt": "question", "response": "answer", "group": "topic"}},
                {"name": "notes", "kind": "csv", "path": str(root / "notes.csv")},
                {"name": "general", "kind": "text", "path": f"file://{root}/general.txt", "weight": 1},
                {"name": "chat", "kind": "jsonl", "path": str(root / "chat.jsonl"), "format": "chat"},
            ],
            "decontaminate": {"paths": [str(root / "eval.jsonl")], "ngram": 13},
            "pack": {"enabled": True, "seq_len": 512},
        },
    })


@pytest.fixture(scope="module")
def run(ray_local, tiny_model, corpus, tmp_path_factory) -> dict:
    from honed.data.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared-corpus") / "data"
    cfg = corpus_config(tiny_model, corpus, out)
    return {"dir": out, "manifest": prepare(cfg), "cfg": cfg}


def test_counts_reconcile_per_source_and_per_stage(run):
    counts = run["manifest"]["counts"]
    for name, c in counts["by_source"].items():
        assert c["read"] == c["train"] + c["val"] + sum(c["dropped"].values()) + sum(c["quarantined"].values()), name
    assert {k: c["read"] for k, c in counts["by_source"].items()} == {"qa": 60, "notes": 33, "general": 83, "chat": 21}
    stages = run["manifest"]["stages"]
    assert stages[0]["in"] == counts["total"]["read"]
    assert all(a["out"] == b["in"] for a, b in zip(stages, stages[1:]))
    assert stages[-1]["out"] == counts["total"]["train"] + counts["total"]["val"]


def test_every_bad_record_is_quarantined_with_its_origin(run):
    by = run["manifest"]["counts"]["by_source"]
    assert by["qa"]["quarantined"] == {"wrong_type": 1}
    assert by["notes"]["quarantined"] == {"malformed_csv": 1}
    assert by["general"]["quarantined"] == {"not_utf8": 1}
    assert by["chat"]["quarantined"] == {"bad_messages": 1}
    rows = [json.loads(line) for f in (run["dir"] / "quarantine").glob("*.json") for line in f.read_text().splitlines()]
    origins = {r["reason"]: r["origin"] for r in rows}
    assert origins["wrong_type"].endswith("qa.parquet#7")
    assert origins["malformed_csv"].endswith("notes.csv:34")
    assert origins["bad_messages"].endswith("chat.jsonl:21")
    assert "general.txt:" in origins["not_utf8"] and all(r["raw"] for r in rows)


def test_filters_redaction_dedup_and_decontamination(run, corpus):
    m = run["manifest"]
    general = m["counts"]["by_source"]["general"]["dropped"]
    assert general.get("quality_script") == 1
    assert general.get("quality_symbol_ratio", 0) + general.get("quality_alpha_words", 0) == 1
    planted = corpus["planted"]
    assert general.get("exact_duplicate", 0) == planted["exact"]
    assert 0.8 * planted["near"] <= general.get("near_duplicate", 0) <= planted["near"]
    assert m["counts"]["by_source"]["notes"]["dropped"] == {"contaminated": 1}
    assert m["pii"]["email"] == 1 and m["pii"]["phone"] == 1
    assert m["dedup"]["exact_removed"] + m["dedup"]["near_removed"] == sum(
        c["dropped"].get("exact_duplicate", 0) + c["dropped"].get("near_duplicate", 0)
        for c in m["counts"]["by_source"].values())
    from honed.models import load_tokenizer

    tok = load_tokenizer(run["cfg"].model.name_or_path)
    shards = [pq.read_table(run["dir"] / "shards" / split).column("input_ids").to_pylist() for split in ("train", "val")]
    everything = "".join(tok.decode(ids) for rows in shards for ids in rows)
    assert EMAIL not in everything and "123-4567" not in everything
    assert "<EMAIL>" in everything and "<PHONE>" in everything


def test_mix_follows_the_weights_without_repeats(run):
    mix = run["manifest"]["mix"]
    assert set(mix) == {"qa", "general"} and mix["qa"]["share"] == pytest.approx(0.75)
    by = run["manifest"]["counts"]["by_source"]
    qa, general = by["qa"]["train"], by["general"]["train"]
    assert qa / (qa + general) == pytest.approx(0.75, abs=0.1)
    assert max(v["rate"] for v in mix.values()) == 1.0                   # the scarcest source is used whole
    assert sum(by[s]["dropped"].get("mix_subsampled", 0) for s in mix) > 0


def test_packed_shards_report_and_histogram(run):
    m = run["manifest"]
    train = pq.read_table(run["dir"] / "shards" / "train")
    assert set(train.column_names) == {"input_ids", "labels", "position_ids", "num_tokens", "num_examples"}
    assert all(len(r) == 512 for r in train.column("input_ids").to_pylist())
    assert sum(train.column("num_examples").to_pylist()) == m["counts"]["total"]["train"]
    used = sum(train.column("num_tokens").to_pylist())
    assert m["packing"]["efficiency"] == pytest.approx(used / (512 * train.num_rows), abs=1e-4)
    assert m["packing"]["efficiency"] > 0.7 and m["shards"]["train_rows"] == train.num_rows
    assert sum(m["tokens"]["histogram"]["train"]) == m["counts"]["total"]["train"]
    assert (run["dir"] / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    report = (run["dir"] / "report.md").read_text()
    assert "| dedup |" in report and "Packing:" in report and "token_lengths.png" in report
    assert len(m["sources"][0]["files"][0]["sha256"]) == 64


def test_packed_shards_train_under_ray_train(run, tiny_model, tmp_path):
    from honed.config import TrainConfig
    from honed.train.trainer import train

    cfg = TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": str(run["dir"]), "output_dir": str(tmp_path / "t"),
        "optim": {"lr": 1e-2, "max_steps": 4, "batch_size": 2, "warmup_steps": 0},
        "log_every": 2, "checkpoint_every": 4})
    metrics = train(cfg)
    assert metrics["step"] == 4 and metrics["loss"] > 0 and metrics["tokens_per_s"] > 0
    assert {"val_loss/qa", "val_loss/notes", "val_loss/general"} <= set(metrics)


@pytest.mark.slow
def test_same_input_and_seed_give_byte_identical_shards(run, tiny_model, corpus, tmp_path):
    from honed.data.pipeline import prepare

    again = prepare(corpus_config(tiny_model, corpus, tmp_path / "again"))
    for split in ("train", "val"):
        first = sorted((run["dir"] / "shards" / split).glob("*.parquet"))
        second = sorted((tmp_path / "again" / "shards" / split).glob("*.parquet"))
        assert [p.name for p in first] == [p.name for p in second] and first
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    assert again["counts"] == run["manifest"]["counts"]
