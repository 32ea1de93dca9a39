"""Typed stage configuration, parsed once, and the fingerprint of result-affecting settings.

One name per setting everywhere: the dataclass field is the command-line flag, the MLproject
parameter and the MLflow param.  Values come, lowest precedence first, from the field default,
an optional YAML file (``--config_file``, then its ``variant``), the run named by ``params_from`` (only the
parameters its search searched, applied in pipelines/stages/contract.py), command-line flags and
``--config k=v,...``. A flag given an empty value is *not given*: every MLproject parameter defaults to ``''``
(the real default is in its description), so ``mlflow run`` passes untouched parameters as empty and they
never hide the file's value, while any explicit ``-P name=value``, even the default, overrides it. Where each
value came from is kept in ``settings_source`` (recorded in the run's ``config.json``, not in the fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import ConfigError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA = str(Path(__file__).resolve().parent.parent / "data" / "fortunes_4class.csv")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TASKS = ("classification", "summarization", "mlm")  # each has a module in pipelines/tasks/
ROUGE_TOKENIZERS = ("whitespace", "char", "morpheme", "default")
GENERATION = ("max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty", "length_penalty",
              "no_repeat_ngram_size")  # the result-affecting generation settings (one GenerationConfig)


def setting(default: Any, help: str, *, result: bool = True, choices: tuple | None = None,
            task: str | tuple[str, ...] | None = None) -> Any:
    """A config field. ``result=False`` keeps it out of the fingerprint (it changes how, not what);
    ``task`` names the task(s) the setting belongs to (it is ignored, and must stay unset, for the others)."""
    tasks = (task,) if isinstance(task, str) else task
    return field(default=default, metadata={"help": help, "result": result, "choices": choices, "task": tasks})


SECRET_PARAM = re.compile(r"key|token|secret|passw|sig|auth|credential", re.IGNORECASE)  # query parameter names
REDACTED = ("base_url",)  # URL settings that may carry credentials: recorded and fingerprinted without them


def redact_url(url: str) -> str:
    """``url`` without credentials: its user-info (``https://user:key@host``) and the values of query parameters
    named like a secret (``?api_key=...``) become ``***``. A URL without them is returned unchanged."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAM.search(key) for key, _ in pairs):
            query = urllib.parse.urlencode([(key, "***" if SECRET_PARAM.search(key) else value) for key, value in pairs],
                                           safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass
class Settings:
    """Behaviour shared by every stage's settings: choice checks, fingerprint inputs, a plain dict, and where
    each value came from (``settings_source``: per setting ``default``, ``config_file``, ``variant``,
    ``params_from`` or ``explicit``; provenance only, never in the fingerprint)."""

    settings_source: dict[str, str] = field(default_factory=dict, repr=False, compare=False, metadata={
        "help": "", "result": False, "provenance": True})

    def __post_init__(self) -> None:
        for f in settings_fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(map(str, choices))}")
        # built in Python rather than parsed: a value other than the default was given
        self.settings_source = {f.name: self.settings_source.get(f.name) or (
            "default" if getattr(self, f.name) == f.default else "explicit") for f in settings_fields(self)}
        if getattr(self, "rouge_tokenizer", "") == "morpheme" and importlib.util.find_spec("kiwipiepy") is None:
            raise ConfigError("rouge_tokenizer=morpheme needs kiwipiepy, which is not installed: pip install "
                              "'pipelines[korean]' (or pip install kiwipiepy), or pass rouge_tokenizer=whitespace or "
                              "char")

    def result_settings(self) -> dict[str, Any]:
        """The settings that change results (the fingerprint's inputs, besides data and model digests)."""
        settings = {f.name: self._redacted(f.name) for f in settings_fields(self)
                    if f.metadata["result"] and self.applies(f)}
        # rules that changed results of these settings in this version: a run made by the old rules is refused on
        # resume (listing e.g. rouge_rules: <unset> -> punctuation-split) rather than mixing the two
        settings.update({name: rules for name, (uses, rules) in CHANGED_RULES.items() if uses(settings)})
        return settings

    def _redacted(self, name: str) -> Any:
        value = getattr(self, name)
        return redact_url(value) if name in REDACTED and value else value

    def applies(self, f: dataclasses.Field) -> bool:
        """Whether setting ``f`` belongs to this configuration's task (settings of no task always do)."""
        tasks = f.metadata.get("task")
        return tasks is None or getattr(self, "task", None) in tasks

    def refuse_other_task_settings(self) -> None:
        """A setting of another task would be silently ignored: refuse it, naming the task it belongs to."""
        for f in settings_fields(self):
            if not self.applies(f) and getattr(self, f.name) != f.default:
                owners = " or ".join(f.metadata["task"])
                raise ConfigError(f"{f.name} is a {owners} setting and does nothing with task={self.task}; remove "
                                  f"it, or pass task={f.metadata['task'][0]}")

    def to_dict(self) -> dict[str, Any]:
        """The settings by name (``settings_source`` left out: it says where they came from)."""
        return {f.name: getattr(self, f.name) for f in settings_fields(self)}

    def to_record(self) -> dict[str, Any]:
        """The settings as runs record them (params, ``config.json``): a database URL's password and a URL's
        credentials removed."""
        from pipelines.study import redact

        record = {name: self._redacted(name) for name in self.to_dict()}
        if record.get("optuna_storage"):
            record["optuna_storage"] = redact(record["optuna_storage"])
        return record


def settings_fields(settings: Settings | type[Settings]) -> list[dataclasses.Field]:
    """The settings of a configuration (its dataclass fields, ``settings_source`` excepted)."""
    return [f for f in dataclasses.fields(settings) if not f.metadata.get("provenance")]


@dataclass
class Coordinated(Settings):
    """Settings of a stage whose units are leased, so that several workers can share it."""

    optuna_storage: str = setting(
        "", "Database (SQLAlchemy URL) holding Optuna studies and the leases through which workers share units; "
        "empty: optuna.db beside the embedded SQLite tracking store (required with any other tracking store).",
        result=False,
    )
    heartbeat_interval: int = setting(10, "Seconds between heartbeats of a unit's lease (and an Optuna trial's).",
                                      result=False)
    grace_period: int = setting(30, "Seconds without heartbeat after which another worker takes a unit over.",
                                result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grace_period <= self.heartbeat_interval or self.heartbeat_interval <= 0:
            raise ConfigError(f"grace_period={self.grace_period} must exceed heartbeat_interval="
                              f"{self.heartbeat_interval} > 0")


@dataclass
class StageConfig(Coordinated):
    """Settings shared by every training stage."""

    POSITIVE = ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_grad_norm",
                "logging_steps")
    SEQ2SEQ_POSITIVE = ("max_source_length", "max_target_length", "max_new_tokens", "num_beams",
                        "repetition_penalty", "length_penalty", "generation_batch_size")

    task: str = setting("classification", "What the model learns (pipelines/tasks/): classification of a text, "
                        "summarization (seq2seq generation scored with ROUGE) or mlm (masked-LM training on "
                        "unlabelled text: the tapt stage).", choices=TASKS)
    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the examples.", result=False)
    text_column: str = setting("text", "Column holding the input text (summarization: the source document).")
    label_column: str = setting("label", "Column holding the class label.", task="classification")
    max_samples: int = setting(0, "Use at most this many rows (classification: stratified sample, summarization: "
                               "uniform); 0 uses all.")
    model: str = setting(
        DEFAULT_MODEL,
        "Hugging Face hub id, local folder, runs:/<run_id>/<path> or models:/<name>@<alias>.",
        result=False,  # the model's content digest goes into the fingerprint instead
    )
    epochs: int = setting(3, "Training epochs.")
    learning_rate: float = setting(5e-5, "Peak learning rate of AdamW.")
    batch_size: int = setting(16, "Training batch size per device.")
    eval_batch_size: int = setting(64, "Batch size for evaluation and prediction.", result=False,
                                   task=("classification", "mlm"))
    gradient_accumulation_steps: int = setting(1, "Batches accumulated per optimizer step.")
    max_length: int = setting(128, "Tokens per example after truncation.", task=("classification", "mlm"))
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.0, "Fraction of steps with linear learning-rate warm-up.")
    scheduler_type: str = setting("linear", "Learning-rate schedule.", choices=SCHEDULERS)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    label_smoothing: float = setting(0.0, "Label smoothing factor of the cross-entropy loss.",
                                     task=("classification", "summarization"))
    seed: int = setting(42, "Seed for model initialisation, data order and dropout.")
    fold_seed: int = setting(42, "Seed of the train/validation split or fold plan.")
    metric: str = setting("", "Validation metric that picks the best checkpoint; empty: the task's default "
                          "(classification f1_macro, accuracy or loss; summarization rouge_mean, rouge1, rouge2, "
                          "rougeL or loss; default first).")
    early_stopping_patience: int = setting(
        0, "Stop after this many evaluations without improvement of `metric`; 0 disables."
    )
    save_steps: int = setting(0, "Evaluate and checkpoint every N optimizer steps; 0 means every epoch.")
    logging_steps: int = setting(10, "Log training loss every N optimizer steps.", result=False)
    experiment_name: str = setting(
        "", "MLflow experiment; empty uses MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID or 'Default'.",
        result=False,
    )
    resume: bool = setting(False, "Continue the newest run of this stage with the same settings.", result=False)
    resume_from: str = setting("", "Run id of a parent run to continue explicitly.", result=False)
    params_from: str = setting(
        "", "Optuna parent run id (or 'latest' in the experiment) whose best parameters replace these settings.",
        result=False,  # the parameters it brings are in the fingerprint
    )
    variant: str = setting("", "Name of a variant in config_file's `variants:` mapping, applied over the file's "
                           "top-level settings (flags and --config still override it); recorded as a tag.",
                           result=False)  # the values it brings are in the fingerprint
    init_from: str = setting("", "Start from these weights with a fresh optimizer, in a new run (unlike resume): a "
                             "Trainer checkpoint folder, a model folder, runs:/<run_id>/<path>, or the id of a "
                             "train/fold/trial run (its model, or its latest checkpoint while unfinished). Its "
                             "content digest is in the fingerprint.", result=False)
    init_epoch: str = setting("restart", "With init_from: restart counts epochs from 0 with a new learning-rate "
                              "schedule; continue goes on from the checkpoint's epoch and schedule position.",
                              choices=("restart", "continue"))
    init_ema: bool = setting(False, "With init_from: start from its EMA weights (a checkpoint trained with "
                             "ema_decay) instead of its raw weights.")
    ema_decay: float = setting(0.0, "Keep an exponential moving average of the weights with this decay per "
                               "optimizer step (e.g. 0.999): evaluation, the best-checkpoint choice and the saved "
                               "model use it; 0: off.")
    swa_epochs: int = setting(0, "Stochastic weight averaging: the saved model is the mean of the weights at the end "
                              "of each of the last N epochs; 0: off.")
    layerwise_lr_decay: float = setting(1.0, "Layer-wise learning rates: each encoder layer's rate is the one above "
                                        "times this factor (the embeddings lowest, the head at learning_rate); "
                                        "1.0: one rate.")
    loss: str = setting("cross_entropy", "Training loss: cross_entropy, or focal (down-weights easy examples by "
                        "(1-p)^focal_gamma).", choices=("cross_entropy", "focal"), task="classification")
    focal_gamma: float = setting(2.0, "Focusing exponent of loss=focal (0: plain cross-entropy).",
                                 task="classification")
    class_weights: str = setting("none", "none, or balanced: each class's loss weighted by rows / (classes x rows "
                                 "of the class) in the training set.", choices=("none", "balanced"),
                                 task="classification")
    # ---- mlm (masked-LM): pipelines/tasks/mlm.py
    mlm_probability: float = setting(0.15, "Share of tokens masked for the masked-LM objective.", task="mlm")
    eval_mlm_probability: float = setting(0.15, "Share of tokens masked in the validation rows (masked once, by "
                                          "`seed`): the same yardstick for every mlm_probability, so eval losses "
                                          "compare across runs and trials.", task="mlm")
    whole_word_mask: bool = setting(False, "Mask whole words (runs of text between spaces: Korean eojeols) instead "
                                    "of single tokens; needs a fast tokenizer.", task="mlm")
    augment_from: str = setting("", "Run id of an augment run: each training set gets the augmentations of its own "
                                "rows (never of a validation row).")
    # ---- summarization (seq2seq): pipelines/tasks/summarization.py
    target_column: str = setting("summary", "Column holding the reference summary.", task="summarization")
    group_column: str = setting("", "Rows sharing a value here (a dialogue, a topic) are never split between "
                                "training and validation (GroupKFold); empty: plain shuffled folds.",
                                task="summarization")
    special_tokens: str = setting("", "Comma-separated tokens added to the tokenizer as whole tokens (e.g. "
                                  "#Person1#,#Person2#), embeddings resized.", task="summarization")
    max_source_length: int = setting(512, "Source tokens after truncation.", task="summarization")
    max_target_length: int = setting(128, "Reference-summary tokens after truncation (training labels).",
                                     task="summarization")
    max_new_tokens: int = setting(64, "Generation: most tokens generated per summary.", task="summarization")
    min_new_tokens: int = setting(0, "Generation: fewest tokens generated per summary.", task="summarization")
    num_beams: int = setting(4, "Generation: beam-search width (1: greedy).", task="summarization")
    repetition_penalty: float = setting(1.0, "Generation: penalty on repeated tokens (1.0: none).",
                                        task="summarization")
    length_penalty: float = setting(1.0, "Generation: beam score length exponent (>1 favours longer summaries).",
                                    task="summarization")
    no_repeat_ngram_size: int = setting(0, "Generation: n-grams of this size never repeat (0: off).",
                                        task="summarization")
    generation_batch_size: int = setting(16, "Batch size of generation on validation rows.", result=False,
                                         task="summarization")
    rouge_tokenizer: str = setting(
        "whitespace", "How ROUGE splits text: whitespace (eojeols/words, lowercased), char, morpheme (Korean "
        "morphemes by kiwipiepy: pip install 'pipelines[korean]') or default (rouge_score's: English only, it drops "
        "Hangul).", choices=ROUGE_TOKENIZERS, task="summarization")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_task_settings()
        for name in self.POSITIVE + (self.SEQ2SEQ_POSITIVE if self.task == "summarization" else ()):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ["max_samples", "early_stopping_patience", "save_steps", "weight_decay", "epochs"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be zero or positive")
        for name in ["warmup_ratio", "label_smoothing"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.task == "classification" and (self.max_length <= 0 or self.eval_batch_size <= 0):
            raise ConfigError("max_length and eval_batch_size must be positive")
        if self.task == "summarization" and (self.min_new_tokens < 0 or self.no_repeat_ngram_size < 0):
            raise ConfigError("min_new_tokens and no_repeat_ngram_size must be zero or positive")
        if self.task == "summarization" and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}: "
                              "lower min_new_tokens or raise max_new_tokens")
        for name in ("mlm_probability", "eval_mlm_probability"):
            if self.task == "mlm" and not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in (0, 1), e.g. 0.15")
        self._check_techniques()

    def result_settings(self) -> dict[str, Any]:
        """Without ``eval_mlm_probability`` where it equals ``mlm_probability``: validation rows were masked with
        ``mlm_probability`` before the setting existed, so masked-LM runs of then keep their fingerprint."""
        settings = super().result_settings()
        if settings.get("eval_mlm_probability") == self.mlm_probability:
            del settings["eval_mlm_probability"]
        return settings

    def _check_techniques(self) -> None:
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999 (0 turns EMA off)")
        if self.swa_epochs < 0 or (self.epochs and self.swa_epochs > self.epochs):
            raise ConfigError(f"swa_epochs={self.swa_epochs} must be between 0 and epochs={self.epochs}")
        if self.swa_epochs and (self.ema_decay or self.early_stopping_patience):
            raise ConfigError("swa_epochs averages the last epochs' weights: it cannot be combined with ema_decay or "
                              "early_stopping_patience (which pick other weights); use one of them")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            raise ConfigError(f"layerwise_lr_decay={self.layerwise_lr_decay} must be in (0, 1], e.g. 0.9")
        if self.focal_gamma < 0:
            raise ConfigError(f"focal_gamma={self.focal_gamma} must be zero or positive")
        if self.label_smoothing and (self.loss == "focal" or self.class_weights == "balanced"):
            raise ConfigError("loss=focal and class_weights=balanced do not smooth labels: pass label_smoothing=0, or "
                              "loss=cross_entropy with class_weights=none")
        if self.loss != "focal" and self.focal_gamma != 2.0:
            raise ConfigError(f"focal_gamma={self.focal_gamma} only applies with loss=focal; pass loss=focal, or drop "
                              "focal_gamma (from the search space too)")
        if not self.init_from and (self.init_epoch != "restart" or self.init_ema):
            raise ConfigError("init_epoch and init_ema only apply with init_from=<checkpoint or run>; pass it")

    def _check_task_settings(self) -> None:
        """Refuse a setting of another task (it would be silently ignored) and resolve the default ``metric``."""
        self.refuse_other_task_settings()
        metrics = task_metrics(self.task)
        if not self.metric:
            self.metric = next(iter(metrics))
        if self.metric not in metrics:
            raise ConfigError(f"metric={self.metric!r} is not a {self.task} metric; pass one of {', '.join(metrics)}")

    def greater_is_better(self) -> bool:
        return task_metrics(self.task)[self.metric]


def task_metrics(task: str) -> dict[str, bool]:
    """The validation metrics a task computes, default first, each with whether greater is better."""
    if task == "summarization":
        return {"rouge_mean": True, "rouge1": True, "rouge2": True, "rougeL": True, "loss": False}
    if task == "mlm":
        return {"loss": False, "perplexity": False, "top1_accuracy": True, "top5_accuracy": True}
    return {"f1_macro": True, "accuracy": True, "loss": False}


@dataclass
class TrainConfig(StageConfig):
    """`train`: one model on a stratified train/validation split."""

    validation_fraction: float = setting(0.2, "Fraction of rows held out for validation.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction={self.validation_fraction} must be in (0, 1)")


@dataclass
class TaptConfig(TrainConfig):
    """`tapt`: masked-LM continued pretraining (task-adaptive) on an unlabelled text column; its model feeds the
    training stages through model=runs:/<run_id>/model or models:/<name>@<alias>."""

    task: str = setting("mlm", "Always mlm: masked-LM training.", choices=("mlm",))
    validation_fraction: float = setting(0.1, "Fraction of rows held out; their masking is fixed by `seed`.")
    registered_model_name: str = setting("", "Also register the model under this name (empty: do not).",
                                         result=False)
    alias: str = setting("", "Registry alias pointed at the new version (with registered_model_name).",
                         result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alias and not self.registered_model_name:
            raise ConfigError("alias needs registered_model_name=<name> to register the model under")


@dataclass
class KFoldConfig(StageConfig):
    """`kfold`: K-fold cross-validation, one child run per fold."""

    k_folds: int = setting(5, "Number of stratified folds.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k_folds < 2:
            raise ConfigError(f"k_folds={self.k_folds} must be at least 2")


ROUGE_RULES = "punctuation-split"  # the rules of the whitespace/char/morpheme ROUGE tokenizers
CHANGED_RULES = {  # setting -> (whether a configuration's results depend on the rules, the rules' name)
    # the whitespace, char and morpheme ROUGE tokenizers split punctuation off words
    "rouge_rules": (lambda s: s.get("rouge_tokenizer", "default") != "default", ROUGE_RULES),
    # layer-wise learning rates count an encoder-decoder's stacks apart (other optimizer parameter groups)
    "layerwise_rules": (lambda s: s.get("task") == "summarization" and s.get("layerwise_lr_decay", 1.0) < 1.0,
                        "per-stack"),
    # sampler=grid gives logical trial n grid point n (before: a point drawn per trial, repeating some)
    "grid_rules": (lambda s: s.get("sampler") == "grid", "point-per-trial"),
}


def fingerprint(inputs: dict[str, Any]) -> str:
    """Stable short hash of the result-affecting settings (plus data and model digests)."""
    payload = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of settings that differ, e.g. ``learning_rate: 2e-05 -> 0.0001``."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- parsing


def convert_value(name: str, raw: Any, target: Any) -> Any:
    """Convert a raw string (or YAML scalar) to the type of the field default ``target``."""
    kind = type(target)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "y", "on"):
                return True
            if lowered in ("false", "0", "no", "n", "off", ""):
                return False
            raise ValueError
        if kind is int:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}") from None


def _parse_overrides(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"--config entry {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_config(cls: type[Settings], argv: list[str] | None = None) -> Settings:
    """Parse command-line arguments into ``cls``; every setting is a ``--name`` flag. Each value's origin is
    recorded in ``settings_source``: a flag or ``--config`` entry is ``explicit`` even when it equals the default."""
    fields = {f.name: f for f in settings_fields(cls)}
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in fields.values():
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        parser.add_argument(f"--{f.name}", default=None, help=f"{f.metadata['help']}{extra} (default: {f.default!r})")
    parser.add_argument("--config_file", default="", help="YAML file mapping setting names to values.")
    parser.add_argument("--config", default="", help="Overrides as k=v,k=v (highest precedence).")
    args = vars(parser.parse_args(argv))
    config_file, overrides = args.pop("config_file"), _parse_overrides(args.pop("config"))

    layers: list[tuple[str, dict[str, Any]]] = []  # (source, values), lowest precedence first
    variant = overrides.get("variant") or args.get("variant") or ""
    if config_file:
        top, chosen = _load_yaml(Path(config_file), fields, variant)
        layers += [("config_file", top), ("variant", chosen)]
    elif variant:
        raise ConfigError(f"variant={variant!r} names a variant of config_file, but no config_file was given; pass "
                          "config_file=<YAML with a `variants:` mapping>")
    for name in overrides:
        if name not in fields:
            raise ConfigError(f"--config names unknown setting {name!r}; known: {', '.join(fields)}")
    given = {name: raw for name, raw in args.items() if raw is not None and raw != ""}  # '': not given (MLproject)
    layers.append(("explicit", {**given, **overrides}))
    values: dict[str, Any] = {}
    sources = dict.fromkeys(fields, "default")
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    converted = {name: convert_value(name, raw, fields[name].default) for name, raw in values.items()}
    return cls(**converted, settings_source=sources)


def _load_yaml(path: Path, fields: dict[str, dataclasses.Field], variant: str = ""
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's top-level settings, and those of ``variants[variant]`` (applied over them)."""
    if not path.is_file():
        raise ConfigError(f"config_file {path} does not exist; pass the path of a YAML mapping of settings")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config_file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config_file {path} must hold a mapping of setting: value")
    variants = loaded.pop("variants", None) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"config_file {path}: `variants` must map each variant name to a mapping of settings")
    variant = variant or str(loaded.get("variant") or "")  # the file may name its default variant
    if variant:
        if "variant" not in fields:
            raise ConfigError(f"variant={variant!r}: this stage has no variants; remove it")
        if variant not in variants:
            raise ConfigError(f"variant={variant!r} is not in config_file {path}; its variants are "
                              f"{', '.join(map(str, variants)) or 'none'}")
    chosen = variants[variant] if variant else {}
    unknown = sorted((set(loaded) | set(chosen)) - set(fields))
    if unknown:
        raise ConfigError(f"config_file {path} names unknown settings {unknown}; known: {', '.join(fields)}")
    return loaded, chosen


TUNABLE = ("learning_rate", "weight_decay", "batch_size", "gradient_accumulation_steps", "warmup_ratio", "epochs",
           "max_length", "scheduler_type", "max_grad_norm", "label_smoothing", "early_stopping_patience",
           "max_source_length", "max_target_length", "mlm_probability", "ema_decay", "layerwise_lr_decay",
           "focal_gamma", *GENERATION)
DEFAULT_SEARCH_SPACE = (
    "{learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}, "
    "weight_decay: {type: float, low: 0.0, high: 0.1}, "
    "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}}"
)
DEFAULT_OPTUNA_STORAGE = ""  # resolved by tracking.state_storage()


@dataclass
class OptunaConfig(KFoldConfig, TrainConfig):
    """`optuna`: hyperparameter search; each trial a child run, resumable per trial, fold and epoch."""

    n_trials: int = setting(20, "Total number of finished (complete or pruned) trials the study should have.",
                            result=False)
    timeout: int = setting(0, "Stop starting new trials after this many seconds; 0 means no limit.", result=False)
    max_retries: int = setting(1, "Times a trial that raised an exception is retried with the same parameters; after "
                               "that it stays FAIL and keeps its number (a crashed trial is always retried).",
                               result=False)
    search_space: str = setting(DEFAULT_SEARCH_SPACE, "YAML file, or inline YAML, mapping settings to distributions.",
                                result=False)  # its parsed content is in the fingerprint
    objective: str = setting("holdout", "holdout: validation split; cv: mean over k_folds folds; generate "
                             "(summarization): no training, each trial generates with its generation settings from "
                             "the fixed, fine-tuned `model` on the validation split and scores it.",
                             choices=("holdout", "cv", "generate"))
    direction: str = setting("auto", "maximize, minimize, or auto (the metric's own direction).",
                             choices=("auto", "maximize", "minimize"))
    sampler: str = setting("tpe", "Optuna sampler.", choices=("tpe", "random", "grid"))
    pruner: str = setting("median", "Optuna pruner (per epoch for holdout, per fold for cv).",
                          choices=("median", "hyperband", "none"))
    study_name: str = setting("", "Optuna study name; empty derives it from experiment and fingerprint.",
                              result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_trials < 0 or self.timeout < 0 or self.max_retries < 0:
            raise ConfigError("n_trials, timeout and max_retries must be zero or positive")
        if self.objective == "generate" and self.task != "summarization":
            raise ConfigError("objective=generate searches generation settings: it needs task=summarization")
        if self.objective == "generate" and self.metric == "loss":
            raise ConfigError("objective=generate scores generated text: pass a ROUGE metric, not metric=loss")

    def tunable(self) -> tuple[str, ...]:
        """The settings a search space may name: generation settings alone for objective=generate."""
        if self.objective == "generate":
            return GENERATION
        fields = {f.name: f for f in dataclasses.fields(self)}
        ignored = {"focal_gamma"} if self.loss != "focal" else set()  # the loss would not use them
        if self.loss == "focal" or self.class_weights == "balanced":
            ignored.add("label_smoothing")
        return tuple(name for name in TUNABLE if self.applies(fields[name]) and name not in ignored)

    def refuse_failing_trials(self, space: dict[str, Any]) -> None:
        """Refuse a search space (name -> Optuna distribution) in which some trial's settings would be refused
        (e.g. min_new_tokens above max_new_tokens), before any run exists. The checks compare at most two settings,
        each monotonically: so every pair of searched settings is tried at its extremes (low and high, the
        smallest and largest numeric choice, or every other choice) with the fixed settings."""
        ends = {name: _extremes(dist) for name, dist in space.items()}
        pairs = [*itertools.combinations(ends, 1), *itertools.combinations(ends, 2)]  # singles first: the clearer
        for trial in (dict(zip(pair, corner)) for pair in pairs for corner in itertools.product(*map(ends.get, pair))):
            try:
                dataclasses.replace(self, **trial)
            except ConfigError as exc:
                raise ConfigError(f"search_space allows trials that would fail ({exc}), e.g. "
                                  f"{', '.join(f'{k}={v}' for k, v in trial.items())}: narrow its ranges or change "
                                  "the fixed settings") from None

    def optimization_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        return "maximize" if self.greater_is_better() else "minimize"


def _extremes(dist: Any) -> list:
    """The values of a search-space distribution at which a monotone check can fail."""
    choices = getattr(dist, "choices", None)
    if choices is None:
        return list(dict.fromkeys((dist.low, dist.high)))
    numbers = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return list(dict.fromkeys([min(numbers), max(numbers)] if len(numbers) == len(choices) else choices))


@dataclass
class EnsembleConfig(Coordinated):
    """`ensemble`: classifiers: weighted soft voting; summarizers: per input the minimum-Bayes-risk summary of the members; registered as one pyfunc model."""

    source_runs: str = setting("", "Comma-separated run ids: a kfold parent (all its folds) or a train run.")
    weights: str = setting("score", "score: normalised validation metrics; equal; optimized: fitted on OOF.",
                           choices=("score", "equal", "optimized"))
    metric: str = setting("f1_macro", "Metric for score weights and the optimized fit.", choices=("f1_macro", "accuracy"))
    registered_model_name: str = setting("pipelines-ensemble", "Model registry name.")
    alias: str = setting("champion", "Registry alias pointed at the new version.")
    skip_missing: bool = setting(False, "Leave out members whose model cannot be loaded (weights renormalised).")
    eval_batch_size: int = setting(64, "Batch size of the served model.")
    seed: int = setting(42, "Seed of the optimized-weights search and its held-out split.")
    experiment_name: str = setting("", "MLflow experiment; empty uses MLFLOW_EXPERIMENT_NAME / _ID or 'Default'.",
                                   result=False)
    resume: bool = setting(False, "Continue the newest run of this stage with the same settings.", result=False)
    resume_from: str = setting("", "Run id of a parent run to continue explicitly.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.source_ids():
            raise ConfigError("source_runs is empty; pass source_runs=<kfold or train run id>[,<run id>...]")

    def source_ids(self) -> list[str]:
        return [part.strip() for part in self.source_runs.split(",") if part.strip()]


@dataclass
class RetrainConfig(StageConfig):
    """`retrain`: one model on all the data with the parameters of an optuna or kfold run."""

    POSITIVE = tuple(name for name in StageConfig.POSITIVE if name != "epochs")
    epochs: int = setting(0, "Training epochs; 0 takes them from params_from (kfold: mean best epoch over folds).")


@dataclass
class LLMSettings(Settings):
    """How to call an OpenAI-compatible chat-completions endpoint (pipelines/llm.py)."""

    base_url: str = setting("", "OpenAI-compatible endpoint, e.g. https://api.upstage.ai/v1 (Upstage Solar), "
                            "https://api.openai.com/v1 or a local vLLM server's http://host:8000/v1.")
    llm_model: str = setting("", "Model name at that endpoint, e.g. solar-pro2.")
    system_prompt: str = setting("", "System message sent before each prompt (inline, or a file); empty: none.")
    temperature: float = setting(0.0, "Sampling temperature (0: the most deterministic answers).")
    max_tokens: int = setting(256, "Most tokens per answer.")
    concurrency: int = setting(4, "Requests in flight at once.", result=False)
    requests_per_minute: int = setting(0, "Most requests started in any minute; 0: no limit.", result=False)
    tokens_per_minute: int = setting(0, "Most tokens (prompt + answer) in any minute; 0: no limit.", result=False)
    max_retries: int = setting(5, "Retries of a request after 429, 5xx, timeouts and dropped connections, with "
                               "exponential back-off (or the server's retry-after).", result=False)
    request_timeout: float = setting(60.0, "Seconds before one attempt of a request times out.", result=False)
    flush_seconds: float = setting(10.0, "Finished requests are written to the ledger (the state database) at least "
                                   "this often; 0: each at once.", result=False)
    api_key_env: str = setting("OPENAI_API_KEY", "Name of the environment variable holding the API key (the key "
                               "itself is never a setting, and is never logged or recorded).", result=False)
    price_per_1k_input: float = setting(0.0, "Price per 1,000 prompt tokens, for the `cost` metric.", result=False)
    price_per_1k_output: float = setting(0.0, "Price per 1,000 answer tokens, for the `cost` metric.",
                                         result=False)
    retry_failed: bool = setting(False, "On resume, send the requests that finally failed again (only them).",
                                 result=False)

    def check_llm(self) -> None:
        """Called by the stages that do send requests."""
        if not self.base_url or not self.llm_model:
            raise ConfigError("base_url and llm_model are required: e.g. base_url=https://api.upstage.ai/v1 "
                              "llm_model=solar-pro2")
        if not os.environ.get(self.api_key_env):
            raise ConfigError(f"the environment variable {self.api_key_env} (api_key_env) is not set: export "
                              f"{self.api_key_env}=<your API key>, or pass api_key_env=<the variable that holds it>")
        for name in ("max_tokens", "concurrency", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("requests_per_minute", "tokens_per_minute", "max_retries", "flush_seconds", "temperature",
                     "price_per_1k_input", "price_per_1k_output"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be zero or positive")


@dataclass
class BatchConfig(Coordinated):
    """Settings of every batch stage: items of a data file in resumable shards (pipelines/stages/shards.py)."""

    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the items.", result=False)
    text_column: str = setting("text", "Column holding the input text.")
    shard_size: int = setting(100, "Items per shard; finished shards are not done again on resume (a "
                              "resume with another size redoes the shards whose rows changed).", result=False)
    experiment_name: str = setting("", "MLflow experiment; empty uses MLFLOW_EXPERIMENT_NAME / _ID or 'Default'.",
                                   result=False)
    resume: bool = setting(False, "Continue the newest run of this stage with the same settings.", result=False)
    resume_from: str = setting("", "Run id of a run of this stage to continue explicitly.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard_size <= 0:
            raise ConfigError(f"shard_size={self.shard_size} must be positive")


@dataclass
class LlmConfig(LLMSettings, BatchConfig):
    """`llm`: one chat completion per row of a data file, resumable per request (never paid twice)."""

    prompt_template: str = setting("{text}", "Prompt (inline, or a file): {text} is the text column, {name} any "
                                   "other column; its content is in the fingerprint.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_llm()


@dataclass
class PredictConfig(Coordinated):
    """`predict`: batch predictions of a model for a data file, resumable per shard."""

    model_uri: str = setting("", "models:/<name>@<alias>, runs:/<run_id>/<path> or a local model folder.",
                             result=False)  # the resolved model version or content digest is in the fingerprint
    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the texts.", result=False)
    text_column: str = setting("text", "Column holding the input text.")
    shard_size: int = setting(1000, "Rows per shard; finished shards are not recomputed on resume.")
    eval_batch_size: int = setting(64, "Batch size of the model (of generation, for a summarizer).", result=False)
    max_length: int = setting(0, "Tokens per text; 0: the length the model was trained with (a pyfunc ensemble "
                              "has its own).")
    max_new_tokens: int = setting(0, "Summarizer: most tokens generated; 0: the model's own generation setting.")
    min_new_tokens: int = setting(0, "Summarizer: fewest tokens generated; 0: the model's own.")
    num_beams: int = setting(0, "Summarizer: beam-search width; 0: the model's own.")
    repetition_penalty: float = setting(0.0, "Summarizer: repeated-token penalty; 0: the model's own.")
    length_penalty: float = setting(0.0, "Summarizer: beam length exponent; 0: the model's own.")
    no_repeat_ngram_size: int = setting(0, "Summarizer: n-grams of this size never repeat; 0: the model's own.")
    output: str = setting("", "Also write the predictions to this CSV path.", result=False)
    experiment_name: str = setting("", "MLflow experiment; empty uses MLFLOW_EXPERIMENT_NAME / _ID or 'Default'.",
                                   result=False)
    resume: bool = setting(False, "Continue the newest predict run with the same settings.", result=False)
    resume_from: str = setting("", "Run id of a predict run to continue explicitly.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model_uri:
            raise ConfigError("model_uri is empty; pass model_uri=models:/<name>@<alias>, runs:/... or a folder")
        if self.shard_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError("shard_size and eval_batch_size must be positive")
        self._check_lengths()

    def _check_lengths(self) -> None:
        if self.min_new_tokens and self.max_new_tokens and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}: "
                              "lower min_new_tokens or raise max_new_tokens")


@dataclass
class ValidateConfig(PredictConfig):
    """`validate`: scores a model, or another run's predictions, against references, shard by shard."""

    model_uri: str = setting("", "A model to predict with and score (models:/..., runs:/... or a folder); or pass "
                             "predictions_from.", result=False)
    task: str = setting("classification", "What is scored: classification labels (accuracy, f1_macro) or "
                        "summaries (ROUGE).", choices=("classification", "summarization"))
    predictions_from: str = setting("", "Run id of a kfold, train, predict, llm or correct run whose predictions "
                                    "are scored (instead of model_uri).", result=False)  # its id is the model digest
    prediction_column: str = setting("", "Column of those predictions to score; empty: the source stage's own "
                                     "(predicted, generated, response, corrected...).")
    label_column: str = setting("label", "Column of `data` holding the true label.", task="classification")
    target_column: str = setting("summary", "Column of `data` holding the reference summary.", task="summarization")
    rouge_tokenizer: str = setting("whitespace", "How ROUGE splits text (see the train stage).",
                                   choices=ROUGE_TOKENIZERS, task="summarization")
    worst_examples: int = setting(50, "Rows in the table of the worst-scored examples.", result=False)

    def __post_init__(self) -> None:
        Coordinated.__post_init__(self)
        if bool(self.model_uri) == bool(self.predictions_from):
            raise ConfigError("pass exactly one of model_uri=<model to score> or predictions_from=<run id whose "
                              "predictions to score>")
        if self.shard_size <= 0 or self.eval_batch_size <= 0 or self.worst_examples < 0:
            raise ConfigError("shard_size and eval_batch_size must be positive, worst_examples zero or positive")
        self._check_lengths()
        self.refuse_other_task_settings()


AUGMENTATION_METHODS = ("eda", "back_translation", "paraphrase", "llm_paraphrase")


@dataclass
class AugmentConfig(LLMSettings, BatchConfig):
    """`augment`: new training rows made from the text of existing ones (EDA, back-translation, paraphrase)."""

    augmentation_methods: str = setting("eda", f"Comma-separated methods: {', '.join(AUGMENTATION_METHODS)}.")
    augmentation_ratio: float = setting(1.0, "Fraction of rows (chosen by seed) that get augmentations.")
    per_method: int = setting(1, "Augmentations per chosen row by eda (the model and LLM methods make one each).")
    eda_operations: str = setting("delete,swap,insert,punctuation", "EDA operations, used in turn.")
    eda_alpha: float = setting(0.1, "EDA strength: share of the words deleted, swapped, inserted or punctuated.")
    bt_forward_model: str = setting("", "back_translation: model translating into the pivot language (a "
                                    "Marian/M2M/NLLB-style seq2seq folder or hub id).")
    bt_backward_model: str = setting("", "back_translation: model translating back from the pivot language.")
    paraphrase_model: str = setting("", "paraphrase: a seq2seq paraphrasing model.")
    augment_max_new_tokens: int = setting(128, "Most tokens a translation or paraphrase model generates.")
    augment_num_beams: int = setting(4, "Beam width of the translation and paraphrase models.")
    paraphrase_prompt: str = setting("Rewrite the following text in the same language with other words, keeping "
                                     "its meaning. Answer with the rewritten text only.\n\n{text}",
                                     "llm_paraphrase: the prompt ({text} and other columns), inline or a file.")
    seed: int = setting(42, "Seed of the row choice and of EDA.")
    eval_batch_size: int = setting(16, "Batch size of the translation and paraphrase models.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.methods()) - set(AUGMENTATION_METHODS))
        if unknown or not self.methods():
            raise ConfigError(f"augmentation_methods={self.augmentation_methods!r}: {unknown or 'empty'}; pass any of "
                              f"{', '.join(AUGMENTATION_METHODS)}")
        if not 0 < self.augmentation_ratio <= 1 or self.per_method < 1:
            raise ConfigError("augmentation_ratio must be in (0, 1] and per_method at least 1")
        if "back_translation" in self.methods() and not (self.bt_forward_model and self.bt_backward_model):
            raise ConfigError("back_translation needs bt_forward_model and bt_backward_model (e.g. "
                              "Helsinki-NLP/opus-mt-ko-en and Helsinki-NLP/opus-mt-en-ko)")
        if "paraphrase" in self.methods() and not self.paraphrase_model:
            raise ConfigError("paraphrase needs paraphrase_model=<a seq2seq paraphrasing model>")
        if "llm_paraphrase" in self.methods():
            self.check_llm()

    def methods(self) -> list[str]:
        return [m.strip() for m in self.augmentation_methods.split(",") if m.strip()]


@dataclass
class CorrectConfig(LLMSettings, BatchConfig):
    """`correct`: post-correction of a run's generated summaries by other models, a vote, or an LLM."""

    predictions_from: str = setting("", "Run id whose summaries are corrected (kfold, train, predict, llm...).")
    prediction_column: str = setting("", "Column of those predictions; empty: the source stage's own.")
    target_column: str = setting("summary", "Column of `data` with reference summaries, if any (then ROUGE before "
                                 "and after is logged).")
    correction_models: str = setting("", "Comma-separated seq2seq checkpoints that each summarize the source into "
                                     "a candidate (quality_based, vote).")
    correction_strategy: str = setting("quality_based", "quality_based: replace a summary whose agreement score "
                                       "is below correction_threshold by a better-scoring candidate; vote: the "
                                       "minimum-Bayes-risk candidate; llm: ask the LLM to fix the summary.",
                                       choices=("quality_based", "vote", "llm"))
    correction_threshold: float = setting(0.3, "quality_based: agreement score under which a summary is replaced.")
    correction_prompt: str = setting("Correct the factual and grammatical errors in this summary of the text, "
                                     "keeping its language. Answer with the corrected summary only.\n\nText: "
                                     "{text}\n\nSummary: {summary}", "llm: the prompt ({text}: source, {summary}: "
                                     "the summary), inline or a file.")
    rouge_tokenizer: str = setting("whitespace", "How ROUGE splits text for scores and votes.",
                                   choices=ROUGE_TOKENIZERS)
    max_source_length: int = setting(512, "Source tokens the correction models read.")
    augment_max_new_tokens: int = setting(64, "Most tokens a correction model generates.")
    augment_num_beams: int = setting(4, "Beam width of the correction models.")
    eval_batch_size: int = setting(16, "Batch size of the correction models.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.predictions_from:
            raise ConfigError("predictions_from is empty: pass the run id whose summaries to correct")
        from pipelines.llm import load_template, template_fields  # pipelines.llm imports this module

        unknown = sorted(set(template_fields(load_template(self.correction_prompt), "correction_prompt"))
                         - {"text", "summary"})
        if unknown:
            raise ConfigError(f"correction_prompt names {{{'}, {'.join(unknown)}}}, which it cannot fill: it knows "
                              "{text} (the source) and {summary} (the summary to correct); fix the template")
        if self.correction_strategy == "llm":
            self.check_llm()
        elif not self.models():
            raise ConfigError(f"correction_strategy={self.correction_strategy} needs correction_models=<seq2seq "
                              "checkpoint>[,<checkpoint>...]")

    def models(self) -> list[str]:
        return [m.strip() for m in self.correction_models.split(",") if m.strip()]
