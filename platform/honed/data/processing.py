"""Per-record work of `honed prepare`: one Ray Data actor turns reader rows into processed rows (parse →
normalise → filter → redact → decontaminate → template + tokenize → split → dedup keys), one row out per row in;
after dedup, `split_windows` cuts kept text documents longer than the limit into token windows.

    processed = rows.map_batches(ExampleProcessor, fn_constructor_kwargs={"model_path": path, "settings": s,
                                 "decontam": index}, batch_format="numpy", compute=ray.data.ActorPoolStrategy(...))

`settings` is the plain dict `honed.data.pipeline.processor_settings` builds from the config. Every output row
has the columns of `OUTPUT_TYPES`, with a status (kept, dropped, quarantined) and a reason.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter, defaultdict

import numpy as np

from honed.config import PII_TYPES
from honed.data.dedup import MinHasher, exact_key
from honed.data.pii import redact
from honed.data.quality import normalize_text, quality_reason, text_of
from honed.data.records import (
    DROPPED, KEPT, QUARANTINED, BadRecord, assign_split, empty_field, encode_example, encode_preference, encode_texts,
    group_key, identical_answers, map_texts, parse_record, token_windows,
)
from honed.models import load_tokenizer


class ExampleProcessor:
    """Ray Data actor: reader rows → one processed row each, with a status, a reason, the tokenized example
    and the keys deduplication needs. Quarantined rows keep their raw text (2,000 characters) and origin."""

    def __init__(self, model_path: str, settings: dict, decontam=None):
        self.tokenizer = load_tokenizer(model_path)
        self.s = settings
        self.decontam = decontam
        dd = settings["dedup"]
        self.hasher = MinHasher(dd["num_perm"], seed=1) if dd["near"] else None

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        out = defaultdict(list)
        rows = [self.clean(str(s), str(r), str(e)) for s, r, e in zip(batch["source"], batch["raw"], batch["error"])]
        self.encode(rows, [str(s) for s in batch["source"]])
        self.add_dedup_keys(rows)
        for row, source, origin, rid in zip(rows, batch["source"], batch["origin"], batch["id"]):
            row.update(source=str(source), origin=str(origin), id=int(rid))
            for key in OUTPUT_KEYS:
                out[key].append(row.get(key, EMPTY[key]))
        # An explicit schema keeps token lists as plain Arrow lists in every block and in the shards.
        return pa.table({key: list_array(out[key], OUTPUT_TYPES[key]) if pa.types.is_list(OUTPUT_TYPES[key])
                         else pa.array(out[key], type=OUTPUT_TYPES[key]) for key in OUTPUT_KEYS})

    def clean(self, source: str, raw: str, error: str) -> dict:
        """Parse → normalise → filter → redact → decontaminate one record; a survivor comes back with status
        `pending` and its record, for `encode` to tokenize with the rest of the batch."""
        s = self.s
        if error:
            reason, _, detail = error.partition(": ")
            return {"status": QUARANTINED, "reason": reason, "raw": raw[:2000], "detail": detail}
        src = s["sources"][source]
        try:
            record = parse_record(raw, src["fields"], src["format"])
        except BadRecord as err:
            return {"status": QUARANTINED, "reason": err.reason, "raw": raw[:2000], "detail": str(err)}
        norm = s["normalize"]
        record = map_texts(record, lambda t: normalize_text(t, norm["unicode"], norm["strip_html"]))
        empty = empty_field(record)
        if empty:  # an empty record is broken input, not a filter's choice: quarantined with its raw text
            return {"status": QUARANTINED, "reason": f"empty_{empty}", "raw": raw[:2000],
                    "detail": f"'{empty}' is empty after normalisation"}
        if identical_answers(record):
            return {"status": QUARANTINED, "reason": "identical_pair", "raw": raw[:2000],
                    "detail": "chosen and rejected are the same text after normalisation: no preference to learn"}
        if s["filters"] is not None:
            failed = quality_reason(text_of(record), s["filters"])
            if failed:
                return {"status": DROPPED, "reason": f"quality_{failed}"}
        pii = Counter()
        if s["pii"]:
            def scrub(text: str) -> str:
                clean, counts = redact(text, s["pii"])
                pii.update(counts)
                return clean
            record = map_texts(record, scrub)
        text = text_of(record)
        if self.decontam is not None and not src["eval_only"] and self.decontam.contaminated(text):
            return {"status": DROPPED, "reason": "contaminated", **_pii_columns(pii)}
        return {"status": "pending", "record": record, "dedup_text": text, **_pii_columns(pii)}

    def encode(self, rows: list[dict], sources: list[str]) -> None:
        """Template + tokenize the pending rows (raw text in one batched tokenizer call), apply the token
        limits, assign the split."""
        s = self.s
        pending = [(row, source) for row, source in zip(rows, sources) if row["status"] == "pending"]
        texts = [row for row, _ in pending if row["record"]["kind"] == "text"]
        for row, ids in zip(texts, encode_texts([r["record"]["text"] for r in texts], self.tokenizer)):
            row["encoded"] = {"input_ids": ids, "labels": list(ids)}
        for row, source in pending:
            record = row.pop("record")
            if record["kind"] == "preference":
                encoded = encode_preference(record, self.tokenizer, s["system_prompt"], s["chat_template"])
            else:
                encoded = row.pop("encoded", None) or encode_example(
                    record, self.tokenizer, s["system_prompt"], s["loss_on"], s["chat_template"])
            # a pair is as long as its longer answer's conversation; both must fit max_seq_len
            n_tokens = max(len(encoded["input_ids"]), len(encoded.get("rejected_input_ids", ())))
            # a long text document stays whole through dedup and the split; `split_windows` cuts it afterwards
            too_long = n_tokens > s["max_seq_len"] and not (s["chunk"] and record["kind"] == "text")
            if too_long or (s["min_tokens"] and n_tokens < s["min_tokens"]):
                row.update(status=DROPPED, reason="too_long" if too_long else "too_few_tokens")
                continue
            src = s["sources"][source]
            group = group_key(record)
            split = "val" if src["eval_only"] else assign_split(s["seed"], source, group, src["val_fraction"])
            row.update(status=KEPT, reason="", split=split, group=group, num_tokens=n_tokens, kind=record["kind"],
                       **encoded, **shard_texts(record))

    def add_dedup_keys(self, rows: list[dict]) -> None:
        kept = [r for r in rows if r["status"] == KEPT]
        dd = self.s["dedup"]
        for r in rows:
            if r["status"] != KEPT:
                r.pop("dedup_text", None)
        if not kept:
            return
        if dd["exact"]:
            for r in kept:
                r["exact_key"] = exact_key(r["dedup_text"])
        if self.hasher is not None:
            sigs = self.hasher.signatures([r["dedup_text"] for r in kept], dd["shingle_words"])
            for r, sig in zip(kept, sigs):
                r["signature"] = sig.astype(np.int64).tolist()
        for r in kept:
            del r["dedup_text"]


def split_windows(batch, size: int, overlap: int, model_path: str):
    """Ray Data stage on kept rows (an Arrow batch), after dedup and the split: a row longer than `size` tokens (a
    text document; nothing else is kept that long) becomes its windows (`honed.data.records.token_windows`), each
    a copy of the document's row (source, id, group, split) with its own tokens, text and `window` number; other
    rows pass through as window 0."""
    import pyarrow as pa

    long = batch["num_tokens"].to_numpy() > size
    if not long.any():
        return batch.append_column("window", pa.array(np.zeros(len(long), dtype=np.int32)))
    ids, labels = batch["input_ids"].to_pylist(), batch["labels"].to_pylist()
    rows, numbers, pieces = [], [], []  # per output row: its document's row, its window number, (ids, labels)
    for i in range(len(long)):
        windows = token_windows(ids[i], labels[i], size, overlap) if long[i] else [(ids[i], labels[i])]
        rows += [i] * len(windows)
        numbers += range(len(windows))
        pieces += windows
    out = batch.take(pa.array(rows))
    texts = [_tokenizer(model_path).decode(x, skip_special_tokens=True) if long[row] else text
             for row, (x, _), text in zip(rows, pieces, out["text"].to_pylist())]
    columns = {"input_ids": list_array([x for x, _ in pieces], OUTPUT_TYPES["input_ids"]),
               "labels": list_array([y for _, y in pieces], OUTPUT_TYPES["labels"]),
               "num_tokens": pa.array([len(x) for x, _ in pieces], OUTPUT_TYPES["num_tokens"]),
               "text": pa.array(texts, pa.string())}
    for name, values in columns.items():
        out = out.set_column(out.schema.get_field_index(name), name, values)
    return out.append_column("window", pa.array(numbers, pa.int32()))


@functools.cache
def _tokenizer(model_path: str):
    """One tokenizer per worker process for `split_windows` (a plain Ray Data task function, reused across tasks)."""
    return load_tokenizer(model_path)


def shard_texts(record: dict) -> dict:
    """The text columns of a kept row. A preference pair with a one-turn question also fills prompt/response
    (question, chosen answer), so evaluation can ask it like any instruction example."""
    out = {k: record.get(k, "") for k in ("prompt", "response", "text", "chosen", "rejected")}
    if "messages" in record:
        out["messages"] = json.dumps(record["messages"], ensure_ascii=False)
    if record["kind"] == "preference" and len(record["messages"]) == 1:
        out |= {"prompt": record["messages"][0]["content"], "response": record["chosen"], "messages": ""}
    return out


def list_array(lists: list[list[int]], list_type):
    """Lists of ints → an Arrow list array through flat numpy buffers (much faster than `pa.array`)."""
    import pyarrow as pa

    lengths = np.fromiter((len(x) for x in lists), dtype=np.int32, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=list_type.value_type.to_pandas_dtype(),
                         count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _pii_columns(counts: Counter) -> dict:
    return {f"pii_{t}": counts.get(t, 0) for t in PII_TYPES}


EMPTY = {
    "source": "", "id": 0, "origin": "", "status": "", "reason": "", "detail": "", "raw": "", "split": "",
    "group": "", "kind": "", "prompt": "", "response": "", "text": "", "messages": "", "input_ids": [], "labels": [],
    "num_tokens": 0, "chosen": "", "rejected": "", "rejected_input_ids": [], "rejected_labels": [],
    "exact_key": 0, "signature": [],
    **{f"pii_{t}": 0 for t in PII_TYPES},
    "augmented_from": -1,  # a paraphrase's source record id (`honed.data.augment`); -1: a record as read
}
OUTPUT_KEYS = list(EMPTY)


def _output_types() -> dict:
    import pyarrow as pa

    ints = {"id": pa.int64(), "num_tokens": pa.int32(), "exact_key": pa.int64(), "augmented_from": pa.int64(),
            "input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()), "signature": pa.list_(pa.int64()),
            "rejected_input_ids": pa.list_(pa.int32()), "rejected_labels": pa.list_(pa.int32()),
            **{f"pii_{t}": pa.int32() for t in PII_TYPES}}
    return {key: ints.get(key, pa.string()) for key in OUTPUT_KEYS}


OUTPUT_TYPES = _output_types()
