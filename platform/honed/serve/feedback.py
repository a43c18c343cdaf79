"""The completion log and the feedback log of a served endpoint (`feedback.store` in the serve config).

    store = FeedbackStore("s3://bucket/feedback")           # or a local dir: pyarrow.fs either way
    store.write_completion(completion_record(...))          # the router, before it answers
    store.record_feedback(FeedbackRequest(...), max_rating) # POST /v1/feedback: checked, written; APIError 400/404
    store.records("feedback")                               # [(path, raw bytes)]: what `honed prepare` reads back

Layout under the root, one JSON object per record:
  completions/<yyyymmdd>/<completion id>.json   what was served: the request (messages or prompt), the model asked
                                                for and the adapter version it resolved to, sampling settings, and
                                                every choice's text
  feedback/<yyyymmdd>/<feedback id>.json        one judgement: a rating, a preferred answer, a choice
Append-only: each record is written once under a fresh uuid name and never rewritten, so replicas writing at the
same time never clobber one another (no read-modify-write). A local file is written under a temporary name and
renamed (a reader never sees half a record); an object-store PUT is whole already. A completion id carries its
day (`chatcmpl-20261203-<32 hex>`), so finding a completion is one read, not a listing.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict

from honed.generation import Completion
from honed.serve.protocol import APIError
from honed.storage import filesystem, is_uri

COMPLETIONS, FEEDBACK = "completions", "feedback"
COMPLETION_ID = re.compile(r"^(chatcmpl|cmpl)-(\d{8})-[0-9a-f]{32}$")


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a judgement of one served completion; at least one of rating, preferred, choice."""

    model_config = ConfigDict(extra="forbid")
    completion_id: str
    """The `id` of a response from /v1/chat/completions or /v1/completions."""
    rating: int | None = None
    """1 (worst) .. `feedback.max_rating`; on a completion of n ≥ 2 choices, of the answer named by `choice`."""
    preferred: str | None = None
    """A better answer written by a person: preferred over every served choice."""
    choice: int | None = None
    """Index of the answer picked among the completion's choices (`n: 2` requests)."""
    comment: str | None = None
    """Kept with the judgement; not used for pairs."""


def new_completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{time.strftime('%Y%m%d', time.gmtime())}-{uuid.uuid4().hex}"


def completion_record(completion_id: str, chat: bool, request: dict[str, Any], sampling: dict[str, Any],
                      model: str, served: str, base_model: str, dones: list[Completion]) -> dict:
    """What the completion log keeps of one answered request. `request`: {"messages"} or {"prompt"} as the model
    saw it (for a `retrieval` model, with its passages filled in); `model`: the name asked for; `served`: what
    answered it (an adapter's `name@N` when the registry resolved it)."""
    return {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
            "created": time.time(), "model": model, "served": served, "base_model": base_model,
            "request": request, "sampling": sampling,
            "choices": [{"index": i, "text": d.text, "finish_reason": d.finish_reason} for i, d in enumerate(dones)]}


def check_feedback(body: FeedbackRequest, completion: dict, max_rating: int) -> dict:
    """The feedback record for `body` on `completion`, or APIError 400 naming the field that is wrong."""
    n = len(completion["choices"])
    if body.rating is None and body.preferred is None and body.choice is None:
        raise APIError(400, "feedback needs at least one of rating, preferred, choice", None, "empty_feedback")
    if body.rating is not None and not 1 <= body.rating <= max_rating:
        raise APIError(400, f"rating {body.rating} is outside 1..{max_rating}", "rating", "invalid_rating")
    if body.preferred is not None and not body.preferred.strip():
        raise APIError(400, "preferred is empty: write the better answer, or leave preferred out", "preferred",
                       "invalid_preferred")
    if body.choice is not None and not 0 <= body.choice < n:
        raise APIError(400, f"choice {body.choice} is not an answer of completion {body.completion_id}, which has "
                            f"{n} choice(s): 0..{n - 1}", "choice", "invalid_choice")
    if body.rating is not None and n > 1 and body.choice is None:
        raise APIError(400, f"completion {body.completion_id} has {n} choices: name the rated one with `choice`",
                       "choice", "invalid_choice")
    day = time.strftime("%Y%m%d", time.gmtime())
    return {"id": f"fb-{day}-{uuid.uuid4().hex}", "object": "feedback", "created": time.time()} | \
        body.model_dump(exclude_none=True)


class FeedbackStore:
    """The completion and feedback logs under a local dir or a pyarrow URI (s3://, gs://, ...)."""

    def __init__(self, root: str):
        self.remote = is_uri(root)
        self.fs, base = filesystem(root) if self.remote else (pafs.LocalFileSystem(), str(Path(root).resolve()))
        self.base = base.rstrip("/")

    def write_completion(self, record: dict) -> None:
        self._write(self._completion_path(record["id"]), record)

    def read_completion(self, completion_id: str) -> dict | None:
        """The logged completion, or None when the id is not one this store holds."""
        path = self._completion_path(completion_id) if COMPLETION_ID.match(completion_id) else None
        if path is None or self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def record_feedback(self, body: FeedbackRequest, max_rating: int) -> dict:
        """Check `body` against its completion (404 unknown id, 400 bad field) and append it; returns the record."""
        completion = self.read_completion(body.completion_id)
        if completion is None:
            raise APIError(404, f"completion '{body.completion_id}' does not exist: completion_id is the `id` of a "
                                "response this endpoint gave", "completion_id", "completion_not_found")
        record = check_feedback(body, completion, max_rating)
        self._write(posixpath.join(self.base, FEEDBACK, record["id"].split("-")[1], f"{record['id']}.json"), record)
        return record

    def records(self, kind: str) -> list[tuple[str, bytes]]:
        """(path, raw bytes) of every record of `kind` (`completions` or `feedback`), sorted by path."""
        entries = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.base, kind), recursive=True,
                                                          allow_not_found=True))
        paths = sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".json"))
        out = []
        for path in paths:
            with self.fs.open_input_stream(path) as f:
                out.append((path, f.read()))
        return out

    def check(self) -> None:
        """Fail now, naming the store, when it cannot be created or reached (not on the first request)."""
        try:
            self.fs.create_dir(self.base, recursive=True)
            self.fs.get_file_info(self.base)
        except OSError as err:
            raise FileNotFoundError(f"feedback.store '{self.base}' cannot be used: {err}") from None

    def _completion_path(self, completion_id: str) -> str:
        day = completion_id.split("-")[1]
        return posixpath.join(self.base, COMPLETIONS, day, f"{completion_id}.json")

    def _write(self, path: str, record: dict) -> None:
        body = json.dumps(record, ensure_ascii=False).encode()
        if self.remote:  # an object store PUT is whole or absent
            with self.fs.open_output_stream(path) as out:
                out.write(body)
            return
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # not `.json`: readers skip it
        with self.fs.open_output_stream(tmp) as out:
            out.write(body)
        self.fs.move(tmp, path)
