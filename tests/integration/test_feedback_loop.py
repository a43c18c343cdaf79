"""Feedback from served traffic → preference pairs → DPO, for real: the openai client gets completions (`n: 2` among
them) from a Serve app logging them, judgements go to POST /v1/feedback, both replicas (router and model) are killed
between judgements and Serve replaces them, then `honed prepare` reads the store and its pairs are the ones judged;
a short DPO run trains on them (slow). Bad payloads: 400 naming the field, unknown ids 404, no key 401."""

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

KEY = "feedback-key"
QUESTION = [{"role": "user", "content": "What does ICD-10-CM code E11.9 mean? Mail alice@example.com"}]


@pytest.fixture(scope="module")
def served(ray_local, tiny_model, free_port, tmp_path_factory):
    import openai

    from honed.config import ServeConfig
    from honed.serve import deploy

    store = tmp_path_factory.mktemp("feedback") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HONED_FEEDBACK_KEYS", KEY)
        cfg = ServeConfig(model={"name_or_path": tiny_model}, port=free_port(), max_tokens=16,
                          api_keys_env="HONED_FEEDBACK_KEYS", feedback={"store": str(store), "max_rating": 5})
        url = deploy.start(cfg)
    yield {"url": url, "store": str(store), "client": openai.OpenAI(base_url=url, api_key=KEY, max_retries=0,
                                                                       timeout=120)}
    deploy.stop()


def post_feedback(served, key: str = KEY, **body) -> tuple[int, dict]:
    """(HTTP status, JSON body) of POST /v1/feedback."""
    request = urllib.request.Request(f"{served['url']}/feedback", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(served, n: int = 1, seed: int = 0):
    return served["client"].chat.completions.create(model="base", messages=QUESTION, max_tokens=8,
                                                    temperature=1.0, seed=seed, n=n)


def replica_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "OpenAIRouter" in a["name"] or "ModelServer" in a["name"]}


def kill_replicas(served) -> None:
    """ray.kill every replica (router and model); wait until Serve has replaced both and the endpoint answers."""
    import ray

    before = replica_names()
    assert len(before) == 2, before
    for name in before:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        fresh = replica_names() - before
        if len(fresh) == 2:
            try:
                if served["client"].models.list().data:
                    return
            except Exception:  # noqa: BLE001 — the proxy answers 5xx until the new router is up
                pass
        time.sleep(2)
    raise AssertionError(f"Serve did not replace the killed replicas {before} within 240 s")


@pytest.fixture(scope="module")
def logged(served):
    """Completions (one with two answers) and the judgements posted before any replica is killed."""
    client = served["client"]
    two = chat(served, n=2, seed=1)
    fixed = chat(served, seed=2)
    rated = [client.completions.create(model="base", prompt="Code E11", max_tokens=8, temperature=1.0, seed=s)
             for s in (3, 4)]
    assert post_feedback(served, completion_id=two.id, choice=1)[0] == 200
    assert post_feedback(served, completion_id=rated[0].id, rating=5)[0] == 200
    return {"two": two, "fixed": fixed, "rated": rated, "store": served["store"]}


@pytest.fixture(scope="module")
def judged(served, logged):
    """Both replicas killed and replaced, the rest judged; the pairs all the judgements mean."""
    two, fixed, rated = logged["two"], logged["fixed"], logged["rated"]
    kill_replicas(served)
    preferred = "Type 2 diabetes mellitus without complications; write to bob@example.com"
    # judgements of completions served by the killed replicas: the log outlived them
    assert post_feedback(served, completion_id=fixed.id, preferred=preferred)[0] == 200
    assert post_feedback(served, completion_id=rated[1].id, rating=2)[0] == 200
    answers = [c.message.content for c in two.choices]
    pairs = [(answers[1], answers[0]), (preferred, fixed.choices[0].message.content),
             (rated[0].choices[0].text, rated[1].choices[0].text)]
    return {"two": two, "pairs": pairs, "store": served["store"]}


def test_completions_are_logged_with_what_was_served(logged):
    from honed.serve.feedback import FeedbackStore

    two = logged["two"]
    assert len(two.choices) == 2 and [c.index for c in two.choices] == [0, 1]
    record = FeedbackStore(logged["store"]).read_completion(two.id)
    assert record["request"] == {"messages": QUESTION} and record["served"] == "base"
    assert record["sampling"] | {"stop": None} == {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 1,
                                                   "n": 2, "stop": None}
    assert [c["text"] for c in record["choices"]] == [c.message.content for c in two.choices]


def test_streamed_completion_is_logged_under_its_chunk_id(served):
    from honed.serve.feedback import FeedbackStore

    chunks = list(served["client"].chat.completions.create(model="base", messages=QUESTION, max_tokens=6,
                                                           temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    record = FeedbackStore(served["store"]).read_completion(chunks[0].id)
    assert record["choices"][0]["text"].strip() == text.strip()


@pytest.mark.parametrize("body, status, param", [
    ({"rating": 9}, 400, "rating"),
    ({"choice": 2}, 400, "choice"),
    ({"preferred": " "}, 400, "preferred"),
    ({"rating": "good"}, 400, "rating"),
    ({"stars": 3}, 400, "stars"),
    ({"completion_id": "chatcmpl-20200101-" + "0" * 32, "rating": 3}, 404, "completion_id"),
])
def test_bad_feedback_is_refused_naming_the_field(served, logged, body, status, param):
    code, answer = post_feedback(served, **({"completion_id": logged["two"].id} | body))
    assert code == status, answer
    assert answer["error"]["param"] == param


def test_feedback_needs_the_api_key(served, logged):
    assert post_feedback(served, key="wrong", completion_id=logged["two"].id, choice=0)[0] == 401


def test_streaming_two_answers_is_refused(served):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        list(served["client"].chat.completions.create(model="base", messages=QUESTION, n=2, stream=True))
    assert err.value.body["param"] == "n"


@pytest.fixture(scope="module")
def prepared_pairs(judged, tiny_model, tmp_path_factory):
    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare

    out = tmp_path_factory.mktemp("feedback-pairs") / "data"
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "output_dir": str(out),
        # the tiny random model answers in random tokens: quality filters would judge its text, not the pipeline
        "data": {"max_seq_len": 160, "val_fraction": 0.0, "filters": {"enabled": False}, "dedup": {"near": False},
                 "sources": [{"name": "served", "kind": "feedback", "path": judged["store"]},
                             # validation rows for the DPO run (honed train reads a val split; pairs all train)
                             {"name": "kjv", "kind": "kjv", "max_records": 4, "eval_only": True}]},
    })
    return {"dir": str(out), "manifest": prepare(cfg)}


@pytest.mark.slow
def test_prepared_pairs_equal_what_was_judged(judged, prepared_pairs):
    import pyarrow.parquet as pq

    from honed.data.pii import redact
    from honed.data.quality import normalize_text

    def cleaned(text: str) -> str:
        return redact(normalize_text(text, "NFC", False), ["email", "phone", "ip", "credit_card", "api_key"])[0]

    expected = [(cleaned(c), cleaned(r)) for c, r in judged["pairs"]]
    expected = [(c, r) for c, r in expected if c.strip() and r.strip() and c.strip() != r.strip()]
    rows = [row for f in sorted(Path(prepared_pairs["dir"], "shards", "train").glob("*.parquet"))
            for row in pq.read_table(f, columns=["chosen", "rejected", "kind"]).to_pylist()]
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == sorted(expected)
    assert all(r["kind"] == "preference" for r in rows)
    assert any("<EMAIL>" in c for c, _ in expected)  # the person's e-mail address did not reach the pairs
    counts = prepared_pairs["manifest"]["counts"]["by_source"]["served"]
    assert counts["read"] == 3 and counts["train"] == len(expected)
    source = prepared_pairs["manifest"]["sources"][0]
    assert "judgements of served answers" in source["derived"] and source["records_sha256"]


@pytest.mark.slow
def test_dpo_trains_on_the_judged_pairs(prepared_pairs, tiny_model, tmp_path):
    from honed.config import TrainConfig, load_config
    from honed.serve import deploy
    from honed.train.trainer import train

    deploy.stop()  # Serve's model replica holds one of the two CPUs: the run and its export check need them
    cfg = load_config(TrainConfig, None, [
        "method.name=dpo", f"model.name_or_path={tiny_model}", f"data_dir={prepared_pairs['dir']}",
        f"output_dir={tmp_path}", "optim.max_steps=4", "optim.batch_size=2", "optim.warmup_steps=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "log_every=2", "checkpoint_every=4"])
    train(cfg)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history and all("reward_accuracy" in m for m in history)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
