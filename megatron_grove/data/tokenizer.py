"""Tokenizers backed by a Hugging Face ``tokenizer.json``, usable by Megatron's datasets.

The shipped default (``megatron_grove/data/assets/tokenizer.json``) is a 4096-token byte-level
BPE trained on the embedded Shakespeare corpus by ``tools/train_tokenizer.py``; its
end-of-document token ``<|endoftext|>`` has id 0 and its padding token ``<|pad|>`` id 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_EOD_TOKEN = "<|endoftext|>"
DEFAULT_PAD_TOKEN = "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "generation_config.json")


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the tokenizer files of folder ``source`` (those present) into ``target``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def default_tokenizer_path() -> str:
    """Path of the shipped ``tokenizer.json``."""
    return str(Path(__file__).parent / "assets" / "tokenizer.json")


def _special_token(config: dict, key: str) -> str | None:
    """A special token's text from a ``tokenizer_config.json`` entry (str or AddedToken dict)."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class JsonTokenizer(MegatronTokenizerBase):
    """A ``tokenizers.Tokenizer`` with the interface Megatron's ``GPTDataset`` reads.

    Megatron reads ``vocab_size`` (to pick the uint16/int32 token dtype), ``eod`` (document
    boundaries), ``pad`` (optional; masked out of the loss) and ``unique_identifiers`` (to
    key its index caches).

    Args:
        path: the ``tokenizer.json`` file.
        eod_token: text of the end-of-document token; must be in the vocabulary.
        pad_token: text of the padding token; None, or not in the vocabulary, for none.
    """

    def __init__(self, path: str, eod_token: str, pad_token: str | None) -> None:
        super().__init__(path, config={})
        with open(path, "rb") as f:
            data = f.read()
        self._sha256 = hashlib.sha256(data).hexdigest()
        self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        self._eod = self._tokenizer.token_to_id(eod_token)
        if self._eod is None:
            raise ValueError(f"end-of-document token {eod_token!r} is not in {path}")
        self._pad = None if pad_token is None else self._tokenizer.token_to_id(pad_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token appended)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the token ids ``ids`` (a list, or e.g. a 1-D tensor)."""
        ids = [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Megatron's name for :meth:`encode`."""
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Megatron's name for :meth:`decode`."""
        return self.decode(ids)

    def apply_chat_template(self, *args: object, **kwargs: object) -> str:
        """Not supported: these tokenizers carry no chat template."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @property
    def vocab(self) -> dict[str, int]:
        """Token text -> id, special tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """Id of the end-of-document token, appended after every document."""
        return self._eod

    @property
    def pad(self) -> int:
        """Id of the padding token; AttributeError when there is none (Megatron then uses -1)."""
        if self._pad is None:
            raise AttributeError(f"{self.path} has no padding token")
        return self._pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in Megatron's dataset cache keys."""
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        return OrderedDict([("class", name), ("sha256", self._sha256)])


def load_tokenizer(path: str | None = None) -> JsonTokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory holding one.

    Args:
        path: None for the shipped tokenizer; a ``tokenizer.json``; or a directory (e.g. a
            Hugging Face model directory) holding one. A ``tokenizer_config.json`` beside
            the ``tokenizer.json``, if any, has its ``eos_token`` / ``pad_token`` name the
            end-of-document and padding tokens.

    Returns:
        The tokenizer. Without a ``tokenizer_config.json`` the end-of-document token is
        ``<|endoftext|>`` and the padding token ``<|pad|>`` (if in the vocabulary).
    """
    path = default_tokenizer_path() if path is None else path
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
    eod_token = _special_token(config, "eos_token") or DEFAULT_EOD_TOKEN
    pad_token = _special_token(config, "pad_token") or DEFAULT_PAD_TOKEN
    return JsonTokenizer(file, eod_token=eod_token, pad_token=pad_token)


def collect_text_files(inputs: list[str]) -> list[str]:
    """Expand files and directories (their ``*.txt``, recursively) into a sorted file list."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(str(p) for p in path.rglob("*.txt"))
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not files:
        raise FileNotFoundError(f"no .txt files in: {' '.join(inputs)}")
    return sorted(files)


def train_bpe(files: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, no normalisation) on ``files``: deterministic for
    the same files (in sorted order) and size; the special tokens come first, so the
    end-of-document token has id 0 and the padding token id 1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[DEFAULT_EOD_TOKEN, DEFAULT_PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(files, trainer)
    return tokenizer
