"""`validate`: score a model (``model_uri``) or another run's predictions (``predictions_from``) against the
true labels or reference summaries, shard by shard (pipelines/stages/shards.py).

Running metrics are logged at step = items done; at the end the parent run gets the final metrics, ``scores.csv``
(one row per item), ``worst_examples.csv`` and, for classification, ``per_class.csv`` and ``confusion_matrix.png``.
A row without a reference (an empty label or summary) is left out of every metric, and out of the prediction work,
and counted (``rows_without_reference``); validate refuses, before predicting anything, when no row has one.
Predictions without their references (from `predict` or `llm`) are joined to ``data`` by ``row_id``; ``data``
must then be the very file those predictions were made for (checked against the source run's data digest).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, f1_score

from pipelines.config import ValidateConfig
from pipelines.data import DataError, Dataset, content_digest, read_artifact_csv, read_table
from pipelines.errors import ConfigError, NotFound
from pipelines.models import ModelSource
from pipelines.rouge import SCORE_COLUMNS, check_tokenizer, score_rows
from pipelines.stages.contract import open_stage, recorded_settings
from pipelines.stages.predict import PREDICTION, Model, load_model
from pipelines.stages.shards import Shards, finish
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
SCORES, WORST, PER_CLASS, CONFUSION = "scores.csv", "worst_examples.csv", "per_class.csv", "confusion_matrix.png"


@dataclass(frozen=True)
class Source:
    """Where a stage keeps its predictions, and which columns hold the prediction and (if any) the truth."""

    artifact: str
    prediction: dict[str, str]  # task -> column
    truth: dict[str, str]  # task -> column; empty: join the truth from `data` by row_id


SOURCES = {
    "kfold": Source("oof_predictions.csv", {"classification": "predicted", "summarization": "generated"},
                    {"classification": "label", "summarization": "reference"}),
    "train": Source("predictions.csv", {"classification": "predicted", "summarization": "generated"},
                    {"classification": "label", "summarization": "reference"}),
    "predict": Source("predictions.csv", {"classification": "label", "summarization": "generated"}, {}),
    "llm": Source("responses.csv", {"classification": "response", "summarization": "response"}, {}),
    "correct": Source("corrected.csv", {"classification": "corrected", "summarization": "corrected"},
                      {"summarization": "reference"}),
}


def run(cfg: ValidateConfig) -> dict[str, float]:
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-val-") as tmp:
        if cfg.model_uri:
            model = scoring_model(cfg, Path(tmp))
            cfg, source, items = model.cfg, model.source, references(cfg, cfg.data)
            work = lambda rows: score(cfg, rows.assign(prediction=predicted(model, rows)))  # noqa: E731
        else:
            source, items = predictions_of(cfg, tracker, Path(tmp))
            work = lambda rows: score(cfg, rows)  # noqa: E731
        items, without = with_reference(cfg, items)
        if cfg.task == "summarization":
            check_tokenizer(items["reference"], cfg.rouge_tokenizer, "the references")
        data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
        ctx = open_stage("validate", cfg, data, source, tracker)
        shards = Shards(ctx, items, cfg.shard_size, Path(tmp) / "shards", read=read_scores)
        scores = shards.run(work, running=lambda frame: summary(cfg, frame))
        metrics = {**summary(cfg, scores), "rows_without_reference": without}
        finish(ctx, {SCORES: scores, WORST: worst(cfg, scores), **reports(cfg, scores, ctx, Path(tmp))}, metrics)
    logger.info("validate run %s: %d items, %s", ctx.parent_id, len(scores), metrics)
    return metrics


def references(cfg: ValidateConfig, path: str, require_truth: bool = True) -> pd.DataFrame:
    """``row_id``, ``text`` and ``reference`` (the true label or summary; empty if ``data`` has none and
    ``require_truth`` is off) of every row of ``data``."""
    frame = read_table(path)
    truth = cfg.label_column if cfg.task == "classification" else cfg.target_column
    setting = "label_column" if cfg.task == "classification" else "target_column"
    if not require_truth and truth not in frame.columns:
        frame = frame.assign(**{truth: ""})
    for column, name in ((cfg.text_column, "text_column"), (truth, setting)):
        if column not in frame.columns:
            raise DataError(f"{path} has no column {column!r}; its columns are {list(frame.columns)}. "
                            f"Pass {name}=<one of them>.")
    return pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column].fillna("").astype(str),
                         "reference": frame[truth].fillna("").astype(str)})


def scoring_model(cfg: ValidateConfig, tmp: Path) -> Model:
    """The model of ``model_uri``, refused before it predicts anything unless it does ``task``."""
    model = load_model(cfg, tmp)
    if model.task != cfg.task:
        raise ConfigError(f"model_uri={cfg.model_uri} is a {model.task} model (as it recorded), not task={cfg.task}: "
                          f"pass task={model.task}")
    return model


def predicted(model: Model, rows: pd.DataFrame) -> np.ndarray:
    """What ``model`` predicts for ``rows``: its label (classifier) or summary (summarizer)."""
    return model.predict(rows[["text"]])[PREDICTION[model.task]].to_numpy()


def with_reference(cfg: ValidateConfig, items: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The items that have a reference, and how many have none (scored by no metric); refused when none has one."""
    missing = items["reference"].fillna("").astype(str).str.strip() == ""
    setting = "label_column" if cfg.task == "classification" else "target_column"
    where = f"data={cfg.data}, {setting}={getattr(cfg, setting)!r}"
    if cfg.predictions_from:
        where = f"the predictions of run {cfg.predictions_from}, with their references or those of {where}"
    if missing.all():
        raise DataError(f"no row has a reference to score against ({where}: empty in all {len(items)} rows); pass "
                        f"data with the true values, or {setting}=<the column that holds them>")
    if missing.any():
        logger.warning("%d of %d rows have no reference (%s): left out of every metric, counted as "
                       "rows_without_reference", int(missing.sum()), len(items), where)
    return items[~missing].reset_index(drop=True), int(missing.sum())


def predictions_of(cfg: ValidateConfig, tracker: Tracker, tmp: Path,
                   require_truth: bool = True) -> tuple[ModelSource, pd.DataFrame]:
    """The source run's predictions as ``row_id``, ``prediction``, ``reference`` (and ``text`` when known)."""
    run = tracker.get_run(cfg.predictions_from)
    stage = run.data.tags.get("stage", "")
    if stage not in SOURCES:
        raise NotFound(f"predictions_from={cfg.predictions_from} is a {stage or 'non-stage'} run; pass a "
                       f"{', '.join(SOURCES)} run id")
    if run.info.status != "FINISHED":
        raise NotFound(f"predictions_from={cfg.predictions_from} is {run.info.status}, not FINISHED: its predictions "
                       "may be incomplete; finish it (resume=true) first")
    used, spec = recorded_settings(tracker, cfg.predictions_from), SOURCES[stage]
    if used.get("task", cfg.task) != cfg.task:
        raise ConfigError(f"run {cfg.predictions_from} is a task={used['task']} run; pass task={used['task']}")
    try:
        frame = read_artifact_csv(tracker.download(cfg.predictions_from, spec.artifact, tmp))
    except Exception:  # noqa: BLE001 - missing artifact
        raise NotFound(f"run {cfg.predictions_from} has no {spec.artifact}: is it finished?") from None
    column = cfg.prediction_column or spec.prediction[cfg.task]
    if column not in frame.columns:
        raise ConfigError(f"{spec.artifact} of run {cfg.predictions_from} has no column {column!r}; its columns are "
                          f"{list(frame.columns)}: pass prediction_column=<one of them>")
    if "error" in frame.columns and (frame["error"] != "").any():
        logger.warning("%d predictions of run %s are failed requests (empty): they score 0; resume it with "
                       "retry_failed=true first to score them", int((frame["error"] != "").sum()), run.info.run_id)
    out = pd.DataFrame({"row_id": frame["row_id"].astype(int), "prediction": frame[column].str.strip()})
    truth = spec.truth.get(cfg.task)
    if truth:
        out["reference"] = frame[truth]
        if (out["reference"].str.strip() == "").all():
            raise DataError(f"{spec.artifact} of run {cfg.predictions_from} has no references (its {truth!r} column "
                            "is empty): score the run it corrected, or a run whose data had references")
        out["text"] = frame["source"] if "source" in frame.columns else ""
    else:
        out = _join_data(cfg, out, run, stage, used, require_truth)
    identity = f"run:{cfg.predictions_from}:{spec.artifact}:{column}"
    return ModelSource(cfg.predictions_from, "", identity), out[["row_id", "text", "reference", "prediction"]]


def _join_data(cfg: ValidateConfig, predictions: pd.DataFrame, run, stage: str, used: dict,
               require_truth: bool) -> pd.DataFrame:
    """The references of ``data`` joined by row_id, once ``data`` is shown to be the file the run predicted for."""
    data = references(dataclasses.replace(cfg, text_column=used["text_column"]), cfg.data, require_truth)
    if _digest_as(stage, used, cfg.data) != run.data.tags.get("data_digest"):
        raise DataError(f"data={cfg.data} is not the file {stage} run {run.info.run_id} made its predictions for (its "
                        "content differs): pass the same data file, or validate a fresh run of that file")
    joined = predictions.merge(data, on="row_id", how="left", validate="one_to_one")
    return joined.fillna({"text": "", "reference": ""})


def _digest_as(stage: str, used: dict, path: str) -> str:
    """The data digest the ``stage`` run computed for ``path`` with its recorded settings."""
    frame = read_table(path)
    if stage == "llm":
        from pipelines.stages.llm import prompt_items

        items = prompt_items(frame, path, used["text_column"], used["prompt_template"])
    else:
        items = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[used["text_column"]].fillna("")
                              .astype(str)})
    return content_digest(items, list(items.columns))


def score(cfg: ValidateConfig, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per item: its prediction, reference and score(s)."""
    rows = rows[["row_id", "text", "reference", "prediction"]].reset_index(drop=True)
    if cfg.task == "summarization":
        return pd.concat([rows, score_rows(rows["reference"], rows["prediction"], cfg.rouge_tokenizer)], axis=1)
    return rows.assign(correct=(rows["prediction"].astype(str).str.strip()
                                == rows["reference"].astype(str).str.strip()).astype(int))


def summary(cfg: ValidateConfig, scores: pd.DataFrame) -> dict[str, float]:
    if cfg.task == "summarization":
        return {column: float(scores[column].mean()) for column in SCORE_COLUMNS}
    truth, predicted = scores["reference"].astype(str).str.strip(), scores["prediction"].astype(str).str.strip()
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "f1_macro": float(f1_score(truth, predicted, labels=classes(truth, predicted), average="macro",
                                       zero_division=0))}


def classes(truth: pd.Series, predicted: pd.Series) -> list[str]:
    """The classes macro-F1 averages over: every true or predicted label; an empty prediction (a failed request)
    is a miss of its row's class, not a class of its own."""
    return sorted((set(truth) | set(predicted)) - {""})


def worst(cfg: ValidateConfig, scores: pd.DataFrame) -> pd.DataFrame:
    key = "rouge_mean" if cfg.task == "summarization" else "correct"
    return scores.sort_values([key, "row_id"], kind="stable").head(cfg.worst_examples)


def reports(cfg: ValidateConfig, scores: pd.DataFrame, ctx, tmp: Path) -> dict[str, pd.DataFrame]:
    """Classification: the per-class report (returned, to log as CSV) and the confusion matrix (logged here)."""
    if cfg.task != "classification":
        return {}
    truth, predicted = scores["reference"].astype(str).str.strip(), scores["prediction"].astype(str).str.strip()
    report = classification_report(truth, predicted, labels=classes(truth, predicted), output_dict=True,
                                   zero_division=0)
    per_class = pd.DataFrame(report).T.rename_axis("class").reset_index()
    _confusion_plot(truth, predicted, tmp / CONFUSION)
    ctx.tracker.upload(ctx.parent_id, tmp / CONFUSION)
    return {PER_CLASS: per_class}


def _confusion_plot(truth: pd.Series, predicted: pd.Series, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = sorted(set(truth) | set(predicted))
    display = ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, xticks_rotation=45,
                                                      colorbar=False)
    display.figure_.set_size_inches(max(4, len(labels)), max(4, len(labels)))
    display.figure_.tight_layout()
    display.figure_.savefig(path, dpi=100)
    plt.close(display.figure_)


def read_scores(path: Path) -> pd.DataFrame:
    return read_artifact_csv(path, ("text", "reference", "prediction"))
