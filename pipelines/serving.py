"""The ensembles as MLflow pyfunc models: member classifiers, vote weights, label map; or member summarizers.

(MLflow requires a pyfunc model class to subclass ``mlflow.pyfunc.PythonModel``: this is the one
module besides tracking.py that imports mlflow.)  Members are loaded once in ``load_context``;
``predict`` takes a DataFrame with a string column ``text`` and returns one row per input with
``label`` and ``prob_<class>`` columns (a summary ensemble: ``summary`` and the ``member`` chosen).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from pipelines.inference import load_member, load_summarizer_member, predict_proba, summarize_all

SPEC = "ensemble.json"


class EnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.labels, self.batch_size = spec["labels"], spec.get("batch_size", 64)
        self.members = [load_member(context.artifacts[m["name"]], m["weight"], self.labels, m["max_length"])
                        for m in spec["members"]]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        texts = validate_texts(model_input)
        probs = predict_proba(self.members, texts, self.batch_size)
        return prediction_frame(probs, self.labels)


class SummaryEnsembleModel(mlflow.pyfunc.PythonModel):
    """Member summarizers; per input, the summary with the highest mean ROUGE to the other members' (MBR)."""

    def load_context(self, context):
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.batch_size, self.rouge_tokenizer = spec.get("batch_size", 16), spec["rouge_tokenizer"]
        self.members = [load_summarizer_member(context.artifacts[m["name"]], m["max_length"])
                        for m in spec["members"]]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        summaries, chosen = summarize_all(self.members, validate_texts(model_input), self.batch_size,
                                          self.rouge_tokenizer)
        return pd.DataFrame({"summary": summaries, "member": chosen})


# the output columns each pyfunc model above records in its signature, and so the task it does
OUTPUTS = {"classification": ("label",), "summarization": ("summary", "member")}


def pyfunc_task(path: str | Path) -> str | None:
    """The task of the pyfunc model saved in ``path``, read from the output columns its MLmodel signature records
    (classification ensemble: ``label``, ``prob_<class>``...; summary ensemble: ``summary``, ``member``); None when
    it records neither."""
    from mlflow.models import Model

    schema = Model.load(str(path)).get_output_schema()
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


def prediction_frame(probs, labels: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"label": [labels[i] for i in probs.argmax(axis=1)]})
    for i, name in enumerate(labels):
        frame[f"prob_{name}"] = probs[:, i]
    return frame
