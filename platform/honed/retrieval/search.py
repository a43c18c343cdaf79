"""A retrieval index directory (written by `honed index`), searching it, and putting passages into a prompt.

    index = RetrievalIndex("runs/icd10/index")                 # local dir or URI (s3://bucket/index)
    passages = index.search("What is the ICD-10-CM code for type 2 diabetes?", top_k=3)
    prompt = fill_template(DEFAULT_RETRIEVAL_TEMPLATE, question, passages)
    sources = source_list(passages)                            # [{id, title, score}] for a response

The directory holds `index.json` (what built it, counts, tokenizer settings, default top_k), `chunks.jsonl`
(one passage a line: id, title, source, text) and `bm25/` (bm25s's files). This module is its one reader and
writer; it needs neither torch nor Ray, so the Serve router and eval load it cheaply.
"""

from __future__ import annotations

import json
import os

from honed.storage import absolute, is_file, join, local_copy, staged

INDEX_META = "index.json"
CHUNKS = "chunks.jsonl"
BM25_DIR = "bm25"
# bm25s's default pattern (\w\w+) splits "E11.9" into "e11" and drops "9": a code would match all its siblings.
# Words keep inner dots and hyphens, and one-character words (digits) count.
TOKEN_PATTERN = r"(?u)\w[\w.\-]*\w|\w"
STOPWORDS = "english"
BUILD_COMMAND = "honed index jobs/index_icd10.yaml output_dir={path}"


class IndexNotFound(FileNotFoundError):
    """No index at a path: the message names the path and the command that builds one."""

    def __init__(self, path: str, detail: str = f"{INDEX_META} missing"):
        super().__init__(f"no retrieval index at '{path}' ({detail}): build it with `{BUILD_COMMAND.format(path=path)}`"
                         " (any `honed index` config with that output_dir)")


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words (see TOKEN_PATTERN) less English stop words: the same for chunks and queries."""
    import bm25s

    return bm25s.tokenize(texts, lower=True, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS, return_ids=False,
                          show_progress=False)


def write_index(chunks: list[dict], meta: dict, output_dir: str) -> dict:
    """Fit BM25 over `chunks` ({id, title, source, text}) on this process and write the index directory (a local
    path or URI); returns the index.json written: `meta` plus the chunk count and tokenizer settings."""
    import bm25s

    if not chunks:
        raise ValueError(f"nothing to index for '{output_dir}': every record was dropped or no source had records "
                         "(see the counts printed above)")
    bm25 = bm25s.BM25()
    bm25.index(tokenize([c["text"] for c in chunks]), show_progress=False)
    meta = meta | {"chunks": len(chunks), "retriever": {"kind": "bm25s", "k1": bm25.k1, "b": bm25.b,
                                                         "method": bm25.method, "token_pattern": TOKEN_PATTERN,
                                                         "stopwords": STOPWORDS, "lower": True}}
    with staged(output_dir) as out:
        bm25.save(os.path.join(out, BM25_DIR), show_progress=False)
        with open(out / CHUNKS, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks)
        (out / INDEX_META).write_text(json.dumps(meta, indent=2))  # last: a local dir holding it is whole
    return meta


class RetrievalIndex:
    """An index directory loaded into memory for search (a URI is downloaded to a temporary dir, read, and the copy
    removed). IndexNotFound when the path holds no index."""

    def __init__(self, path: str):
        import bm25s

        if not index_exists(path):
            raise IndexNotFound(path)
        self.path = path
        with local_copy(path) as local:
            self.meta = json.loads((local / INDEX_META).read_text())
            with open(local / CHUNKS, encoding="utf-8") as f:
                self.chunks = [json.loads(line) for line in f]
            self.bm25 = bm25s.BM25.load(os.path.join(local, BM25_DIR), show_progress=False)

    def search(self, query: str, top_k: int | None = None) -> list[dict]:
        """The best `top_k` passages (default the index's top_k) sharing a word with `query`, best first:
        `{id, title, source, text, score}`; fewer (or none) when fewer match."""
        k = min(top_k or self.meta["top_k"], len(self.chunks))
        tokens = tokenize([query])
        if not tokens[0]:
            return []
        found, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [self.chunks[int(i)] | {"score": round(float(s), 4)} for i, s in zip(found[0], scores[0]) if s > 0]


def fill_template(template: str, question: str, passages: list[dict]) -> str:
    """`template` (with `{passages}` and `{question}`) filled: passages numbered `[1] text`, blank-line separated."""
    text = "\n\n".join(f"[{n}] {p['text']}" for n, p in enumerate(passages, 1))
    return template.format(passages=text, question=question)


def source_list(passages: list[dict]) -> list[dict]:
    """What a response says of its passages: `[{id, title, score}]`, best first."""
    return [{"id": p["id"], "title": p["title"], "score": p["score"]} for p in passages]


def index_exists(path: str) -> bool:
    """Whether `path` (local or URI) holds index.json; a check before any Ray work."""
    try:
        return is_file(join(path, INDEX_META))
    except (OSError, ValueError):  # an unreachable bucket or a URI pyarrow cannot open
        return False


def with_passages(questions: list[dict], settings) -> list[dict]:
    """Each question `{prompt, ...}` asked with retrieval (`settings`: RetrievalSettings): `prompt` becomes the
    filled template, `question` keeps the original and `sources` names the passages."""
    index = RetrievalIndex(settings.index)
    out = []
    for q in questions:
        passages = index.search(q["prompt"], settings.top_k)
        out.append(q | {"prompt": fill_template(settings.template, q["prompt"], passages), "question": q["prompt"],
                        "sources": source_list(passages)})
    return out


def with_sources(request: dict, settings, index: RetrievalIndex) -> tuple[dict, list[dict]]:
    """A served request (`{"messages": [...]}` or `{"prompt": ...}` plus sampling fields) with the passages for
    its last user message (or prompt) filled into it by `settings.template`, and those passages' sources."""
    if "prompt" in request:
        passages = index.search(request["prompt"], settings.top_k)
        return request | {"prompt": fill_template(settings.template, request["prompt"], passages)}, \
            source_list(passages)
    messages = [dict(m) for m in request["messages"]]
    users = [m for m in messages if m["role"] == "user"]
    if not users:  # nothing asked: nothing to search for
        return request, []
    passages = index.search(users[-1]["content"], settings.top_k)
    users[-1]["content"] = fill_template(settings.template, users[-1]["content"], passages)
    return request | {"messages": messages}, source_list(passages)


def resolve_index(path: str) -> str:
    """`path` made absolute when local (a Serve replica may start elsewhere); IndexNotFound when no index is there."""
    if not index_exists(path):
        raise IndexNotFound(path)
    return absolute(path)
