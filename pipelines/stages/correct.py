"""`correct`: post-correction of the generated summaries of a run, in resumable shards (pipelines/shards.py).

For each summary (``predictions_from``) and its source: ``quality_based`` scores the summary and the candidates
of ``correction_models`` (each summarizes the source) by agreement (pipelines/mbr.py) and replaces a summary
scoring under ``correction_threshold`` by a better candidate; ``vote`` takes the minimum-Bayes-risk choice among
the summary and the candidates; ``llm`` asks the LLM to fix the summary (the `llm` client and ledger). The run
logs ``corrected.csv`` (``row_id``, ``text``, ``original``, ``corrected``, ``changed``, ``chosen_from`` and, with
references, ``reference``) and, with references, ROUGE before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from pipelines.config import CorrectConfig, ValidateConfig
from pipelines.data import Dataset, content_digest
from pipelines.llm import canonical_request, load_template, template_fields
from pipelines.mbr import agreement, mbr_choice
from pipelines.models import ModelSource, resolve_model
from pipelines.rouge import corpus_scores
from pipelines.shards import Shards, finish
from pipelines.stages.augment import rewrite
from pipelines.stages.contract import open_stage
from pipelines.stages.llm import Session
from pipelines.stages.validate import predictions_of
from pipelines.tasks.summarization import load_summarizer
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
CORRECTED, ORIGINAL = "corrected.csv", "original"


def run(cfg: CorrectConfig) -> dict[str, float]:
    cfg = dataclasses.replace(cfg, correction_prompt=load_template(cfg.correction_prompt),
                              system_prompt=load_template(cfg.system_prompt))
    template_fields(cfg.correction_prompt, "correction_prompt")
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-fix-") as tmp:
        source, items = predictions_of(_as_validate(cfg), tracker, Path(tmp), require_truth=False)
        models = [resolve_model(name, Path(tmp) / "models") for name in cfg.models()]
        identity = ModelSource(source.name, "", "|".join([source.digest, *(m.digest for m in models)]))
        data = Dataset(frame=items, labels=[], digest=content_digest(items, list(items.columns)))
        ctx = open_stage("correct", cfg, data, identity, tracker)
        with Session(ctx, cfg) if cfg.correction_strategy == "llm" else nullcontext() as session:
            fixer = Fixer(cfg, [(m.name, load_summarizer(m.path)) for m in models], session)
            corrected = Shards(ctx, items, cfg.shard_size, Path(tmp) / "shards", read=_read).run(fixer.correct)
        metrics = {"rows": len(corrected), "changed": int(corrected["changed"].sum()), **before_after(cfg, corrected)}
        finish(ctx, {CORRECTED: corrected}, metrics)
    logger.info("correct run %s: %s", ctx.parent_id, metrics)
    return metrics


def _as_validate(cfg: CorrectConfig) -> ValidateConfig:
    return ValidateConfig(task="summarization", predictions_from=cfg.predictions_from, data=cfg.data,
                          prediction_column=cfg.prediction_column, text_column=cfg.text_column,
                          target_column=cfg.target_column, optuna_storage=cfg.optuna_storage)


class Fixer:
    def __init__(self, cfg: CorrectConfig, models: list[tuple[str, tuple]], session: Session | None):
        self.cfg, self.models, self.session = cfg, models, session

    def correct(self, rows: pd.DataFrame) -> pd.DataFrame:
        texts, originals = rows["text"].tolist(), rows["prediction"].tolist()
        if self.cfg.correction_strategy == "llm":
            chosen = self._by_llm(texts, originals)
        else:
            candidates = {name: rewrite(loaded, texts, self.cfg, self.cfg.max_source_length)
                          for name, loaded in self.models}
            chosen = [self._choose(i, texts[i], originals[i], candidates) for i in range(len(rows))]
        out = pd.DataFrame({"row_id": rows["row_id"], "text": texts, "reference": rows["reference"],
                            "original": originals, "corrected": [c for c, _ in chosen],
                            "chosen_from": [f for _, f in chosen]})
        return out.assign(changed=(out["corrected"] != out["original"]).astype(int))

    def _choose(self, i: int, text: str, original: str, candidates: dict[str, list[str]]) -> tuple[str, str]:
        names = [ORIGINAL, *candidates]
        options = [original, *(candidates[name][i] for name in candidates)]
        if self.cfg.correction_strategy == "vote":
            best = mbr_choice(options, self.cfg.rouge_tokenizer)
            return options[best], names[best]
        scores = agreement(options, text, self.cfg.rouge_tokenizer)
        best = max(range(len(options)), key=lambda k: (scores[k], -k))
        if scores[0] < self.cfg.correction_threshold and scores[best] > scores[0]:
            return options[best], names[best]
        return original, ORIGINAL

    def _by_llm(self, texts: list[str], originals: list[str]) -> list[tuple[str, str]]:
        prompts = [self.cfg.correction_prompt.format_map({"text": t, "summary": s}) for t, s in zip(texts, originals)]
        answers = self.session.client.answer([canonical_request(p, self.cfg, self.cfg.system_prompt)
                                              for p in prompts])
        return [(a.strip(), "llm") if not e and a.strip() else (o, ORIGINAL)
                for a, e, o in zip(answers["response"], answers["error"], originals)]


def before_after(cfg: CorrectConfig, corrected: pd.DataFrame) -> dict[str, float]:
    """ROUGE of the summaries before and after, over the rows that have a reference."""
    scored = corrected[corrected["reference"].str.strip() != ""]
    if scored.empty:
        return {}
    before = corpus_scores(scored["reference"], scored["original"], cfg.rouge_tokenizer)
    after = corpus_scores(scored["reference"], scored["corrected"], cfg.rouge_tokenizer)
    return {**{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()}}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in ("text", "reference", "original", "corrected", "chosen_from")},
                       keep_default_na=False)
