"""Settings of the summarization task: seq2seq generation scored with ROUGE (contract: pipelines/tasks/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.settings import ROUGE_TOKENIZERS, Settings, setting

TASK = "summarization"
USES = ("label_smoothing",)
GENERATION = ("max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty", "length_penalty",
              "no_repeat_ngram_size")  # the result-affecting generation settings (one GenerationConfig)
TUNABLE = ("max_source_length", "max_target_length", *GENERATION)
POSITIVE = ("max_source_length", "max_target_length", "max_new_tokens", "num_beams", "repetition_penalty",
            "length_penalty", "generation_batch_size")
CHANGED_RULES = {  # see pipelines/settings.py
    # layer-wise learning rates count an encoder-decoder's stacks apart (other optimizer parameter groups)
    "layerwise_rules": (lambda s: s.get("layerwise_lr_decay", 1.0) < 1.0, "per-stack"),
}


@dataclass
class Training(Settings):
    target_column: str = setting("summary", "Column holding the reference summary.", task=TASK)
    group_column: str = setting("", "Rows sharing a value here (a dialogue, a topic) are never split between "
                                "training and validation (GroupKFold); empty: plain shuffled folds.", task=TASK)
    special_tokens: str = setting("", "Comma-separated tokens added to the tokenizer as whole tokens (e.g. "
                                  "#Person1#,#Person2#), embeddings resized.", task=TASK)
    max_source_length: int = setting(512, "Source tokens after truncation.", task=TASK)
    max_target_length: int = setting(128, "Reference-summary tokens after truncation (training labels).", task=TASK)
    max_new_tokens: int = setting(64, "Generation: most tokens generated per summary.", task=TASK)
    min_new_tokens: int = setting(0, "Generation: fewest tokens generated per summary.", task=TASK)
    num_beams: int = setting(4, "Generation: beam-search width (1: greedy).", task=TASK)
    repetition_penalty: float = setting(1.0, "Generation: penalty on repeated tokens (1.0: none).", task=TASK)
    length_penalty: float = setting(1.0, "Generation: beam score length exponent (>1 favours longer summaries).",
                                    task=TASK)
    no_repeat_ngram_size: int = setting(0, "Generation: n-grams of this size never repeat (0: off).", task=TASK)
    generation_batch_size: int = setting(16, "Batch size of generation on validation rows.", result=False, task=TASK)
    rouge_tokenizer: str = setting(
        "whitespace", "How ROUGE splits text: whitespace (eojeols/words, lowercased), char, morpheme (Korean "
        "morphemes by kiwipiepy: pip install 'pipelines[korean]') or default (rouge_score's: English only, it drops "
        "Hangul).", choices=ROUGE_TOKENIZERS, task=TASK)


@dataclass
class Scoring(Settings):
    target_column: str = setting("summary", "Column of `data` holding the reference summary.", task=TASK)
    rouge_tokenizer: str = setting("whitespace", "How ROUGE splits text (see the train stage).",
                                   choices=ROUGE_TOKENIZERS, task=TASK)


@dataclass
class Prediction(Settings):
    """Overrides of a summarizer's own generation settings (0: the model's own)."""

    max_new_tokens: int = setting(0, "Summarizer: most tokens generated; 0: the model's own generation setting.")
    min_new_tokens: int = setting(0, "Summarizer: fewest tokens generated; 0: the model's own.")
    num_beams: int = setting(0, "Summarizer: beam-search width; 0: the model's own.")
    repetition_penalty: float = setting(0.0, "Summarizer: repeated-token penalty; 0: the model's own.")
    length_penalty: float = setting(0.0, "Summarizer: beam length exponent; 0: the model's own.")
    no_repeat_ngram_size: int = setting(0, "Summarizer: n-grams of this size never repeat; 0: the model's own.")


def metrics(cfg: object) -> dict[str, bool | None]:
    """Validation metrics, default objective first, with whether greater is better (gen_len: logged only)."""
    return {"rouge_mean": True, "rouge1": True, "rouge2": True, "rougeL": True, "loss": False, "gen_len": None}


def check(cfg: Training) -> None:
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be positive")
    if cfg.min_new_tokens < 0 or cfg.no_repeat_ngram_size < 0:
        raise ConfigError("min_new_tokens and no_repeat_ngram_size must be zero or positive")
    _check_lengths(cfg)


def check_prediction(cfg: Prediction) -> None:
    if cfg.max_new_tokens and cfg.min_new_tokens:  # 0: the model's own
        _check_lengths(cfg)


def _check_lengths(cfg: Training | Prediction) -> None:
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise ConfigError(f"min_new_tokens={cfg.min_new_tokens} exceeds max_new_tokens={cfg.max_new_tokens}: "
                          "lower min_new_tokens or raise max_new_tokens")
