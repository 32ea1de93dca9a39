"""EDA for space-separated text: whole eojeols only, no characters but the input's and PUNCTUATION, deterministic."""

from __future__ import annotations

import random
import unicodedata

import pytest

from pipelines.eda import (
    OPERATIONS,
    PUNCTUATION,
    augment,
    augment_many,
    punctuation_insertion,
    random_deletion,
    random_insertion,
    random_swap,
)

KO = "이 영화 정말 재미있어요 배우들의 연기가 훌륭합니다"
KO_WORDS = KO.split()
SEEDS = range(20)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_same_seed_same_output(operation: str) -> None:
    first = [augment(KO, operation, random.Random(0), alpha=0.3) for _ in range(3)]
    assert len(set(first)) == 1


def test_other_seed_other_output() -> None:
    def run(seed: int) -> list[tuple[str, str]]:
        return augment_many(KO, 8, OPERATIONS, random.Random(seed), alpha=0.3)

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("operation", ["delete", "swap", "insert"])
@pytest.mark.parametrize("seed", SEEDS)
def test_tokens_come_from_the_input(operation: str, seed: int) -> None:
    out = augment(KO, operation, random.Random(seed), alpha=0.3).split()
    assert out
    assert set(out) <= set(KO_WORDS)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_only_input_characters_punctuation_and_spaces(operation: str, seed: int) -> None:
    out = augment(KO, operation, random.Random(seed), alpha=0.5)
    assert set(out) <= set(KO) | set(PUNCTUATION) | {" "}
    assert "  " not in out and out == out.strip()


@pytest.mark.parametrize("seed", SEEDS)
def test_swap_is_a_permutation(seed: int) -> None:
    out = augment(KO, "swap", random.Random(seed), alpha=0.3).split()
    assert sorted(out) == sorted(KO_WORDS)
    assert sorted(random_swap(KO_WORDS, 3, random.Random(seed))) == sorted(KO_WORDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_insert_adds_exactly_n_input_tokens(seed: int) -> None:
    out = augment(KO, "insert", random.Random(seed), alpha=0.3).split()
    assert len(out) == len(KO_WORDS) + round(0.3 * len(KO_WORDS))  # n = 2
    out = random_insertion(KO_WORDS, 4, random.Random(seed))
    assert len(out) == len(KO_WORDS) + 4
    assert set(out) <= set(KO_WORDS)
    for word in KO_WORDS:  # nothing of the input is lost
        assert out.count(word) >= KO_WORDS.count(word)


@pytest.mark.parametrize("seed", SEEDS)
def test_punctuation_only_adds_marks(seed: int) -> None:
    out = augment(KO, "punctuation", random.Random(seed), alpha=0.5).split()
    marks = [token for token in out if token in PUNCTUATION]
    assert [token for token in out if token not in PUNCTUATION] == KO_WORDS
    assert 1 <= len(marks) <= max(1, int(0.5 * len(KO_WORDS)))


def test_punctuation_at_least_one_mark_for_small_p() -> None:
    out = punctuation_insertion(["하나", "둘"], 0.0, random.Random(0))
    assert len(out) == 3 and sum(token in PUNCTUATION for token in out) == 1


@pytest.mark.parametrize("operation", OPERATIONS)
def test_nfd_input_gives_nfc_output(operation: str) -> None:
    nfd = unicodedata.normalize("NFD", KO)
    assert nfd != KO
    out = augment(nfd, operation, random.Random(0), alpha=0.3)
    assert unicodedata.is_normalized("NFC", out)
    assert out == augment(KO, operation, random.Random(0), alpha=0.3)
    assert set(out.split()) - set(PUNCTUATION) <= set(KO_WORDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_delete_never_empty(seed: int) -> None:
    assert augment(KO, "delete", random.Random(seed), alpha=1.0).split()
    kept = random_deletion(KO_WORDS, 1.0, random.Random(seed))
    assert len(kept) == 1 and kept[0] in KO_WORDS
    assert random_deletion(KO_WORDS, 0.0, random.Random(seed)) == KO_WORDS


def test_delete_keeps_a_one_word_input() -> None:
    assert random_deletion(["안녕하세요"], 1.0, random.Random(0)) == ["안녕하세요"]


def test_unknown_operation_raises() -> None:
    with pytest.raises(ValueError, match="synonym") as info:
        augment(KO, "synonym", random.Random(0))
    assert all(operation in str(info.value) for operation in OPERATIONS)
    with pytest.raises(ValueError, match="synonym"):
        augment_many(KO, 2, ["swap", "synonym"], random.Random(0))


def test_augment_many_distinct_and_cycled() -> None:
    pairs = augment_many(KO, 8, OPERATIONS, random.Random(0), alpha=0.3)
    assert len(pairs) == 8
    assert [operation for operation, _ in pairs] == list(OPERATIONS) * 2
    texts = [text for _, text in pairs]
    assert len(set(texts)) == len(texts)
    assert KO not in texts


def test_augment_many_compares_with_normalised_input() -> None:
    messy = "  " + unicodedata.normalize("NFD", KO).replace(" ", "\t ") + "\n"
    texts = [text for _, text in augment_many(messy, 6, OPERATIONS, random.Random(0), alpha=0.3)]
    assert texts and KO not in texts


def test_augment_many_may_return_fewer() -> None:
    assert augment_many("하나 둘", 5, ["swap"], random.Random(0)) == [("swap", "둘 하나")]
    assert augment_many("안녕하세요", 3, ["delete", "swap"], random.Random(0), max_tries=3) == []


@pytest.mark.parametrize("operation", OPERATIONS)
def test_one_word_text(operation: str) -> None:
    out = augment("안녕하세요", operation, random.Random(0), alpha=0.5)
    if operation in ("delete", "swap"):
        assert out == "안녕하세요"
    else:
        assert set(out.split()) <= {"안녕하세요", *PUNCTUATION}
        assert "안녕하세요" in out.split()


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_empty_text(text: str, operation: str) -> None:
    assert augment(text, operation, random.Random(0)) == ""
    assert augment_many(text, 3, OPERATIONS, random.Random(0)) == []
    assert random_deletion([], 0.5, random.Random(0)) == []
    assert random_swap([], 2, random.Random(0)) == []
    assert random_insertion([], 2, random.Random(0)) == []
    assert punctuation_insertion([], 0.5, random.Random(0)) == []


def test_inputs_are_not_mutated() -> None:
    words = list(KO_WORDS)
    for func, strength in ((random_deletion, 0.5), (random_swap, 3), (random_insertion, 3), (punctuation_insertion, 0.5)):
        func(words, strength, random.Random(0))
    assert words == KO_WORDS
