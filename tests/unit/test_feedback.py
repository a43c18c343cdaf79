"""The completion and feedback logs (honed.serve.feedback) and the pairs `honed prepare` makes of them
(honed.data.feedback_source): the pair rule, refusals naming the field, concurrent writers, a store on S3 (moto)."""

import json
import threading
from pathlib import Path

import pytest

from honed.generation import Completion
from honed.serve.feedback import FeedbackRequest, FeedbackStore, completion_record, new_completion_id
from honed.serve.protocol import APIError
from s3_server import BUCKET, moto_s3

QUESTION = [{"role": "user", "content": "What does ICD-10-CM code E11.9 mean?"}]


def log_completion(store: FeedbackStore, answers: list[str], request: dict | None = None) -> str:
    cid = new_completion_id(chat=True)
    dones = [Completion(a, 12, 5, "stop") for a in answers]
    store.write_completion(completion_record(cid, True, request or {"messages": QUESTION},
                                             {"temperature": 1.0, "n": len(answers)}, "icd10", "icd10@3",
                                             "smollm2-135m-instruct", dones))
    return cid


def judge(store: FeedbackStore, cid: str, **fields) -> dict:
    return store.record_feedback(FeedbackRequest(completion_id=cid, **fields), max_rating=5)


def pairs_of(root: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(chosen, rejected) of every pair, and the errors of the rows that will be quarantined."""
    from honed.data.feedback_source import feedback_records

    rows = feedback_records(root)
    pairs = [(json.loads(raw)["chosen"], json.loads(raw)["rejected"]) for _, raw, error in rows if not error]
    return pairs, [error.split(":")[0] for _, _, error in rows if error]


def test_the_pair_rule(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb"))
    picked = log_completion(store, ["Type 2 diabetes without complications", "Type 1 diabetes"])
    judge(store, picked, choice=0)
    fixed = log_completion(store, ["Diabetes of some kind"])
    judge(store, fixed, preferred="Type 2 diabetes mellitus without complications")
    good, bad = (log_completion(store, [a]) for a in ("Right answer", "Wrong answer"))
    other_question = log_completion(store, ["Unrelated"], {"messages": [{"role": "user", "content": "Code E12?"}]})
    judge(store, bad, rating=4)
    judge(store, bad, rating=1)          # the latest rating of an answer counts
    judge(store, good, rating=5)
    judge(store, other_question, rating=1)
    pairs, errors = pairs_of(str(tmp_path / "fb"))
    assert errors == []
    assert pairs == [("Type 2 diabetes without complications", "Type 1 diabetes"),
                     ("Type 2 diabetes mellitus without complications", "Diabetes of some kind"),
                     ("Right answer", "Wrong answer")]


def test_rating_pairs_need_the_same_question_and_different_ratings(tmp_path):
    store = FeedbackStore(str(tmp_path))
    a = log_completion(store, ["first"], {"prompt": "Code E11"})
    b = log_completion(store, ["second"], {"prompt": "Code E12"})
    c = log_completion(store, ["third"], {"prompt": "Code E11"})
    judge(store, a, rating=3)
    judge(store, b, rating=1)
    judge(store, c, rating=3)
    assert pairs_of(str(tmp_path)) == ([], [])


def test_preferred_answer_and_rating_on_a_two_answer_completion(tmp_path):
    store = FeedbackStore(str(tmp_path))
    cid = log_completion(store, ["one", "two"])
    record = judge(store, cid, choice=1, rating=2, preferred="three")
    assert record["completion_id"] == cid and record["id"].startswith("fb-")
    pairs, _ = pairs_of(str(tmp_path))
    assert pairs == [("two", "one"), ("three", "one"), ("three", "two")]


@pytest.mark.parametrize("fields, param", [
    ({"rating": 0}, "rating"),
    ({"rating": 6}, "rating"),
    ({"preferred": "  "}, "preferred"),
    ({"choice": 2}, "choice"),
    ({"choice": -1}, "choice"),
    ({"rating": 4}, "choice"),   # two answers: which one is rated?
    ({}, None),
])
def test_bad_feedback_is_400_naming_the_field(tmp_path, fields, param):
    store = FeedbackStore(str(tmp_path))
    cid = log_completion(store, ["one", "two"])
    with pytest.raises(APIError) as err:
        judge(store, cid, **fields)
    assert (err.value.status, err.value.param) == (400, param)
    assert store.records("feedback") == []  # nothing written for a refused judgement


@pytest.mark.parametrize("cid", ["chatcmpl-20261203-" + "0" * 32, "chatcmpl-../../etc", "anything"])
def test_unknown_completion_is_404(tmp_path, cid):
    store = FeedbackStore(str(tmp_path))
    with pytest.raises(APIError) as err:
        judge(store, cid, rating=3)
    assert (err.value.status, err.value.param, err.value.code) == (404, "completion_id", "completion_not_found")


def test_unknown_fields_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ratting"):
        FeedbackRequest(completion_id="x", ratting=3)


def test_concurrent_writers_never_clobber(tmp_path):
    """Two stores (as two replicas) on one root, 8 threads appending at once: every judgement is there, whole."""
    root = str(tmp_path / "shared")
    cid = log_completion(FeedbackStore(root), ["one", "two"])
    stores = [FeedbackStore(root), FeedbackStore(root)]
    written = []

    def append(worker: int) -> None:
        for i in range(25):
            written.append(judge(stores[worker % 2], cid, choice=i % 2)["id"])

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [json.loads(raw) for _, raw in FeedbackStore(root).records("feedback")]
    assert sorted(r["id"] for r in records) == sorted(written) and len(written) == 200
    assert not [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def test_broken_store_records_become_quarantine_rows(tmp_path):
    store = FeedbackStore(str(tmp_path))
    cid = log_completion(store, ["one", "two"])
    judge(store, cid, choice=1)
    day = cid.split("-")[1]
    (tmp_path / "feedback" / day / "fb-broken.json").write_text("{not json")
    (tmp_path / "feedback" / day / "fb-orphan.json").write_text(json.dumps(
        {"id": "fb-orphan", "completion_id": "chatcmpl-19990101-" + "1" * 32, "choice": 0}))
    (tmp_path / "feedback" / day / "fb-badchoice.json").write_text(json.dumps(
        {"id": "fb-badchoice", "completion_id": cid, "choice": 5}))
    pairs, errors = pairs_of(str(tmp_path))
    assert pairs == [("two", "one")]
    assert sorted(errors) == ["bad_feedback", "malformed_json", "unknown_completion"]


def test_missing_store_names_it(tmp_path):
    from honed.data.feedback_source import feedback_records

    with pytest.raises(FileNotFoundError, match="feedback store .*nope"):
        feedback_records(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, and the environment that points pyarrow at it."""
    with moto_s3() as env:
        yield env


def test_store_on_object_storage(s3):
    import boto3

    store = FeedbackStore(f"s3://{BUCKET}/feedback")
    store.check()
    cid = log_completion(store, ["one", "two"])
    assert store.read_completion(cid)["choices"][1]["text"] == "two"
    judge(FeedbackStore(f"s3://{BUCKET}/feedback"), cid, choice=1)  # another replica's store object
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]]
    day = cid.split("-")[1]
    assert f"feedback/completions/{day}/{cid}.json" in keys
    assert sum(k.startswith(f"feedback/feedback/{day}/fb-") for k in keys) == 1
    assert pairs_of(f"s3://{BUCKET}/feedback") == ([("two", "one")], [])


def test_two_choices_in_one_response_body():
    from honed.serve.protocol import completion_body

    body = completion_body("icd10", [Completion("a", 7, 3, "stop"), Completion("b", 7, 4, "length")], True, "cid")
    assert body["id"] == "cid" and [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}


def test_n_is_at_most_two_and_config_keys_are_checked():
    from pydantic import ValidationError

    from honed.config import ServeConfig, SourceConfig
    from honed.serve.protocol import ChatRequest

    assert ChatRequest(model="m", messages=QUESTION, n=2).n == 2
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        ChatRequest(model="m", messages=QUESTION, n=3)
    with pytest.raises(ValidationError, match="max_rating"):
        ServeConfig(feedback={"store": "x", "max_rating": 1})
    with pytest.raises(ValidationError, match="kind 'feedback' needs `path`"):
        SourceConfig(name="fb", kind="feedback")


def test_a_feedback_source_gives_reader_rows(tmp_path):
    """`kind: feedback` enters the pipeline as reader rows (what processing parses, or quarantines by `error`)."""
    from honed.config import SourceConfig
    from honed.data.records import parse_record
    from honed.data.sources import builtin_rows

    store = FeedbackStore(str(tmp_path))
    judge(store, log_completion(store, ["one", "two"]), choice=0)
    (tmp_path / "feedback" / "19990101").mkdir()
    (tmp_path / "feedback" / "19990101" / "fb-x.json").write_text("[1]")
    rows = builtin_rows(SourceConfig(name="served", kind="feedback", path=str(tmp_path)), 3, seed=0)
    assert [r["error"].split(":")[0] for r in rows] == ["not_an_object", ""]
    assert len({r["id"] for r in rows}) == 2 and all(r["source"] == "served" for r in rows)
    record = parse_record(rows[1]["raw"])
    assert (record["kind"], record["messages"], record["chosen"], record["rejected"]) == \
        ("preference", QUESTION, "one", "two")
