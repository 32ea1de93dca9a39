"""The stages' typed configurations, composed from the settings machinery (pipelines/settings.py: fields, parsing,
precedence, fingerprint inputs) and each registered task's settings (pipelines/tasks/<task>/settings.py, listed in
pipelines/tasks/__init__.py): no task is named here but as a default (and tapt's fixed mlm); its settings,
checks and metrics come from its module."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.llm_settings import LLMSettings, load_template, template_fields
from pipelines.settings import ROUGE_TOKENIZERS, Coordinated, Resumable, Settings, setting, wire_tasks
from pipelines.tasks import TASKS, task_settings

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA = str(Path(__file__).resolve().parent.parent / "data" / "fortunes_4class.csv")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TASK_SETTINGS = {name: task_settings(name) for name in TASKS}


def _mixins(kind: str) -> tuple[type[Settings], ...]:
    """Each task's ``kind`` settings class (``Training``, ``Scoring``, ``Prediction``), where it has one."""
    return tuple(getattr(module, kind) for module in TASK_SETTINGS.values() if hasattr(module, kind))


@dataclass
class CommonTraining(Settings):
    """The settings of the training stages that are no single task's (``shared``: of the tasks whose USES name it)."""

    task: str = setting("classification", f"What the model learns: one of {', '.join(TASKS)} (pipelines/tasks/"
                        "<task>/; its settings.py holds the task's own settings).", choices=TASKS)
    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the examples.", result=False)
    text_column: str = setting("text", "Column holding the input text (the source document of a summary).")
    max_samples: int = setting(0, "Use at most this many rows (stratified by label where the task has one label, "
                               "else uniform); 0 uses all.")
    model: str = setting(
        DEFAULT_MODEL,
        "Hugging Face hub id, local folder, runs:/<run_id>/<path> or models:/<name>@<alias>.",
        result=False,  # the model's content digest goes into the fingerprint instead
    )
    epochs: int = setting(3, "Training epochs.")
    learning_rate: float = setting(5e-5, "Peak learning rate of AdamW.")
    batch_size: int = setting(16, "Training batch size per device.")
    eval_batch_size: int = setting(64, "Batch size for evaluation and prediction.", result=False, shared=True)
    gradient_accumulation_steps: int = setting(1, "Batches accumulated per optimizer step.")
    max_length: int = setting(128, "Tokens per example after truncation.", shared=True)
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.0, "Fraction of steps with linear learning-rate warm-up.")
    scheduler_type: str = setting("linear", "Learning-rate schedule.", choices=SCHEDULERS)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    label_smoothing: float = setting(0.0, "Label smoothing factor of the cross-entropy loss.", shared=True)
    seed: int = setting(42, "Seed for model initialisation, data order and dropout.")
    fold_seed: int = setting(42, "Seed of the train/validation split or fold plan.")
    metric: str = setting("", "Validation metric that picks the best checkpoint; empty: the task's default (the "
                          "first of `metrics` in pipelines/tasks/<task>/settings.py; another name is refused, listing "
                          "them).")
    early_stopping_patience: int = setting(
        0, "Stop after this many evaluations without improvement of `metric`; 0 disables."
    )
    save_steps: int = setting(0, "Evaluate and checkpoint every N optimizer steps; 0 means every epoch.")
    logging_steps: int = setting(10, "Log training loss every N optimizer steps.", result=False)
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
                        "(1-p)^focal_gamma).", choices=("cross_entropy", "focal"), shared=True)
    focal_gamma: float = setting(2.0, "Focusing exponent of loss=focal (0: plain cross-entropy).",
                                 shared=True)
    class_weights: str = setting("none", "none, or balanced: each class's loss weighted by rows / (classes x rows "
                                 "of the class) in the training set.", choices=("none", "balanced"),
                                 shared=True)
    augment_from: str = setting("", "Run id of an augment run: each training set gets the augmentations of its own "
                                "rows (never of a validation row).")


wire_tasks(CommonTraining, TASK_SETTINGS)


@dataclass
class StageConfig(*reversed(_mixins("Training")), CommonTraining, Resumable, Coordinated):
    """Settings of every training stage: the common ones, and each task's own (pipelines/tasks/<task>/settings.py)."""

    POSITIVE = ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_grad_norm",
                "logging_steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_task_settings()
        for name in self.POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ["max_samples", "early_stopping_patience", "save_steps", "weight_decay", "epochs"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be zero or positive")
        for name in ["warmup_ratio", "label_smoothing"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        task_settings(self.task).check(self)
        self._check_techniques()

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
        objectives = [name for name, greater in self.metrics().items() if greater is not None]
        if not self.metric:
            self.metric = objectives[0]
        if self.metric not in objectives:
            raise ConfigError(f"metric={self.metric!r} is not a {self.task} metric; pass one of "
                              f"{', '.join(objectives)}")

    def metrics(self) -> dict[str, bool | None]:
        """The task's validation metrics, default objective first: name -> whether greater is better."""
        return task_settings(self.task).metrics(self)

    def greater_is_better(self) -> bool:
        return self.metrics()[self.metric]


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


TUNABLE = ("learning_rate", "weight_decay", "batch_size", "gradient_accumulation_steps", "warmup_ratio", "epochs",
           "max_length", "scheduler_type", "max_grad_norm", "label_smoothing", "early_stopping_patience", "ema_decay",
           "layerwise_lr_decay", "focal_gamma",
           *dict.fromkeys(name for module in TASK_SETTINGS.values() for name in module.TUNABLE))
DEFAULT_SEARCH_SPACE = (
    "{learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}, "
    "weight_decay: {type: float, low: 0.0, high: 0.1}, "
    "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}}"
)


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
                             "(a task that generates text): no training, each trial generates with its generation "
                             "settings from the fixed, fine-tuned `model` on the validation split and scores it.",
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
        if self.objective == "generate" and not self.generation():
            able = " or ".join(name for name, module in TASK_SETTINGS.items() if getattr(module, "GENERATION", ()))
            raise ConfigError(f"objective=generate searches generation settings: it needs task={able}")
        if self.objective == "generate" and self.metric == "loss":
            raise ConfigError("objective=generate scores generated text: pass a ROUGE metric, not metric=loss")

    def tunable(self) -> tuple[str, ...]:
        """The settings a search space may name: generation settings alone for objective=generate."""
        if self.objective == "generate":
            return self.generation()
        fields = {f.name: f for f in dataclasses.fields(self)}
        ignored = {"focal_gamma"} if self.loss != "focal" else set()  # the loss would not use them
        if self.loss == "focal" or self.class_weights == "balanced":
            ignored.add("label_smoothing")
        return tuple(name for name in TUNABLE if self.applies(fields[name]) and name not in ignored)

    def generation(self) -> tuple[str, ...]:
        """The task's generation settings (what objective=generate searches); none for a task that does not generate."""
        return getattr(task_settings(self.task), "GENERATION", ())

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
class EnsembleConfig(Resumable, Coordinated):
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
class BatchConfig(Resumable, Coordinated):
    """Settings of every batch stage: items of a data file in resumable shards (pipelines/stages/shards.py)."""

    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the items.", result=False)
    text_column: str = setting("text", "Column holding the input text.")
    shard_size: int = setting(100, "Items per shard; finished shards are not done again on resume (a "
                              "resume with another size redoes the shards whose rows changed).", result=False)

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
class PredictConfig(Resumable, Coordinated, *_mixins("Prediction")):
    """`predict`: batch predictions of a model for a data file, resumable per shard."""

    model_uri: str = setting("", "models:/<name>@<alias>, runs:/<run_id>/<path> or a local model folder.",
                             result=False)  # the resolved model version or content digest is in the fingerprint
    data: str = setting(DEFAULT_DATA, "CSV, JSONL or Parquet file with the texts.", result=False)
    text_column: str = setting("text", "Column holding the input text.")
    shard_size: int = setting(1000, "Rows per shard; finished shards are not recomputed on resume.")
    eval_batch_size: int = setting(64, "Batch size of the model (of generation, for a summarizer).", result=False)
    max_length: int = setting(0, "Tokens per text; 0: the length the model was trained with (a pyfunc ensemble "
                              "has its own).")
    output: str = setting("", "Also write the predictions to this CSV path.", result=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model_uri:
            raise ConfigError("model_uri is empty; pass model_uri=models:/<name>@<alias>, runs:/... or a folder")
        if self.shard_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError("shard_size and eval_batch_size must be positive")
        self._check_predictions()

    def _check_predictions(self) -> None:
        """Each task's checks of its ``Prediction`` settings (they apply whatever the model)."""
        for module in TASK_SETTINGS.values():
            if hasattr(module, "check_prediction"):
                module.check_prediction(self)


@dataclass
class ValidateConfig(PredictConfig, *_mixins("Scoring")):
    """`validate`: scores a model, or another run's predictions, against references, shard by shard."""

    model_uri: str = setting("", "A model to predict with and score (models:/..., runs:/... or a folder); or pass "
                             "predictions_from.", result=False)
    task: str = setting("classification", "What is scored: the task of the predictions (its metrics), one of the "
                        "tasks with a Scoring class in pipelines/tasks/<task>/settings.py.",
                        choices=tuple(name for name, module in TASK_SETTINGS.items() if hasattr(module, "Scoring")))
    predictions_from: str = setting("", "Run id of a kfold, train, predict, llm or correct run whose predictions "
                                    "are scored (instead of model_uri).", result=False)  # its id is the model digest
    prediction_column: str = setting("", "Column of those predictions to score; empty: the source stage's own "
                                     "(predicted, generated, response, corrected...).")
    worst_examples: int = setting(50, "Rows in the table of the worst-scored examples.", result=False)

    def __post_init__(self) -> None:
        Coordinated.__post_init__(self)
        if bool(self.model_uri) == bool(self.predictions_from):
            raise ConfigError("pass exactly one of model_uri=<model to score> or predictions_from=<run id whose "
                              "predictions to score>")
        if self.shard_size <= 0 or self.eval_batch_size <= 0 or self.worst_examples < 0:
            raise ConfigError("shard_size and eval_batch_size must be positive, worst_examples zero or positive")
        self._check_predictions()
        self.refuse_other_task_settings()
        getattr(task_settings(self.task), "check_scoring", lambda cfg: None)(self)


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
