"""Retrieval on a real local Ray: `honed index` reads, cleans and chunks files and bundled ICD-10 records with Ray
Data and writes a BM25 index (locally and to a local S3 server); the Serve app over HTTP puts the passages into the
prompt and returns their sources; `honed eval` scores the same questions with and without retrieval.

The slow test is the issue's check: ICD-10-CM codes of a chapter the model never saw, asked as "What is the
ICD-10-CM code for <description>?", answered by SmolLM2-135M-Instruct with and without the index's passages."""

import json
import re

import openai
import pytest

from honed.cli import main
from honed.retrieval.search import RetrievalIndex
from s3_server import BUCKET, moto_s3

LONG_DOC = " ".join(f"word{i}" for i in range(300)) + " the appendix is a tube joined to the large intestine"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval-corpus")
    lines = [json.dumps({"text": LONG_DOC}),
             json.dumps({"prompt": "Who answers billing questions?", "response": "Write to billing@example.com"}),
             "{broken json",
             json.dumps({"text": "#### ### ## # ###"})]
    (root / "notes.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def built(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "index"
    sources = (f"sources=[{{name: notes, kind: jsonl, path: {corpus}}}, "
               "{name: icd10, kind: icd10, chapters: ['11'], max_records: 60}]")
    assert main(["index", "jobs/index_icd10.yaml", sources, "chunk_words=100", "chunk_overlap=10",
                 "top_k=2", f"output_dir={out}"]) == 0
    return str(out)


def test_index_holds_cleaned_chunks_and_counts_every_record(built):
    index = RetrievalIndex(built)
    counts = index.meta["counts"]
    assert counts["read"] == 64 and counts["kept_records"] == 62
    assert counts["quarantined"] == {"malformed_json": 1} and sum(counts["dropped"].values()) == 1
    notes = [c for c in index.chunks if c["source"] == "notes"]
    assert len(notes) == 5  # the 310-word document in 100-word chunks overlapping by 10 words, and the Q&A
    assert "<EMAIL>" in notes[-1]["text"] and "example.com" not in json.dumps(index.chunks)
    assert index.meta["config"]["chunk_words"] == 100 and index.meta["top_k"] == 2


def test_top_k_finds_the_record_asked_about(built):
    index = RetrievalIndex(built)
    icd = [c for c in index.chunks if c["source"] == "icd10"]
    for chunk in icd[::10]:
        code = re.search(r"code ([A-Z][0-9][0-9A-Z.]*)", chunk["text"])[1]
        hits = index.search(f"What does ICD-10-CM code {code} mean?")
        assert len(hits) <= 2 and code in hits[0]["text"], (code, hits)
    assert index.search("which tube is joined")[0]["id"].startswith("notes:")


def test_the_index_writes_to_and_loads_from_object_storage(ray_local, corpus, tmp_path):
    with moto_s3():
        assert main(["index", f"sources=[{{name: notes, kind: jsonl, path: {corpus}}}]",
                     f"output_dir=s3://{BUCKET}/notes"]) == 0
        index = RetrievalIndex(f"s3://{BUCKET}/notes")
        assert index.search("appendix intestine")[0]["source"] == "notes"
        assert main(["eval", f"retrieval.index=s3://{BUCKET}/absent"]) == 1


def test_served_answers_carry_the_passages_and_their_sources(built, tiny_model, free_port):
    from honed.config import ServeConfig
    from honed.generation import render_chat
    from honed.models import load_tokenizer
    from honed.retrieval.search import fill_template
    from honed.serve import deploy

    question = RetrievalIndex(built).chunks[-1]["text"].split("\n")[0]  # an ICD-10 record's question
    cfg = ServeConfig(model={"name_or_path": tiny_model}, port=free_port(), max_tokens=16,
                      retrieval={"base": {"index": built, "top_k": 1}})
    client = openai.OpenAI(base_url=deploy.start(cfg), api_key="none", max_retries=0, timeout=120)
    try:
        chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": question}],
                                              max_tokens=4, temperature=0)
        passages = RetrievalIndex(built).search(question, top_k=1)
        assert chat.model_extra["sources"] == [{k: p[k] for k in ("id", "title", "score")} for p in passages]
        # the model read the question inside the template, with the passage: exactly these prompt tokens
        tokenizer = load_tokenizer(tiny_model)
        asked = fill_template(cfg.retrieval["base"].template, question, passages)
        prompt = render_chat(tokenizer, [{"role": "user", "content": asked}])
        assert chat.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": question}],
                                                max_tokens=4, temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[0].model_extra["sources"][0]["id"] == passages[0]["id"]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        text = client.completions.create(model="base", prompt=question, max_tokens=2, temperature=0)
        assert text.model_extra["sources"][0]["id"] == passages[0]["id"]
    finally:
        deploy.stop()


def test_eval_scores_the_same_questions_with_and_without_retrieval(prepared, built, tiny_model, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", f"model.name_or_path={tiny_model}", f"data_dir={prepared['dir']}", f"output_dir={out}",
                 f"retrieval.index={built}", "generate_examples=4", "max_examples=4", "max_new_tokens=4",
                 "bias.enabled=false", "decontamination=false"]) == 0
    result = json.loads((out / "eval.json").read_text())
    base = result["scores"]["base"]
    assert {"exact_match", "retrieval/exact_match", "token_f1", "retrieval/token_f1"} <= set(base)
    answered = result["retrieval"]["samples"]["base"]
    assert len(answered) == len(result["samples"]["base"]) == 4
    assert [a["question"] for a in answered] == [s["prompt"] for s in result["samples"]["base"]]
    assert all(a["prompt"].startswith("Context:\n") and a["prompt"].endswith(a["question"]) for a in answered)
    gain = result["retrieval"]["models"]["base"]["token_f1"]
    assert gain["without"] == base["token_f1"] and gain["with"] == base["retrieval/token_f1"]
    assert len(gain["gain_interval"]) == 2


@pytest.mark.slow
def test_retrieval_lets_the_base_model_answer_codes_it_never_saw(ray_local, tmp_path):
    """ICD-10-CM chapter 11 (the demo trains on 4, 9, 10): 40 codes asked by description, scored by the exact code
    (and its 3-character category) in the answer of SmolLM2-135M-Instruct, without retrieval and with the top 1 and
    top 3 passages. Measured here (2 busy CPU cores, 7 min): exact code 0.00 without, 0.90 with the top passage, 0.15
    with three (category 0.00 / 0.95 / 0.80): given siblings side by side, the 135M model often copies the wrong one."""
    import simple_icd_10_cm as cm

    from honed.config import DEFAULT_RETRIEVAL_TEMPLATE
    from honed.eval.evaluate import answer_questions
    from honed.models import load_model, resolve_model
    from honed.retrieval.search import fill_template

    out = tmp_path / "index"
    assert main(["index", "jobs/index_icd10.yaml", f"output_dir={out}"]) == 0
    index = RetrievalIndex(str(out))
    codes = sorted(c for c in cm.get_descendants("11") if cm.is_leaf(c) and cm.is_category_or_subcategory(c))
    questions = [{"prompt": f"What is the ICD-10-CM code for {cm.get_description(c).lower()}?", "response": c}
                 for c in codes[:: len(codes) // 40][:40]]
    model, tokenizer = load_model(resolve_model("smollm2-135m-instruct"), "float32", device="cpu")
    template = {"system_prompt": "You are a medical coding assistant. Answer with ICD-10-CM facts only."}

    def scores(top_k: int) -> tuple[float, float, float]:
        """(code in the passages, exact code in the answer, its category in the answer) over the questions."""
        passages = [index.search(q["prompt"], top_k) if top_k else [] for q in questions]
        asked = [q | {"prompt": fill_template(DEFAULT_RETRIEVAL_TEMPLATE, q["prompt"], p)} if top_k else q
                 for q, p in zip(questions, passages)]
        answers = answer_questions(model, tokenizer, asked, template, {"batch_size": 8, "max_new_tokens": 32})
        share = lambda hits: round(sum(hits) / len(questions), 3)  # noqa: E731
        return (share(q["response"] in " ".join(x["text"] for x in p) for q, p in zip(questions, passages)),
                share(q["response"] in a["answer"] for q, a in zip(questions, answers)),
                share(q["response"][:3] in a["answer"] for q, a in zip(questions, answers)))

    figures = {f"top_k={k}": scores(k) for k in (0, 1, 3)}
    print(f"\n[retrieval] {len(questions)} chapter-11 codes (in passages, exact code, category): {figures}")
    assert figures["top_k=1"][0] >= 0.9 and figures["top_k=3"][0] >= figures["top_k=1"][0]
    assert figures["top_k=1"][1] >= figures["top_k=0"][1] + 0.3
    assert figures["top_k=1"][2] >= figures["top_k=0"][2] + 0.3
