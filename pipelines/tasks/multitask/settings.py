"""`task=multitask` settings: one encoder, one classification head per column of ``label_columns``.

Metrics: per head ``<column>_f1_macro`` and ``<column>_accuracy`` (over the rows labelled for that head), and
``f1_macro`` / ``accuracy``, their means over the heads (``f1_macro`` is the default objective), and ``loss``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.settings import Settings, setting

USES = ("max_length", "eval_batch_size", "label_smoothing")  # shared settings this task implements (per head)
TUNABLE = ("head_weights",)
SAME_AS_PARAMS_SOURCE = ("label_columns",)  # head_weights of a params_from run are in its column order
RESERVED = ("row_id", "text", "fold", "correct", "error")  # the task's, predictions' and scores' own column names
# mlflow.utils.validation.validate_param_and_metric_name's characters (not imported: settings stay light), less "/":
# a column names metric keys (<column>_f1_macro) and files (per_class_<column>.csv)
METRIC_NAME = re.compile(r"[\w.\- :]+")


@dataclass
class Scoring(Settings):
    label_columns: str = setting("", "Comma-separated columns of `data`, each holding one label per row: one "
                                 "classification head each (e.g. sentiment,topic); an empty cell is no label for "
                                 "that head.", task="multitask")


@dataclass
class Training(Scoring):
    head_weights: str = setting("", "Comma-separated weight of each head's loss, in label_columns order (e.g. 2,1); "
                                "empty: 1 each.", task="multitask")


def label_columns(cfg) -> list[str]:
    return [part.strip() for part in (getattr(cfg, "label_columns", "") or "").split(",") if part.strip()]


def head_weights(cfg) -> list[float]:
    """The loss weight of each head (checked by ``check``)."""
    text = str(getattr(cfg, "head_weights", "") or "")  # a search space's numeric choice: a number
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return [float(part) for part in parts] if parts else [1.0] * len(label_columns(cfg))


def metrics(cfg) -> dict[str, bool]:
    """Metric name -> whether greater is better, the default objective first; per head once ``label_columns`` is
    known."""
    table = {"f1_macro": True, "accuracy": True, "loss": False}
    for column in label_columns(cfg):
        table.update({f"{column}_f1_macro": True, f"{column}_accuracy": True})
    return table


def check(cfg) -> None:
    if cfg.max_length <= 0 or cfg.eval_batch_size <= 0:
        raise ConfigError("max_length and eval_batch_size must be positive")
    columns = check_columns(cfg)
    if not isinstance(cfg.head_weights, str) and len(columns) > 1:
        raise ConfigError(f"head_weights={cfg.head_weights!r} is one number for the {len(columns)} label_columns: "
                          "give one weight per column (e.g. 2,1); in a search_space search it as categorical "
                          "choices of comma-separated weights, e.g. {type: categorical, choices: ['1,1', '2,1']}")
    try:
        weights = head_weights(cfg)
    except ValueError:
        raise ConfigError(f"head_weights={cfg.head_weights!r} must be comma-separated numbers, e.g. 2,1") from None
    if len(weights) != len(columns):
        raise ConfigError(f"head_weights={cfg.head_weights!r} gives {len(weights)} weights for the {len(columns)} "
                          f"label_columns ({', '.join(columns)}): give one per column, or none (1 each)")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"head_weights={cfg.head_weights!r}: every weight must be a positive number")


def check_columns(cfg) -> list[str]:
    """``label_columns``, refused when empty, repeated, reserved, or not usable in metric keys and file names."""
    columns = label_columns(cfg)
    if not columns:
        raise ConfigError("task=multitask needs label_columns=<col>,<col>...: the columns of `data` holding one "
                          "label each (one classification head per column)")
    if len(set(columns)) < len(columns):
        raise ConfigError(f"label_columns={cfg.label_columns!r} names a column twice; name each column once")
    clash = [c for c in columns if c in RESERVED or c == getattr(cfg, "text_column", None)]
    if clash:
        raise ConfigError(f"label_columns={cfg.label_columns!r} names {clash[0]!r}, the text_column or a name the "
                          f"predictions or scores use for their own columns ({', '.join(RESERVED)}): rename that "
                          "column of `data`")
    bad = [c for c in columns if not METRIC_NAME.fullmatch(c)]
    if bad:
        raise ConfigError(f"label_columns={cfg.label_columns!r} names {bad[0]!r}: each column names metrics and "
                          "files, so it may hold only letters, digits, underscores, dashes, periods, spaces and "
                          "colons: rename that column of `data` (e.g. the other characters to _)")
    return columns


def check_scoring(cfg) -> None:
    """`validate`: the heads to score."""
    if not label_columns(cfg):
        raise ConfigError("task=multitask scores one head per column of label_columns: pass "
                          "label_columns=<col>,<col>... (the columns of `data` holding the true labels)")
    check_columns(cfg)
