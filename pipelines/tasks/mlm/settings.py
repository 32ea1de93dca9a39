"""Settings of the mlm task: masked-LM training on unlabelled text, the tapt stage (contract:
pipelines/tasks/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import ConfigError
from pipelines.settings import Settings, setting

TASK = "mlm"
USES = ("eval_batch_size", "max_length")
TUNABLE = ("mlm_probability",)


@dataclass
class Training(Settings):
    mlm_probability: float = setting(0.15, "Share of tokens masked for the masked-LM objective.", task=TASK)
    eval_mlm_probability: float = setting(
        0.15, "Share of tokens masked in the validation rows (masked once, by `seed`): the same yardstick for every "
        "mlm_probability, so eval losses compare across runs and trials.", task=TASK,
        same_as="mlm_probability")  # validation rows were masked with mlm_probability before it existed
    whole_word_mask: bool = setting(False, "Mask whole words (runs of text between spaces: Korean eojeols) instead "
                                    "of single tokens; needs a fast tokenizer.", task=TASK)


def metrics(cfg: object) -> dict[str, bool]:
    """Validation metrics, default objective first, with whether greater is better."""
    return {"loss": False, "perplexity": False, "top1_accuracy": True, "top5_accuracy": True}


def check(cfg: Training) -> None:
    for name in ("mlm_probability", "eval_mlm_probability"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be in (0, 1), e.g. 0.15")
