"""The task registry fits together (pipelines/settings.py wire_tasks), and a model folder's task is read from what
it is (pipelines/tasks/recorded.py)."""

from __future__ import annotations

import types

import pytest
from transformers import BartConfig

from pipelines import config
from pipelines.config import CommonTraining, PredictConfig, TrainConfig
from pipelines.errors import ConfigError
from pipelines.models import ModelSource
from pipelines.settings import wire_tasks
from pipelines.tasks.recorded import folder_task


def modules(**changes) -> dict:
    """The registered tasks' settings modules, with ``changes`` (task -> attributes) applied to copies."""
    out = dict(config.TASK_SETTINGS)
    for name, attributes in changes.items():
        out[name] = types.SimpleNamespace(**{**vars(out[name]), **attributes})
    return out


def test_the_registered_tasks_fit_together():
    wire_tasks(CommonTraining, config.TASK_SETTINGS)  # what config.py did at import: no error


@pytest.mark.parametrize("changes, refusal", [
    ({"classification": {"USES": ("max_length", "focal_gama")}}, "not shared"),
    ({"classification": {"USES": ("max_length", "loss", "class_weights", "label_smoothing", "eval_batch_size")}},
     "focal_gamma"),  # no task uses it any more: it would silently leave every fingerprint
])
def test_a_registry_that_would_drop_a_setting_is_refused(changes, refusal):
    try:
        with pytest.raises(TypeError, match=refusal):
            wire_tasks(CommonTraining, modules(**changes))
    finally:
        wire_tasks(CommonTraining, config.TASK_SETTINGS)


def test_a_setting_declared_by_two_tasks_is_refused():
    summarization = config.TASK_SETTINGS["summarization"]
    try:
        with pytest.raises(TypeError, match="declared by two tasks"):
            wire_tasks(CommonTraining, modules(mlm={"Training": summarization.Training}))
    finally:
        wire_tasks(CommonTraining, config.TASK_SETTINGS)
    assert TrainConfig(task="classification", focal_gamma=1.5, loss="focal").result_settings()["focal_gamma"] == 1.5


@pytest.mark.parametrize("architecture, task", [("BartForSequenceClassification", "classification"),
                                                ("BartForConditionalGeneration", "summarization")])
def test_a_folder_not_trained_here_is_the_task_its_architecture_does(tmp_path, architecture, task):
    # an encoder-decoder *classifier* is a classifier: read as a summarizer it would generate from a dropped head
    BartConfig(vocab_size=64, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
               decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
               architectures=[architecture]).save_pretrained(tmp_path)
    assert folder_task(ModelSource(str(tmp_path), str(tmp_path), "x")).name == task


def test_generation_overrides_are_compared_only_when_both_are_given():
    PredictConfig(model_uri="m", max_new_tokens=-1)  # as before: an override left to the model's generate() to refuse
    with pytest.raises(ConfigError, match="exceeds max_new_tokens"):
        PredictConfig(model_uri="m", max_new_tokens=4, min_new_tokens=8)
