"""`llm`: one chat completion per row of a data file, through any OpenAI-compatible endpoint.

Rows are done in shards (pipelines/stages/shards.py); within a shard each finished request is in the ledger
(pipelines/llm.py), so a resumed run re-sends only the requests that had not returned. The parent run gets
``responses.csv`` (``row_id``, ``response``, token counts, ``latency_s``, ``error``, ``retries``),
``failures.csv`` (the rows whose request finally failed) and the request statistics as metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import LlmConfig
from pipelines.data import DataError, Dataset, content_digest, read_artifact_csv, read_table
from pipelines.errors import ConfigError
from pipelines.llm import Client, Ledger, canonical_request, statistics
from pipelines.llm_settings import LLMSettings, load_template, template_fields
from pipelines.models import ModelSource
from pipelines.settings import redact_url
from pipelines.stages.contract import StageContext, open_stage
from pipelines.stages.shards import FAILURES, Shards, failures, finish
from pipelines.tracking import Tracker, state_storage

logger = logging.getLogger(__name__)
RESPONSES = "responses.csv"


def run(cfg: LlmConfig) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, prompt_template=load_template(cfg.prompt_template),
                              system_prompt=load_template(cfg.system_prompt))
    items = prompt_items(read_table(cfg.data), cfg.data, cfg.text_column, cfg.prompt_template)
    data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-llm-") as tmp:
        ctx = open_stage("llm", cfg, data, endpoint(cfg), tracker)
        with Session(ctx, cfg) as session:
            shards = Shards(ctx, items, cfg.shard_size, Path(tmp), cfg.retry_failed, read=read_responses)
            responses = shards.run(lambda rows: pd.concat([rows[["row_id"]], session.ask(rows["prompt"])], axis=1))
        metrics = statistics(responses, cfg)
        finish(ctx, {RESPONSES: responses, FAILURES: failures(responses)}, metrics)
    report("llm", ctx.parent_id, metrics)
    return metrics


def prompt_items(frame: pd.DataFrame, path: str, text_column: str, template: str) -> pd.DataFrame:
    """``row_id`` and the rendered ``prompt`` of every row; a field that is no column is refused up front."""
    if text_column not in frame.columns:
        raise DataError(f"{path} has no column {text_column!r}; its columns are {list(frame.columns)}. "
                        "Pass text_column=<one of them>.")
    fields = template_fields(template)
    missing = [name for name in fields if name != "text" and name not in frame.columns]
    if missing:
        raise ConfigError(f"prompt_template names {missing}, which are not columns of {path} (its columns: "
                          f"{list(frame.columns)}; {{text}} is text_column). Fix the template or the data.")
    values = frame.fillna("").astype(str)
    values["text"] = values[text_column]
    prompts = [template.format_map(row) for row in values[fields].to_dict("records")] if fields \
        else [template] * len(frame)
    return pd.DataFrame({"row_id": np.arange(len(frame)), "prompt": prompts})


def endpoint(cfg: LLMSettings) -> ModelSource:
    """The endpoint and model as the stage's model identity (its fingerprint has base_url, without credentials,
    and llm_model)."""
    url = redact_url(cfg.base_url)
    return ModelSource(name=cfg.llm_model, path=url, digest=f"{url}#{cfg.llm_model}")


class Session:
    """The client and ledger of one stage run (closed, and the ledger flushed, on leaving the block)."""

    def __init__(self, ctx: StageContext, cfg: LLMSettings):
        self.cfg = cfg
        self.ledger = Ledger(state_storage(cfg.optuna_storage), ctx.parent_id, cfg.flush_seconds)
        self.client = Client(cfg, self.ledger)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.ledger.close()

    def ask(self, prompts: pd.Series | list[str]) -> pd.DataFrame:
        """One row of the client's columns per prompt, in order (``error`` non-empty where it finally failed)."""
        system = self.cfg.system_prompt
        return self.client.answer([canonical_request(p, self.cfg, system) for p in prompts])


def read_responses(path: Path) -> pd.DataFrame:
    return read_artifact_csv(path, ("response", "error"))


def report(stage: str, run_id: str, metrics: dict[str, float]) -> None:
    """The run's metrics in the log, and a warning naming the failed requests of any stage that sends them."""
    if metrics.get("failures"):
        logger.warning("%s run %s: %d LLM requests failed (listed in %s of the run); resume with resume=true "
                       "retry_failed=true to send only them again", stage, run_id, metrics["failures"], FAILURES)
    logger.info("%s run %s: %s", stage, run_id, {k: round(v, 4) for k, v in metrics.items()})
