"""Tasks: what a model learns. Each task is a package ``pipelines/tasks/<name>/`` named in ``TASKS``; adding a task is
adding its package and one line there. Stages never branch on the task: they ask it.

``settings.py`` (no torch: pipelines/config.py composes the stage configurations from it):

- ``Training``: the task's own settings of the training stages (``setting(..., task="<name>")``);
- ``USES``: the shared settings of pipelines/config.py it uses (``max_length``, ``label_smoothing``, ``loss``...);
- ``Scoring`` (optional): the settings `validate` needs to find the truth; a task without it is not validated;
- ``Prediction`` (optional): settings of `predict` (they apply to every model it predicts with);
- ``metrics(cfg)``: metric name -> greater is better (None: logged, never an objective), default objective first;
- ``TUNABLE``: its settings a search space may name; ``check(cfg)``: its checks of a training configuration;
- optional: ``check_prediction(cfg)``, ``check_scoring(cfg)``, ``GENERATION`` (what objective=generate searches),
  ``CHANGED_RULES``, ``SAME_AS_PARAMS_SOURCE`` (settings a params_from run must share: what its parameters mean).

``task.py``: ``TASK``, the ``Task`` of pipelines/tasks/base.py (data, splits, model, Trainer, predictions)::

    task = get_task(cfg.task)
    data = task.load(cfg)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.tasks.base import Task

TASKS = (  # one line per task: its package pipelines/tasks/<name>/ has settings.py (no torch) and task.py
    "classification",
    "summarization",
    "mlm",
    "multitask",
)


def task_settings(name: str) -> ModuleType:
    """The settings module of task ``name`` (pipelines/tasks/<name>/settings.py)."""
    _check(name)
    return importlib.import_module(f"pipelines.tasks.{name}.settings")


def get_task(name: str) -> Task:
    """The ``TASK`` of task ``name`` (pipelines/tasks/<name>/task.py)."""
    _check(name)
    return importlib.import_module(f"pipelines.tasks.{name}.task").TASK


def _check(name: str) -> None:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not one of {', '.join(TASKS)}")
