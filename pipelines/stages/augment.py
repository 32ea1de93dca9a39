"""`augment`: new rows made from the text of existing ones, in resumable shards (pipelines/stages/shards.py).

Methods: ``eda`` (pipelines/eda.py: deletion, swap, in-text insertion, punctuation; language-independent),
``back_translation`` (two seq2seq translation models), ``paraphrase`` (a seq2seq paraphrasing model) and
``llm_paraphrase`` (the `llm` stage's client and ledger: never paid twice). The run logs ``augmented.csv``: every
original row (``method=original``) and then the new rows, each with all the columns of its source row, the new
text, ``source_row_id`` (the source's position in ``data``) and ``method``; and ``failures.csv``, the rows whose
LLM request finally failed (metric ``failures``; sent again on ``resume=true retry_failed=true``). Training stages
take it with ``augment_from=<this run>`` and give a fold only the augmentations of its own training rows.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from pipelines.config import AugmentConfig
from pipelines.data import DataError, Dataset, content_digest, read_artifact_csv, read_table
from pipelines.eda import augment_many
from pipelines.generation import generate, generation_config, load_summarizer
from pipelines.llm_settings import load_template, template_fields
from pipelines.models import ModelSource, resolve_model
from pipelines.stages.contract import open_stage
from pipelines.stages.llm import Session, prompt_items, report
from pipelines.stages.shards import ERROR, FAILURES, Shards, failures, finish
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
AUGMENTED = "augmented.csv"
ORIGINAL = "original"


def run(cfg: AugmentConfig) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, paraphrase_prompt=load_template(cfg.paraphrase_prompt),
                              system_prompt=load_template(cfg.system_prompt))
    frame = read_table(cfg.data)
    if cfg.text_column not in frame.columns:
        raise DataError(f"{cfg.data} has no column {cfg.text_column!r}; its columns are {list(frame.columns)}. "
                        "Pass text_column=<one of them>.")
    items = chosen_rows(frame, cfg)
    data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-aug-") as tmp:
        models = {name: resolve_model(getattr(cfg, name), Path(tmp) / "models") for name in model_settings(cfg)}
        source = ModelSource("+".join(m.name for m in models.values()) or "eda", "",
                             "|".join(f"{k}={m.digest}" for k, m in models.items()))
        ctx = open_stage("augment", cfg, data, source, tracker)
        with Session(ctx, cfg) if "llm_paraphrase" in cfg.methods() else nullcontext() as session:
            makers = Makers(cfg, models, session)
            shards = Shards(ctx, items, cfg.shard_size, Path(tmp) / "shards", cfg.retry_failed, read=_read)
            new = shards.run(makers.augment)
        failed, new = failures(new, "source_row_id"), new[new[ERROR] == ""]
        augmented = assemble(frame, new, cfg.text_column)
        counts = new["method"].value_counts()
        metrics = {"rows_original": len(frame), "rows_new": len(new), "failures": len(failed),
                   **{f"rows_{method}": int(counts.get(method, 0)) for method in cfg.methods()}}
        finish(ctx, {AUGMENTED: augmented, FAILURES: failed}, metrics)
    report("augment", ctx.parent_id, metrics)
    return metrics


def chosen_rows(frame: pd.DataFrame, cfg: AugmentConfig) -> pd.DataFrame:
    """``row_id`` and ``text`` of the rows to augment (``augmentation_ratio`` of them, chosen by ``seed``), with
    the columns the paraphrase prompt names."""
    chosen = np.random.default_rng(cfg.seed).random(len(frame)) < cfg.augmentation_ratio
    items = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column].fillna("").astype(str)})
    if "llm_paraphrase" in cfg.methods():
        items["prompt"] = prompt_items(frame, cfg.data, cfg.text_column, cfg.paraphrase_prompt)["prompt"]
    else:
        template_fields(cfg.paraphrase_prompt, "paraphrase_prompt")
    return items[chosen & (items["text"].str.strip() != "")].reset_index(drop=True)


def model_settings(cfg: AugmentConfig) -> list[str]:
    methods = cfg.methods()
    return ((["bt_forward_model", "bt_backward_model"] if "back_translation" in methods else [])
            + (["paraphrase_model"] if "paraphrase" in methods else []))


class Makers:
    """The augmentation methods of one run, applied to the rows of a shard."""

    def __init__(self, cfg: AugmentConfig, models: dict[str, ModelSource], session: Session | None):
        self.cfg, self.session = cfg, session
        self.networks = {name: load_summarizer(model.path) for name, model in models.items()}

    def augment(self, rows: pd.DataFrame) -> pd.DataFrame:
        """New rows (``source_row_id``, ``method``, ``text``, ``error``) for a shard's rows, in row order, then
        method order; a failed LLM request is a row with its ``error`` and no text."""
        parts = []
        for method in self.cfg.methods():
            texts = [(*made, "")[:3] for made in getattr(self, method)(rows)]  # (row_id, text[, error]) each
            parts.append(pd.DataFrame(texts, columns=["source_row_id", "text", ERROR]).assign(method=method))
        new = pd.concat(parts, ignore_index=True)
        original = dict(zip(rows["row_id"], rows["text"]))
        fresh = (new["text"].str.strip() != "") & (new["text"] != new["source_row_id"].map(original))
        new = new[fresh | (new[ERROR] != "")]
        order = {m: i for i, m in enumerate(self.cfg.methods())}
        new = new.assign(_m=new["method"].map(order)).sort_values(["source_row_id", "_m"], kind="stable")
        return new[["source_row_id", "method", "text", ERROR]].reset_index(drop=True)

    def eda(self, rows: pd.DataFrame) -> list[tuple[int, str]]:
        operations = [op.strip() for op in self.cfg.eda_operations.split(",") if op.strip()]
        out = []
        for row_id, text in zip(rows["row_id"], rows["text"]):
            rng = random.Random(f"{self.cfg.seed}:{row_id}")  # the same however the rows are sharded
            out += [(row_id, new) for _, new in augment_many(text, self.cfg.per_method, operations, rng,
                                                             self.cfg.eda_alpha)]
        return out

    def back_translation(self, rows: pd.DataFrame) -> list[tuple[int, str]]:
        pivot = self._generate("bt_forward_model", rows["text"].tolist())
        return list(zip(rows["row_id"], self._generate("bt_backward_model", pivot)))

    def paraphrase(self, rows: pd.DataFrame) -> list[tuple[int, str]]:
        return list(zip(rows["row_id"], self._generate("paraphrase_model", rows["text"].tolist())))

    def llm_paraphrase(self, rows: pd.DataFrame) -> list[tuple[int, str, str]]:
        answers = self.session.ask(rows["prompt"])
        return [(r, "" if e else a.strip(), e) for r, a, e in zip(rows["row_id"], answers["response"], answers[ERROR])]

    def _generate(self, name: str, texts: list[str]) -> list[str]:
        return rewrite(self.networks[name], texts, self.cfg)


def rewrite(loaded: tuple, texts: list[str], cfg, max_length: int | None = None) -> list[str]:
    """What a loaded seq2seq model (network, tokenizer) generates for ``texts``: beam search of
    ``augment_num_beams`` beams, at most ``augment_max_new_tokens`` tokens, nothing sampled."""
    network, tokenizer = loaded
    settings = {"max_new_tokens": cfg.augment_max_new_tokens, "num_beams": cfg.augment_num_beams,
                "min_new_tokens": 0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0}
    config = generation_config(network, SimpleNamespace(**settings))
    return generate(network, tokenizer, texts, config, cfg.eval_batch_size, max_length)


def assemble(frame: pd.DataFrame, new: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """Every original row, then the new rows, each with its source row's other columns."""
    originals = frame.assign(source_row_id=np.arange(len(frame)), method=ORIGINAL)
    copies = originals.iloc[new["source_row_id"].to_numpy()].reset_index(drop=True)
    copies[text_column] = new["text"].to_numpy()
    copies["method"] = new["method"].to_numpy()
    return pd.concat([originals, copies], ignore_index=True)


def _read(path: Path) -> pd.DataFrame:
    frame = read_artifact_csv(path, ("text", "method", ERROR))
    # a shard of an older version has no error column: it dropped its failed requests (a resume keeps them dropped)
    return frame if ERROR in frame.columns else frame.assign(**{ERROR: ""})
