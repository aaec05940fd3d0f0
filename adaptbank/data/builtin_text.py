"""Built-in generated *generation* tasks (input text -> target text): the embedded default for decoders.

The companions of :mod:`adaptbank.data.builtin` (classification) for generation tasks, with the same
contract: output is a pure function of ``(task, split, n)`` (the RNG is
``random.Random(f"adaptbank-builtin-{task}-{split}")``), texts are unique within a split, and the test
split never repeats a text of the default-size train split.

* ``copy``: a few words, to be repeated as they are (``"red fox plum" -> "red fox plum"``): an in-context
  mapping any decoder can learn, which generalises to unseen word sequences;
* ``antonym``: a degree word and an adjective, to be answered with the adjective's opposite
  (``"very hot" -> "cold"``); train and test use different degree words, so the test asks the learnt
  word map in new company.

The prompt template belongs to the task spec (``tasks/copy.toml``, ``tasks/antonym.toml``).
"""

from __future__ import annotations

import random
from functools import lru_cache

__all__ = ["BUILTIN_GENERATION", "generate_pairs"]

# fmt: off
_WORDS = ("red blue green black white pink gold grey fox cat dog owl bee cow pig hen "
          "plum pear lime fig kiwi corn rice bean sun moon star rain snow wind lake hill "
          "ship car bus van book pen cup box").split()
_PAIRS = ("hot cold|big small|tall short|fast slow|hard soft|wet dry|old young|rich poor|light dark|"
          "loud quiet|full empty|early late|happy sad|strong weak|clean dirty|thick thin|high low|"
          "wide narrow|heavy light|open closed|near far|sweet sour|deep shallow|brave afraid").split("|")
_DEGREES = {"train": "very rather quite so too really truly fairly pretty somewhat mostly utterly highly always".split(),
            "test": "extremely slightly awfully terribly incredibly".split()}
# fmt: on

BUILTIN_GENERATION: dict[str, str] = {
    "copy": "repeat one to three words as they are",
    "antonym": "the opposite of an adjective after a degree word",
}
"""Builtin generation task name -> what it asks."""

_DEFAULT = {"train": 600, "test": 200}


def _antonyms() -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in _PAIRS:
        a, b = pair.split()
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


def _draw(task: str, split: str, rng: random.Random) -> tuple[str, str]:
    if task == "copy":
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
        return text, text
    word, opposite = rng.choice(sorted(_antonyms().items()))
    return f"{rng.choice(_DEGREES[split])} {word}", opposite


def _capacity(task: str, split: str) -> int:
    if task == "copy":
        return sum(len(_WORDS) ** k for k in (1, 2, 3))
    return len(_antonyms()) * len(_DEGREES[split])


@lru_cache(maxsize=16)
def _pairs_cached(task: str, split: str, n: int) -> tuple[tuple[str, str], ...]:
    rng = random.Random(f"adaptbank-builtin-{task}-{split}")
    seen: set[str] = set()
    if split != "train":  # keep test texts out of the default-size train split
        seen.update(text for text, _ in _pairs_cached(task, "train", _DEFAULT["train"]))
    out: list[tuple[str, str]] = []
    while len(out) < n:
        text, target = _draw(task, split, rng)
        if text not in seen:
            seen.add(text)
            out.append((text, target))
    return tuple(out)


def generate_pairs(task: str, split: str, n: int | None = None) -> list[tuple[str, str]]:
    """``n`` deterministic ``(text, target)`` pairs of builtin generation ``task`` and ``split``
    (default 600 train / 200 test)."""
    if task not in BUILTIN_GENERATION:
        raise ValueError(f"unknown builtin generation task {task!r}; allowed: {sorted(BUILTIN_GENERATION)}")
    if split not in _DEFAULT:
        raise ValueError(f"unknown builtin split {split!r}; allowed: {list(_DEFAULT)}")
    n = _DEFAULT[split] if n is None else n
    room = _capacity(task, split) - (_DEFAULT["train"] if split != "train" and task == "copy" else 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= room:
        raise ValueError(f"n must be an int in [1, {room}] for builtin {task!r} {split}, got {n!r}")
    return list(_pairs_cached(task, split, n))
