"""Chat templates: messages -> token ids, with the offsets of message boundaries.

The boundaries let the engine reuse the state of an earlier conversation: a
request that repeats it and adds a message is a cached prefix plus the new
tokens. Each message is tokenized on its own and the pieces concatenated, so
a boundary is exact by construction (no re-tokenization across it).

- Byte-level tokenizer: ``<|role|>`` special id, the content's UTF-8 bytes,
  ``<|end|>``; the generation prompt is ``<|assistant|>`` and generation stops
  at ``<|end|>``.
- A checkpoint whose ``tokenizer_config.json`` has a ``chat_template``: the
  Jinja template is rendered in a sandbox, one message more at a time.
- Other tokenizers: ``role: content`` lines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.text.tokenizer import ByteTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    pass


@dataclass
class RenderedChat:
    token_ids: list[int]
    boundaries: list[int]  # token offsets after each message (and each assistant text), after the generation prompt
    stop_token_ids: list[int]


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, jinja_source: str | None = None):
        self.tokenizer = tokenizer
        self._jinja = None
        if jinja_source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise ChatTemplateError(message)

            env.globals["raise_exception"] = raise_exception
            from jinja2 import TemplateError

            try:
                self._jinja = env.from_string(jinja_source)
            except TemplateError as exc:
                raise ChatTemplateError(f"the checkpoint's chat_template does not compile: {exc}") from exc

    @classmethod
    def for_checkpoint(cls, tokenizer: Tokenizer, checkpoint_dir: str | Path | None) -> "ChatTemplate":
        source = None
        if checkpoint_dir is not None:
            path = Path(checkpoint_dir) / "tokenizer_config.json"
            if path.is_file():
                try:
                    source = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
                except ValueError:
                    source = None
                if isinstance(source, list):  # named templates: take the default one
                    source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        return cls(tokenizer, source if isinstance(source, str) else None)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
        for m in messages:
            if m.get("role") not in ROLES:
                raise ChatTemplateError(f"unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if isinstance(self.tokenizer, ByteTokenizer) and self._jinja is None:
            return self._render_bytes(messages, add_generation_prompt)
        return self._render_text(messages, add_generation_prompt)

    def _render_bytes(self, messages: Sequence[dict], add_generation_prompt: bool) -> RenderedChat:
        tok = self.tokenizer

        def special(name: str) -> int:
            token = tok.special_id(name)
            assert token is not None, name  # a ByteTokenizer (see render): BYTE_SPECIALS has every role and <|end|>
            return token

        end = special("<|end|>")
        ids: list[int] = []
        boundaries: list[int] = []
        for m in messages:
            ids += [special(f"<|{m['role']}|>"), *tok.encode(m.get("content") or "")]
            if m["role"] == "assistant":
                # Also before <|end|>: a reply cut by max_tokens was cached without it.
                boundaries.append(len(ids))
            ids.append(end)
            boundaries.append(len(ids))
        if add_generation_prompt:
            ids.append(special("<|assistant|>"))
            boundaries.append(len(ids))
        stops = [end] + ([tok.eos_id] if tok.eos_id is not None else [])
        return RenderedChat(ids, boundaries, stops)

    def _text_of(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self._jinja is not None:
            from jinja2 import TemplateError

            try:
                return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          bos_token=getattr(self.tokenizer, "bos_token", ""),
                                          eos_token=getattr(self.tokenizer, "eos_token", ""))
            except TemplateError as exc:  # a template that rejects the conversation is a bad request
                raise ChatTemplateError(str(exc)) from exc
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def _render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> RenderedChat:
        ids: list[int] = []
        boundaries: list[int] = []
        done = ""
        steps = [(list(messages[: i + 1]), False) for i in range(len(messages))]
        if add_generation_prompt:
            steps.append((list(messages), True))
        for prefix, gen in steps:
            text = self._text_of(prefix, gen)
            if not text.startswith(done):  # the template rewrites earlier text: no reusable boundary
                ids = self.tokenizer.encode(text)
                boundaries = []
            else:
                ids += self.tokenizer.encode(text[len(done) :])
                boundaries.append(len(ids))
            done = text
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        return RenderedChat(ids, boundaries, stops)
