"""`validate`: score a model (``model_uri``) or another run's predictions (``predictions_from``) against the
true labels or reference summaries, shard by shard (pipelines/stages/shards.py).

Running metrics are logged at step = items done; at the end the parent run gets the final metrics, ``scores.csv``
(one row per item), ``worst_examples.csv`` and the task's reports (classification: ``per_class.csv`` and
``confusion_matrix.png``). What is compared, how it is scored and where each stage keeps it is the task's (its
``targets``, ``score``, ``artifact_columns``: pipelines/tasks/base.py).
A row without a reference (an empty label or summary) is left out of every metric, and out of the prediction work,
and counted (``rows_without_reference``); validate refuses, before predicting anything, when no row has one.
Predictions without their references (from `predict` or `llm`) are joined to ``data`` by ``row_id``; ``data``
must then be the very file those predictions were made for (checked against the source run's data digest).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import ValidateConfig
from pipelines.data import DataError, Dataset, content_digest, read_artifact_csv, read_table
from pipelines.errors import ConfigError, NotFound
from pipelines.models import ModelSource
from pipelines.stages.contract import open_stage, recorded_settings
from pipelines.stages.predict import load_model
from pipelines.stages.shards import Shards, finish
from pipelines.tasks import get_task
from pipelines.tasks.base import LoadedModel
from pipelines.tasks.recorded import check_same_task
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
SCORES, WORST = "scores.csv", "worst_examples.csv"
ARTIFACTS = {"kfold": "oof_predictions.csv", "train": "predictions.csv", "predict": "predictions.csv",
             "llm": "responses.csv", "correct": "corrected.csv"}  # where each stage keeps its predictions


def run(cfg: ValidateConfig) -> dict[str, float]:
    task = get_task(cfg.task)
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-val-") as tmp:
        if cfg.model_uri:
            model = scoring_model(cfg, Path(tmp))
            cfg, source, items = model.cfg, model.source, references(cfg, cfg.data)
            work = lambda rows: score(cfg, with_predictions(model, rows))
        else:
            source, items = predictions_of(cfg, tracker, Path(tmp))
            work = lambda rows: score(cfg, rows)
        items, without = with_reference(cfg, items)
        task.check_references(cfg, items)
        data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
        ctx = open_stage("validate", cfg, data, source, tracker)
        shards = Shards(ctx, items, cfg.shard_size, Path(tmp) / "shards", read=lambda path: read_scores(cfg, path))
        scores = shards.run(work, running=lambda frame: summary(cfg, frame))
        metrics = {**summary(cfg, scores), "rows_without_reference": without}
        reported, files = task.reports(cfg, scores, Path(tmp))
        for path in files:
            tracker.upload(ctx.parent_id, path)
        finish(ctx, {SCORES: scores, WORST: worst(cfg, scores), **reported}, metrics)
    logger.info("validate run %s: %d items, %s", ctx.parent_id, len(scores), metrics)
    return metrics


def columns(cfg: ValidateConfig) -> list[str]:
    """The scores frame's columns before the scores: ``row_id``, ``text``, each target's truth, each prediction."""
    targets = get_task(cfg.task).targets(cfg)
    return ["row_id", "text", *(t.truth for t in targets), *(t.prediction for t in targets)]


def references(cfg: ValidateConfig, path: str, require_truth: bool = True) -> pd.DataFrame:
    """``row_id``, ``text`` and each target's truth (the true label or summary; empty if ``data`` has none and
    ``require_truth`` is off) of every row of ``data``."""
    frame = read_table(path)
    targets = get_task(cfg.task).targets(cfg)
    if not require_truth:
        frame = frame.assign(**{t.column: "" for t in targets if t.column not in frame.columns})
    for column, name in ((cfg.text_column, "text_column"), *((t.column, t.setting) for t in targets)):
        if column not in frame.columns:
            raise DataError(f"{path} has no column {column!r}; its columns are {list(frame.columns)}. "
                            f"Pass {name}=<one of them>.")
    return pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column].fillna("").astype(str),
                         **{t.truth: frame[t.column].fillna("").astype(str) for t in targets}})


def scoring_model(cfg: ValidateConfig, tmp: Path) -> LoadedModel:
    """The model of ``model_uri``, refused before it predicts anything unless it does ``task``."""
    model = load_model(cfg, tmp)
    check_same_task(model.task, cfg.task, f"model_uri={cfg.model_uri} is a {model.task} model (as it recorded), not "
                                          f"task={cfg.task}: pass task={model.task}")
    return model


def with_predictions(model: LoadedModel, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with what ``model`` predicts for them (its label, its summary...) in the scores frame's columns."""
    predicted = model.predict(rows[["text"]])
    named = get_task(model.task).artifact_columns("predict", model.cfg)
    return rows.assign(**{name: predicted[column].to_numpy() for name, column in named.items()})


def with_reference(cfg: ValidateConfig, items: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The items that have a reference, and how many have none (scored by no metric); refused when none has one."""
    targets = get_task(cfg.task).targets(cfg)
    truths = items[[t.truth for t in targets]]
    missing = truths.apply(lambda column: column.fillna("").astype(str).str.strip() == "").all(axis=1)
    setting = "/".join(dict.fromkeys(t.setting for t in targets))
    where = f"data={cfg.data}, {', '.join(f'{t.setting}={t.column!r}' for t in targets)}"
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
    """The source run's predictions in the scores frame's columns (``text`` empty when unknown)."""
    run, stage, used = _source_run(cfg, tracker)
    artifact, task = ARTIFACTS[stage], get_task(cfg.task)
    named = task.artifact_columns(stage, cfg)
    if named is None:
        raise NotFound(f"predictions_from={cfg.predictions_from} is a {stage} run, which holds no task={cfg.task} "
                       "predictions; pass a run that predicted for this task")
    try:
        frame = read_artifact_csv(tracker.download(cfg.predictions_from, artifact, tmp))
    except Exception:  # noqa: BLE001 - missing artifact
        raise NotFound(f"run {cfg.predictions_from} has no {artifact}: is it finished?") from None
    predicted = _prediction_columns(cfg, named, frame, artifact)
    if "error" in frame.columns and (frame["error"] != "").any():
        logger.warning("%d predictions of run %s are failed requests (empty): they score 0; resume it with "
                       "retry_failed=true first to score them", int((frame["error"] != "").sum()), run.info.run_id)
    out = pd.DataFrame({"row_id": frame["row_id"].astype(int),
                        **{name: frame[column].str.strip() for name, column in predicted.items()}})
    truths = {t.truth: named.get(t.truth) for t in task.targets(cfg)}
    if all(truths.values()):
        out = out.assign(**{name: frame[column] for name, column in truths.items()})
        if (out[list(truths)].apply(lambda column: column.str.strip() == "")).all(axis=None):
            raise DataError(f"{artifact} of run {cfg.predictions_from} has no references (its "
                            f"{', '.join(repr(c) for c in truths.values())} column is empty): score the run it "
                            "corrected, or a run whose data had references")
        out["text"] = frame[named["text"]] if "text" in named else ""
    else:
        out = _join_data(cfg, out, run, stage, used, require_truth)
    identity = f"run:{cfg.predictions_from}:{artifact}:{','.join(predicted.values())}"
    return ModelSource(cfg.predictions_from, "", identity), out[columns(cfg)]


def _source_run(cfg: ValidateConfig, tracker: Tracker) -> tuple[object, str, dict]:
    """The finished stage run ``predictions_from`` names, its stage and its recorded settings, of ``task``."""
    run = tracker.get_run(cfg.predictions_from)
    stage = run.data.tags.get("stage", "")
    if stage not in ARTIFACTS:
        raise NotFound(f"predictions_from={cfg.predictions_from} is a {stage or 'non-stage'} run; pass a "
                       f"{', '.join(ARTIFACTS)} run id")
    if run.info.status != "FINISHED":
        raise NotFound(f"predictions_from={cfg.predictions_from} is {run.info.status}, not FINISHED: its predictions "
                       "may be incomplete; finish it (resume=true) first")
    used = recorded_settings(tracker, cfg.predictions_from)
    recorded = used.get("task", cfg.task)
    check_same_task(recorded, cfg.task, f"run {cfg.predictions_from} is a task={recorded} run; pass task={recorded}")
    return run, stage, used


def _prediction_columns(cfg: ValidateConfig, named: dict[str, str], frame: pd.DataFrame,
                        artifact: str) -> dict[str, str]:
    """Scores-frame prediction column -> the artifact's column holding it (``prediction_column`` if given)."""
    predicted = {t.prediction: named[t.prediction] for t in get_task(cfg.task).targets(cfg)}
    if cfg.prediction_column:
        if len(predicted) > 1:
            raise ConfigError(f"prediction_column={cfg.prediction_column!r} names one column, and task={cfg.task} "
                              f"scores {len(predicted)} ({', '.join(predicted.values())}): leave it empty")
        predicted = dict.fromkeys(predicted, cfg.prediction_column)
    for column in predicted.values():
        if column not in frame.columns:
            raise ConfigError(f"{artifact} of run {cfg.predictions_from} has no column {column!r}; its columns are "
                              f"{list(frame.columns)}: pass prediction_column=<one of them>")
    return predicted


def _join_data(cfg: ValidateConfig, predictions: pd.DataFrame, run, stage: str, used: dict,
               require_truth: bool) -> pd.DataFrame:
    """The references of ``data`` joined by row_id, once ``data`` is shown to be the file the run predicted for."""
    data = references(dataclasses.replace(cfg, text_column=used["text_column"]), cfg.data, require_truth)
    if _digest_as(stage, used, cfg.data) != run.data.tags.get("data_digest"):
        raise DataError(f"data={cfg.data} is not the file {stage} run {run.info.run_id} made its predictions for (its "
                        "content differs): pass the same data file, or validate a fresh run of that file")
    joined = predictions.merge(data, on="row_id", how="left", validate="one_to_one")
    return joined.fillna({"text": "", **{t.truth: "" for t in get_task(cfg.task).targets(cfg)}})


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
    """One row per item: its truth(s), prediction(s) and score(s)."""
    return get_task(cfg.task).score(cfg, rows[columns(cfg)].reset_index(drop=True))


def summary(cfg: ValidateConfig, scores: pd.DataFrame) -> dict[str, float]:
    return get_task(cfg.task).summarize_scores(cfg, scores)


def worst(cfg: ValidateConfig, scores: pd.DataFrame) -> pd.DataFrame:
    key = get_task(cfg.task).row_score
    return scores.sort_values([key, "row_id"], kind="stable").head(cfg.worst_examples)


def read_scores(cfg: ValidateConfig, path: Path) -> pd.DataFrame:
    return read_artifact_csv(path, tuple(columns(cfg)[1:]))  # text, truths and predictions: verbatim
