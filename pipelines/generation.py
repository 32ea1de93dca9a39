"""Seq2seq generation shared by the stages and tasks that summarize, translate or paraphrase: is a model seq2seq,
its one GenerationConfig, batched deterministic generation and decoding, loading a trained summarizer."""

from __future__ import annotations

import copy
import logging
import unicodedata

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from pipelines.errors import ConfigError
from pipelines.tasks.summarization.settings import GENERATION


class _LengthNotice(logging.Filter):
    """Our GenerationConfig sets max_new_tokens and min_new_tokens, which take precedence; transformers fills in its
    own max_length/min_length defaults and then warns, on every batch, that both are set. Drop that one notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "seem to have been set" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_LengthNotice())


def is_seq2seq(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False)) or config.model_type == "encoder-decoder"


def generation_config(network, settings) -> GenerationConfig:
    """The model's generation config with the run's generation settings (``settings`` has the GENERATION names);
    ``max_new_tokens``/``min_new_tokens`` rule, so a checkpoint's own ``max_length``/``min_length`` are cleared.
    Generation is deterministic (no sampling). With ``num_beams=1`` (greedy) the beam-only ``length_penalty`` has
    no effect and ``early_stopping`` is off: transformers refuses either when set for greedy search."""
    config = copy.deepcopy(network.generation_config)
    beams = settings.num_beams > 1
    config.update(**{name: getattr(settings, name) for name in GENERATION}, max_length=None, min_length=None,
                  do_sample=False, early_stopping=beams)
    if not beams:
        config.length_penalty = 1.0
    try:
        config.validate(strict=True)
    except ValueError as exc:
        raise ConfigError(f"these generation settings cannot be used together: {exc}") from None
    return config


def _structural_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's own markers (padding, start, end...), dropped from generated text; tokens the user
    added through ``special_tokens`` (e.g. #Person1#) are text and stay."""
    markers = {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.cls_token,
               tokenizer.sep_token, tokenizer.unk_token, tokenizer.mask_token}
    return {tokenizer.convert_tokens_to_ids(token) for token in markers if token is not None}


def decode(tokenizer, ids: np.ndarray) -> tuple[list[str], list[int]]:
    """Generated token ids (padded with -100 or the pad id) -> texts and their lengths in tokens."""
    drop = _structural_ids(tokenizer)
    texts, lengths = [], []
    for row in np.asarray(ids):
        kept = [int(i) for i in row if i >= 0 and int(i) not in drop]
        text = tokenizer.decode(kept, skip_special_tokens=False)
        texts.append(unicodedata.normalize("NFC", text).strip())
        lengths.append(len(kept))
    return texts, lengths


@torch.no_grad()
def generate(network, tokenizer, texts: list[str], config: GenerationConfig, batch_size: int,
             max_length: int | None = None) -> list[str]:
    """Summaries of ``texts``, generated in batches of similar length (longest first), returned in input order."""
    network.eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chosen], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        ids = network.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               generation_config=config)
        for i, text in zip(chosen, decode(tokenizer, ids.numpy())[0]):
            out[i] = text
    return out


def load_summarizer(path) -> tuple[torch.nn.Module, object]:
    """A trained seq2seq model (or warm-started encoder-decoder) and its tokenizer, for generation."""
    return AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
