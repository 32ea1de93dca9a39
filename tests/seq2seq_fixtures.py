"""Tiny seq2seq fixtures built in-process: summarisation data, a BART, and a DistilBERT that cannot be a decoder.

Nothing here reaches the model hub. The BART tokenizer is byte-level BPE trained on ``data/debian_summaries.jsonl``
(Korean and English), so Korean text splits into real pieces and every text round-trips exactly through
``decode(encode(text), skip_special_tokens=True)``: no normalizer, no prefix space (``add_prefix_space=False``, the
BART/RoBERTa default, so a text's first word is encoded without a leading ``Ġ``), and ``clean_up_tokenization_spaces``
off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SUMMARIES_DATA = ROOT / "data" / "debian_summaries.jsonl"
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, BART's order (<mask> is last in BART)


def _summary_rows() -> list[dict]:
    with open(SUMMARIES_DATA, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summary_corpus() -> list[str]:
    """Every Korean and English description and synopsis of the bundled Debian summaries (tokenizer training text)."""
    fields = ("description", "synopsis", "description_en", "synopsis_en")
    return [row[field] for row in _summary_rows() for field in fields if row.get(field)]


def make_tiny_summaries(path: Path, rows: int = 60, language: str = "ko") -> Path:
    """JSONL with ``source``, ``summary`` and ``topic`` (the Debian section) from the first ``rows`` bundled rows.

    ``language="ko"`` takes ``description``/``synopsis``, ``"en"`` takes ``description_en``/``synopsis_en``.
    """
    if language not in ("ko", "en"):
        raise ValueError(f"language must be 'ko' or 'en', not {language!r}")
    suffix = "" if language == "ko" else "_en"
    with open(path, "w", encoding="utf-8") as handle:
        for row in _summary_rows()[:rows]:
            record = {"source": row[f"description{suffix}"], "summary": row[f"synopsis{suffix}"],
                      "topic": row["section"]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def make_tiny_bart_tokenizer(corpus: list[str] | None = None, vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with BART's special tokens, trained on ``corpus``.

    ``corpus`` defaults to :func:`summary_corpus`. Encoding gives ``<s> text </s>`` (pairs ``<s> A </s></s> B </s>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())  # byte-level: no unknown pieces, so no unk_token in the model
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BART_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(summary_corpus() if corpus is None else corpus, trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   add_prefix_space=False, clean_up_tokenization_spaces=False)


def make_tiny_bart(folder: Path, corpus: list[str] | None = None) -> Path:
    """A 2+2-layer, 32-wide ``BartForConditionalGeneration`` and its byte-level BPE tokenizer, saved in ``folder``.

    ``decoder_start_token_id`` is ``</s>`` as in BART; ``forced_bos_token_id`` is unset. The weights are seeded, so
    the same model comes out in every session.
    """
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = make_tiny_bart_tokenizer(corpus)
    tokenizer.save_pretrained(folder)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=None,
        forced_eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)  # the same tiny model in every test session
    model = BartForConditionalGeneration(config)
    generation = model.generation_config
    generation.pad_token_id, generation.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.eos_token_id = generation.forced_eos_token_id = tokenizer.eos_token_id
    generation.decoder_start_token_id, generation.forced_bos_token_id = tokenizer.eos_token_id, None
    model.save_pretrained(folder)
    return folder


def make_tiny_distilbert(folder: Path) -> Path:
    """A 2-layer, 32-wide ``DistilBertForMaskedLM`` with a WordPiece vocabulary trained on the demo data.

    An encoder-only model type with no causal-LM class, so it cannot serve as a seq2seq decoder.
    """
    import pandas as pd
    import torch
    from conftest import make_wordpiece_tokenizer
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tokenizer = make_wordpiece_tokenizer(pd.read_csv(ROOT / "data" / "fortunes_4class.csv")["text"].tolist())
    tokenizer.save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)  # the same tiny model in every test session
    DistilBertForMaskedLM(config).save_pretrained(folder)
    return folder
