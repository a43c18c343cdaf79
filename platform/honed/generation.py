"""Prompting and decoding shared by evaluation and serving, so both apply the template the adapter was
trained with (system prompt, chat template, EOS) in exactly the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
             streamer=None) -> list[Completion]:
    """Batched decoding of already-rendered prompts (left-padded); greedy when temperature is 0.
    A `transformers` streamer, if given, receives the text as it is decoded (batch of one)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = temperature > 0
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, top_k=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, stop_strings=stop or None, tokenizer=tokenizer if stop else None,
        streamer=streamer,
    )
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    return [_finish(tokenizer, row, int(mask.sum()), stop or [])
            for row, mask in zip(new_tokens, enc["attention_mask"])]


def _finish(tokenizer, tokens: torch.Tensor, prompt_tokens: int, stop: list[str]) -> Completion:
    ids = tokens.tolist()
    finish, used = "length", len(ids)
    if tokenizer.eos_token_id in ids:  # generate() pads finished rows after their EOS
        used = ids.index(tokenizer.eos_token_id) + 1
        ids, finish = ids[: used - 1], "stop"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in stop:
        if s and s in text:
            text, finish = text[: text.index(s)], "stop"
    return Completion(text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=used, finish_reason=finish)
