"""Chat JSONL -> a Megatron indexed dataset plus its per-token loss mask.

Each non-blank line of the input is one conversation (:func:`megatron_grove.data.chat.
conversation_of`), rendered and tokenised by the tokenizer's chat template
(:class:`~megatron_grove.data.chat.ChatTemplate`). The token ids go to ``PREFIX.{bin,idx}``
(one document per conversation, as plain data) and the loss mask, one uint8 per token, to
``PREFIX.loss_mask.{bin,idx}`` (:func:`~megatron_grove.data.chat.loss_mask_prefix`), both
written atomically (:func:`megatron_grove.data.datasets.write_parallel_indexed_datasets`).
A bad record (not JSON, no assistant turn, an unknown role, an empty content) stops the run
with :class:`~megatron_grove.data.preprocess.InputError` naming its file and line, and nothing
is written; with ``skip_bad`` it is left out and counted instead.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_grove.data.chat import (
    ChatRecordError,
    ChatTemplate,
    conversation_of,
    load_chat_template,
    loss_mask_prefix,
)
from megatron_grove.data.datasets import EmptyDatasetError, write_parallel_indexed_datasets
from megatron_grove.data.preprocess import InputError, _check_inputs
from megatron_grove.data.tokenizer import load_tokenizer

__all__ = ["ChatPreprocessResult", "preprocess_chat"]


@dataclass
class ChatPreprocessResult:
    """What :func:`preprocess_chat` wrote: conversations, tokens (end-of-document tokens
    included), loss tokens (mask 1), records skipped as bad (with the first few reasons), the
    template used and the time taken."""

    conversations: int
    tokens: int
    loss_tokens: int
    skipped_bad: int
    skipped_examples: list[str] = field(default_factory=list)
    template_source: str = ""
    seconds: float = 0.0


def _records(files: list[str]) -> Iterator[tuple[str, int, bytes, int]]:
    """``(path, line number, raw line, its size)`` of every line; ``raw`` is empty for a
    blank line."""
    for path in files:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                yield path, number, line if line.strip() else b"", len(line)


def _messages(raw: bytes) -> list[dict[str, str]]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ChatRecordError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ChatRecordError(f"invalid JSON ({err.msg})") from None
    return conversation_of(record)


def preprocess_chat(files: list[str], output_prefix: str, tokenizer: Optional[str] = None,
                    skip_bad: bool = False, progress: bool = True) -> ChatPreprocessResult:
    """Tokenise the chat JSONL ``files`` into ``output_prefix`` (+ its loss mask).

    Args:
        files: JSONL files, one conversation per line, read in this order.
        output_prefix: writes ``PREFIX.{bin,idx}`` and ``PREFIX.loss_mask.{bin,idx}``.
        tokenizer: a ``tokenizer.json`` or its folder (None: the shipped one); its chat
            template, if it has one, renders the conversations.
        skip_bad: leave bad records out (counted) instead of stopping at the first.
        progress: a tqdm bar over the input bytes.
    """
    _check_inputs(files)
    token_ids = load_tokenizer(tokenizer)
    template_text, source, specials = load_chat_template(tokenizer)
    try:
        template = ChatTemplate(template_text, token_ids, specials)
    except ValueError as err:  # a template that cannot render the probe conversation
        raise InputError(f"chat template from {source}: {str(err).splitlines()[0]}") from None
    result = ChatPreprocessResult(0, 0, 0, 0, template_source=source)
    began = time.perf_counter()
    with tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True,
              desc="preprocess --chat", disable=not progress, dynamic_ncols=True) as bar:

        def rows() -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
            for path, number, raw, size in _records(files):
                bar.update(size)
                if not raw:
                    continue
                try:
                    encoded = template.encode(_messages(raw))
                except (ChatRecordError, ValueError) as err:
                    if not skip_bad:
                        raise InputError(f"{path}:{number}: {err} (--skip-bad leaves such "
                                         "records out)") from None
                    result.skipped_bad += 1
                    if len(result.skipped_examples) < 3:
                        result.skipped_examples.append(f"{path}:{number}: {err}")
                    continue
                result.conversations += 1
                result.tokens += len(encoded.ids)
                result.loss_tokens += int(encoded.loss_mask.sum())
                yield encoded.ids, encoded.loss_mask

        try:
            write_parallel_indexed_datasets(
                rows(), [output_prefix, loss_mask_prefix(output_prefix)],
                [DType.optimal_dtype(token_ids.vocab_size), numpy.uint8])
        except EmptyDatasetError:
            raise InputError(f"no usable conversation in {', '.join(files)}"
                             f"{f' ({result.skipped_bad} bad skipped)' if result.skipped_bad else ''}"
                             "; nothing written") from None
    result.seconds = time.perf_counter() - began
    return result
