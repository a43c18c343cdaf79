"""Chat templates: the tokenizer's own, or one shipped here by name. The Jinja text of the template used is
written into the dataset manifest and adapter metadata, and the same text is applied again in training,
evaluation and serving, so a model is always prompted exactly as it was trained.

Every template renders a conversation prefix as a string prefix of the longer conversation (checked when
examples are encoded): that is what lets the loss cover assistant turns only.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
PLAIN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
)

NAMED = {"chatml": (CHATML, ["<|im_end|>"]), "llama3": (LLAMA3, ["<|eot_id|>"]),
         "alpaca": (ALPACA, ["### Instruction:"]), "plain": (PLAIN, [])}


def resolve_template(name: str, tokenizer) -> dict:
    """`{name, chat_template, stop}` for a template name; `tokenizer` means the model's own template.
    `stop` lists the end-of-turn strings generation must stop at (the EOS token is always one)."""
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError("template 'tokenizer': this tokenizer has no chat template; "
                             f"choose a named one: {', '.join(NAMED)}")
        stop = [tokenizer.eos_token] if tokenizer.eos_token else []
        return {"name": name, "chat_template": tokenizer.chat_template, "stop": stop}
    if name not in NAMED:
        raise ValueError(f"unknown template '{name}'; choose 'tokenizer' or one of {', '.join(NAMED)}")
    text, stop = NAMED[name]
    stop = list(dict.fromkeys(stop + ([tokenizer.eos_token] if tokenizer.eos_token else [])))
    return {"name": name, "chat_template": text, "stop": stop}
