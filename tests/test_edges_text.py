"""Issue 19, items 12, 13 and 15: text edges that gave silent wrong results.

12: ``augment_from`` rows take their label/target from the current data; a data file whose text differs is refused
    naming the rows.
13: a vote between two candidates (MBR ties by symmetry) is decided by agreement with the source text, or refused;
    summary ensembles check that their sources share references and ``rouge_tokenizer``.
15: punctuation (any Unicode P*) is never part of a word in the ``whitespace``, ``char`` and ``morpheme``
    tokenizers; on English, ``whitespace`` and ``default`` score exactly as ``rouge_score``'s own scorer.

Everything runs in-process: unit tests of the ROUGE and MBR functions, and real SQLite stores holding recorded
runs (no training, no subprocess).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from pipelines.rouge import score_rows, tokenize

KO_SOURCE = "고객이 어제 주문한 노트북의 환불을 요청했다. 상담원은 영수증을 확인한 뒤 환불을 처리했다."


# ---------------------------------------------------------------- item 15: punctuation


def test_punctuation_is_not_part_of_a_word():
    with_period, without = "고객이 환불을 요청했다.", "고객이 환불을 요청했다"
    for tokenizer in ("whitespace", "char", "morpheme"):
        scores = score_rows([with_period], [without], tokenizer).iloc[0]
        assert scores.tolist() == [1.0, 1.0, 1.0, 1.0], tokenizer
    # Unicode punctuation too: curly quotes, corner brackets, ellipsis, middle dot, full-width comma
    assert tokenize("“환불”을 「요청」했다… 고객·상담원，끝", "whitespace") == ["환불", "을", "요청", "했다", "고객",
                                                                       "상담원", "끝"]
    assert tokenize("요청했다!?", "char") == ["요", "청", "했", "다"]
    assert "." not in tokenize(with_period, "morpheme") and "“" not in tokenize("“환불”", "morpheme")


ENGLISH = [
    ("The cat sat on the mat.", "The cat sat on the mat"),
    ("Don't stop: it's state-of-the-art (really)!", "dont stop, its state of the art really"),
    ("Revenue rose 5% to $3.2bn, the U.S. unit said.", "The U.S. unit said revenue rose 5%."),
    ('"Hello," she said -- and left...', "she said hello and left"),
]


@pytest.mark.parametrize("tokenizer", ["whitespace", "default"])
def test_english_scores_equal_rouge_scores_own_scorer(tokenizer):
    from rouge_score import rouge_scorer
    from rouge_score import tokenize as rouge_tokenize

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    ours = score_rows([r for r, _ in ENGLISH], [p for _, p in ENGLISH], tokenizer)
    for (reference, prediction), (_, row) in zip(ENGLISH, ours.iterrows()):
        assert tokenize(reference, tokenizer) == rouge_tokenize.tokenize(reference, None)
        theirs = scorer.score(reference, prediction)
        assert [row[k] for k in ("rouge1", "rouge2", "rougeL")] == \
            pytest.approx([theirs[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")], abs=1e-12)


# ---------------------------------------------------------------- item 13: votes


def test_two_candidates_are_decided_by_agreement_with_the_source():
    from pipelines.mbr import mbr_choice

    near, far = "고객이 노트북 환불을 요청했고 상담원이 처리했다", "배송이 늦어 고객이 불만을 제기했다"
    assert mbr_choice([far, near], "whitespace", source=KO_SOURCE) == 1
    assert mbr_choice([near, far], "whitespace", source=KO_SOURCE) == 0
    # then the model score, where the source does not decide
    assert mbr_choice(["a b", "c d"], "whitespace", source="x y", scores=[-2.0, -1.0]) == 1
    # equal tokens: the same summary to ROUGE, so either is right
    assert mbr_choice(["A b.", "a b"], "whitespace") == 0


def test_a_vote_that_cannot_decide_is_refused():
    from pipelines.mbr import VoteUndecided, mbr_choice

    with pytest.raises(VoteUndecided, match=r"my setting cannot decide: candidates \[0, 1\] of 2.*no source text "
                                            r"or model scores.*Add a candidate.*another strategy"):
        mbr_choice(["a b", "c d"], "whitespace", setting="my setting")
    with pytest.raises(VoteUndecided, match="ROUGE to the source text"):  # neither shares a word with the source
        mbr_choice(["a b", "c d"], "whitespace", source="x y z")


def test_correct_vote_with_one_correction_model_can_change_the_summary(monkeypatch):
    from pipelines.stages import correct

    better = "고객이 노트북 환불을 요청했고 상담원이 처리했다"
    monkeypatch.setattr(correct, "rewrite", lambda loaded, texts, cfg, length: [better, "전혀 다른 이야기"])
    cfg = SimpleNamespace(correction_strategy="vote", rouge_tokenizer="whitespace", max_source_length=64)
    rows = pd.DataFrame({"row_id": [7, 8], "text": [KO_SOURCE, KO_SOURCE], "reference": ["", ""],
                         "prediction": ["배송이 늦어 고객이 불만을 제기했다", better]})
    out = correct.Fixer(cfg, [("m1", None)], None).correct(rows.head(1))
    assert out["corrected"].tolist() == [better] and out["chosen_from"].tolist() == ["m1"]
    assert out["changed"].tolist() == [1]
    # row 8: the summary and the candidate share no word with each other or the source: refused, naming the row
    from pipelines.mbr import VoteUndecided

    with pytest.raises(VoteUndecided, match=r"correction_strategy=vote on row_id 8 .*correction_models=m1"):
        correct.Fixer(cfg, [("m1", None)], None).correct(rows.assign(prediction=["배송 지연", "날씨 맑음"]))


def test_two_member_summary_ensemble_is_not_always_member_0(monkeypatch):
    from pipelines.tasks.summarization import mbr_vote

    outputs = {"a": ["배송이 늦어 고객이 불만을 제기했다"], "b": ["고객이 노트북 환불을 요청했고 상담원이 처리했다"]}
    monkeypatch.setattr(mbr_vote, "generate", lambda network, *args: outputs[network])
    members = [SimpleNamespace(network=name, tokenizer=None, config=None, max_length=64) for name in ("a", "b")]
    summaries, chosen = mbr_vote.summarize_all(members, [KO_SOURCE], 4, "whitespace")
    assert chosen == [1] and summaries == outputs["b"]
    # neither shares a word with the source: the member most confident of its own summary wins
    outputs.update(a=["날씨 맑음"], b=["주가 상승"])
    monkeypatch.setattr(mbr_vote, "own_scores", lambda members, text, summaries: [-3.0, -1.5])
    assert mbr_vote.summarize_all(members, [KO_SOURCE], 4, "whitespace") == (["주가 상승"], [1])


# ---------------------------------------------------------------- real stores with recorded runs


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    from pipelines.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with Tracker("edges-text") as opened:
        yield opened


def recorded_run(tracker, folder: Path, stage: str, settings: dict, artifacts: dict[str, pd.DataFrame],
                 metrics: dict[str, float]) -> str:
    """A FINISHED ``stage`` run as a stage records it: ``config.json`` settings, CSV artifacts, metrics."""
    run_id = tracker.start_parent(stage, "fp", {})
    folder = folder / run_id
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"settings": settings}))
    tracker.upload(run_id, folder / "config.json")
    for name, frame in artifacts.items():
        frame.to_csv(folder / name, index=False)
        tracker.upload(run_id, folder / name)
    tracker.log_metrics(run_id, metrics)
    tracker.finish(run_id)
    return run_id


def summary_source(tracker, folder: Path, rouge_tokenizer: str, references: list[str]) -> str:
    oof = pd.DataFrame({"row_id": [0, 1, 2], "source": [KO_SOURCE, "서버 점검 공지", "회의록 요약"],
                        "reference": references, "generated": ["환불 처리", "서버 점검", "회의 요약"]})
    settings = {"task": "summarization", "max_source_length": 64, "rouge_tokenizer": rouge_tokenizer}
    return recorded_run(tracker, folder, "train", settings, {"predictions.csv": oof}, {"final_rouge_mean": 0.5})


def test_summary_ensemble_sources_must_share_references_and_rouge_tokenizer(tracker, tmp_path):
    from pipelines.config import EnsembleConfig
    from pipelines.stages import ensemble

    references = ["환불을 처리했다", "서버를 점검한다", "회의를 요약했다"]
    a = summary_source(tracker, tmp_path, "whitespace", references)
    same = summary_source(tracker, tmp_path, "whitespace", references)
    char = summary_source(tracker, tmp_path, "char", references)
    other = summary_source(tracker, tmp_path, "whitespace", [references[0], "서버를 고친다", references[2]])

    def sources(*runs):
        return ensemble._sources(tracker, EnsembleConfig(source_runs=",".join(runs)), tmp_path / "dl")

    assert [s.run_id for s in sources(a, same)] == [a, same]
    with pytest.raises(ensemble.EnsembleError, match=f"rouge_tokenizer.*{a}: whitespace, {char}: char"):
        sources(a, char)
    with pytest.raises(ensemble.EnsembleError, match=rf"{a} and {other} have different reference texts on 1 of "
                                                     r"their 3 shared rows \(row ids \[1\]"):
        sources(a, other)


def augment_context(tracker, data: Path, source: str):
    from pipelines.config import KFoldConfig
    from pipelines.stages.contract import StageContext
    from pipelines.tasks import get_task

    cfg = KFoldConfig(data=str(data), augment_from=source)
    return StageContext("kfold", cfg, tracker, {}, "", data=get_task("classification").load(cfg))


def test_augmentations_take_labels_from_the_current_data(tracker, tmp_path, tiny_data):
    from pipelines.errors import ConfigError
    from pipelines.stages.augment import assemble
    from pipelines.stages.augmented import augmentations

    frame = pd.read_csv(tiny_data)
    new = pd.DataFrame({"source_row_id": [0, 1, 5], "text": ["rewrite zero", "rewrite one", "rewrite five"],
                        "method": "eda"})
    source = recorded_run(tracker, tmp_path, "augment", {"text_column": "text"},
                          {"augmented.csv": assemble(frame, new, "text")}, {})
    relabelled = "politics" if frame.at[1, "label"] != "politics" else "science"
    frame.loc[1, "label"] = relabelled  # corrected after augmenting
    frame.to_csv(tmp_path / "corrected.csv", index=False)
    ctx = augment_context(tracker, tmp_path / "corrected.csv", source)
    extra = augmentations(ctx, source).set_index("source_row_id")
    assert extra.at[1, "text"] == "rewrite one" and extra.at[1, "label"] == relabelled
    assert extra.at[1, "label_id"] == ctx.data.labels.index(relabelled)
    assert extra.loc[[0, 5], "label"].tolist() == frame.loc[[0, 5], "label"].tolist()

    frame.loc[[3, 9], "text"] = "edited after augmenting"
    frame.to_csv(tmp_path / "edited.csv", index=False)
    with pytest.raises(ConfigError, match=rf"augment run {source} .*text of 2 rows .* \(row ids 3, 9\)"):
        augmentations(augment_context(tracker, tmp_path / "edited.csv", source), source)


def test_runs_scored_by_the_old_tokenizer_rules_are_not_resumed_under_the_new_ones():
    """A summarization run's fingerprint names the ROUGE rules of its tokenizer, so a run started before punctuation
    was split off words is refused on resume (listing rouge_rules) instead of mixing two yardsticks."""
    from pipelines.config import KFoldConfig
    from pipelines.settings import ROUGE_RULES, describe_differences, parse_config

    new = parse_config(KFoldConfig, ["--task", "summarization", "--rouge_tokenizer", "whitespace"]).result_settings()
    old = {k: v for k, v in new.items() if k != "rouge_rules"}
    assert new["rouge_rules"] == ROUGE_RULES
    assert describe_differences(old, new) == [f"rouge_rules: <unset> -> {ROUGE_RULES}"]
    default = parse_config(KFoldConfig, ["--task", "summarization", "--rouge_tokenizer", "default"]).result_settings()
    assert "rouge_rules" not in default  # rouge_score's own tokenizer did not change
    assert "rouge_rules" not in parse_config(KFoldConfig, []).result_settings()  # classification: no ROUGE


def test_runs_made_by_the_old_layerwise_or_grid_rules_are_not_resumed_under_the_new_ones():
    """The same guard for the other two rules this version changed: an encoder-decoder's layer-wise learning rates
    (other optimizer parameter groups: an old checkpoint's optimizer state would not fit) and grid point order."""
    from pipelines.config import KFoldConfig, OptunaConfig
    from pipelines.settings import parse_config

    seq2seq = parse_config(KFoldConfig, ["--task", "summarization", "--layerwise_lr_decay", "0.8"]).result_settings()
    assert seq2seq["layerwise_rules"] == "per-stack"
    encoder = parse_config(KFoldConfig, ["--layerwise_lr_decay", "0.8"]).result_settings()
    assert "layerwise_rules" not in encoder  # an encoder's groups did not change: its runs keep their fingerprint
    assert parse_config(OptunaConfig, ["--sampler", "grid"]).result_settings()["grid_rules"] == "point-per-trial"
    assert "grid_rules" not in parse_config(OptunaConfig, ["--sampler", "tpe"]).result_settings()
