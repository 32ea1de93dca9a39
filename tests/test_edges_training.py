"""Training at the edges (issue 19, items 5-7): a focal loss whose gradient stays finite once p rounds to 1, a
diverged step that fails its unit before any checkpoint of it, layer-wise learning rates per stack of an
encoder-decoder, and a masked-LM search measured with one fixed validation masking."""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipelines import techniques, training
from pipelines.config import TaptConfig, TrainConfig
from pipelines.errors import UserError
from pipelines.models import ModelSource
from pipelines.settings import parse_config
from pipelines.tasks import get_task

CLASSIFICATION = get_task("classification")


# ---- item 5: focal loss and non-finite training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.2, 0.5, 2.0])
def test_focal_loss_gradient_is_finite_when_p_rounds_to_one(dtype, gamma):
    # row 0: p of the true class is exactly 1.0 in float32 (1 - p == 0): (1-p)^gamma has an infinite slope there
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 3.0, 0.0]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 2, 0])
    assert torch.log_softmax(logits.float(), -1)[0, 0].exp() == 1.0
    loss = techniques.FocalLoss(gamma, None)({"logits": logits}, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (loss, logits.grad)
    assert logits.grad[0].abs().max() < 1e-6  # a certain, right example teaches (next to) nothing
    # the other rows keep the loss and the gradient of the plain formula
    rest = logits.detach()[1:].float().requires_grad_()
    p = torch.softmax(rest, -1).gather(1, labels[1:].view(-1, 1)).squeeze(1)
    (-((1 - p) ** gamma) * p.log()).sum().div(3).backward()
    assert torch.allclose(logits.grad[1:].float(), rest.grad, atol=1e-6 if dtype == torch.float32 else 1e-2)


class _Store:
    """A checkpoint store that records which steps were committed."""

    def __init__(self):
        self.committed = []

    def restore(self, output_dir):
        return None

    def commit(self, local, *args, **kwargs):
        self.committed.append(int(str(local).rsplit("-", 1)[1]))

    def __getattr__(self, name):  # wait, cancel, ...
        return lambda *args, **kwargs: None


class _Tracker:
    def logged_steps(self, run_id):
        return {}

    def __getattr__(self, name):  # log_metrics, ...
        return lambda *args, **kwargs: None


class _NaNFromStep(type(CLASSIFICATION)):
    """The classification task whose loss becomes NaN at optimizer step ``step`` (a diverging run)."""

    def __init__(self, step: int):
        self.step = step

    def trainer(self, *args, **kwargs):
        trainer = super().trainer(*args, **kwargs)
        calls = []

        def loss(outputs, labels, num_items_in_batch=None):
            calls.append(1)
            value = torch.nn.functional.cross_entropy(outputs["logits"], labels)
            return value * float("nan") if len(calls) >= self.step else value

        trainer.compute_loss_func = loss
        return trainer


def test_a_non_finite_step_fails_the_unit_before_its_checkpoint(tiny_data, tiny_model, tmp_path):
    cfg = parse_config(TrainConfig, ["--data", str(tiny_data), "--model", str(tiny_model), "--max_length", "16",
                                     "--batch_size", "8", "--max_samples", "48", "--save_steps", "1"])
    task = _NaNFromStep(3)
    data = task.load(cfg)
    store = _Store()
    model = ModelSource(name=str(tiny_model), path=str(tiny_model), digest="tiny")
    with pytest.raises(UserError, match=r"step 3 .*not finite.*learning_rate=5e-05") as failed:
        training.fit(cfg, task, model, data, data.frame, None, _Tracker(), "run", store, tmp_path, save_model=False)
    assert "resume=false" in str(failed.value)
    assert store.committed == [1, 2]  # never the diverged step's checkpoint


def test_a_logged_non_finite_loss_fails_the_unit():
    cfg = parse_config(TrainConfig, ["--loss", "focal", "--focal_gamma", "0.5"])
    refuse = training.RefuseNonFinite(cfg)
    state = SimpleNamespace(global_step=7, epoch=1.5)
    refuse.on_log(None, state, None, logs={"loss": 0.3, "grad_norm": 1.0, "learning_rate": 1e-5})
    with pytest.raises(training.TrainingDiverged, match=r"step 7 .*loss \(nan\).*focal_gamma=0.5"):
        refuse.on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": 1.0})


# ---- item 6: layer-wise learning rates per stack


def _groups(model) -> dict[int, set[str]]:
    """Depth -> the parameters at that depth, a numbered layer named once (``...layer.0``), weight/bias dropped."""
    groups = defaultdict(set)
    for name, depth in techniques.layer_depths(model).items():
        groups[depth].add(re.sub(r"((?:layers?|block)\.\d+)\..*|\.(weight|bias)$", r"\1", name))
    return dict(groups)


def test_layerwise_groups_of_bert_bart_t5_and_a_bert2bert_warm_start(tiny_model):
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    from pipelines.tasks.summarization.task import warm_start

    bert = CLASSIFICATION.build(parse_config(TrainConfig, ["--model", str(tiny_model)]), str(tiny_model),
                                SimpleNamespace(labels=["a", "b", "c"])).network
    assert _groups(bert) == {
        2: {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm"},
        1: {"bert.encoder.layer.0"}, 0: {"bert.encoder.layer.1", "bert.pooler.dense", "classifier"}}
    # BERT2BERT: the encoder's word embedding is at the bottom of the encoder like its position embeddings, the
    # decoder's (tied to its LM head) at the bottom of the decoder
    bert2bert = warm_start(str(tiny_model), AutoTokenizer.from_pretrained(tiny_model))
    embeddings = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"}
    assert _groups(bert2bert) == {
        2: {f"encoder.embeddings.{e}" for e in embeddings} | {f"decoder.bert.embeddings.{e}" for e in embeddings},
        1: {"encoder.encoder.layer.0", "decoder.bert.encoder.layer.0"},
        0: {"encoder.encoder.layer.1", "encoder.pooler.dense", "decoder.bert.encoder.layer.1",
            "decoder.cls.predictions", "decoder.cls.predictions.transform.dense",
            "decoder.cls.predictions.transform.LayerNorm"}}
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=50, d_model=8, encoder_layers=2, decoder_layers=1, encoder_attention_heads=1,
        decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32))
    # the shared token embedding feeds both stacks: the bottom of the deeper one
    assert _groups(bart) == {
        2: {"model.shared", "model.encoder.embed_positions", "model.encoder.layernorm_embedding"},
        1: {"model.encoder.layers.0", "model.decoder.embed_positions", "model.decoder.layernorm_embedding"},
        0: {"model.encoder.layers.1", "model.decoder.layers.0"}}
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=8, d_ff=16, num_layers=2, num_decoder_layers=3,
                                             num_heads=1, d_kv=4))
    assert _groups(t5) == {
        3: {"shared"}, 2: {"decoder.block.0"}, 1: {"encoder.block.0", "decoder.block.1"},
        0: {"encoder.block.1", "encoder.final_layer_norm", "decoder.block.2", "decoder.final_layer_norm"}}


# ---- item 7: masked-LM search with one yardstick


def _tapt(tiny_data, tiny_model, *extra: str) -> TaptConfig:
    return parse_config(TaptConfig, ["--data", str(tiny_data), "--model", str(tiny_model), "--max_length", "32",
                                     "--text_column", "text", *extra])


def test_validation_masking_does_not_follow_the_training_masking(tiny_data, tiny_model):
    from transformers import AutoTokenizer

    from pipelines.tasks.mlm.task import mask_fixed

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    mlm = get_task("mlm")
    base = _tapt(tiny_data, tiny_model)
    frame = mlm.load(base).frame.head(40)

    def masked(cfg):
        items = mask_fixed(tokenizer, frame, cfg).items
        share = sum(sum(label != -100 for label in item["labels"]) for item in items) / sum(
            len(item["labels"]) - 2 for item in items)
        return items, share

    reference, share = masked(base)
    assert masked(_tapt(tiny_data, tiny_model, "--mlm_probability", "0.5"))[0] == reference  # same yardstick
    assert masked(base)[0] == reference  # deterministic: seeded by (seed, row id)
    assert 0.08 < share < 0.25
    assert masked(_tapt(tiny_data, tiny_model, "--eval_mlm_probability", "0.5"))[1] > 0.35
    # in the fingerprint where it changes results; an old run (eval masked like training) keeps its fingerprint
    assert "eval_mlm_probability" not in base.result_settings()
    assert _tapt(tiny_data, tiny_model, "--mlm_probability", "0.3").result_settings()["eval_mlm_probability"] == 0.15
    assert "eval_mlm_probability" not in parse_config(TrainConfig, []).result_settings()


def test_search_pruning_ignores_the_evaluation_before_training():
    from pipelines.stages.search import ReportToOptuna

    reported = []
    trial = SimpleNamespace(report=lambda value, step: reported.append((step, value)), should_prune=lambda: False)
    reporter = ReportToOptuna(trial, "loss", None, "run")
    args, control = SimpleNamespace(eval_steps=None), SimpleNamespace(should_training_stop=False)
    reporter.on_evaluate(args, SimpleNamespace(global_step=0, epoch=0.0), control, metrics={"eval_loss": 9.0})
    reporter.on_evaluate(args, SimpleNamespace(global_step=6, epoch=1.0), control, metrics={"eval_loss": 4.0})
    assert reported == [(1, 4.0)]  # the untrained model's step-0 evaluation is not the trial's first result
