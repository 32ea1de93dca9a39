"""ROUGE for Korean: values checked against hand-computed F1 (F1 = 2PR / (P + R)), not against the library."""

from __future__ import annotations

import sys

import pytest

from pipelines import rouge
from pipelines.errors import ConfigError
from pipelines.rouge import SCORE_COLUMNS, TOKENIZERS, check_tokenizer, corpus_scores, score_rows, tokenize

KO_REF = "고양이가 매트 위에 앉았다"
KO_PRED = "고양이가 매트에 앉았다"


def one(reference: str, prediction: str, tokenizer: str) -> dict[str, float]:
    frame = score_rows([reference], [prediction], tokenizer)
    assert list(frame.columns) == list(SCORE_COLUMNS)
    assert all(str(dtype) == "float64" for dtype in frame.dtypes)
    return frame.iloc[0].to_dict()


def expect(scores: dict[str, float], r1: float, r2: float, rl: float) -> None:
    assert scores["rouge1"] == pytest.approx(r1)
    assert scores["rouge2"] == pytest.approx(r2)
    assert scores["rougeL"] == pytest.approx(rl)
    assert scores["rouge_mean"] == pytest.approx((r1 + r2 + rl) / 3)


def test_english_whitespace() -> None:
    # ref: the cat sat on the mat (6 tokens); pred: the cat lay on the mat (6 tokens)
    # unigrams: the min(2,2)=2, cat 1, on 1, mat 1 -> 5; P = R = 5/6 -> F1 5/6
    # bigrams: ref {the cat, cat sat, sat on, on the, the mat}, pred {the cat, cat lay, lay on, on the, the mat}
    #   overlap the cat, on the, the mat = 3; P = R = 3/5 -> F1 3/5
    # LCS: the cat on the mat = 5; P = R = 5/6 -> F1 5/6;  mean (5/6 + 3/5 + 5/6) / 3 = 34/45
    scores = one("the cat sat on the mat", "The cat lay on the mat", "whitespace")
    expect(scores, 5 / 6, 3 / 5, 5 / 6)
    assert scores["rouge_mean"] == pytest.approx(34 / 45)


def test_unigram_overlap_is_clipped() -> None:
    # ref: the cat (2); pred: the the the the (4): overlap min(1, 4) = 1, P = 1/4, R = 1/2
    #   F1 = 2 * 1/8 / (3/4) = 1/3; bigrams: no (the, cat) in pred -> 0; LCS "the" = 1 -> same as rouge1, 1/3
    expect(one("the cat", "the the the the", "whitespace"), 1 / 3, 0.0, 1 / 3)


def test_korean_whitespace() -> None:
    # ref eojeol: 고양이가 매트 위에 앉았다 (4); pred: 고양이가 매트에 앉았다 (3)
    # unigrams: 고양이가, 앉았다 -> 2; P = 2/3, R = 2/4 -> F1 = 2 * 1/3 / (7/6) = 4/7
    # bigrams ref {고양이가 매트, 매트 위에, 위에 앉았다}, pred {고양이가 매트에, 매트에 앉았다}: 0 -> 0
    # LCS: 고양이가 앉았다 = 2 -> 4/7
    expect(one(KO_REF, KO_PRED, "whitespace"), 4 / 7, 0.0, 4 / 7)


def test_korean_char() -> None:
    assert tokenize(KO_PRED, "char") == ["고", "양", "이", "가", "매", "트", "에", "앉", "았", "다"]
    # ref chars: 고 양 이 가 매 트 위 에 앉 았 다 (11); pred: 고 양 이 가 매 트 에 앉 았 다 (10), all in ref
    # unigrams: overlap 10; P = 10/10, R = 10/11 -> F1 = 2 * 10/11 / (21/11) = 20/21
    # bigrams ref (10): 고양 양이 이가 가매 매트 트위 위에 에앉 앉았 았다
    #         pred (9): 고양 양이 이가 가매 매트 트에 에앉 앉았 았다 -> overlap 8 (all but 트에)
    #   P = 8/9, R = 8/10 -> F1 = 2 * (64/90) / (152/90) = 128/152 = 16/19
    # LCS: pred is ref without 위 -> 10 -> 20/21
    scores = one(KO_REF, KO_PRED, "char")
    expect(scores, 20 / 21, 16 / 19, 20 / 21)
    assert scores["rouge_mean"] == pytest.approx(1096 / 1197)  # (20/21 + 16/19 + 20/21) / 3


def test_korean_morpheme_tokens() -> None:
    assert tokenize("회의 내용을 요약했습니다", "morpheme") == ["회의", "내용", "을", "요약", "하", "었", "습니다"]
    assert tokenize("Kiwi로 GPT를 테스트했다", "morpheme") == ["kiwi", "로", "gpt", "를", "테스트", "하", "었", "다"]
    assert tokenize("  ", "morpheme") == []


def test_korean_morpheme_matches_inflected_forms() -> None:
    ref, pred = "요약했습니다", "요약합니다"
    assert tokenize(ref, "morpheme") == ["요약", "하", "었", "습니다"]
    assert tokenize(pred, "morpheme") == ["요약", "하", "ᆸ니다"]  # ᆸ is the jongseong jamo U+11B8
    # whitespace: one eojeol each, different -> nothing overlaps
    expect(one(ref, pred, "whitespace"), 0.0, 0.0, 0.0)
    # morphemes: unigrams 요약, 하 -> 2; P = 2/3, R = 2/4 -> F1 = 4/7
    # bigrams ref {요약 하, 하 었, 었 습니다}, pred {요약 하, 하 ᆸ니다}: 1; P = 1/2, R = 1/3 -> 2 * 1/6 / (5/6) = 2/5
    # LCS: 요약 하 = 2 -> 4/7
    expect(one(ref, pred, "morpheme"), 4 / 7, 2 / 5, 4 / 7)


def test_morpheme_without_kiwipiepy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rouge, "_KIWI", None)
    monkeypatch.setitem(sys.modules, "kiwipiepy", None)  # makes `import kiwipiepy` raise ImportError
    with pytest.raises(ConfigError, match="needs kiwipiepy.*rouge_tokenizer=whitespace or char"):
        tokenize("요약했습니다", "morpheme")


def test_default_tokenizer_drops_hangul() -> None:
    assert tokenize(KO_REF, "default") == []
    assert tokenize("GPT-4가 요약했다", "default") == ["gpt", "4"]
    expect(one(KO_REF, KO_REF, "default"), 0.0, 0.0, 0.0)  # even a perfect Korean prediction scores 0
    expect(one(KO_REF, KO_REF, "whitespace"), 1.0, 1.0, 1.0)


def test_check_tokenizer() -> None:
    korean = [KO_REF, "회의 내용을 요약했습니다", "GPT summary"]
    with pytest.raises(ConfigError, match="rouge_tokenizer") as err:
        check_tokenizer(korean, "default", "target_column 'summary' of data/x.jsonl")
    # letters: 11 + 11 Hangul (고양이가 매트 위에 앉았다: 4+2+2+3; 회의 내용을 요약했습니다: 2+3+6), 3 + 7 Latin
    #   -> 22/32 = 68.75%, shown as 69%
    assert "69% of the letters in target_column 'summary' of data/x.jsonl" in str(err.value)
    # English: é is the only non-ASCII letter, 1 of 17 + 10 = 27 letters = 3.7% (under 5%)
    check_tokenizer(["The cat sat on the mat.", "Café au lait 2024"], "default", "English")
    for name in TOKENIZERS:
        if name != "default":
            check_tokenizer(korean, name, "Korean")
    with pytest.raises(ConfigError, match="rouge_tokenizer"):
        check_tokenizer(korean, "bpe", "Korean")


def test_corpus_scores_is_mean_of_rows() -> None:
    # row 1: identical -> all 1; row 2: the cat / the the the the -> 1/3, 0, 1/3 (see test above)
    scores = corpus_scores(["the cat", "the cat"], ["the cat", "the the the the"], "whitespace")
    assert set(scores) == set(SCORE_COLUMNS)
    assert scores["rouge1"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["rouge2"] == pytest.approx((1 + 0) / 2)
    assert scores["rougeL"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["rouge_mean"] == pytest.approx((1 + (1 / 3 + 0 + 1 / 3) / 3) / 2)


def test_empty_mismatched_and_unknown() -> None:
    frame = score_rows([KO_REF, "", KO_REF, KO_REF], ["", KO_PRED, "   ", None], "char")
    assert frame.to_numpy().tolist() == [[0.0] * 4] * 4
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        score_rows(["a", "b"], ["a"], "whitespace")
    with pytest.raises(ConfigError, match="rouge_tokenizer='bpe' is not one of whitespace, char, morpheme, default"):
        score_rows(["a"], ["a"], "bpe")
    with pytest.raises(ConfigError, match="rouge_tokenizer"):
        tokenize("a", "bpe")


def test_hangul_in_decomposed_form_scores_as_its_syllables():
    import unicodedata

    text = "고양이가 매트 위에 앉았다"
    decomposed = unicodedata.normalize("NFD", text)  # jamo, as macOS file names and some editors write it
    assert decomposed != text
    for tokenizer in ("whitespace", "char"):
        assert score_rows([decomposed], [text], tokenizer).iloc[0].tolist() == [1.0, 1.0, 1.0, 1.0]
