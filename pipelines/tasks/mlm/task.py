"""`task=mlm`: masked-LM training on unlabelled text (task-adaptive pretraining, the `tapt` stage).

Training masks ``mlm_probability`` of the tokens of each example afresh every epoch (transformers'
``DataCollatorForLanguageModeling``), with a generator seeded by (``seed``, epoch, example): not the global RNG,
which the Trainer's prefetching of batches around a mid-epoch checkpoint would desynchronise, so a resumed run
masks exactly as an uninterrupted one. ``whole_word_mask`` masks every token of a chosen word, a word being a
run of text between spaces (for Korean, an eojeol); transformers then replaces every chosen token by the mask
token (no 10 % random / 10 % kept). Validation rows are masked once, by ``seed`` and row id, at
``eval_mlm_probability`` (not the training ``mlm_probability``, which a search may vary), every chosen token
replaced by the mask token: the loss is comparable across epochs, resumes, folds and trials, and
``top1_accuracy``/``top5_accuracy`` are fill-mask accuracies (the original token is the model's first / among
its five first guesses at a masked position). ``eval_loss`` is the mean cross-entropy per masked token (not
per batch) and ``perplexity`` its exp.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from pipelines.config import StageConfig
from pipelines.data import Dataset, content_digest
from pipelines.errors import ConfigError
from pipelines.models import ModelError, ModelSource
from pipelines.tasks.base import Built, LoadedModel, Task, read_columns, shuffled_folds, shuffled_holdout

logger = logging.getLogger(__name__)
TOP_K = 5


class TokenDataset(torch.utils.data.Dataset):
    """Tokenized texts (with the offsets whole-word masking needs), masked later by the collator."""

    def __init__(self, tokenizer, texts: list[str], max_length: int, offsets: bool):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True,
                                   return_offsets_mapping=offsets)

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **{key: values[i] for key, values in self.encodings.items()}}


class MaskedDataset(torch.utils.data.Dataset):
    """Validation texts masked once: the same masks in every evaluation."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def masking_collator(tokenizer, cfg: StageConfig, probability: float | None = None,
                     **kwargs) -> DataCollatorForLanguageModeling:
    """Masks ``probability`` of the tokens (default: the training ``mlm_probability``)."""
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability or cfg.mlm_probability,
                                           whole_word_mask=cfg.whole_word_mask, **kwargs)


def mask_fixed(tokenizer, frame: pd.DataFrame, cfg: StageConfig) -> MaskedDataset:
    """Each row masked by a generator seeded with (``seed``, row id) at ``eval_mlm_probability`` (whatever
    ``mlm_probability`` training uses), every chosen token replaced by the mask token; a row where nothing was
    chosen gets its first word masked (every row counts)."""
    collator = masking_collator(tokenizer, cfg, cfg.eval_mlm_probability, mask_replace_prob=1.0,
                                random_replace_prob=0.0)
    tokens = TokenDataset(tokenizer, frame["text"].tolist(), cfg.max_length, offsets=cfg.whole_word_mask)
    items = []
    for i, row_id in enumerate(frame["row_id"].tolist()):
        item = {key: value for key, value in tokens[i].items() if key != "index"}
        input_ids, labels = mask_one(collator, item, f"{cfg.seed}:{row_id}")
        if not (labels != -100).any():
            input_ids, labels = _mask_first_word(item, tokenizer.mask_token_id)
        items.append({"input_ids": input_ids.tolist(), "attention_mask": [1] * len(input_ids),
                      "labels": labels.tolist()})
    return MaskedDataset(items)


def mask_one(collator: DataCollatorForLanguageModeling, item: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``item`` masked by a generator seeded with ``key``: its input ids and labels."""
    digest = hashlib.sha256(key.encode()).digest()
    collator.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    batch = collator.torch_call([item])
    return batch["input_ids"][0], batch["labels"][0]


def _mask_first_word(item: dict, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(item["input_ids"])
    special = torch.tensor(item["special_tokens_mask"], dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    first = int((~special).nonzero()[0]) if (~special).any() else 0
    labels[first], ids[first] = ids[first], mask_id
    return ids, labels


def top_k_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the ``TOP_K`` best-scored ids, and the cross-entropy of the label (what compute_metrics needs,
    instead of the whole vocabulary's logits)."""
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                               reduction="none")
    return logits.topk(TOP_K, dim=-1).indices, losses


def fill_mask_scores(top_ids: np.ndarray, losses: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: masked tokens, top-1 and top-5 hits, summed cross-entropy (positions with label -100 ignored)."""
    masked = labels != -100
    hits = (top_ids == labels[..., None]) & masked[..., None]
    return {"masked_tokens": masked.sum(axis=1), "top1_hits": hits[..., 0].sum(axis=1),
            "top5_hits": hits.any(axis=-1).sum(axis=1), "loss_sum": np.where(masked, losses, 0.0).sum(axis=1)}


def summarize(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Per masked token of all rows: ``loss`` (mean cross-entropy), its exp ``perplexity``, fill-mask accuracies."""
    tokens = max(int(rows["masked_tokens"].sum()), 1)
    loss = float(rows["loss_sum"].sum() / tokens)
    return {"loss": loss, "perplexity": float(np.exp(loss)), "top1_accuracy": float(rows["top1_hits"].sum() / tokens),
            "top5_accuracy": float(rows["top5_hits"].sum() / tokens)}


class MaskedLMTrainer(Trainer):
    """``eval_loss`` per masked token (the Trainer's own is a mean of per-batch means, which depends on the
    evaluation batch size and disagrees with ``perplexity``)."""

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if f"{prefix}_token_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = output.metrics.pop(f"{prefix}_token_loss")
        return output


class MaskedLM(Task):
    name = "mlm"
    text_columns = ()
    input_length_setting = "max_length"

    def load(self, cfg: StageConfig) -> Dataset:
        frame = read_columns(cfg.data, {"text": ("text_column", cfg.text_column)}, "mlm")
        if 0 < cfg.max_samples < len(frame):
            frame = frame.sample(n=cfg.max_samples, random_state=cfg.fold_seed).sort_values("row_id")
            frame = frame.reset_index(drop=True)
        return Dataset(frame=frame, labels=[], digest=content_digest(frame, list(frame.columns)))

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        return shuffled_folds(data.frame, cfg.k_folds, cfg.fold_seed)

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        return shuffled_holdout(data.frame, cfg.validation_fraction, cfg.fold_seed, cfg.data)

    def check_model(self, path: str) -> None:
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ModelError(f"model {path} ({config.model_type}) has no masked-LM form in transformers, so no MLM "
                             "head can be added to it. Pass an encoder checkpoint (BERT, RoBERTa, XLM-R, ELECTRA, "
                             "DeBERTa, MiniLM...) for task=mlm.")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.mask_token is None:
            raise ModelError(f"the tokenizer of model {path} has no mask token; task=mlm needs one (pass a "
                             "checkpoint trained with masked-LM, e.g. a BERT-style encoder)")

    def load_model(self, cfg, source: ModelSource) -> LoadedModel:
        raise ModelError(f"model {source.name} is a masked-LM model (trained with task=mlm, e.g. by tapt): it predicts "
                         "no labels or summaries. Fine-tune it first (-e train or -e kfold with -P model=<its URI>) "
                         "and predict with that model")

    def build(self, cfg: StageConfig, path: str, data: Dataset) -> Built:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if cfg.whole_word_mask and not tokenizer.is_fast:
            raise ConfigError(f"whole_word_mask needs a fast tokenizer (character offsets); model {path} has a slow "
                              "one. Pass whole_word_mask=false.")
        tokenizer.model_max_length = cfg.max_length
        network = AutoModelForMaskedLM.from_pretrained(path)
        return Built(network, tokenizer)

    def trainer(self, cfg, built, args, train, valid, callbacks) -> Trainer:
        tokenizer = built.tokenizer

        def compute_metrics(eval_pred) -> dict[str, float]:
            top_ids, losses = eval_pred.predictions
            metrics = summarize(fill_mask_scores(top_ids, losses, eval_pred.label_ids))
            return {"token_loss": metrics.pop("loss"), **metrics}  # the Trainer would overwrite "loss"

        collate = _Collate(masking_collator(tokenizer, cfg), DataCollatorForSeq2Seq(tokenizer), cfg.seed)
        return MaskedLMTrainer(
            model=built.network,
            # the evaluation before training is the base model's (logged at step 0)
            # remove_unused_columns=False: the collator needs the example index, offsets and special-token mask
            args=TrainingArguments(**args, per_device_eval_batch_size=cfg.eval_batch_size,
                                   eval_on_start=valid is not None, remove_unused_columns=False),
            train_dataset=TokenDataset(tokenizer, train["text"].tolist(), cfg.max_length, cfg.whole_word_mask),
            eval_dataset=None if valid is None else mask_fixed(tokenizer, valid, cfg),
            processing_class=tokenizer,
            data_collator=collate,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=top_k_and_loss,
            callbacks=[*callbacks, MaskingEpoch(collate)],
        )

    def evaluate(self, trainer, built, valid, cfg, data) -> tuple[dict[str, float], pd.DataFrame]:
        output = trainer.predict(trainer.eval_dataset)
        rows = fill_mask_scores(*output.predictions, output.label_ids)
        return summarize(rows), pd.DataFrame({"row_id": valid["row_id"].to_numpy(), **rows})


class _Collate:
    """Training examples masked one by one, by (``seed``, ``epoch``, example index), then padded; the
    fixed-masked validation batches are only padded."""

    def __init__(self, mask: DataCollatorForLanguageModeling, pad: DataCollatorForSeq2Seq, seed: int):
        self.mask, self.pad, self.seed = mask, pad, seed
        self.epoch = 0  # set by MaskingEpoch before each epoch's batches are drawn

    def __call__(self, examples: list[dict]) -> dict:
        if "labels" in examples[0]:
            return self.pad(examples)
        masked = []
        for example in examples:
            item = {key: value for key, value in example.items() if key != "index"}
            input_ids, labels = mask_one(self.mask, item, f"{self.seed}:{self.epoch}:{example['index']}")
            masked.append({"input_ids": input_ids.tolist(), "attention_mask": [1] * len(input_ids),
                           "labels": labels.tolist()})
        return self.pad(masked)


class MaskingEpoch(TrainerCallback):
    """Tells the collator the epoch whose batches are drawn next (``on_epoch_begin`` precedes the epoch's
    dataloader iterator; after a mid-epoch resume ``state.epoch`` is fractional)."""

    def __init__(self, collate: _Collate):
        self.collate = collate

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collate.epoch = int(state.epoch + 1e-6)


TASK = MaskedLM()
