"""DPO on local Ray: preference pairs through `honed prepare` (malformed pairs quarantined), a 2-worker
TorchTrainer DPO run whose reward accuracy and margin on the training pairs rise, and SFT → DPO from the
shared `trained` adapter, resumed from its checkpoint."""

import json
import math
from pathlib import Path

import pytest

BAD_PAIRS = [
    {"prompt": "What does code Z99.1 mean?", "chosen": "Dependence on respirator", "rejected": "A made-up answer"},
    {"prompt": "Missing its rejected answer", "chosen": "only one"},
    {"prompt": "Same twice", "chosen": "identical answer", "rejected": "identical answer "},
    {"prompt": "Wrong type", "chosen": ["not", "a", "string"], "rejected": "b"},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
     "chosen": "a", "rejected": "b"},
    {"prompt": "Empty chosen", "chosen": "   ", "rejected": "b"},
]


@pytest.fixture(scope="module")
def pairs_data(ray_local, tiny_model, tmp_path_factory) -> dict:
    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare

    root = tmp_path_factory.mktemp("pairs")
    extra = root / "pairs.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in BAD_PAIRS))
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "output_dir": str(root / "data"),
        "data": {"max_seq_len": 160, "sources": [
            {"name": "prefs", "kind": "icd10_pairs", "chapters": ["4"], "max_records": 72},
            {"name": "kjv", "kind": "kjv", "max_records": 16, "eval_only": True},
            {"name": "extra", "kind": "jsonl", "path": str(extra), "val_fraction": 0.0},
        ]},
    })
    return {"dir": str(root / "data"), "manifest": prepare(cfg)}


def test_pairs_are_prepared_and_malformed_ones_quarantined(pairs_data):
    m = pairs_data["manifest"]
    extra = m["counts"]["by_source"]["extra"]
    assert extra["quarantined"] == {"missing_field": 1, "identical_pair": 1, "wrong_type": 1, "bad_messages": 1,
                                    "empty_chosen": 1}, extra
    assert extra["train"] == 1 and extra["read"] == len(BAD_PAIRS)
    for c in m["counts"]["by_source"].values():  # nothing silently lost
        assert c["read"] == c["train"] + c["val"] + sum(c["dropped"].values()) + sum(c["quarantined"].values())
    assert m["kinds"]["train"] == {"prefs": {"preference": m["counts"]["by_source"]["prefs"]["train"]},
                                   "extra": {"preference": 1}}
    assert m["kinds"]["val"]["kjv"] == {"text": 16}
    prefs = next(s for s in m["sources"] if s["name"] == "prefs")
    assert "derived from ICD-10-CM, not judged by people" in prefs["derived"]
    quarantined = [json.loads(line) for f in Path(pairs_data["dir"], "quarantine").glob("*.json")
                   for line in f.read_text().splitlines()]
    assert {q["reason"] for q in quarantined} == set(extra["quarantined"]) and all(q["raw"] for q in quarantined)


def dpo_config(tiny_model, data_dir, out, **over):
    from honed.config import TrainConfig

    base = {"model": {"name_or_path": tiny_model}, "data_dir": data_dir, "output_dir": str(out),
            "method": {"name": "dpo", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "dpo": {"beta": 0.5}},
            "optim": {"lr": 2e-2, "epochs": 5, "batch_size": 4, "warmup_steps": 2},
            "log_every": 5, "checkpoint_every": 10, "validate_at_checkpoints": True}
    for key, value in over.items():
        base[key] = value
    return TrainConfig.model_validate(base)


@pytest.mark.slow
def test_two_worker_dpo_learns_the_training_preferences(pairs_data, tiny_model, tmp_path):
    from honed.train.trainer import train

    final = train(dpo_config(tiny_model, pairs_data["dir"], tmp_path))
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    print("\n[dpo] " + " | ".join(f"step {m['step']} loss {m['loss']:.3f} acc {m['reward_accuracy']:.2f} "
                                  f"margin {m['reward_margin']:.3f}" for m in history))
    # later epochs revisit the pairs: accuracy on training pairs above chance, the margin grows, the loss falls
    assert last["reward_accuracy"] >= 0.75 and last["reward_accuracy"] > first["reward_accuracy"], history
    assert last["reward_margin"] > first["reward_margin"] + 0.5 and last["chosen_reward"] > last["rejected_reward"]
    assert last["loss"] < math.log(2) - 0.2
    assert {"val_loss/prefs", "val_reward_accuracy/prefs", "val_reward_margin", "val_loss/kjv"} <= set(final)
    assert final["val_loss"] == final["val_loss/prefs"]  # the pooled domain loss is the pairs' DPO loss
    assert final["export_check"]["max_abs_diff"] < 1e-4
    meta = json.loads((tmp_path / "adapter" / "honed.json").read_text())
    assert meta["method"]["name"] == "dpo" and meta["method"]["dpo"]["beta"] == 0.5
    report = (tmp_path / "report.md").read_text()  # the run report plots and tables the DPO metrics
    assert (tmp_path / "plots" / "preference.png").stat().st_size > 0
    assert f"| reward_accuracy | {last['reward_accuracy']:.6g} | {last['step']} |" in report, report

    # `honed eval` on a dataset of pairs adds preference accuracy, base vs the DPO adapter, on held-out pairs
    from honed.config import EvalConfig
    from honed.eval.evaluate import evaluate

    result = evaluate(EvalConfig(model={"name_or_path": tiny_model}, adapter=str(tmp_path / "adapter"),
                                 data_dir=pairs_data["dir"], output_dir=str(tmp_path / "eval"), max_examples=24,
                                 generate_examples=4, max_new_tokens=4, bias={"enabled": False}))
    for scores in result["scores"].values():
        assert 0 <= scores["preference_accuracy"] <= 1 and "logp_margin" in scores
    assert result["scores"]["tuned"]["logp_margin"] != result["scores"]["base"]["logp_margin"]


def test_sft_then_dpo_starts_at_the_sft_model_and_resumes(pairs_data, tiny_model, trained, tmp_path):
    from honed.train.trainer import train

    over = {"method": {"name": "dpo", "dpo": {"adapter": trained["adapter"], "beta": 0.2, "loss": "ipo"}},
            "optim": {"lr": 5e-3, "max_steps": 6, "batch_size": 4, "warmup_steps": 0},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "log_every": 3, "checkpoint_every": 3,
            "name": "sft-dpo"}
    train(dpo_config(tiny_model, pairs_data["dir"], tmp_path, **over))
    over["optim"] = over["optim"] | {"max_steps": 9}
    final = train(dpo_config(tiny_model, pairs_data["dir"], tmp_path, **over))  # same name: continues at step 6
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 6} in [{k: e[k] for k in ("event", "step")} for e in events if "event" in e]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [3, 6, 9] and final["step"] == 9
    sft_config = json.loads(Path(trained["adapter"], "adapter_config.json").read_text())
    dpo_config_ = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert dpo_config_["r"] == sft_config["r"]  # the SFT adapter itself was trained on
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.is_dir()) == []  # no reference copy
    assert final["export_check"]["max_abs_diff"] < 1e-4
