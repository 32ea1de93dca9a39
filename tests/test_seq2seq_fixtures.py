"""The tiny seq2seq fixtures work offline, and the transformers behaviours the seq2seq code relies on hold."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from seq2seq_fixtures import (
    make_tiny_bart,
    make_tiny_distilbert,
    make_tiny_summaries,
    summary_corpus,
)

SPEAKERS = ["#Person1#", "#Person2#"]
DIALOGUE = "#Person1#: 안녕하세요. #Person2#: Hi there!\n#Person1# 잘 가요"


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory) -> Path:
    started = time.monotonic()
    folder = make_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))
    assert time.monotonic() - started < 10
    return folder


def test_tiny_summaries_ko_and_en(tmp_path):
    ko = [json.loads(line) for line in make_tiny_summaries(tmp_path / "ko.jsonl").read_text("utf-8").splitlines()]
    en = [json.loads(line) for line in
          make_tiny_summaries(tmp_path / "en.jsonl", rows=10, language="en").read_text("utf-8").splitlines()]
    assert len(ko) == 60 and len(en) == 10
    assert set(ko[0]) == {"source", "summary", "topic"}
    assert ko[0]["summary"] == "주소록을 VCARD 파일 형식으로 변환" and ko[0]["topic"] == "utils"
    assert en[0]["summary"] == "convert an addressbook to VCARD file format" and en[0]["topic"] == "utils"
    assert len({row["topic"] for row in ko}) > 5  # usable as a group column
    assert make_tiny_summaries(tmp_path / "again.jsonl").read_bytes() == (tmp_path / "ko.jsonl").read_bytes()
    with pytest.raises(ValueError):
        make_tiny_summaries(tmp_path / "x.jsonl", language="de")


def test_tiny_bart_loads_round_trips_and_generates(tiny_bart):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BartForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart)
    assert isinstance(model, BartForConditionalGeneration)
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0, 1, 2, 3]
    assert tokenizer.mask_token == "<mask>" and len(tokenizer) == model.config.vocab_size == 2000
    for settings in (model.config, model.generation_config):
        assert (settings.pad_token_id, settings.bos_token_id, settings.eos_token_id) == (1, 0, 2)
        assert settings.decoder_start_token_id == 2 and getattr(settings, "forced_bos_token_id", None) is None

    corpus = summary_corpus()
    encoded = tokenizer(corpus)["input_ids"]
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in encoded)  # <s> text </s>
    assert max(map(len, encoded)) <= model.config.max_position_embeddings
    assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == corpus  # lossless, Korean included
    for text in ["  두 칸\n\n줄바꿈 끝 ", "\t탭\r\n", " 앞 공백", "Hello world", "a , b ."]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.tokenize("Hello")[0] == "H"  # no prefix space is added to the first word
    korean = tokenizer.tokenize("주소록을 파일 형식으로 변환")
    pieces = [tokenizer.convert_tokens_to_string([piece]) for piece in korean]
    assert any(len(piece.strip()) >= 2 for piece in pieces)  # real multi-syllable Korean pieces, not only bytes

    batch = tokenizer(["주소록을 VCARD 파일 형식으로 변환", "짧다"], return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=5)
    assert generated.shape[0] == 2 and generated.shape[1] <= 6 and bool((generated[:, 0] == 2).all())
    labels = tokenizer(text_target=["주소록 변환", "짧다"], return_tensors="pt", padding=True)["input_ids"]
    assert math.isfinite(model(**batch, labels=labels).loss.item())


def test_speaker_tokens_survive_resize_save_and_load(tiny_bart, tmp_path):
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bart)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart)
    # v5 key is "extra_special_tokens"; "additional_special_tokens" is still accepted and converted to it.
    assert tokenizer.add_special_tokens({"additional_special_tokens": SPEAKERS}) == 2
    assert tokenizer.extra_special_tokens == SPEAKERS
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert model.config.vocab_size == 2002 and model.lm_head.weight.shape[0] == 2002
    assert model.final_logits_bias.shape[-1] == 2002
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["extra_special_tokens"] == SPEAKERS

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer) == 2002
    ids = tokenizer(DIALOGUE)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["<s>", "#Person1#"]  # one token, not split
    assert "#Person" not in tokenizer.decode(ids, skip_special_tokens=True)  # skipping drops the speakers too
    framing = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert tokenizer.decode([i for i in ids if i not in framing]) == DIALOGUE  # dropping only framing keeps them
    with torch.no_grad():
        assert math.isfinite(model(**tokenizer([DIALOGUE], return_tensors="pt"),
                                   labels=tokenizer(text_target=["#Person2# 인사"], return_tensors="pt")["input_ids"]
                                   ).loss.item())

    plain = AutoTokenizer.from_pretrained(tiny_bart)  # the alternative: ordinary added tokens, never skipped
    plain.add_tokens([AddedToken(token, normalized=False, special=False) for token in SPEAKERS])
    plain.save_pretrained(tmp_path / "plain")
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert plain.decode(plain(DIALOGUE)["input_ids"], skip_special_tokens=True) == DIALOGUE


def test_tiny_distilbert_cannot_be_a_decoder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DistilBertForMaskedLM, EncoderDecoderModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert "distilbert" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["bert"] == "BertLMHeadModel"
    folder = make_tiny_distilbert(tmp_path / "distil")
    assert isinstance(DistilBertForMaskedLM.from_pretrained(folder), DistilBertForMaskedLM)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.decode(tokenizer("the computer")["input_ids"], skip_special_tokens=True) == "the computer"
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(str(folder), str(folder))
    (tmp_path / "again").mkdir()
    make_tiny_distilbert(tmp_path / "again")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()


def test_tiny_bert_warm_starts_as_seq2seq(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertLMHeadModel, EncoderDecoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(tiny_model), str(tiny_model))
    assert isinstance(model.decoder, BertLMHeadModel) and model.decoder.config.add_cross_attention
    batch = tokenizer(["the computer crashed again today", "politics is the art of the possible"],
                      return_tensors="pt", padding=True)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    with pytest.raises(ValueError, match="decoder_start_token_id"):  # generate() reads only generation_config
        model.generate(**batch, max_new_tokens=3)
    for settings in (model.config, model.generation_config):  # the loss (label shifting) reads only model.config
        settings.decoder_start_token_id = tokenizer.cls_token_id
        settings.pad_token_id = tokenizer.pad_token_id
        settings.eos_token_id = tokenizer.sep_token_id

    labels = tokenizer(["computer crashed", "politics"], return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4)
    assert bool((generated[:, 0] == tokenizer.cls_token_id).all())

    model.save_pretrained(tmp_path / "bert2bert")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bert2bert")
    assert isinstance(loaded, EncoderDecoderModel)
    for settings in (loaded.config, loaded.generation_config):
        assert (settings.decoder_start_token_id, settings.pad_token_id, settings.eos_token_id) == (
            tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id)
    with torch.no_grad():
        assert torch.equal(loaded.generate(**batch, max_new_tokens=4), generated)

    with pytest.raises(NotImplementedError):
        loaded.resize_token_embeddings(len(tokenizer) + 1)
    tokenizer.add_special_tokens({"extra_special_tokens": SPEAKERS})
    loaded.encoder.resize_token_embeddings(len(tokenizer))
    loaded.decoder.resize_token_embeddings(len(tokenizer))  # also resizes the tied LM head and its bias
    assert loaded.config.decoder.vocab_size == loaded.decoder.config.vocab_size == len(tokenizer)
    assert loaded.decoder.get_output_embeddings().weight.shape[0] == len(tokenizer)
    ids = tokenizer(["#Person1#: hello computer"], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(ids["input_ids"][0])[1] == "#Person1#"
    with torch.no_grad():
        assert math.isfinite(loaded(**ids, labels=ids["input_ids"]).loss.item())
