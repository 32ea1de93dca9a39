"""Easy Data Augmentation (EDA) for any language written with spaces between words, Korean in particular.

Only the resource-free EDA operations (Wei & Zou 2019) are here, plus AEDA punctuation insertion
(Karimi et al. 2021): no WordNet, synonym list or stop-word list is needed, so the same code serves
Korean, whose space-separated words (eojeols) carry their particles and endings with them.

Every operation works on whole whitespace tokens: a token is removed, moved or copied as a unit and is
never split, so an output holds only the characters of its (NFC-normalised) input, single spaces, and
the marks of ``PUNCTUATION``.  All functions are pure and deterministic given their ``random.Random``.
"""

from __future__ import annotations

import random
import unicodedata

OPERATIONS = ("delete", "swap", "insert", "punctuation")
PUNCTUATION = (".", ",", "!", "?", ";", ":")


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word independently with probability ``p``.

    Never returns an empty list: when every word is dropped, one word chosen at random is kept.
    A list of one word (or none) is returned unchanged, as a new list.
    """
    if len(words) <= 1:
        return list(words)
    kept = [word for word in words if rng.random() >= p]
    return kept if kept else [rng.choice(words)]


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap the words at two distinct random positions, ``n`` times; a no-op for fewer than two words."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Insert, ``n`` times, a copy of a word of ``words`` at a random position (no external vocabulary).

    The copied word is always taken from the original ``words``; an empty list is returned unchanged.
    """
    out = list(words)
    if not words:
        return out
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(words))
    return out


def punctuation_insertion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """AEDA: insert between 1 and ``max(1, int(p * len(words)))`` marks of ``PUNCTUATION`` as separate tokens.

    Each mark is drawn uniformly and placed at a random position (start, between two tokens or end).
    An empty list is returned unchanged.
    """
    out = list(words)
    if not words:
        return out
    count = rng.randint(1, max(1, int(p * len(words))))
    for _ in range(count):
        out.insert(rng.randint(0, len(out)), rng.choice(PUNCTUATION))
    return out


def _check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown EDA operation {operation!r}; expected one of {', '.join(OPERATIONS)}")


def _words(text: str) -> list[str]:
    """NFC-normalise ``text`` (Korean from some sources is NFD) and split it on whitespace."""
    return unicodedata.normalize("NFC", text).split()


def _apply(words: list[str], operation: str, rng: random.Random, alpha: float) -> list[str]:
    n = max(1, round(alpha * len(words)))
    if operation == "delete":
        return random_deletion(words, alpha, rng)
    if operation == "swap":
        return random_swap(words, n, rng)
    if operation == "insert":
        return random_insertion(words, n, rng)
    return punctuation_insertion(words, alpha, rng)


def augment(text: str, operation: str, rng: random.Random, alpha: float = 0.1) -> str:
    """Apply one EDA ``operation`` to ``text`` and return the result joined with single spaces.

    The text is NFC-normalised and split on whitespace.  ``swap`` and ``insert`` act
    ``n = max(1, round(alpha * len(words)))`` times; ``delete`` and ``punctuation`` use ``p = alpha``.
    Empty or whitespace-only text gives ``""``.  An operation not in ``OPERATIONS`` raises ``ValueError``.
    """
    _check_operation(operation)
    words = _words(text)
    if not words:
        return ""
    return " ".join(_apply(words, operation, rng, alpha))


def augment_many(
    text: str,
    count: int,
    operations: tuple[str, ...] | list[str],
    rng: random.Random,
    alpha: float = 0.1,
    max_tries: int = 10,
) -> list[tuple[str, str]]:
    """Up to ``count`` distinct ``(operation, augmented_text)`` pairs, the operations cycled in the given order.

    Slot ``i`` uses ``operations[i % len(operations)]``; a result equal to the (normalised) input or to an
    earlier result is drawn again, at most ``max_tries`` times, after which that slot is given up.  The list
    may therefore be shorter than ``count`` (empty for empty text, or a one-word text and ``delete``/``swap``),
    and a given-up slot leaves a gap in the cycle.  Unknown or no operations raise ``ValueError``.
    """
    if not operations:
        raise ValueError(f"no EDA operations given; expected some of {', '.join(OPERATIONS)}")
    for operation in operations:
        _check_operation(operation)
    original = " ".join(_words(text))
    seen = {original}
    results: list[tuple[str, str]] = []
    for slot in range(max(0, count)):
        operation = operations[slot % len(operations)]
        augmented = _draw_new(original, operation, rng, alpha, max_tries, seen)
        if augmented is not None:
            seen.add(augmented)
            results.append((operation, augmented))
    return results


def _draw_new(
    text: str, operation: str, rng: random.Random, alpha: float, max_tries: int, seen: set[str]
) -> str | None:
    """The first of at most ``max_tries`` augmentations of ``text`` not in ``seen``, or None."""
    for _ in range(max_tries):
        augmented = augment(text, operation, rng, alpha)
        if augmented not in seen:
            return augmented
    return None
