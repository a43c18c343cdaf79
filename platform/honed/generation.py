"""Prompting and decoding shared by evaluation and serving, so both apply the template the adapter was
trained with (system prompt, chat template, EOS) in exactly the same way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

BASE = "__base__"  # the adapter name of rows decoded by the base model (peft's name for it)


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
    """A peft adapter name or BASE (rows of different LoRA adapters then share one forward through peft's
    `adapter_names`); None decodes with the model as it is."""


@dataclass
class _Row:
    job: DecodeJob
    stop_ids: set[int]
    stop_text: list[str]
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed out
    finish: str | None = None


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


def _pick(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Next token per row: argmax when the row's temperature is 0, else top-p sampling from its own generator."""
    picked = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.job.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float() / row.job.temperature, -1)
        if row.job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < row.job.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        picked[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return picked


@torch.inference_mode()
def decode_steps(model, tokenizer, jobs: list[DecodeJob]) -> Iterator[list[dict | None]]:
    """Decode `jobs` together, one token per row per step, and yield one event per job after each step:
    `{"text": piece}` (new text, possibly ""), `{"done": Completion}` once, then None.

    Left-padded prompts, one KV cache; finished rows leave the batch. Rows name their adapter: when any row
    names one, every forward passes peft's `adapter_names`, so rows of different LoRA adapters (and of the base,
    BASE) share each forward. Stop strings end a row where they start; streamed text holds back any tail that
    could still turn into a stop string."""
    device = next(model.parameters()).device
    rows = []
    for job in jobs:
        stop_ids, stop_text = stop_split(tokenizer, job.stop)
        generator = None
        if job.temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(job.seed if job.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        rows.append(_Row(job, stop_ids, stop_text, generator))
    mixed = any(job.adapter is not None for job in jobs)
    width = max(len(job.prompt_ids) for job in jobs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    live = list(range(len(jobs)))  # indices of rows still decoding, in batch order
    cache = None
    while live:
        extra = {"adapter_names": [jobs[i].adapter or BASE for i in live]} if mixed else {}
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1, **extra)
        cache = out.cache
        tokens = _pick(out.logits[:, -1], [rows[i] for i in live])
        events: list[dict | None] = [None] * len(jobs)
        for i, token in zip(live, tokens):
            events[i] = _advance(tokenizer, rows[i], token)
        yield events
        keep = [k for k, i in enumerate(live) if rows[i].finish is None]
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], [tokens[k] for k in keep]
            live = [live[k] for k in keep]
        input_ids = torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], -1)
        positions = positions[:, -1:] + 1


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
            if event and "done" in event:
                done[i] = event["done"]
    return done
