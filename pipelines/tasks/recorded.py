"""What a saved model or a run recorded about its task: the task of a model folder, read, never guessed; and the
refusal of a model or run made for another task than the one asked for."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from pipelines.errors import ConfigError
from pipelines.models import ModelError, ModelSource
from pipelines.tasks import TASKS, get_task
from pipelines.tasks.base import TRAINED_WITH, Task


def folder_task(source: ModelSource) -> Task:
    """The task of a transformers model folder: the one a stage trained it for (``pipelines.json``), else the first
    registered task that ``recognizes`` its config (a sequence classifier, a seq2seq model). Anything else is
    refused: a bare encoder would predict with a random head."""
    marker = Path(source.path, TRAINED_WITH)
    recorded = json.loads(marker.read_text()).get("task") if marker.is_file() else None
    if recorded in TASKS:
        return get_task(recorded)
    tasks = [get_task(name) for name in TASKS]  # imported first: a task may register its own model type
    config = AutoConfig.from_pretrained(source.path)
    for task in tasks:
        if task.recognizes(config):
            return task
    raise ModelError(f"model {source.name} records no task this stage predicts ({TRAINED_WITH}: {recorded!r}) and its "
                     f"architectures {config.architectures} are neither a sequence classifier nor a seq2seq model: "
                     "fine-tune it first (-e train or -e kfold with -P model=<it>) and predict with that model")


def check_same_task(recorded: str, wanted: str, refusal: str) -> None:
    """Refuse (ConfigError ``refusal``) a model or run made for task ``recorded`` where task ``wanted`` is asked."""
    if recorded != wanted:
        raise ConfigError(refusal)
