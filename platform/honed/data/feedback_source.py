"""`kind: feedback` for `honed prepare`: the judgements in a serve feedback store as preference pairs.

    sources: [{name: served, kind: feedback, path: s3://bucket/feedback}]   # the serve config's feedback.store

The pair rule (the dataset manifest names this module beside the source):
- `choice: i` on a completion of n ≥ 2 answers: chosen = answer i, rejected = each other answer;
- `preferred: text` written by a person: chosen = that text, rejected = each answer the completion served;
- ratings: the latest rating of each served answer counts; among the answers to one question (the same request
  messages or prompt), every answer rated higher is chosen over every answer rated lower; equal ratings give none.
The question is the request as it was sent (its messages, or a text completion's prompt as one user turn); the
prepare pipeline then cleans, redacts, deduplicates and templates the pairs like any preference source. A pair
whose two answers are the same text is quarantined there (`identical_pair`); a record of the store that cannot be
read, or a judgement naming a completion the store lacks, is quarantined here with its path.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.fs as pafs

from honed.serve.feedback import COMPLETIONS, FEEDBACK, FeedbackStore


def feedback_records(root: str) -> list[tuple[str, str, str]]:
    """(origin, raw JSON record, reader error) for every pair the store's judgements give, in a stable order:
    judgement by judgement (oldest first), then the rating pairs question by question; a record that cannot be
    used comes out with its error (the pipeline quarantines it)."""
    completions, judgements, out = read_store(root)
    ratings: dict[tuple[str, int], tuple[str, dict]] = {}
    for path, judgement in judgements:
        completion = completions.get(judgement.get("completion_id"))
        error = _judgement_error(judgement, completion)
        if error:
            out.append((path, json.dumps(judgement, ensure_ascii=False), error))
            continue
        out += [(f"{path}#{i}", json.dumps(pair, ensure_ascii=False), "")
                for i, pair in enumerate(judged_pairs(judgement, completion))]
        if judgement.get("rating") is not None:
            ratings[(completion["id"], judgement.get("choice") or 0)] = (path, judgement)
    out += [(origin, json.dumps(pair, ensure_ascii=False), "") for origin, pair in rating_pairs(ratings, completions)]
    return out


def read_store(root: str) -> tuple[dict[str, dict], list[tuple[str, dict]], list[tuple[str, str, str]]]:
    """Completions by id, judgements (path, record) oldest first, and (path, raw, error) of unreadable records."""
    store = FeedbackStore(root)
    if store.fs.get_file_info(store.base).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"feedback store '{root}' does not exist (the serve config's feedback.store writes "
                                "it; a local dir or s3:// URI)")
    completions, judgements, broken = {}, [], []
    for kind in (COMPLETIONS, FEEDBACK):
        for path, raw in store.records(kind):
            record, error = _load(raw)
            error = error or (_completion_error(record) if kind == COMPLETIONS else "")
            if error:
                broken.append((path, raw.decode("utf-8", "replace"), error))
            elif kind == COMPLETIONS:
                completions[record["id"]] = record
            else:
                judgements.append((path, record))
    judgements.sort(key=lambda j: (j[1].get("created", 0), j[0]))
    return completions, judgements, broken


def judged_pairs(judgement: dict, completion: dict) -> list[dict]:
    """The pairs of one judgement's `choice` and `preferred` (ratings pair across judgements: `rating_pairs`)."""
    answers = [c["text"] for c in completion["choices"]]
    question = completion["request"]
    pairs = []
    choice = judgement.get("choice")
    if choice is not None and len(answers) > 1:
        pairs += [question | {"chosen": answers[choice], "rejected": other}
                  for i, other in enumerate(answers) if i != choice]
    if judgement.get("preferred") is not None:
        pairs += [question | {"chosen": judgement["preferred"], "rejected": served} for served in answers]
    return pairs


def rating_pairs(ratings: dict[tuple[str, int], tuple[str, dict]], completions: dict) -> list[tuple[str, dict]]:
    """(origin, pair) for every higher- over lower-rated answer to the same question. `ratings`: the latest
    judgement (its path and record) of each (completion id, choice index)."""
    by_question: dict[str, list[tuple[int, str, str, dict]]] = defaultdict(list)
    for (completion_id, index), (path, judgement) in sorted(ratings.items()):
        completion = completions[completion_id]
        key = json.dumps(completion["request"], sort_keys=True)
        by_question[key].append((judgement["rating"], completion["choices"][index]["text"], path,
                                 completion["request"]))
    out = []
    for rated in by_question.values():
        for high, chosen, high_path, question in rated:
            out += [(f"{high_path}+{low_path}", question | {"chosen": chosen, "rejected": rejected})
                    for low, rejected, low_path, _ in rated if high > low]
    return out


def _completion_error(record: dict) -> str:
    request, choices = record.get("request"), record.get("choices")
    if not isinstance(record.get("id"), str) or not isinstance(request, dict) or not isinstance(choices, list) \
            or not choices or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
        return "bad_completion: a completion record needs id, request ({messages} or {prompt}) and choices [{text}]"
    return ""


def _judgement_error(judgement: dict, completion: dict | None) -> str:
    if completion is None:
        return f"unknown_completion: no completion '{judgement.get('completion_id')}' in the store"
    choice, rating, preferred = judgement.get("choice"), judgement.get("rating"), judgement.get("preferred")
    n = len(completion["choices"])
    if choice is not None and not (isinstance(choice, int) and 0 <= choice < n):
        return f"bad_feedback: choice {choice!r} is not an answer index of a completion with {n} choice(s)"
    if rating is not None and not isinstance(rating, int):
        return f"bad_feedback: rating {rating!r} is not an integer"
    if preferred is not None and not isinstance(preferred, str):
        return f"bad_feedback: preferred must be a string, got {type(preferred).__name__}"
    return ""


def _load(raw: bytes) -> tuple[dict | None, str]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"malformed_json: {err}"
    if not isinstance(record, dict):
        return None, f"not_an_object: expected a JSON object, got {type(record).__name__}"
    return record, ""
