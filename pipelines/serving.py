"""The ensembles as one MLflow pyfunc model: its spec names the task, whose ensemble strategy loads and predicts.

(MLflow requires a pyfunc model class to subclass ``mlflow.pyfunc.PythonModel``: this is the one module besides
tracking.py that imports mlflow.)  Members are loaded once in ``load_context``; ``predict`` takes a DataFrame with a
string column ``text`` and returns one row per input with the task's columns (classification: ``label`` and
``prob_<class>``; summarization: ``summary`` and the ``member`` chosen; see pipelines/tasks/ensemble.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from pipelines.inference import prediction_frame
from pipelines.tasks import get_task

SPEC = "ensemble.json"
TASK_METADATA = "pipelines_task"  # the MLmodel metadata key naming the task of an ensemble logged by this version
__all__ = ["SPEC", "TASK_METADATA", "EnsembleModel", "SummaryEnsembleModel", "prediction_frame", "pyfunc_task",
           "validate_texts"]


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Any task's ensemble: the ``ensemble`` strategy of the task ``spec["task"]`` loads the members and predicts."""

    default_task = "classification"  # of a spec naming none: logged before specs named their task

    def load_context(self, context):
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.predictor = get_task(spec.get("task", self.default_task)).ensemble.load(spec, context.artifacts)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return self.predictor.predict(validate_texts(model_input))


class SummaryEnsembleModel(EnsembleModel):
    """Summary ensembles logged before specs named their task: their pickles name this class."""

    default_task = "summarization"


# the output columns each task's ensemble records in its signature: how models that record no task are read
OUTPUTS = {"classification": ("label",), "summarization": ("summary", "member")}


def pyfunc_task(path: str | Path) -> str | None:
    """The task of the pyfunc model saved in ``path``: the one its MLmodel metadata records, else the one
    the output columns of its signature name (classification ensemble: ``label``, ``prob_<class>``...; summary
    ensemble: ``summary``, ``member``); None when it records neither."""
    from mlflow.models import Model

    model = Model.load(str(path))
    if (model.metadata or {}).get(TASK_METADATA):
        return model.metadata[TASK_METADATA]
    schema = model.get_output_schema()
    names = set(schema.input_names()) if schema is not None and schema.has_input_names() else set()
    tasks = [task for task, columns in OUTPUTS.items() if names.issuperset(columns)]
    return tasks[0] if len(tasks) == 1 else None


def validate_texts(model_input) -> list[str]:
    """The ``text`` column as a list of strings, or a 400-class error saying what is wrong."""
    if not isinstance(model_input, pd.DataFrame) or "text" not in model_input.columns:
        columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise MlflowException.invalid_parameter_value(f"input needs a column 'text'; got {columns}")
    if len(model_input) == 0:
        raise MlflowException.invalid_parameter_value("input has no rows; send at least one {'text': ...}")
    bad = [i for i, value in enumerate(model_input["text"]) if not isinstance(value, str)]
    if bad:
        raise MlflowException.invalid_parameter_value(f"'text' must be a string in every row; rows {bad[:10]} are not")
    return model_input["text"].tolist()
