"""What an ensemble of one task's runs is: its sources, and the strategy (``Task.ensemble``) that votes them.

The `ensemble` stage (pipelines/stages/ensemble.py) reads the sources and publishes the model; the served model
(pipelines/serving.py) asks the strategy of the task its spec names to load and predict. Neither knows the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from pipelines.config import EnsembleConfig
from pipelines.errors import UserError


class EnsembleError(UserError):
    """A source or member cannot be used, or a resume request cannot be honoured; the message says why."""


@dataclass
class Source:
    """A FINISHED kfold parent run (all its fold models, averaged equally) or train run (its one model)."""

    run_id: str
    stage: str  # kfold or train
    task: str
    members: list[str]  # run ids holding a `model/` artifact
    oof: pd.DataFrame  # its out-of-fold (kfold) or validation (train) predictions as the task logged them, row_id first
    score: float  # its validation metric: the strategy's ``metric``
    settings: dict  # the settings it recorded (config.json): the values its models were trained with
    max_length: int  # the tokens per input text its models were trained with (``Task.input_length_setting``)
    fingerprint: str
    data_digest: str


class Predictor(Protocol):
    def predict(self, texts: list[str]) -> pd.DataFrame:
        """One row per text: the served model's output columns."""


class Ensemble:
    """How the runs of one task make one served model. The stage calls, in order: ``metric`` (per source),
    ``check``, ``weigh``, ``evaluate``, ``spec``, ``example``; the served model calls ``load``. Methods are plain
    functions of their arguments (one instance serves every ensemble)."""

    def metric(self, cfg: EnsembleConfig) -> str:
        """The validation metric that scores a source: ``cv_<metric>_mean`` of a kfold run, ``final_<metric>`` of a
        train run."""
        return cfg.metric

    def check(self, sources: list[Source]) -> None:
        """Raise EnsembleError, before any run exists, when the sources cannot be voted together (other labels, other
        data on their shared rows...); the message names the runs and what to do."""

    def weigh(self, cfg: EnsembleConfig, sources: list[Source]) -> tuple[list[float], dict[str, float]]:
        """Each source's share of the vote (0: its models are left out of the served model) and metrics reporting
        how the shares were chosen. The stage shares a source's weight equally among its models and renormalises
        when ``skip_missing`` drops a whole source."""
        return [1.0] * len(sources), {}

    def evaluate(self, cfg: EnsembleConfig, sources: list[Source],
                 weights: list[float]) -> tuple[dict[str, float], dict[str, object]]:
        """Metrics (``ensemble_<metric>``, ``source<i>_<metric>``...) and params of the vote with the shares of the
        model registered, on the rows every source predicted out of fold."""
        raise NotImplementedError

    def spec(self, cfg: EnsembleConfig, sources: list[Source], members: list[dict]) -> dict:
        """What the served model needs besides its members' folders, as JSON (the stage adds ``task``). ``members``:
        one dict per model: ``name`` (its artifact), ``run_id``, ``source``, ``path``, ``weight``, ``max_length``."""
        raise NotImplementedError

    def example(self, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        """An input frame (column ``text``) and the output frame the served model answers: its signature."""
        raise NotImplementedError

    def load(self, spec: dict, artifacts: dict[str, str]) -> Predictor:
        """The served model's predictor, members loaded once; ``artifacts``: member name -> its local folder."""
        raise NotImplementedError


def shared_rows(sources: list[Source]) -> list[int]:
    """The row ids every source predicted out of fold, sorted; refused when there are none."""
    rows = sorted(set.intersection(*(set(s.oof["row_id"]) for s in sources)))
    if not rows:
        raise EnsembleError("the sources share no out-of-fold rows: were they trained on the same data?")
    return rows
