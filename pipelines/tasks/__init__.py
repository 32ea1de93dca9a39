"""Tasks: what a model learns. One module per task supplies data checks, splits, model and Trainer construction,
metrics and prediction frames (the interface is ``Task`` in base.py); stages never branch on the task.

    task = get_task(cfg.task)
    data = task.load(cfg)
"""

from __future__ import annotations

import importlib

from pipelines.config import TASKS
from pipelines.errors import ConfigError
from pipelines.tasks.base import Task


def get_task(name: str) -> Task:
    """The task module's ``TASK`` for ``name`` (``classification``, ``summarization``)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not one of {', '.join(TASKS)}")
    return importlib.import_module(f"pipelines.tasks.{name}.task").TASK
