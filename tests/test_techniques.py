"""Training techniques in-process: focal loss against cross-entropy, balanced class weights, layer-wise learning
rates read from the optimizer's param groups, and EMA/SWA against averages computed independently."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from pipelines import techniques
from pipelines.config import TrainConfig
from pipelines.settings import parse_config
from pipelines.tasks import get_task
from pipelines.training import _arguments

TASK = get_task("classification")


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 3) * 3, torch.randint(0, 3, (16,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert techniques.FocalLoss(0.0, None)({"logits": logits}, labels) == pytest.approx(ce.item(), rel=1e-6)
    # with gradient accumulation the Trainer passes the examples of the whole accumulated batch
    summed = techniques.FocalLoss(0.0, None)({"logits": logits}, labels, num_items_in_batch=32)
    assert summed == pytest.approx(ce.item() * 16 / 32, rel=1e-6)
    # gamma > 0 weighs each example by (1 - p)^gamma: never more than cross-entropy, much less when confident
    p = torch.softmax(logits, -1).gather(1, labels.view(-1, 1)).squeeze(1)
    expected = (-((1 - p) ** 2) * p.log()).mean()
    focal = techniques.FocalLoss(2.0, None)({"logits": logits}, labels)
    assert focal == pytest.approx(expected.item(), rel=1e-6) and focal < ce


def test_balanced_class_weights_are_inverse_frequencies():
    import numpy as np

    weights = techniques.balanced_weights(np.array([0, 0, 0, 1, 2, 2]), 4)  # class 3 absent
    assert weights.tolist() == pytest.approx([6 / (4 * 3), 6 / 4, 6 / (4 * 2), 0.0])
    logits, labels = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 2, 2])
    loss = techniques.FocalLoss(0.0, weights)({"logits": logits}, labels)
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert loss == pytest.approx((per_example * weights[labels]).mean().item(), rel=1e-6)


@pytest.fixture
def classifier(tiny_data, tiny_model, tmp_path):
    def make(*extra: str):
        cfg = parse_config(TrainConfig, ["--data", str(tiny_data), "--model", str(tiny_model), "--max_length", "32",
                                         "--batch_size", "8", "--learning_rate", "1e-3", *extra])
        data = TASK.load(cfg)
        built = TASK.build(cfg, cfg.model, data)
        args = {**_arguments(cfg, tmp_path / "out", validate=False), "save_strategy": "no"}
        return cfg, data, built, args
    return make


def test_classification_supplies_the_focal_loss_with_balanced_weights(classifier):
    cfg, data, _, _ = classifier("--loss", "focal", "--focal_gamma", "1.5", "--class_weights", "balanced")
    loss = TASK.loss(cfg, data, data.frame)
    expected = techniques.balanced_weights(data.frame["label_id"].to_numpy(), len(data.labels))
    assert loss.gamma == 1.5 and torch.equal(loss.weights, expected)
    assert TASK.loss(classifier()[0], data, data.frame) is None  # cross-entropy, unweighted: the model's own loss


def test_layerwise_decay_gives_each_layer_its_learning_rate(classifier):
    cfg, data, built, args = classifier("--layerwise_lr_decay", "0.5", "--weight_decay", "0.01")
    trainer = TASK.trainer(cfg, built, args, data.frame, None, [])
    techniques.install(cfg, trainer, [])
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(built.network.named_parameters())

    def lr(name):
        return lr_of[id(named[name])]

    # 2 encoder layers: the head and layer 1 at the base rate, layer 0 halved, embeddings quartered
    assert lr("classifier.weight") == (1e-3, 0.01)
    assert lr("bert.encoder.layer.1.attention.self.query.weight") == (1e-3, 0.01)
    assert lr("bert.encoder.layer.0.attention.self.query.weight") == (5e-4, 0.01)
    assert lr("bert.encoder.layer.0.attention.self.query.bias") == (5e-4, 0.0)  # biases are not decayed
    assert lr("bert.embeddings.word_embeddings.weight") == (2.5e-4, 0.01)
    assert lr("bert.embeddings.LayerNorm.weight") == (2.5e-4, 0.0)
    assert len(lr_of) == len(named)  # every parameter is in exactly one group
    trainer.train()  # the Trainer trains with this optimizer, its schedule scaling every group alike
    rates = {round(g["initial_lr"] / 1e-3, 6) for g in trainer.optimizer.param_groups}
    assert rates == {1.0, 0.5, 0.25} and trainer.optimizer is trainer.lr_scheduler.optimizer


class Snapshots(TrainerCallback):
    """The weights after every optimizer step and at every epoch end, recorded independently of the averages."""

    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epochs.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _train_with(classifier, *settings: str):
    cfg, data, built, args = classifier(*settings)
    initial = {n: p.detach().clone() for n, p in built.network.named_parameters()}
    snapshots = Snapshots()
    averages = techniques.averaging_callbacks(cfg, None)
    # the snapshots first: they record the weights each step leaves, which the averages then take in
    trainer = TASK.trainer(cfg, built, args, data.frame, None, [snapshots, *averages])
    techniques.install(cfg, trainer, averages)
    trainer.train()
    return built.network, initial, snapshots


def test_ema_final_model_is_the_exponential_average_of_every_step(classifier):
    network, initial, snapshots = _train_with(classifier, "--ema_decay", "0.9", "--epochs", "2")
    expected = dict(initial)
    for step in snapshots.steps:
        expected = {n: 0.9 * expected[n] + 0.1 * step[n] for n in expected}
    assert len(snapshots.steps) == 30  # 120 rows / 8 x 2 epochs
    for name, parameter in network.named_parameters():
        assert torch.allclose(parameter, expected[name], atol=1e-6), name
    assert not torch.equal(network.classifier.weight, snapshots.steps[-1]["classifier.weight"])


def test_swa_final_model_is_the_mean_of_the_last_epochs(classifier):
    network, _, snapshots = _train_with(classifier, "--swa_epochs", "2", "--epochs", "3")
    assert len(snapshots.epochs) == 3
    for name, parameter in network.named_parameters():
        mean = (snapshots.epochs[1][name] + snapshots.epochs[2][name]) / 2
        assert torch.allclose(parameter, mean, atol=1e-6), name


def test_layer_depths_of_other_architectures():
    from transformers import (
        AlbertConfig,
        AlbertForMaskedLM,
        BartConfig,
        BartForConditionalGeneration,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    from pipelines.errors import ConfigError

    t5 = techniques.layer_depths(T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=8, d_ff=16, num_layers=2, num_heads=1, d_kv=4)))
    # T5's depth is its block's, whichever sub-layer; the decoder is a stack of its own (tests/test_edges_training)
    assert t5["encoder.block.0.layer.0.SelfAttention.q.weight"] == 1
    assert t5["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == 1
    assert t5["encoder.block.1.layer.1.DenseReluDense.wi.weight"] == 0 and t5["shared.weight"] == 2
    assert t5["decoder.block.0.layer.0.SelfAttention.q.weight"] == 1
    bart = techniques.layer_depths(BartForConditionalGeneration(BartConfig(
        vocab_size=50, d_model=8, encoder_layers=2, decoder_layers=1, encoder_attention_heads=1,
        decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32)))
    assert (bart["model.encoder.layers.0.fc1.weight"], bart["model.encoder.layers.1.fc1.weight"],
            bart["model.encoder.embed_positions.weight"], bart["model.decoder.layers.0.fc1.weight"]) == (1, 0, 2, 0)
    distil = techniques.layer_depths(DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=8, n_layers=2, n_heads=1, hidden_dim=8)))
    assert (distil["distilbert.transformer.layer.0.ffn.lin1.weight"], distil["classifier.weight"],
            distil["distilbert.embeddings.word_embeddings.weight"]) == (1, 0, 2)
    albert = AlbertForMaskedLM(AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=8, num_attention_heads=1,
                                            intermediate_size=8))
    with pytest.raises(ConfigError, match="no numbered encoder layers.*pass layerwise_lr_decay=1"):
        techniques.layer_depths(albert)  # one layer shared by all depths: nothing to decay


def test_a_tied_embedding_named_after_the_lm_head_is_still_the_embedding():
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                                   num_attention_heads=1, intermediate_size=8))
    names = dict(model.named_parameters())
    assert "lm_head.decoder.weight" in names and "roberta.embeddings.word_embeddings.weight" not in names
    assert techniques.layer_depths(model)["lm_head.decoder.weight"] == 2  # the embeddings' depth: lowest rate
    ema = techniques.EMA(0.9, None)
    ema.start(model)
    saved = ema._under_every_name(model)  # what ema.pt holds: found by a classifier's name too (init_ema)
    assert saved["roberta.embeddings.word_embeddings.weight"] is saved["lm_head.decoder.weight"]
