"""ROUGE-1/2/L F1 that is correct for Korean (and any non-Latin text).

Why: ``rouge_score``'s default tokenizer lowercases the text and replaces every character outside ``[a-z0-9]``
with a space, so Hangul (and CJK, Cyrillic, accented letters...) simply disappears: Korean summaries score 0, or
are scored only on the stray Latin words and digits they contain.  We therefore hand ``RougeScorer`` our own
tokenizer object.  ``RougeScorer`` uses such an object as is: it calls ``tokenizer.tokenize(text)`` on the
target and the prediction and counts the returned tokens exactly (no further lowercasing, filtering or stemming;
``use_stemmer`` only reaches its own default tokenizer), and ``rougeL`` is the plain LCS F1 over those tokens.

Tokenizers (the ``rouge_tokenizer`` setting):

* ``whitespace``: the words of ``text.lower()``; for Korean these are eojeol (word + attached particles/endings),
  so "요약했습니다" and "요약합니다" share nothing.
* ``char``: every word character of ``text.lower()``, one token each (bigrams span word boundaries).
* ``morpheme``: Korean morphemes from kiwipiepy (``Kiwi().tokenize``, token forms, lowercased): particles and
  endings become their own tokens, so inflected forms of one word match.  Needs the ``korean`` extra.
* ``default``: ``rouge_score``'s own tokenizer, English only (see above); :func:`check_tokenizer` refuses it
  for text that is mostly not Latin.

Punctuation and symbols (any character of Unicode category P* or S*: ``. , ! ? “ ” 「 」 … ~ % $ ₩``) separate words
and are never tokens, in every tokenizer: "요청했다." is the word "요청했다", and "state-of-the-art" four words.  This
is what ``rouge_score`` does for English (it keeps only runs of ``[a-z0-9]``), so on ASCII text ``whitespace`` and
``default`` give the same tokens and scores.
"""

from __future__ import annotations

import functools
import logging
import math
import unicodedata
from collections.abc import Sequence
from typing import Any

import pandas as pd
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from pipelines.errors import ConfigError

TOKENIZERS = ("whitespace", "char", "morpheme", "default")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
SCORE_COLUMNS = (*ROUGE_KEYS, "rouge_mean")
MAX_NON_LATIN = 0.05  # share of letters above which rouge_tokenizer=default is refused

log = logging.getLogger(__name__)
_KIWI: Any = None  # kiwipiepy.Kiwi, built on first use (about 1 s)


def _check_name(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"rouge_tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")


def _kiwi() -> Any:
    global _KIWI
    if _KIWI is None:
        try:
            from kiwipiepy import Kiwi
        except ImportError as err:
            raise ConfigError(
                "rouge_tokenizer=morpheme needs kiwipiepy: pip install 'pipelines[korean]' (or pip install kiwipiepy),"
                " or pass rouge_tokenizer=whitespace or char") from err
        log.info("Loading the kiwipiepy morpheme analyser")
        _KIWI = Kiwi()
    return _KIWI


@functools.lru_cache(maxsize=65536)
def _separates(char: str) -> bool:
    """Whitespace, punctuation (Unicode P*) and symbols (S*) separate words and are never counted."""
    return char.isspace() or unicodedata.category(char)[0] in "PS"


def _words(text: str) -> list[str]:
    return "".join(" " if _separates(c) else c for c in text).split()


def tokenize(text: str, tokenizer: str) -> list[str]:
    """The tokens ROUGE counts for ``text`` under ``tokenizer`` (one of :data:`TOKENIZERS`)."""
    _check_name(tokenizer)
    text = unicodedata.normalize("NFC", text)  # Hangul typed as jamo (NFD, e.g. from macOS) equals its syllables
    if tokenizer == "whitespace":
        return _words(text.lower())
    if tokenizer == "char":
        return [c for word in _words(text.lower()) for c in word]
    if tokenizer == "morpheme":
        return [w for token in _kiwi().tokenize(text) for w in _words(token.form.lower())] if text.strip() else []
    return rouge_tokenize.tokenize(text, None)


class _Tokenizer:
    """The object ``RougeScorer`` calls: ``tokenize(text) -> list[str]``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.name)


@functools.cache
def _scorer(tokenizer: str) -> rouge_scorer.RougeScorer:
    if tokenizer == "default":
        return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=_Tokenizer(tokenizer))


def _text(value: Any) -> str:
    """None and NaN (missing cells) are empty text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def score_rows(references: Sequence[str], predictions: Sequence[str], tokenizer: str) -> pd.DataFrame:
    """Per pair: ROUGE-1/2/L F1 in [0, 1] and their mean (columns :data:`SCORE_COLUMNS`, float64)."""
    _check_name(tokenizer)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    scorer = _scorer(tokenizer)
    rows = []
    for reference, prediction in zip(map(_text, references), map(_text, predictions)):
        if not reference.strip() or not prediction.strip():
            rows.append([0.0] * len(ROUGE_KEYS))
            continue
        scores = scorer.score(reference, prediction)
        rows.append([float(scores[key].fmeasure) for key in ROUGE_KEYS])
    frame = pd.DataFrame(rows, columns=list(ROUGE_KEYS), dtype="float64")
    frame["rouge_mean"] = frame[list(ROUGE_KEYS)].mean(axis=1)
    return frame


def corpus_scores(references: Sequence[str], predictions: Sequence[str], tokenizer: str) -> dict[str, float]:
    """Mean over pairs of each per-pair F1 (the usual competition score), keyed by :data:`SCORE_COLUMNS`."""
    rows = score_rows(references, predictions, tokenizer)
    if rows.empty:
        raise ValueError("corpus_scores needs at least one reference/prediction pair")
    return {column: float(rows[column].mean()) for column in SCORE_COLUMNS}


def check_tokenizer(texts: Sequence[str], tokenizer: str, what: str) -> None:
    """Refuse ``rouge_tokenizer=default`` when over 5% of the letters in ``texts`` are not ASCII (they would vanish).

    ``what`` names the texts in the message, e.g. ``"target_column 'summary' of data/x.jsonl"``.
    """
    _check_name(tokenizer)
    if tokenizer != "default":
        return
    letters = non_latin = 0
    for text in map(_text, texts):
        for char in text:
            if char.isalpha():
                letters += 1
                non_latin += not char.isascii()
    if letters and non_latin / letters > MAX_NON_LATIN:
        pct = 100 * non_latin / letters
        raise ConfigError(
            f"rouge_tokenizer=default keeps only a-z and 0-9, but {pct:.0f}% of the letters in {what} are not Latin"
            " (e.g. Hangul): they would score 0. Pass rouge_tokenizer=whitespace, char or morpheme.")
