"""task=mlm in-process: fixed validation masks, fill-mask accuracy against an independent computation,
whole-word masking of Korean eojeols, and models that cannot do masked-LM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_wordpiece_tokenizer

from pipelines.config import TaptConfig
from pipelines.data import Dataset
from pipelines.models import ModelError
from pipelines.settings import parse_config
from pipelines.tasks import get_task
from pipelines.tasks.mlm.task import mask_fixed, masking_collator
from pipelines.training import _arguments

TASK = get_task("mlm")


def tapt_config(data, model, *extra: str) -> TaptConfig:
    return parse_config(TaptConfig, ["--data", str(data), "--model", str(model), "--max_length", "32",
                                     "--eval_batch_size", "7", *extra])


@pytest.fixture(scope="module")
def mlm_setup(tiny_data, tiny_model):
    cfg = tapt_config(tiny_data, tiny_model)
    data = TASK.load(cfg)
    valid = data.frame.iloc[TASK.holdout(data, cfg)].reset_index(drop=True)
    return cfg, data, valid


def test_validation_masks_are_fixed_by_seed_and_row(mlm_setup):
    cfg, data, valid = mlm_setup
    tokenizer = TASK.build(cfg, cfg.model, data).tokenizer
    first, again = mask_fixed(tokenizer, valid, cfg), mask_fixed(tokenizer, valid, cfg)
    assert [i["labels"] for i in first.items] == [i["labels"] for i in again.items]
    # a row's mask depends on its row id, not on which other rows are beside it
    alone = mask_fixed(tokenizer, valid.iloc[[3]], cfg)
    assert alone.items[0] == first.items[3]
    other_seed = mask_fixed(tokenizer, valid, tapt_config(cfg.data, cfg.model, "--seed", "7"))
    assert [i["labels"] for i in other_seed.items] != [i["labels"] for i in first.items]
    for item in first.items:  # every row has a masked token, each replaced by [MASK]
        masked = [i for i, label in enumerate(item["labels"]) if label != -100]
        assert masked and all(item["input_ids"][i] == tokenizer.mask_token_id for i in masked)


def test_fill_mask_accuracy_matches_an_independent_computation(mlm_setup, tmp_path):
    cfg, data, valid = mlm_setup
    cfg = tapt_config(cfg.data, cfg.model, "--epochs", "6", "--learning_rate", "5e-3")
    built = TASK.build(cfg, cfg.model, data)
    args = {**_arguments(cfg, tmp_path, validate=True), "eval_strategy": "no", "save_strategy": "no"}
    trainer = TASK.trainer(cfg, built, args, data.frame, valid, [])
    trainer.train()  # a little: frequent tokens get guessed, so the hit counts compared below are not all zero
    metrics, rows = TASK.evaluate(trainer, built, valid, cfg, data)

    hits1 = hits5 = tokens = 0
    nll = 0.0
    built.network.eval()
    with torch.no_grad():
        for item in trainer.eval_dataset.items:  # one row at a time: no padding involved
            logits = built.network(input_ids=torch.tensor([item["input_ids"]])).logits[0].numpy()
            for position, label in enumerate(item["labels"]):
                if label == -100:
                    continue
                ranked = np.argsort(-logits[position], kind="stable")
                hits1 += int(ranked[0] == label)
                hits5 += int(label in ranked[:5])
                shifted = logits[position] - logits[position].max()
                nll += float(np.log(np.exp(shifted).sum()) - shifted[label])
                tokens += 1
    assert int(rows["masked_tokens"].sum()) == tokens
    assert metrics["top1_accuracy"] == pytest.approx(hits1 / tokens)
    assert metrics["top5_accuracy"] == pytest.approx(hits5 / tokens)
    assert metrics["perplexity"] == pytest.approx(np.exp(nll / tokens), rel=1e-4)
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert 0 < hits1 < hits5 < tokens
    logged = trainer.evaluate()  # what the Trainer logs each epoch agrees, whatever the evaluation batch size
    assert logged["eval_loss"] == pytest.approx(metrics["loss"]) and logged["eval_top5_accuracy"] == hits5 / tokens


def test_training_masks_whole_korean_eojeols_by_seed_epoch_and_example():
    from transformers import DataCollatorForSeq2Seq

    from pipelines.tasks.mlm.task import TokenDataset, _Collate

    texts = ["오늘은 날씨가 정말 좋아서 공원에 산책을 나갔습니다.", "이 영화는 배우들의 연기가 훌륭했어요!",
             "배송이 빨라서 만족스럽습니다", "다음에도 이 가게에서 주문하겠습니다."] * 10
    tokenizer = make_wordpiece_tokenizer(texts[:4])
    cfg = parse_config(TaptConfig, ["--whole_word_mask", "true", "--mlm_probability", "0.3"])
    tokens = TokenDataset(tokenizer, texts, 64, offsets=True)
    collate = _Collate(masking_collator(tokenizer, cfg), DataCollatorForSeq2Seq(tokenizer), cfg.seed)
    batch = collate([tokens[i] for i in range(len(texts))])  # the training path: pads offsets itself, masks
    split_words = 0
    for row, text in enumerate(texts):
        offsets = tokens.encodings["offset_mapping"][row]
        masked = (batch["labels"][row] != -100).tolist()
        words: dict[int, set[bool]] = {}
        for (start, end), is_masked in zip(offsets, masked):
            if end > start:  # not a special token
                words.setdefault(text[:start].count(" "), set()).add(is_masked)  # eojeols: between single spaces
        assert all(len(flags) == 1 for flags in words.values()), f"a word of {text!r} was partly masked"
        split_words += sum(1 for t in offsets if t[1] > t[0]) > len(words)
    assert split_words > 0 and batch["labels"].ne(-100).any()  # words were split into pieces, and some masked
    # an example's mask depends on (seed, epoch, example) only: not on its batch or the global RNG
    torch.manual_seed(123)
    alone = collate([tokens[5]])
    assert torch.equal(alone["labels"][0], batch["labels"][5][: alone["labels"].shape[1]])
    collate.epoch = 1
    assert not torch.equal(collate([tokens[i] for i in range(len(texts))])["labels"], batch["labels"])


def test_a_model_without_masked_lm_form_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=8, d_ff=16, num_layers=1, num_heads=1,
                                        d_kv=4)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no masked-LM form in transformers.*Pass an encoder checkpoint"):
        TASK.check_model(str(tmp_path))


def test_mlm_reads_only_the_text_column(tmp_path):
    path = tmp_path / "texts.csv"
    pd.DataFrame({"body": ["a b c", "d e f"]}).to_csv(path, index=False)
    data: Dataset = TASK.load(tapt_config(path, tmp_path, "--text_column", "body"))
    assert list(data.frame["text"]) == ["a b c", "d e f"] and data.labels == []
