"""A small chat set made from the embedded plays: questions whose answers are in the text.

Each play (``assets/corpus/train``) is read as a sequence of speeches: a line holding only a
speaker's name in capitals and a full stop (``BRUTUS.``), then the speech's lines up to the
next blank line (stage directions in brackets are dropped). Two kinds of question, about a
verse line ``L`` of at least 4 words:

* "who": ``In PLAY, who speaks the line "L"?`` -> ``NAME.`` (the speaker, as the text names
  them);
* "next": ``In PLAY, what line comes after "L"?`` -> the next line of the play's dialogue.

Conversations are single questions (a quarter of them after a system message), or both
questions about the same line in two turns. Speeches are assigned to the training or the
validation part by their position (every ``valid_every``-th speech of a play goes to
validation), so no validation line is asked about in training. Everything is seeded and
deterministic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_grove.data.datasets import embedded_train_files

__all__ = ["Speech", "read_speeches", "play_chat_records", "SYSTEM_PROMPT"]

SYSTEM_PROMPT = "You answer questions about Shakespeare's plays with words from the text."
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*\.?( [A-Z][A-Za-z']*\.?){0,3}\.$")


@dataclass(frozen=True)
class Speech:
    """One speech: its speaker (as the text names them, without the full stop; names in
    capitals title-cased: ``Brutus``, ``First Cit``) and its verse lines."""

    speaker: str
    lines: tuple[str, ...]


def _play_title(path: str) -> str:
    return " ".join(word.capitalize() if word != "and" else word
                    for word in Path(path).stem.split("_")).replace("Tempest", "The Tempest")


def read_speeches(path: str) -> list[Speech]:
    """The speeches of the play at ``path``, in order: paragraphs (lines between blank lines)
    whose first line is a speaker's name (up to 4 capitalised words and a full stop:
    ``BRUTUS.``, ``First Cit.``) and which hold at least one more line."""
    speeches: list[Speech] = []
    text = Path(path).read_text(encoding="utf-8")
    for paragraph in re.split(r"\n[ \t]*\n", text):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        verse = [re.sub(r"\s*\[.*?\]\s*", " ", line).strip() for line in lines[1:]
                 if not line.startswith("[")]
        verse = [line for line in verse if line]
        if verse:
            name = lines[0][:-1]
            speeches.append(Speech(name.title() if name.isupper() else name, tuple(verse)))
    return speeches


def play_chat_records(valid_every: int = 10, seed: int = 0, per_play: int = 400
                      ) -> tuple[list[dict], list[dict]]:
    """``(train, valid)`` chat records (``{"messages": [...]}``) about the embedded plays:
    ``per_play`` conversations per play, split as the module docstring says (so about a
    ``1/valid_every`` share of them validation)."""
    rng = random.Random(seed)
    train: list[dict] = []
    valid: list[dict] = []
    for path in embedded_train_files():
        title = _play_title(path)
        speeches = read_speeches(path)
        # (speech index, line, its speaker, the next line of dialogue)
        candidates = []
        dialogue = [(i, line) for i, speech in enumerate(speeches) for line in speech.lines]
        for (i, line), (_, following) in zip(dialogue, dialogue[1:]):
            if len(line.split()) >= 4 and following:
                candidates.append((i, line, speeches[i].speaker, following))
        for i, line, speaker, following in rng.sample(candidates, min(per_play, len(candidates))):
            who = (f'In {title}, who speaks the line "{line}"?', f"{speaker}.")
            after = (f'In {title}, what line comes after "{line}"?', following)
            kind = rng.random()
            if kind < 0.4:
                turns = [who]
            elif kind < 0.8:
                turns = [after]
            else:
                turns = [who, ("And what line comes after it?", following)]
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.25 else []
            for question, answer in turns:
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}]
            (valid if i % valid_every == 0 else train).append({"messages": messages})
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid
