"""Edges of reading and scoring (issue 19, items 10, 11 and 16): labels spelled like a missing value, rows without a
reference, and `predict` / `validate` on every kind of model the project registers (the summary-ensemble pyfunc
included). In-process and small: the tiny BERT of conftest, a tiny BART, one SQLite store per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import store_env
from helpers import artifact_frame, client
from seq2seq_fixtures import make_tiny_bart, make_tiny_summaries
from sklearn.metrics import accuracy_score, f1_score

from pipelines.config import PredictConfig, ValidateConfig
from pipelines.data import load_dataset
from pipelines.errors import ConfigError, UserError
from pipelines.stages import predict, validate
from pipelines.tasks.base import TRAINED_WITH
from pipelines.tasks.classification.task import TASK as CLASSIFICATION

SPELLED_MISSING = ["NA", "None", "null", "N/A", "nan", "NULL", "#N/A", "01"]


# ---------------------------------------------------------------- item 10: reading what was written


def test_restored_fold_predictions_keep_labels_spelled_like_missing(tmp_path):
    """A fold restored on resume reads its predictions back: labels ``NA``, ``None``... must come back as written,
    or the OOF of a resumed kfold differs from an uninterrupted one."""
    written = pd.DataFrame({"row_id": range(len(SPELLED_MISSING)), "label": SPELLED_MISSING,
                            "predicted": SPELLED_MISSING[::-1]})
    for name in SPELLED_MISSING:
        written[f"prob_{name}"] = 1.0 / len(SPELLED_MISSING)
    written.to_csv(tmp_path / "predictions.csv", index=False)
    restored = CLASSIFICATION.read_predictions(tmp_path / "predictions.csv")
    assert restored["label"].tolist() == SPELLED_MISSING and restored["predicted"].tolist() == SPELLED_MISSING[::-1]
    assert restored["row_id"].dtype.kind == "i" and all(d.kind == "f" for d in restored.filter(like="prob_").dtypes)
    # every stage's shard and artifact reader goes through the same helper: text verbatim, "" stays ""
    from pipelines.data import read_artifact_csv

    pd.DataFrame({"row_id": [0, 1], "response": ["NA", ""], "error": ["", "None"], "code": ["01", "2"],
                  "score": [0.5, 1.0]}).to_csv(tmp_path / "s.csv", index=False)
    back = read_artifact_csv(tmp_path / "s.csv", ("response", "code"))
    assert back["response"].tolist() == ["NA", ""] and back["error"].tolist() == ["", "None"]
    assert back["code"].tolist() == ["01", "2"] and back["score"].tolist() == [0.5, 1.0]
    assert read_artifact_csv(tmp_path / "s.csv")["score"].tolist() == ["0.5", "1.0"]  # None: every column is text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_data_empty_cell_is_missing_and_na_text_is_a_label(tmp_path, suffix):
    """One meaning in every format: an empty (or blank) cell is missing, ``NA``/``None``/``null``/``N/A``/``01`` are
    labels as written; numeric-looking labels stay as written (no ``1.0`` because a cell was empty)."""
    texts = [f"text {i}" for i in range(12)]
    words = ["NA", "None", "null", "N/A", "01", "NA", "None", "null", "N/A", "01", "", "  "]
    numbers = ["1", "2", "1", "2", "1", "2", "1", "2", "1", "2", "", "1"]
    for labels, expected in ((words, ["01", "N/A", "NA", "None", "null"]), (numbers, ["1", "2"])):
        frame = pd.DataFrame({"text": texts, "label": labels})
        path = tmp_path / f"data{suffix}"
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        elif suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(path)
        data = load_dataset(str(path), "text", "label")
        assert data.labels == expected, (suffix, data.labels)
        kept = [i for i, label in enumerate(labels) if label.strip()]
        assert data.frame["row_id"].tolist() == kept
        assert data.frame["label"].tolist() == [labels[i] for i in kept]


# ---------------------------------------------------------------- a store and tiny models, shared by the module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edges")


@pytest.fixture
def in_store(folder, monkeypatch):
    """This process tracks to the module's SQLite store (created once)."""
    for key, value in store_env(folder).items():
        if key.startswith(("MLFLOW_", "PIPELINES_")):
            monkeypatch.setenv(key, value)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PIPELINES_FAILPOINT"):
        monkeypatch.delenv(key, raising=False)
    return store_env(folder)


def _runs(env: dict, experiment: str) -> list:
    found = client(env).get_experiment_by_name(experiment)
    return [] if found is None else client(env).search_runs([found.experiment_id])


@pytest.fixture(scope="module")
def classifier(tiny_model, tiny_data, folder) -> Path:
    """The tiny BERT with two of the data's class names (its head is untrained: predictions are arbitrary)."""
    model = shutil.copytree(tiny_model, folder / "classifier")
    labels = sorted(pd.read_csv(tiny_data)["label"].unique())[:2]
    config = json.loads((model / "config.json").read_text())
    config.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    (model / "config.json").write_text(json.dumps(config))
    (model / TRAINED_WITH).write_text(json.dumps({"task": "classification", "max_length": 32}))
    return model


# ---------------------------------------------------------------- item 11: rows without a reference


def test_validate_scores_only_rows_with_a_reference(classifier, tiny_data, folder, in_store):
    frame = pd.read_csv(tiny_data).head(24)
    frame.loc[[1, 5, 9], "label"] = ""
    frame.loc[13, "label"] = "   "
    frame.to_csv(folder / "partly.csv", index=False)
    cfg = ValidateConfig(experiment_name="refs", model_uri=str(classifier), data=str(folder / "partly.csv"),
                         shard_size=10)
    metrics = validate.run(cfg)
    assert metrics["rows_without_reference"] == 4
    [parent] = [r for r in _runs(in_store, "refs") if r.data.tags.get("stage") == "validate"]
    scores = artifact_frame(in_store, parent.info.run_id, "scores.csv", folder / "refs-scores").fillna("")
    assert len(scores) == 20 and (scores["reference"].str.strip() != "").all()
    assert metrics["accuracy"] == accuracy_score(scores["reference"], scores["prediction"])
    assert parent.data.metrics["rows_without_reference"] == 4

    frame.assign(label="").to_csv(folder / "unlabelled.csv", index=False)
    with pytest.raises(UserError, match="no row has a reference"):
        validate.run(ValidateConfig(experiment_name="none", model_uri=str(classifier),
                                    data=str(folder / "unlabelled.csv")))
    assert _runs(in_store, "none") == []  # refused before any run, any prediction


def test_empty_prediction_is_a_miss_not_a_macro_f1_class():
    scores = pd.DataFrame({"reference": ["a", "a", "b", "b"], "prediction": ["a", "", "b", "b"]})
    metrics = validate.summary(ValidateConfig(model_uri="x"), scores)
    assert metrics["f1_macro"] == f1_score(scores["reference"], scores["prediction"], labels=["a", "b"],
                                           average="macro")


# ---------------------------------------------------------------- item 16: every model the project registers


@pytest.fixture(scope="module")
def summaries(folder) -> Path:
    return make_tiny_summaries(folder / "docs.jsonl", rows=6, language="en")


@pytest.fixture(scope="module")
def summary_ensemble(summaries, folder) -> str:
    """A summary-ensemble pyfunc saved as the ensemble stage logs it (same class, same signature), one tiny BART
    member; its tokenizer learns only the documents' text, to stay quick."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from pipelines.serving import SPEC, SummaryEnsembleModel

    frame = pd.read_json(summaries, lines=True)
    bart = make_tiny_bart(folder / "bart", corpus=frame["source"].tolist() + frame["summary"].tolist())
    (bart / TRAINED_WITH).write_text(json.dumps({"task": "summarization", "max_length": 64}))
    (folder / SPEC).write_text(json.dumps({"rouge_tokenizer": "whitespace", "batch_size": 4,
                                           "members": [{"name": "member-0", "max_length": 64}]}))
    signature = infer_signature(pd.DataFrame({"text": ["a document"]}),
                                pd.DataFrame({"summary": ["a summary"], "member": [0]}))
    mlflow.pyfunc.save_model(folder / "summary-ensemble", python_model=SummaryEnsembleModel(), signature=signature,
                             artifacts={"spec": str(folder / SPEC), "member-0": str(bart)}, pip_requirements=[])
    return str(folder / "summary-ensemble")


def test_predict_and_validate_take_the_summary_ensemble(summary_ensemble, summaries, folder, in_store):
    args = {"model_uri": summary_ensemble, "data": str(summaries), "text_column": "source", "shard_size": 4}
    metrics = predict.run(PredictConfig(experiment_name="pred", output=str(folder / "out.csv"), **args))
    out = pd.read_csv(folder / "out.csv", keep_default_na=False)
    assert list(out.columns) == ["row_id", "generated", "member"] and len(out) == 6
    assert metrics["rows"] == 6 and metrics["generated_chars_mean"] == out["generated"].str.len().mean()

    scored = validate.run(ValidateConfig(experiment_name="val", task="summarization", target_column="summary",
                                         **args))
    assert {"rouge_mean", "rouge1", "rows_without_reference"} <= set(scored)

    with pytest.raises(ConfigError, match="is a summarization model.*pass task=summarization"):
        validate.run(ValidateConfig(experiment_name="wrong", **args))
    assert _runs(in_store, "wrong") == []  # refused before any run, any prediction


def test_an_ensemble_whose_spec_names_no_task_still_loads_and_the_metadata_task_wins(classifier, folder):
    """Ensembles registered by earlier versions pickled ``EnsembleModel`` (a classification ensemble; the summary
    ones ``SummaryEnsembleModel``, above) with a spec without ``task``: they load and vote as before. The task a
    newer model records in its MLmodel metadata is read before its signature."""
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.serving import SPEC, TASK_METADATA, EnsembleModel, pyfunc_task

    labels = [json.loads((classifier / "config.json").read_text())["id2label"][str(i)] for i in range(2)]
    (folder / "old-spec").mkdir()
    (folder / "old-spec" / SPEC).write_text(json.dumps({"labels": labels, "batch_size": 4, "members": [
        {"name": "member-0", "run_id": "r", "source": "s", "weight": 1.0, "max_length": 8}]}))
    texts = pd.DataFrame({"text": ["The computer crashed again during the long budget vote.", "Vote!"]})
    output = pd.DataFrame({"label": labels, **{f"prob_{label}": [0.5, 0.5] for label in labels}})
    mlflow.pyfunc.save_model(folder / "old-ensemble", python_model=EnsembleModel(), pip_requirements=[],
                             signature=infer_signature(texts, output),
                             artifacts={"spec": str(folder / "old-spec" / SPEC), "member-0": str(classifier)})
    out = mlflow.pyfunc.load_model(str(folder / "old-ensemble")).predict(texts)
    tokenizer, network = AutoTokenizer.from_pretrained(classifier), AutoModelForSequenceClassification.from_pretrained(
        classifier)
    with torch.no_grad():  # the member alone, truncated to the spec's max_length
        batch = tokenizer(texts["text"].tolist(), truncation=True, max_length=8, padding=True, return_tensors="pt")
        probs = torch.softmax(network(**batch).logits.double(), dim=-1).numpy()
    assert list(out.columns) == ["label", *(f"prob_{label}" for label in labels)]
    np.testing.assert_allclose(out[[f"prob_{label}" for label in labels]].to_numpy(), probs, rtol=0, atol=1e-9)
    assert out["label"].tolist() == [labels[i] for i in probs.argmax(axis=1)]
    assert pyfunc_task(folder / "old-ensemble") == "classification"  # read from its signature

    mlflow.pyfunc.save_model(folder / "recorded", python_model=EnsembleModel(), pip_requirements=[],
                             signature=infer_signature(texts, output), metadata={TASK_METADATA: "summarization"})
    assert pyfunc_task(folder / "recorded") == "summarization"


def test_predict_refuses_a_model_of_unknown_kind_before_any_run(classifier, tiny_data, folder, in_store):
    import mlflow.pyfunc

    class Other(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"score": [0.0] * len(model_input)})

    from mlflow.models import infer_signature

    mlflow.pyfunc.save_model(folder / "other", python_model=Other(), pip_requirements=[], signature=infer_signature(
        pd.DataFrame({"text": ["a"]}), pd.DataFrame({"score": [0.0]})))
    with pytest.raises(UserError, match="neither a 'label' nor a 'summary' output"):
        predict.run(PredictConfig(experiment_name="other", model_uri=str(folder / "other"), data=str(tiny_data)))
    with pytest.raises(ConfigError, match="is a classification model.*pass task=classification"):
        validate.run(ValidateConfig(experiment_name="other", model_uri=str(classifier), data=str(tiny_data),
                                    task="summarization"))
    bare = shutil.copytree(classifier, folder / "bare")
    (bare / TRAINED_WITH).unlink()
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UserError, match="neither a sequence classifier nor a seq2seq model"):
        predict.run(PredictConfig(experiment_name="other", model_uri=str(bare), data=str(tiny_data), max_length=32))
    assert _runs(in_store, "other") == []
