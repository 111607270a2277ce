"""Chat data: conversations -> token ids and a per-token loss mask, through a chat template.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``
(:func:`conversation_of` also takes the ``{"prompt", "response"}`` pair, plus an optional
``"system"``). It is rendered to text by a Jinja chat template exactly as ``transformers``
applies one (``render_jinja_template``, with the tokenizer's special tokens as variables): the
tokenizer's own ``chat_template`` (``tokenizer_config.json`` or ``chat_template.jinja`` beside
its ``tokenizer.json``) when it has one, else :data:`DEFAULT_CHAT_TEMPLATE` (ChatML, the format
of the Qwen3 family: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``).

The loss mask marks each assistant turn as the template writes it after the generation prompt
(``render(messages[:i], add_generation_prompt=True)`` .. ``render(messages[:i+1])``): its content
and end-of-turn marker (ChatML: ``<|im_end|>\\n``). The conversation is cut at those bounds into
segments, each tokenised on its own, so a prompt rendered for generation tokenises exactly as it
did in training. Each conversation ends with the end-of-document token (mask 0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy

from megatron_grove.data.tokenizer import JsonTokenizer, _special_token

__all__ = ["ROLES", "DEFAULT_CHAT_TEMPLATE", "ChatRecordError", "conversation_of",
           "ChatTemplate", "EncodedConversation", "load_chat_template", "loss_mask_prefix",
           "is_chat_prefix"]

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, used when the tokenizer has no chat template of its own."""


class ChatRecordError(ValueError):
    """A record that is not a usable conversation (the message says why, in one line)."""


def conversation_of(record: Any) -> list[dict[str, str]]:
    """The messages of one JSONL record, checked: ``{"messages": [...]}`` or
    ``{"prompt": ..., "response": ...}`` (+ ``"system"``). Raises :class:`ChatRecordError` for
    no assistant turn, an unknown role or an empty or non-string content."""
    if not isinstance(record, dict):
        raise ChatRecordError("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatRecordError("'messages' is not a non-empty list")
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if "system" in record
                    else []) + [{"role": "user", "content": record["prompt"]},
                                {"role": "assistant", "content": record["response"]}]
    else:
        raise ChatRecordError("neither 'messages' nor a 'prompt'/'response' pair")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ChatRecordError(f"message {number} is not a JSON object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatRecordError(f"message {number}: unknown role {role!r} (allowed: "
                                  f"{', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise ChatRecordError(f"message {number} ({role}): empty content")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise ChatRecordError("no assistant turn")
    return checked


def _tokenizer_files_dir(tokenizer_path: Optional[str]) -> Optional[Path]:
    if tokenizer_path is None:
        return None
    path = Path(tokenizer_path)
    return path if path.is_dir() else path.parent


def load_chat_template(tokenizer_path: Optional[str]) -> tuple[str, str, dict[str, str]]:
    """``(template, source, special tokens)`` of the tokenizer at ``tokenizer_path`` (a
    ``tokenizer.json`` or its folder; None: the shipped one): its ``chat_template.jinja``, else
    the ``chat_template`` of its ``tokenizer_config.json`` (a string, or the one named
    ``default`` of a list), else :data:`DEFAULT_CHAT_TEMPLATE`. ``source`` says which; the
    special tokens (``bos_token``, ``eos_token``, ...) are the template's variables."""
    folder = _tokenizer_files_dir(tokenizer_path)
    config: dict = {}
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {key: value for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                if (value := _special_token(config, key))}
    if folder is not None and (folder / "chat_template.jinja").is_file():
        file = folder / "chat_template.jinja"
        return file.read_text(encoding="utf-8"), str(file), specials
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template.strip():
        return template, str(folder / "tokenizer_config.json"), specials
    return DEFAULT_CHAT_TEMPLATE, "the default (ChatML)", specials


@dataclass
class EncodedConversation:
    """A conversation as ``ids`` [n] and ``loss_mask`` [n] (uint8: 1 on assistant tokens), the
    end-of-document token last (mask 0)."""

    ids: numpy.ndarray
    loss_mask: numpy.ndarray


class ChatTemplate:
    """A Jinja chat template bound to a tokenizer.

    Args:
        template: the Jinja source (``transformers``' chat-template dialect).
        tokenizer: what encodes the rendered text.
        special_tokens: variables the template may read (``eos_token``, ...).
    """

    def __init__(self, template: str, tokenizer: JsonTokenizer,
                 special_tokens: Optional[dict[str, str]] = None) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        probe = "\x00ANSWER\x00"
        turn = self.segments([{"role": "user", "content": "?"},
                              {"role": "assistant", "content": probe}])[1][0]
        if probe not in turn:
            raise ValueError("the chat template does not write an assistant turn's content")
        self.end_of_turn = turn.split(probe, 1)[1].strip()
        """What the template writes after an assistant's content (ChatML: ``<|im_end|>``);
        generation stops there. Empty: the template marks no end of turn."""

    @classmethod
    def for_tokenizer(cls, tokenizer_path: Optional[str], tokenizer: JsonTokenizer
                      ) -> "ChatTemplate":
        """The template of :func:`load_chat_template` bound to ``tokenizer``."""
        template, _, specials = load_chat_template(tokenizer_path)
        return cls(template, tokenizer, specials)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as ``transformers``' ``apply_chat_template`` renders it
        (ValueError when the template refuses it)."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages],
                                                chat_template=self.template,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.special_tokens)
        except TemplateError as err:  # a template's own raise_exception(), or a bad template
            raise ValueError(f"chat template: {str(err).splitlines()[0]}") from None
        return rendered[0]

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_assistant_turn)`` pieces whose
        concatenation is :meth:`render` of it. ValueError when the template does not render a
        conversation as a prefix of its continuation (the mask bounds would be undefined)."""
        full = self.render(messages)
        pieces: list[tuple[str, bool]] = []
        position = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[:i + 1])
            if not (after.startswith(before) and full.startswith(after)
                    and len(before) >= position):
                raise ValueError(f"the chat template does not render turn {i + 1} as the "
                                 "continuation of the turns before it; give a template that does")
            if len(before) > position:
                pieces.append((full[position:len(before)], False))
            pieces.append((full[len(before):len(after)], True))
            position = len(after)
        if position < len(full):
            pieces.append((full[position:], False))
        return pieces

    def encode(self, messages: list[dict[str, str]]) -> EncodedConversation:
        """Token ids and loss mask of a (checked) conversation; see the module docstring."""
        ids: list[int] = []
        mask: list[int] = []
        for text, is_assistant in self.segments(messages):
            piece = self.tokenizer.encode(text)
            ids += piece
            mask += [int(is_assistant)] * len(piece)
        ids.append(self.tokenizer.eod)
        mask.append(0)
        return EncodedConversation(numpy.asarray(ids, dtype=numpy.int64),
                                   numpy.asarray(mask, dtype=numpy.uint8))

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (no assistant answer yet) followed by the generation prompt,
        tokenised as :meth:`encode` tokenises the same text before an assistant turn."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

    def turn_ended(self, new_ids: list[int]) -> bool:
        """Whether generated ``new_ids`` hold the end-of-turn marker (a generation stop)."""
        return bool(self.end_of_turn) and self.end_of_turn in self.tokenizer.decode(new_ids)

    def answer_of(self, completion: str) -> tuple[str, bool]:
        """``(answer, ended)``: the generated text up to the end-of-turn marker, and whether the
        marker was reached."""
        if self.end_of_turn and self.end_of_turn in completion:
            return completion.split(self.end_of_turn, 1)[0], True
        return completion, False


def loss_mask_prefix(prefix: str) -> str:
    """The indexed dataset holding ``prefix``'s per-token loss mask (``PREFIX.loss_mask``)."""
    return f"{prefix}.loss_mask"


def is_chat_prefix(prefix: str) -> bool:
    """Whether ``prefix`` is chat data: a ``PREFIX.loss_mask.{bin,idx}`` lies beside it."""
    return os.path.isfile(f"{loss_mask_prefix(prefix)}.idx")
