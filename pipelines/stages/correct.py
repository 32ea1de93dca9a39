"""`correct`: post-correction of the generated summaries of a run, in resumable shards (pipelines/stages/shards.py).

For each summary (``predictions_from``) and its source: ``quality_based`` scores the summary and the candidates
of ``correction_models`` (each summarizes the source) by agreement (pipelines/mbr.py) and replaces a summary
scoring under ``correction_threshold`` by a better candidate; ``vote`` takes the minimum-Bayes-risk choice among
the summary and the candidates (ties, always the case with one correction model, go to the one agreeing most
with the source; a tie that remains refuses the run); ``llm`` asks the LLM to fix the summary (the `llm` client
and ledger). The run logs ``corrected.csv`` (``row_id``, ``text``, ``original``, ``corrected``, ``changed``,
``chosen_from``, ``error`` and, with references, ``reference``) and, with references, ROUGE before and after. A
summary whose LLM request finally failed stays the original, with the ``error``; those rows are listed in
``failures.csv`` and counted in the metric ``failures``, and sent again on ``resume=true retry_failed=true``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from pipelines.config import CorrectConfig, ValidateConfig
from pipelines.data import Dataset, content_digest, read_artifact_csv
from pipelines.generation import load_summarizer
from pipelines.llm_settings import load_template
from pipelines.mbr import agreement, mbr_choice
from pipelines.models import ModelSource, resolve_model
from pipelines.rouge import check_tokenizer, corpus_scores
from pipelines.stages.augment import rewrite
from pipelines.stages.contract import open_stage
from pipelines.stages.llm import Session, report
from pipelines.stages.shards import ERROR, FAILURES, Shards, failures, finish
from pipelines.stages.validate import predictions_of
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
CORRECTED, ORIGINAL = "corrected.csv", "original"


def run(cfg: CorrectConfig) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, correction_prompt=load_template(cfg.correction_prompt),
                              system_prompt=load_template(cfg.system_prompt))  # its fields: checked by the config
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-fix-") as tmp:
        source, items = predictions_of(_as_validate(cfg), tracker, Path(tmp), require_truth=False)
        refuse_unfit_rouge(cfg, items)
        models = [resolve_model(name, Path(tmp) / "models") for name in cfg.models()]
        identity = ModelSource(source.name, "", "|".join([source.digest, *(m.digest for m in models)]))
        data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
        ctx = open_stage("correct", cfg, data, identity, tracker)
        with Session(ctx, cfg) if cfg.correction_strategy == "llm" else nullcontext() as session:
            fixer = Fixer(cfg, [(m.name, load_summarizer(m.path)) for m in models], session)
            shards = Shards(ctx, items, cfg.shard_size, Path(tmp) / "shards", cfg.retry_failed, read=_read)
            corrected = shards.run(fixer.correct)
        failed = failures(corrected)
        metrics = {"rows": len(corrected), "changed": int(corrected["changed"].sum()), "failures": len(failed),
                   **before_after(cfg, corrected)}
        finish(ctx, {CORRECTED: corrected, FAILURES: failed}, metrics)
    report("correct", ctx.parent_id, metrics)
    return metrics


def refuse_unfit_rouge(cfg: CorrectConfig, items: pd.DataFrame) -> None:
    """``rouge_tokenizer=default`` drops Hangul (every score and vote would be 0): refuse it before any run or
    request when the texts, summaries or references are not mostly Latin, naming the column."""
    for column, what in (("text", f"the source texts (text_column {cfg.text_column!r})"),
                         ("prediction", f"the summaries of run {cfg.predictions_from}"),
                         ("reference", f"target_column {cfg.target_column!r} of {cfg.data}")):
        check_tokenizer(items[column], cfg.rouge_tokenizer, what)


def _as_validate(cfg: CorrectConfig) -> ValidateConfig:
    return ValidateConfig(task="summarization", predictions_from=cfg.predictions_from, data=cfg.data,
                          prediction_column=cfg.prediction_column, text_column=cfg.text_column,
                          target_column=cfg.target_column, optuna_storage=cfg.optuna_storage)


class Fixer:
    def __init__(self, cfg: CorrectConfig, models: list[tuple[str, tuple]], session: Session | None):
        self.cfg, self.models, self.session = cfg, models, session

    def correct(self, rows: pd.DataFrame) -> pd.DataFrame:
        texts, originals = rows["text"].tolist(), rows["prediction"].tolist()
        errors = [""] * len(rows)
        if self.cfg.correction_strategy == "llm":
            chosen, errors = self._by_llm(texts, originals)
        else:
            candidates = {name: rewrite(loaded, texts, self.cfg, self.cfg.max_source_length)
                          for name, loaded in self.models}
            chosen = [self._choose(i, texts[i], originals[i], candidates, row_id)
                      for i, row_id in enumerate(rows["row_id"])]
        out = pd.DataFrame({"row_id": rows["row_id"], "text": texts, "reference": rows["reference"],
                            "original": originals, "corrected": [c for c, _ in chosen],
                            "chosen_from": [f for _, f in chosen], ERROR: errors})
        return out.assign(changed=(out["corrected"] != out["original"]).astype(int))

    def _choose(self, i: int, text: str, original: str, candidates: dict[str, list[str]],
                row_id: int) -> tuple[str, str]:
        names = [ORIGINAL, *candidates]
        options = [original, *(candidates[name][i] for name in candidates)]
        if self.cfg.correction_strategy == "vote":  # ties: agreement with the source text decides (pipelines/mbr.py)
            best = mbr_choice(options, self.cfg.rouge_tokenizer, source=text,
                              setting=f"correction_strategy=vote on row_id {row_id} (the summary and "
                                      f"correction_models={','.join(candidates)})")
            return options[best], names[best]
        scores = agreement(options, text, self.cfg.rouge_tokenizer)
        best = max(range(len(options)), key=lambda k: (scores[k], -k))
        if scores[0] < self.cfg.correction_threshold and scores[best] > scores[0]:
            return options[best], names[best]
        return original, ORIGINAL

    def _by_llm(self, texts: list[str], originals: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """(corrected, chosen_from) per row, and the error of each request (a failed one keeps the original)."""
        prompts = [self.cfg.correction_prompt.format_map({"text": t, "summary": s}) for t, s in zip(texts, originals)]
        answers = self.session.ask(prompts)
        chosen = [(a.strip(), "llm") if not e and a.strip() else (o, ORIGINAL)
                  for a, e, o in zip(answers["response"], answers[ERROR], originals)]
        return chosen, answers[ERROR].tolist()


def before_after(cfg: CorrectConfig, corrected: pd.DataFrame) -> dict[str, float]:
    """ROUGE of the summaries before and after, over the rows that have a reference."""
    scored = corrected[corrected["reference"].str.strip() != ""]
    if scored.empty:
        return {}
    before = corpus_scores(scored["reference"], scored["original"], cfg.rouge_tokenizer)
    after = corpus_scores(scored["reference"], scored["corrected"], cfg.rouge_tokenizer)
    return {**{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()}}


def _read(path: Path) -> pd.DataFrame:
    return read_artifact_csv(path, ("text", "reference", "original", "corrected", "chosen_from", ERROR))
