"""``task=summarization``'s ensemble (``MbrVote``): per input, the members' summary with the highest mean ROUGE to the
others (minimum Bayes risk, pipelines/mbr.py; ties go to the one agreeing most with the source text, then to the
member most confident of its own summary). Scored on the shared out-of-fold rows with the sources' own out-of-fold
summaries as candidates; served as ``summary`` and the ``member`` chosen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.config import EnsembleConfig
from pipelines.generation import generate, load_summarizer
from pipelines.mbr import mbr_choice
from pipelines.rouge import corpus_scores
from pipelines.tasks.ensemble import Ensemble, EnsembleError, Source, shared_rows


@dataclass
class Summarizer:
    network: torch.nn.Module
    tokenizer: object
    config: object  # GenerationConfig: the one the model was trained and validated with
    max_length: int


def load_summarizer_member(path: str | Path, max_length: int) -> Summarizer:
    """A seq2seq model saved by `train`/`kfold`, with its own saved generation settings."""
    network, tokenizer = load_summarizer(path)
    return Summarizer(network, tokenizer, network.generation_config, max_length)


def summarize_all(members: list[Summarizer], texts: list[str], batch_size: int, rouge_tokenizer: str) -> tuple:
    """Each member's summary of each text, then per text the minimum-Bayes-risk choice (ties: the summary agreeing
    most with the text, then the member most confident of its own summary): (summaries, chosen)."""
    outputs = [generate(m.network, m.tokenizer, texts, m.config, batch_size, m.max_length) for m in members]
    chosen = []
    for i, text in enumerate(texts):
        summaries = [out[i] for out in outputs]
        chosen.append(mbr_choice(summaries, rouge_tokenizer, source=text,
                                 scores=lambda text=text, summaries=summaries: own_scores(members, text, summaries),
                                 setting=f"the summary ensemble's vote on input row {i}"))
    return [outputs[c][i] for i, c in enumerate(chosen)], chosen


@torch.no_grad()
def own_scores(members: list[Summarizer], text: str, summaries: list[str]) -> list[float]:
    """Each member's mean log-probability per token of its own summary of ``text`` (labels as in training: without
    a leading decoder start token): its confidence, the last tie-break of the summary vote."""
    scores = []
    for member, summary in zip(members, summaries):
        batch = member.tokenizer([text], truncation=True, max_length=member.max_length, return_tensors="pt")
        ids = member.tokenizer(text_target=[summary])["input_ids"][0]
        start = member.network.config.decoder_start_token_id
        labels = torch.tensor([ids[1:] if len(ids) > 1 and ids[0] == start else ids])
        scores.append(-float(member.network(**batch, labels=labels).loss))
    return scores


@dataclass
class Summaries:
    """The served summary ensemble."""

    members: list[Summarizer]
    batch_size: int
    rouge_tokenizer: str

    def predict(self, texts: list[str]) -> pd.DataFrame:
        summaries, chosen = summarize_all(self.members, texts, self.batch_size, self.rouge_tokenizer)
        return pd.DataFrame({"summary": summaries, "member": chosen})


def rouge_tokenizer(source: Source) -> str:
    return source.settings.get("rouge_tokenizer", "whitespace")


class MbrVote(Ensemble):
    """Every member votes (no weights); the summary nearest to the others' wins."""

    def metric(self, cfg: EnsembleConfig) -> str:
        return "rouge_mean"

    def check(self, sources: list[Source]) -> None:
        """One ROUGE on one set of rows: the same recorded ``rouge_tokenizer``, and the same source text and
        reference on every shared out-of-fold row."""
        tokenizers = {s.run_id: rouge_tokenizer(s) for s in sources}
        if len(set(tokenizers.values())) > 1:
            raise EnsembleError(f"the sources recorded different rouge_tokenizer settings ("
                                f"{', '.join(f'{run}: {name}' for run, name in tokenizers.items())}): their ROUGE "
                                "scores are not comparable; pass runs trained with one rouge_tokenizer")
        rows = shared_rows(sources)
        first = sources[0].oof.set_index("row_id").loc[rows]
        for source in sources[1:]:
            frame = source.oof.set_index("row_id").loc[rows]
            for column in ("source", "reference"):
                differ = [row for row, a, b in zip(rows, first[column], frame[column]) if a != b]
                if differ:
                    row = differ[0]
                    raise EnsembleError(
                        f"sources {sources[0].run_id} and {source.run_id} have different {column} texts on "
                        f"{len(differ)} of their {len(rows)} shared rows (row ids {differ[:10]}; row {row}: "
                        f"{first.at[row, column][:80]!r} vs {frame.at[row, column][:80]!r}): they were not trained "
                        "on the same data; pass runs of one data file")

    def evaluate(self, cfg, sources, weights) -> tuple[dict[str, float], dict[str, object]]:
        tokenizer, rows = rouge_tokenizer(sources[0]), shared_rows(sources)
        frames = [s.oof.set_index("row_id").loc[rows] for s in sources]
        candidates = [f["generated"].tolist() for f in frames]
        texts, runs = frames[0]["source"].tolist(), ",".join(s.run_id for s in sources)
        chosen = [mbr_choice([c[i] for c in candidates], tokenizer, source=texts[i],
                             setting=f"the summary vote of source_runs={runs} on out-of-fold row_id {row}")
                  for i, row in enumerate(rows)]
        references = frames[0]["reference"].tolist()
        metrics = {f"ensemble_{k}": v for k, v in corpus_scores(
            references, [candidates[c][i] for i, c in enumerate(chosen)], tokenizer).items()}
        for i, summaries in enumerate(candidates):
            metrics.update({f"source{i}_{k}": v for k, v in corpus_scores(references, summaries, tokenizer).items()})
        return metrics, {"oof_rows": len(rows), "selection": "minimum Bayes risk (ROUGE)"}

    def spec(self, cfg, sources, members) -> dict:
        return {"rouge_tokenizer": rouge_tokenizer(sources[0]), "batch_size": cfg.eval_batch_size,
                "members": [{k: m[k] for k in ("name", "run_id", "source", "max_length")} for m in members]}

    def example(self, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        return (pd.DataFrame({"text": ["an example document", "another one"]}),
                pd.DataFrame({"summary": ["a summary", "another"], "member": [0, 0]}))

    def load(self, spec: dict, artifacts: dict[str, str]) -> Summaries:
        members = [load_summarizer_member(artifacts[m["name"]], m["max_length"]) for m in spec["members"]]
        return Summaries(members, spec.get("batch_size", 16), spec["rouge_tokenizer"])
