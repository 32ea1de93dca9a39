"""`task=summarization`: seq2seq generation of a summary per source text, scored with ROUGE (right for Korean).

Models: any ``AutoModelForSeq2SeqLM`` checkpoint (BART/KoBART, T5/mT5, Marian, Pegasus), or an encoder-only
checkpoint whose architecture can also be a decoder (BERT, RoBERTa, XLM-R, ELECTRA...) warm-started as an
``EncoderDecoderModel`` (Rothe et al., 2020: "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks").
Training runs on ``Seq2SeqTrainer``; every evaluation generates with the run's one ``GenerationConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from pipelines.config import StageConfig
from pipelines.data import DataError, Dataset, content_digest
from pipelines.errors import ConfigError
from pipelines.generation import decode, generate, generation_config, is_seq2seq, load_summarizer
from pipelines.models import ModelError, ModelSource
from pipelines.rouge import SCORE_COLUMNS, check_tokenizer, score_rows
from pipelines.tasks.base import (
    Built,
    LoadedModel,
    Target,
    Task,
    read_columns,
    shuffled_folds,
    shuffled_holdout,
    trained_length,
)
from pipelines.tasks.summarization.mbr_vote import MbrVote
from pipelines.tasks.summarization.settings import GENERATION

logger = logging.getLogger(__name__)
# what transformers' generate() does with a generation setting the model leaves unset (None)
UNSET_GENERATION = {"min_new_tokens": 0, "num_beams": 1, "repetition_penalty": 1.0, "length_penalty": 1.0,
                    "no_repeat_ngram_size": 0}
_EVALUATED = {"prediction": "generated", "reference": "reference", "text": "source"}  # ``evaluate``'s frame


class Seq2SeqDataset(torch.utils.data.Dataset):
    """Tokenized sources and labels. A label sequence that begins with the decoder's start token (a BERT
    tokenizer's [CLS] in a warm-started encoder-decoder) loses it: the decoder is fed that token first anyway, and
    would otherwise learn to answer it with itself."""

    def __init__(self, tokenizer, sources: list[str], targets: list[str], cfg: StageConfig, start: int | None):
        self.encodings = tokenizer(sources, truncation=True, max_length=cfg.max_source_length)
        labels = tokenizer(text_target=targets, truncation=True, max_length=cfg.max_target_length)["input_ids"]
        self.labels = [ids[1:] if ids and ids[0] == start else ids for ids in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{key: values[i] for key, values in self.encodings.items()}, "labels": self.labels[i]}


class Summarization(Task):
    name = "summarization"
    text_columns = ("source", "reference", "generated")
    input_length_setting = "max_source_length"
    row_score = "rouge_mean"
    ensemble = MbrVote()

    def load(self, cfg: StageConfig) -> Dataset:
        columns = {"text": ("text_column", cfg.text_column), "target": ("target_column", cfg.target_column)}
        if cfg.group_column:
            columns["group"] = ("group_column", cfg.group_column)
        frame = read_columns(cfg.data, columns, "summarization")
        check_tokenizer(frame["target"].tolist(), cfg.rouge_tokenizer,
                        f"target_column {cfg.target_column!r} of {cfg.data}")
        if 0 < cfg.max_samples < len(frame):
            frame = frame.sample(n=cfg.max_samples, random_state=cfg.fold_seed).sort_values("row_id")
            frame = frame.reset_index(drop=True)
        return Dataset(frame=frame, labels=[], digest=content_digest(frame, list(frame.columns)))

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        frame, k = data.frame, cfg.k_folds
        if "group" in frame:
            groups = frame["group"].nunique()
            if k > groups:
                raise DataError(f"k_folds={k} is larger than the number of groups ({groups} values of group_column "
                                f"{cfg.group_column!r}); lower k_folds to at most {groups} or use more data.")
            splits = GroupKFold(n_splits=k, shuffle=True, random_state=cfg.fold_seed).split(frame, groups=frame["group"])
            return [np.sort(valid) for _, valid in splits]
        return shuffled_folds(frame, k, cfg.fold_seed)

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        frame, fraction = data.frame, cfg.validation_fraction
        if "group" in frame:
            if frame["group"].nunique() < 2:
                raise DataError(f"group_column {cfg.group_column!r} has a single value: nothing to hold out")
            split = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=cfg.fold_seed)
            _, valid = next(split.split(frame, groups=frame["group"]))
            return np.sort(valid)
        return shuffled_holdout(frame, fraction, cfg.fold_seed, cfg.data)

    def check_model(self, path: str) -> None:
        config = AutoConfig.from_pretrained(path)
        kind = config.model_type
        if is_seq2seq(config) or (kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            return
        raise ModelError(
            f"model {path} ({kind}) can neither generate text (not a seq2seq model) nor warm-start a decoder (its "
            f"architecture has no decoder form). Pass a seq2seq checkpoint (BART/KoBART, T5, mT5, Marian, Pegasus) or "
            f"an encoder that can be a decoder (BERT, RoBERTa, XLM-R, ELECTRA) for task=summarization.")

    def build(self, cfg: StageConfig, path: str, data: Dataset) -> Built:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.model_max_length = cfg.max_source_length  # saved with the model: predict truncates the same way
        added = add_special_tokens(tokenizer, cfg.special_tokens)
        if is_seq2seq(AutoConfig.from_pretrained(path)):
            network = AutoModelForSeq2SeqLM.from_pretrained(path)
            if added:
                network.resize_token_embeddings(len(tokenizer))
        else:
            network = warm_start(path, tokenizer)
        network.generation_config = generation_config(network, cfg)
        return Built(network, tokenizer)

    def trainer(self, cfg, built, args, train, valid, callbacks) -> Seq2SeqTrainer:
        def encode(frame: pd.DataFrame) -> Seq2SeqDataset:
            return Seq2SeqDataset(built.tokenizer, frame["text"].tolist(), frame["target"].tolist(), cfg,
                                  built.network.config.decoder_start_token_id)

        def compute_metrics(eval_pred) -> dict[str, float]:
            generated, lengths = decode(built.tokenizer, eval_pred.predictions)
            scores = score_rows(valid["target"].tolist(), generated, cfg.rouge_tokenizer)
            return {**scores.mean().to_dict(), "gen_len": float(np.mean(lengths))}

        return Seq2SeqTrainer(
            model=built.network,
            args=Seq2SeqTrainingArguments(**args, per_device_eval_batch_size=cfg.generation_batch_size,
                                          label_smoothing_factor=cfg.label_smoothing, predict_with_generate=True,
                                          generation_config=built.network.generation_config),
            train_dataset=encode(train),
            eval_dataset=None if valid is None else encode(valid),
            processing_class=built.tokenizer,
            data_collator=DataCollatorForSeq2Seq(built.tokenizer, model=built.network),
            compute_metrics=None if valid is None else compute_metrics,
            callbacks=callbacks,
        )

    def evaluate(self, trainer, built, valid, cfg, data) -> tuple[dict[str, float], pd.DataFrame]:
        output = trainer.predict(trainer.eval_dataset)
        generated, lengths = decode(built.tokenizer, output.predictions)
        scores = score_rows(valid["target"].tolist(), generated, cfg.rouge_tokenizer)
        predictions = pd.DataFrame({"row_id": valid["row_id"].to_numpy(), "source": valid["text"].to_numpy(),
                                    "reference": valid["target"].to_numpy(), "generated": generated})
        predictions = pd.concat([predictions, scores], axis=1)
        metrics = {**scores.mean().to_dict(), "gen_len": float(np.mean(lengths)), "loss": output.metrics["test_loss"]}
        return metrics, predictions

    def generation_objective(self, cfg, path):
        if not is_seq2seq(AutoConfig.from_pretrained(path)):
            raise ConfigError(f"objective=generate scores a fine-tuned summarizer, and model {cfg.model} is an "
                              "encoder-only checkpoint; pass model=runs:/<train run id>/model")
        loaded = functools.cache(lambda: load_summarizer(path))  # once, at the first trial

        def objective(trial: StageConfig, valid: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
            network, tokenizer = loaded()
            generated = generate(network, tokenizer, valid["text"].tolist(), generation_config(network, trial),
                                 trial.generation_batch_size, trial.max_source_length)
            scores = score_rows(valid["target"].tolist(), generated, trial.rouge_tokenizer)
            predictions = pd.DataFrame({"row_id": valid["row_id"].to_numpy(), "generated": generated})
            return scores.mean().to_dict(), pd.concat([predictions, scores], axis=1)

        return objective

    def recognizes(self, config) -> bool:
        return is_seq2seq(config)

    def load_model(self, cfg, source: ModelSource) -> LoadedModel:
        """The summarizer with the generation settings given, else those it was trained with."""
        network, tokenizer = load_summarizer(source.path)
        resolved = {name: getattr(cfg, name) or getattr(network.generation_config, name) for name in GENERATION}
        if not resolved["max_new_tokens"]:
            raise ConfigError(f"model {source.name} records no max_new_tokens (it was not trained by a pipelines "
                              "stage); pass max_new_tokens=N (and num_beams, ... as wanted)")
        resolved = {name: UNSET_GENERATION.get(name) if value is None else value for name, value in resolved.items()}
        cfg = dataclasses.replace(cfg, **resolved, max_length=cfg.max_length or trained_length(source))
        generation = generation_config(network, cfg)
        logger.info("summarizer %s: generation %s, source truncated to %d tokens", source.name, resolved,
                    cfg.max_length)

        def predict(frame: pd.DataFrame) -> pd.DataFrame:
            return pd.DataFrame({"generated": generate(network, tokenizer, frame["text"].tolist(), generation,
                                                       cfg.eval_batch_size, cfg.max_length)})

        return LoadedModel(source, self.name, cfg, predict, summary_lengths)

    def pyfunc_model(self, cfg, source: ModelSource, model) -> LoadedModel:
        return LoadedModel(source, self.name, cfg,
                           lambda frame: model.predict(frame).rename(columns={"summary": "generated"}), summary_lengths)

    def artifact_columns(self, stage: str, cfg) -> dict[str, str] | None:
        return {"kfold": _EVALUATED, "train": _EVALUATED, "predict": {"prediction": "generated"},
                "llm": {"prediction": "response"},
                "correct": {"prediction": "corrected", "reference": "reference"}}.get(stage)

    def targets(self, cfg) -> list[Target]:
        return [Target("reference", "prediction", "target_column", cfg.target_column)]

    def check_references(self, cfg, items: pd.DataFrame) -> None:
        check_tokenizer(items["reference"], cfg.rouge_tokenizer, "the references")

    def score(self, cfg, rows: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([rows, score_rows(rows["reference"], rows["prediction"], cfg.rouge_tokenizer)], axis=1)

    def summarize_scores(self, cfg, scores: pd.DataFrame) -> dict[str, float]:
        return {column: float(scores[column].mean()) for column in SCORE_COLUMNS}


def summary_lengths(predictions: pd.DataFrame) -> dict[str, float]:
    return {"rows": len(predictions), "generated_chars_mean": float(predictions["generated"].str.len().mean())}


def add_special_tokens(tokenizer, special_tokens: str) -> int:
    """Add ``special_tokens`` (comma-separated) as whole tokens; how many were new."""
    tokens = [token.strip() for token in special_tokens.split(",") if token.strip()]
    if not tokens:
        return 0
    return tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)


def warm_start(path: str, tokenizer) -> EncoderDecoderModel:
    """An encoder-decoder whose encoder and decoder both start from the encoder-only checkpoint ``path``
    (the decoder's cross-attention starts random)."""
    network = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    if len(tokenizer) > network.config.encoder.vocab_size:  # special_tokens added (the sub-configs follow)
        network.encoder.resize_token_embeddings(len(tokenizer))
        network.decoder.resize_token_embeddings(len(tokenizer))
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for config in (network.config, network.generation_config):
        config.decoder_start_token_id, config.bos_token_id = start, start
        config.eos_token_id, config.pad_token_id = end, tokenizer.pad_token_id
    logger.info("warm-started an encoder-decoder from %s (%s): encoder and decoder weights from the checkpoint, "
                "cross-attention new", path, network.config.encoder.model_type)
    return network


TASK = Summarization()
