"""Settings of the classification task: one label per text (see pipelines/tasks/__init__.py for the contract)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.settings import Settings, setting

TASK = "classification"
USES = ("eval_batch_size", "max_length", "label_smoothing", "loss", "focal_gamma", "class_weights")
TUNABLE: tuple[str, ...] = ()  # its shared settings are tunable in pipelines/config.py


@dataclass
class Training(Settings):
    label_column: str = setting("label", "Column holding the class label.", task=TASK)


@dataclass
class Scoring(Settings):
    label_column: str = setting("label", "Column of `data` holding the true label.", task=TASK)


def metrics(cfg: object) -> dict[str, bool]:
    """Validation metrics, default objective first, with whether greater is better."""
    return {"f1_macro": True, "accuracy": True, "loss": False}


def check(cfg: Training) -> None:
    if cfg.max_length <= 0 or cfg.eval_batch_size <= 0:
        raise ConfigError("max_length and eval_batch_size must be positive")
