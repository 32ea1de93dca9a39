"""`task=multitask`: one encoder, a head per label column; masked per-head loss, kfold killed and resumed exactly."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import signal
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_entrypoint, store_env
from helpers import artifact_text, children, client, parents, serving
from safetensors.torch import load_file
from sklearn.metrics import f1_score
from test_ensemble import _post
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from pipelines.config import (
    EnsembleConfig,
    OptunaConfig,
    PredictConfig,
    RetrainConfig,
    TrainConfig,
    ValidateConfig,
)
from pipelines.data import Dataset
from pipelines.errors import UserError
from pipelines.stages import ensemble, predict, retrain, validate
from pipelines.study import load_search_space
from pipelines.tasks.ensemble import EnsembleError, Source
from pipelines.tasks.multitask.model import IGNORE, MultitaskConfig, MultitaskModel
from pipelines.tasks.multitask.settings import head_weights
from pipelines.tasks.multitask.task import TASK, head_metrics
from pipelines.tasks.multitask.vote import head_classes
from pipelines.warmstart import InitWeights, load_weights

K, BATCH, SAVE_STEPS = 3, 8, 2
HEADS = ["label", "length"]
OOF_COLUMNS = ["label", "predicted_label", "prob_label_computers", "prob_label_politics", "prob_label_science",
               "length", "predicted_length", "prob_length_long", "prob_length_short"]
TEXTS = ["The computer crashed again.", "Vote for the senator!", "Atoms are mostly empty space.", "x"]


def tiny_network(weights=(2.0, 1.0), **encoder_settings) -> MultitaskModel:
    encoder = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                                  **encoder_settings})
    torch.manual_seed(0)
    return MultitaskModel(MultitaskConfig(encoder=encoder.to_dict(), label_columns=["a", "b"],
                                          head_labels=[["x", "y", "z"], ["s", "l"]], head_weights=list(weights)))


def test_loss_of_a_head_counts_only_its_labelled_rows():
    network = tiny_network()
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])}
    labels = torch.tensor([[0, IGNORE], [2, 1], [IGNORE, 0]])
    out = network(**inputs, labels=labels)
    a, b = out.logits[:, :3], out.logits[:, 3:]
    ce = torch.nn.functional.cross_entropy
    expected = 2.0 * ce(a[[0, 1]], torch.tensor([0, 2])) + 1.0 * ce(b[[1, 2]], torch.tensor([1, 0]))
    assert torch.allclose(out.loss, expected)

    # a batch without a labelled row for head a: that head adds 0, its gradient is 0, the other head still learns
    network.zero_grad()
    loss = network(**inputs, labels=torch.tensor([[IGNORE, 1], [IGNORE, 0], [IGNORE, 1]])).loss
    assert torch.isfinite(loss) and torch.allclose(loss, ce(network(**inputs).logits[:, 3:], torch.tensor([1, 0, 1])))
    loss.backward()
    grads = {name: p.grad for name, p in network.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.count_nonzero(grads["heads.0.weight"]) == 0 and torch.count_nonzero(grads["heads.1.weight"]) > 0
    assert torch.count_nonzero(grads["encoder.embeddings.word_embeddings.weight"]) > 0

    network.zero_grad()
    nothing = network(**inputs, labels=torch.full((3, 2), IGNORE)).loss
    nothing.backward()
    assert nothing.item() == 0.0 and all(p.grad is None or torch.count_nonzero(p.grad) == 0
                                         for p in network.parameters())


def test_heads_are_scored_only_on_their_labelled_rows():
    ids = np.array([[0, IGNORE], [1, 1], [IGNORE, 0], [1, 0]])
    a = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])  # row 2 would be wrong for a: it has no label
    b = np.array([[9.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # row 0 would be wrong for b
    metrics = head_metrics([a, b], ids, ["a", "b"])
    assert metrics["a_accuracy"] == metrics["b_accuracy"] == metrics["accuracy"] == 1.0
    assert metrics["f1_macro"] == 1.0


def test_an_explicit_classifier_dropout_of_zero_is_kept():
    assert tiny_network(classifier_dropout=0.0, hidden_dropout_prob=0.1).dropout.p == 0.0
    assert tiny_network(hidden_dropout_prob=0.1).dropout.p == 0.1


SMALL = pd.DataFrame({"row_id": range(7), "text": ["a cat", "the dog", "one", "two birds", "fish", "a b c", "z"],
                      "a": ["x", "y", "x", "", "y", "x", "y"], "b": ["s", "", "", "s", "l", "s", "l"]})
SMALL_CFG = {"task": "multitask", "label_columns": "a,b", "max_length": 16}


def built_on(path) -> object:
    return TASK.build(TrainConfig(**SMALL_CFG), str(path), Dataset(frame=SMALL, labels=[], digest=""))


def test_a_bfloat16_checkpoint_gets_float32_heads_and_body(tiny_model, tmp_path):
    AutoModelForSequenceClassification.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    built = built_on(tmp_path)
    assert {p.dtype for p in built.network.parameters()} == {torch.float32}
    batch = built.tokenizer(["a cat", "one"], padding=True, return_tensors="pt")
    built.network(**batch, labels=torch.tensor([[0, 1], [1, IGNORE]])).loss.backward()


def test_evaluate_logs_the_loss_of_all_validation_rows_whatever_the_batch_size(tiny_model, tmp_path):
    cfg = TrainConfig(**SMALL_CFG, head_weights="2,1", label_smoothing=0.1)
    built = TASK.build(cfg, str(tiny_model), Dataset(frame=SMALL, labels=[], digest=""))
    args = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    losses = []
    for size in (2, 7):  # batches of 2 hold 0, 1 or 2 labelled rows of a head
        sized = dataclasses.replace(cfg, eval_batch_size=size)
        losses.append(TASK.evaluate(TASK.trainer(sized, built, args, SMALL, SMALL, []), built, SMALL, sized, None)
                      [0]["loss"])
    with torch.no_grad():
        logits = built.network.eval()(**built.tokenizer(SMALL["text"].tolist(), padding=True, return_tensors="pt")).logits
    ce = torch.nn.functional.cross_entropy
    a = ce(logits[[0, 1, 2, 4, 5, 6], :2], torch.tensor([0, 1, 0, 1, 0, 1]), label_smoothing=0.1)
    b = ce(logits[[0, 3, 4, 5, 6], 2:], torch.tensor([1, 1, 0, 1, 0]), label_smoothing=0.1)  # classes l, s
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(float(2 * a + b), rel=1e-5)


def test_init_from_a_classification_checkpoint_loads_its_body_into_the_encoder(tiny_model):
    network = built_on(tiny_model).network
    heads = [p.clone() for p in network.heads.parameters()]
    with torch.no_grad():
        for parameter in network.encoder.parameters():
            parameter.zero_()
    load_weights(network, InitWeights(str(tiny_model), tiny_model, None, ""), ema=False)
    source = load_file(str(tiny_model / "model.safetensors"))
    assert torch.equal(network.encoder.embeddings.word_embeddings.weight, source["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(network.encoder.encoder.layer[1].output.dense.weight,
                       source["bert.encoder.layer.1.output.dense.weight"])
    assert all(torch.equal(p, q) for p, q in zip(network.heads.parameters(), heads))  # new heads kept as built


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_integer_labels_are_the_same_classes_in_every_format(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(6)], "a": [1, 2, 3, None, 1, 2.5],
                          "b": pd.array([1, 2, 3, None, 1, 2], dtype="Int64"), "c": ["x", "y"] * 3})
    {".csv": lambda: frame.to_csv(path, index=False),  # b: 1, 2, 3, an empty cell...
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),  # b: 1, 2, 3, null...
     ".parquet": lambda: frame.astype({"b": float}).to_parquet(path)}[suffix]()  # as pyarrow reads int64 with a null
    loaded = TASK.load(TrainConfig(task="multitask", label_columns="b,a,c", data=str(path))).frame
    assert loaded["b"].tolist() == ["1", "2", "3", "", "1", "2"]
    assert loaded["a"].tolist() == ["1.0", "2.0", "3.0", "", "1.0", "2.5"]  # not whole numbers: as they are


@pytest.mark.parametrize("columns, named", [("topic (coarse),b", "topic (coarse)"), ("a,is_spam?", "is_spam?"),
                                            ("a/b", "a/b"), ("a,correct", "correct"), ("error,a", "error"),
                                            ("a,a", None)])
def test_label_columns_the_metrics_files_or_scores_cannot_hold_are_refused(columns, named):
    message = "names a column twice" if named is None else f"names {re.escape(repr(named))}.*rename that column"
    with pytest.raises(UserError, match=message):
        TrainConfig(task="multitask", label_columns=columns)
    with pytest.raises(UserError, match=message):
        ValidateConfig(task="multitask", label_columns=columns, predictions_from="0123")
    TrainConfig(task="multitask", label_columns="topic-coarse,is spam,v1.0:a")


def test_max_length_and_eval_batch_size_must_be_positive():
    for setting in ("max_length", "eval_batch_size"):
        with pytest.raises(UserError, match="max_length and eval_batch_size must be positive"):
            TrainConfig(task="multitask", label_columns="a,b", **{setting: 0})


def test_head_weights_are_searched_as_choices_of_comma_separated_weights():
    cfg = OptunaConfig(task="multitask", label_columns="a,b")
    tunable = {name: getattr(cfg, name) for name in cfg.tunable()}
    for numbers in ("{type: float, low: 1, high: 2}", "{type: categorical, choices: [1, 2]}"):
        with pytest.raises(UserError, match=r"would fail \(head_weights=1.* is one number for the 2 label_columns.*"
                                            r"choices: \['1,1', '2,1'\]"):
            cfg.refuse_failing_trials(load_search_space(f"{{head_weights: {numbers}}}", tunable))
    cfg.refuse_failing_trials(load_search_space("{head_weights: {type: categorical, choices: ['1,1', '2,1']}}",
                                                tunable))
    one = OptunaConfig(task="multitask", label_columns="a")  # one head: a number is its weight
    one.refuse_failing_trials(load_search_space("{head_weights: {type: float, low: 0.5, high: 2}}", tunable))
    assert head_weights(dataclasses.replace(one, head_weights=0.5)) == [0.5]


def multitask_data(tiny_data, path) -> str:
    """36 rows (12 per class) with a second label column `length` (short/long), some cells of it empty; row 4 has
    no `label` (it trains the length head only), row 9 no label at all (dropped)."""
    frame = pd.read_csv(tiny_data).groupby("label").head(12).reset_index(drop=True)
    lengths = frame["text"].str.len()
    frame["length"] = np.where(lengths > lengths.median(), "long", "short")
    frame.loc[frame.index % 5 == 0, "length"] = ""
    frame.loc[[4, 9], "label"] = ""
    frame.loc[9, "length"] = ""
    frame.to_csv(path, index=False)
    return str(path)


def kfold_args(data, tiny_model, experiment: str, **extra) -> dict:
    return dict(task="multitask", label_columns=",".join(HEADS), data=data, model=tiny_model, k_folds=K, epochs=1,
                batch_size=BATCH, save_steps=SAVE_STEPS, max_length=32, learning_rate=1e-3,
                experiment_name=experiment, **extra)


def finished(env, tmp_path, experiment: str) -> tuple:
    (parent,) = parents(env, experiment, "kfold")
    assert parent.info.status == "FINISHED"
    oof = artifact_text(env, parent.info.run_id, "oof_predictions.csv", tmp_path / experiment)
    return parent, oof, {r.data.tags["fold"]: r for r in children(env, experiment, parent.info.run_id)}


def starts(log: str) -> list[int]:
    return [int(line.split("training starts at step ")[1].split()[0]) for line in log.splitlines()
            if "training starts at step " in line]


@pytest.fixture(scope="module")
def cv(tiny_data, tiny_model, tmp_path_factory) -> SimpleNamespace:
    """One finished multitask kfold run (experiment `uninterrupted`) in a store of its own, with its data, OOF
    predictions (as logged, and as a frame of text) and fold runs."""
    folder = tmp_path_factory.mktemp("multitask-store")
    env, data = store_env(folder), multitask_data(tiny_data, folder / "multi.csv")
    proc = run_entrypoint("kfold", kfold_args(data, tiny_model, "uninterrupted"), env, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropping rows with an empty text_column or no label of label_columns" in proc.stderr
    parent, oof, folds = finished(env, folder, "uninterrupted")
    frame = pd.read_csv(io.StringIO(oof), dtype=str, keep_default_na=False)
    return SimpleNamespace(env=env, folder=folder, data=data, tiny_model=tiny_model, parent=parent, oof=oof,
                           frame=frame, folds=folds)


@pytest.fixture
def in_store(cv, monkeypatch):
    """Stages run in this process track to ``cv``'s store."""
    for key, value in cv.env.items():
        if key.startswith(("MLFLOW_", "PIPELINES_")):
            monkeypatch.setenv(key, value)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PIPELINES_FAILPOINT"):
        monkeypatch.delenv(key, raising=False)
    return cv


def pooled(frame: pd.DataFrame) -> dict[str, float]:
    """Per head accuracy and macro F1 of OOF predictions over the rows labelled for that head, and their means."""
    metrics = {}
    for head in HEADS:
        labelled = frame[frame[head] != ""]
        metrics[f"{head}_accuracy"] = (labelled[head] == labelled[f"predicted_{head}"]).mean()
        metrics[f"{head}_f1_macro"] = f1_score(labelled[head], labelled[f"predicted_{head}"], average="macro")
    return {**metrics, **{name: np.mean([metrics[f"{h}_{name}"] for h in HEADS]) for name in ("accuracy", "f1_macro")}}


@pytest.mark.slow
def test_kfold_scores_each_head_on_its_labelled_rows(cv):
    frame = cv.frame
    assert list(frame.columns) == ["row_id", "fold", *OOF_COLUMNS]
    assert sorted(frame["row_id"].astype(int)) == [i for i in range(36) if i != 9]
    assert frame.set_index("row_id").loc["4", "label"] == "" and (frame["length"] == "").sum() == 8
    assert (frame["predicted_label"] != "").all() and (frame["predicted_length"] != "").all()
    metrics = cv.parent.data.metrics
    for i, fold in frame.groupby("fold"):  # each head scored on its labelled rows of the fold only
        for head in HEADS:
            labelled = fold[fold[head] != ""]
            assert metrics[f"fold{i}_{head}_accuracy"] == pytest.approx(
                (labelled[head] == labelled[f"predicted_{head}"]).mean())
    assert metrics["cv_f1_macro_mean"] == pytest.approx(
        (metrics["cv_label_f1_macro_mean"] + metrics["cv_length_f1_macro_mean"]) / 2)
    assert {"cv_length_accuracy_mean", "cv_accuracy_mean", "cv_loss_mean", "cv_label_f1_macro_std"} <= set(metrics)


@pytest.mark.slow
def test_kfold_killed_in_a_fold_resumes_from_its_checkpoint_to_the_same_oof(cv):
    env, folder, data, tiny_model = cv.env, cv.folder, cv.data, cv.tiny_model
    # SIGKILL in fold 1, one step after its step-2 checkpoint was committed (fold 0 has 3 steps)
    steps = 3
    killed = run_entrypoint("kfold", kfold_args(data, tiny_model, "mt"), {**env, "PIPELINES_FAILPOINT":
                            f"train_step:{steps + SAVE_STEPS + 1}"}, folder)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = parents(env, "mt", "kfold")
    before = {r.data.tags["fold"]: r for r in children(env, "mt", run.info.run_id)}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING"
    assert before["1"].data.tags["checkpoint"] == f"checkpoints/checkpoint-{SAVE_STEPS}"
    resumed = run_entrypoint("kfold", kfold_args(data, tiny_model, "mt", resume="true"), env, folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert starts(resumed.stderr) == [SAVE_STEPS, 0]  # fold 1 went on from its checkpoint, fold 2 from scratch
    again, resumed_oof, after = finished(env, folder, "mt")
    assert again.info.run_id == run.info.run_id and after["1"].info.run_id == before["1"].info.run_id
    assert resumed_oof == cv.oof
    assert {k: v for k, v in again.data.metrics.items() if k.startswith(("cv_", "fold"))} == \
        {k: v for k, v in cv.parent.data.metrics.items() if k.startswith(("cv_", "fold"))}


@pytest.mark.slow
def test_validate_and_predict_score_and_answer_each_head(in_store, tmp_path):
    cv = in_store
    metrics = validate.run(ValidateConfig(task="multitask", label_columns="label,length", data=cv.data,
                                          predictions_from=cv.parent.info.run_id, shard_size=20,
                                          experiment_name="validate"))
    expected = pooled(cv.frame)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert metrics["rows_without_reference"] == 0
    (run,) = parents(cv.env, "validate", "validate")
    scores = pd.read_csv(io.StringIO(artifact_text(cv.env, run.info.run_id, "scores.csv", tmp_path / "s")),
                         dtype={h: str for h in HEADS}, keep_default_na=False).set_index("row_id")
    row4 = scores.loc[4]  # no `label`: scored by its `length` alone
    assert row4["label"] == "" and row4["correct"] == float(row4["length"] == row4["predicted_length"])
    logged = {a.path for a in client(cv.env).list_artifacts(run.info.run_id)}
    assert {"per_class_label.csv", "per_class_length.csv", "confusion_matrix_length.png"} <= logged

    fold0 = cv.folds["0"].info.run_id
    summary = predict.run(PredictConfig(model_uri=f"runs:/{fold0}/model", data=cv.data, experiment_name="predict",
                                        output=str(tmp_path / "predicted.csv")))
    predicted = pd.read_csv(tmp_path / "predicted.csv", dtype=str, keep_default_na=False)
    assert list(predicted.columns) == ["row_id", *(c for c in OOF_COLUMNS if c not in HEADS)]
    assert sum(v for k, v in summary.items() if k.startswith("count_length_")) == len(predicted) == 36
    own = cv.frame[cv.frame["fold"] == "0"].set_index("row_id")  # the fold model's own validation rows
    mine = predicted.set_index("row_id").loc[own.index]
    assert (mine[["predicted_label", "predicted_length"]] == own[["predicted_label", "predicted_length"]]).all(axis=None)
    probs = [c for c in OOF_COLUMNS if c.startswith("prob_")]
    np.testing.assert_allclose(mine[probs].astype(float), own[probs].astype(float), atol=1e-5)

    # the model scored on one of its heads: that head's rows with a label, the others counted as without reference
    by_model = validate.run(ValidateConfig(task="multitask", label_columns="length", data=cv.data,
                                           model_uri=f"runs:/{fold0}/model", experiment_name="validate-model"))
    truth = pd.read_csv(cv.data, dtype=str, keep_default_na=False)["length"]
    labelled = truth != ""
    assert by_model["length_accuracy"] == pytest.approx((predicted["predicted_length"] == truth)[labelled].mean())
    assert by_model["rows_without_reference"] == (~labelled).sum() == 9 and "label_accuracy" not in by_model
    with pytest.raises(UserError, match=r"has heads \['label', 'length'\], and label_columns='length,topic'"):
        validate.run(ValidateConfig(task="multitask", label_columns="length,topic", data=cv.data,
                                    model_uri=f"runs:/{fold0}/model", experiment_name="validate-model"))


def two_heads_sources() -> list[Source]:
    """Two sources over heads `a` (classes b_y, z) and `a_b` (w, x): `prob_a_` starts every probability column.
    Source 0 is right on head a and wrong on a_b, source 1 the other way round (less sure of both); row 3 has no a_b.
    Both heads are right only for a weight of source 1 between 4/7 and 0.8: equal weights miss every row of a_b."""
    truth_a, truth_ab = np.array(["b_y", "z"] * 10), np.array(["w", "w", "x", "x"] * 5)
    truth_ab[3] = ""

    def oof(sure_a: float, sure_ab: float) -> pd.DataFrame:
        columns = {"row_id": np.arange(20), "fold": np.arange(20) % 2, "a": truth_a}
        p = np.where(truth_a == "b_y", sure_a, 1 - sure_a)
        columns.update({"predicted_a": np.where(p > 0.5, "b_y", "z"), "prob_a_b_y": p, "prob_a_z": 1 - p})
        q = np.where(truth_ab == "w", sure_ab, 1 - sure_ab)
        columns.update({"a_b": truth_ab, "predicted_a_b": np.where(q > 0.5, "w", "x"), "prob_a_b_w": q,
                        "prob_a_b_x": 1 - q})
        return pd.DataFrame(columns)

    return [Source(f"run{i}", "kfold", "multitask", [], frame, score, {"label_columns": "a,a_b"}, 32, "", "")
            for i, (frame, score) in enumerate([(oof(0.9, 0.1), 0.5), (oof(0.4, 0.8), 0.5)])]


def test_vote_reads_each_heads_classes_and_averages_over_the_heads():
    sources, vote = two_heads_sources(), TASK.ensemble
    vote.check(sources)
    assert head_classes(sources[0].oof, ["a", "a_b"], "run0") == [["b_y", "z"], ["w", "x"]]
    metrics, params = vote.evaluate(None, sources, [0.3, 0.7])
    assert params["oof_rows"] == 20
    assert metrics["ensemble_a_accuracy"] == metrics["ensemble_a_b_f1_macro"] == metrics["ensemble_f1_macro"] == 1.0
    assert (metrics["source0_a_accuracy"], metrics["source0_a_b_accuracy"], metrics["source0_accuracy"]) == (1, 0, 0.5)
    assert (metrics["source1_a_accuracy"], metrics["source1_a_b_accuracy"]) == (0, 1)
    cfg = EnsembleConfig(source_runs="run0,run1", weights="optimized")
    weights, report = vote.weigh(cfg, sources)
    assert 4 / 7 < weights[1] < 0.8 and report["fit_optimized_f1_macro"] == 1.0
    assert report["fit_equal_f1_macro"] == report["heldout_equal_f1_macro"] == 0.5  # head a right, a_b all wrong
    assert report["heldout_optimized_f1_macro"] == 1.0
    sources[1].oof.loc[0, "a"] = "z"
    with pytest.raises(EnsembleError, match="disagree on the true labels"):
        vote.check(sources)


def test_params_from_a_run_of_other_label_columns_is_refused_before_training(in_store):
    cfg = RetrainConfig(task="multitask", label_columns="length,label", data=str(in_store.data),
                        model=str(in_store.tiny_model), experiment_name="uninterrupted", max_length=32,
                        params_from=in_store.parent.info.run_id)
    with pytest.raises(UserError, match="trained with label_columns='label,length'"):
        retrain.run(cfg)
    assert parents(in_store.env, "uninterrupted", "retrain") == []


def test_validate_needs_the_heads_to_score():
    with pytest.raises(UserError, match="task=multitask scores one head per column of label_columns"):
        ValidateConfig(task="multitask", predictions_from="0123")


def test_label_columns_whose_prediction_columns_collide_are_refused(tmp_path):
    path = tmp_path / "collide.csv"
    pd.DataFrame({"text": [f"text {i}" for i in range(8)], "a": ["b_x", "y"] * 4, "a_b": ["x", "z"] * 4}).to_csv(path)
    with pytest.raises(UserError, match="make the predictions column 'prob_a_b_x' twice"):
        TASK.load(TrainConfig(task="multitask", label_columns="a,a_b", data=str(path)))


@pytest.mark.slow
def test_ensemble_is_registered_and_served_per_head(in_store, tmp_path):
    cv = in_store
    metrics = ensemble.run(EnsembleConfig(source_runs=cv.parent.info.run_id, registered_model_name="multi",
                                          experiment_name="ensemble", weights="optimized"))
    expected = pooled(cv.frame)  # one source: its fold models average to its own OOF predictions
    assert {k: metrics[f"ensemble_{k}"] for k in expected} == pytest.approx(expected, abs=1e-12)

    folders = [client(cv.env).download_artifacts(r.info.run_id, "model", str(tmp_path / r.info.run_id))
               for r in cv.folds.values()]
    with serving(cv.env, "models:/multi@champion", cv.folder) as port:
        status, body = _post(port, json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode())
    assert status == 200, body
    served = pd.DataFrame(json.loads(body)["predictions"])
    classes = {"label": ["computers", "politics", "science"], "length": ["long", "short"]}
    assert list(served.columns) == [name for head, labels in classes.items()
                                    for name in (head, *(f"prob_{head}_{c}" for c in labels))]
    heads = []  # per fold model, per head: its class probabilities, computed here from its own folder
    for folder in folders:
        batch = AutoTokenizer.from_pretrained(folder)(TEXTS, truncation=True, max_length=32, padding=True,
                                                      return_tensors="pt")
        with torch.no_grad():
            logits = MultitaskModel.from_pretrained(folder).eval()(**batch).logits.double()
        heads.append([torch.softmax(part, dim=-1).numpy() for part in logits.split([3, 2], dim=-1)])
    for h, (head, labels) in enumerate(classes.items()):
        expected_probs = np.mean([member[h] for member in heads], axis=0)
        probs = served[[f"prob_{head}_{c}" for c in labels]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose(probs, expected_probs, atol=1e-6)
        assert served[head].tolist() == [labels[i] for i in probs.argmax(axis=1)]

    summary = predict.run(PredictConfig(model_uri="models:/multi@champion", data=cv.data, experiment_name="predict",
                                        output=str(tmp_path / "ensemble.csv")))
    predicted = pd.read_csv(tmp_path / "ensemble.csv", dtype=str, keep_default_na=False)
    assert {"predicted_label", "predicted_length"} <= set(predicted.columns)
    assert sum(v for k, v in summary.items() if k.startswith("count_label_")) == 36
