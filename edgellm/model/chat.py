"""Chat messages -> prompt text with the model's own template (as llama.cpp renders it: Jinja2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from edgellm.errors import ConfigError
from edgellm.model.description import TokenizerSpec

# Used when a model ships no template; the same ChatML layout SmolLM2 uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class Message(TypedDict):
    role: str
    content: str


def render_chat(spec: TokenizerSpec, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Render messages through the GGUF's `tokenizer.chat_template` in a sandboxed Jinja2."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"chat message {i} needs 'role' and 'content', found {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template rejected the messages: {message}")

    env.globals["raise_exception"] = raise_exception
    tokens = spec.tokens
    try:
        template = env.from_string(spec.chat_template or CHATML_TEMPLATE)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=tokens[spec.bos_id] if spec.bos_id is not None else "",
            eos_token=tokens[spec.eos_id] if spec.eos_id is not None else "",
        )
    except TemplateError as exc:
        raise ConfigError(f"chat template failed to render: {exc}") from None
