"""`tapt` end to end through `mlflow run`: SIGKILLed mid-epoch and resumed to the identical weights and metrics,
then chained into `kfold` and `train` through runs:/ and models:/ URIs with the lineage tag."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from conftest import run_entrypoint, store_env
from helpers import client, metric_steps, mlflow_run, parents
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPORTED = ("eval_loss", "perplexity", "top1_accuracy", "top5_accuracy")


def tapt_args(data, model, **extra) -> dict:
    # 120 rows, 12 held out: 108 training rows, 14 steps of 8 per epoch, a checkpoint every 5 steps
    return {"experiment_name": "tapt", "data": data, "text_column": "text", "model": model, "epochs": 2,
            "max_length": 32, "mlm_probability": 0.15, "whole_word_mask": "true", "seed": 42, "batch_size": 8,
            "learning_rate": 2e-3, "save_steps": 5, **extra}


def results(metrics: dict[str, float]) -> dict[str, float]:
    """All but timings and the training-loss running means (over the logging window and the whole run), which a
    resumed Trainer restarts at its checkpoint's step."""
    return {k: v for k, v in metrics.items()
            if not any(t in k for t in ("runtime", "per_second")) and k not in ("loss", "train_loss")}


def model_tensors(env: dict, run_id: str, dst) -> dict[str, torch.Tensor]:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(dst))
    return load_file(f"{folder}/model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_data, tiny_model, tmp_path_factory):
    """An uninterrupted tapt run, registered as tiny-tapt@domain."""
    folder = tmp_path_factory.mktemp("tapt-reference")
    env = store_env(folder)
    done = mlflow_run(env, folder, "tapt", tapt_args(tiny_data, tiny_model, registered_model_name="tiny-tapt",
                                                      alias="domain"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = parents(env, "tapt", "tapt")
    return env, run, model_tensors(env, run.info.run_id, folder / "model")


def test_tapt_logs_metrics_before_and_after_and_registers_its_model(reference):
    env, run, _ = reference
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "tapt"
    metrics = run.data.metrics
    for name in REPORTED:
        assert name in metrics and f"base_{name.removeprefix('eval_')}" in metrics
    assert metrics["perplexity"] < metrics["base_perplexity"]  # two epochs on the domain text helped
    assert 0 <= metrics["top1_accuracy"] <= metrics["top5_accuracy"] <= 1
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["final_loss"]))  # all of the final model
    version = client(env).get_model_version_by_alias("tiny-tapt", "domain")
    assert version.run_id == run.info.run_id and run.data.tags["registered_model"] == f"tiny-tapt/{version.version}"
    assert {a.path for a in client(env).list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors",
                                                                                     "model/config.json"}
    assert not any(a.path.endswith("optimizer.pt") for a in client(env).list_artifacts(run.info.run_id, "model"))


def test_tapt_killed_mid_epoch_resumes_to_identical_weights_and_metrics(reference, tiny_data, tiny_model, tmp_path):
    ref_env, ref, ref_weights = reference
    env = store_env(tmp_path)
    killed = mlflow_run({**env, "PIPELINES_FAILPOINT": "train_step:19"}, tmp_path, "tapt",
                        tapt_args(tiny_data, tiny_model))
    assert killed.returncode != 0 and "failpoint train_step reached" in killed.stderr
    (run,) = parents(env, "tapt", "tapt")
    # mid-epoch: the Trainer skips the epoch's first batches and re-syncs its random state on the way
    assert run.info.status == "RUNNING" and run.data.tags["checkpoint"] == "checkpoints/checkpoint-15"

    resumed = mlflow_run(env, tmp_path, "tapt", tapt_args(tiny_data, tiny_model, resume="true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming tapt run {run.info.run_id}" in resumed.stderr
    assert "training starts at step 15 of 28" in resumed.stderr  # from the checkpoint, not from step 0
    (after,) = parents(env, "tapt", "tapt")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    weights = model_tensors(env, after.info.run_id, tmp_path / "model")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[name], ref_weights[name]) for name in weights)
    assert results(after.data.metrics) == results(ref.data.metrics) and set(REPORTED) <= set(results(ref.data.metrics))
    steps = metric_steps(env, after.info.run_id)
    assert steps["eval_loss"].count(0) == 1  # the base model's evaluation was not repeated by the resume
    assert all(len(s) == len(set(s)) for s in steps.values())


def test_tapt_model_feeds_kfold_and_train_with_lineage(reference, tiny_data, tmp_path):
    env, run, _ = reference
    env = {**env}
    tapt_id = run.info.run_id
    kfold = mlflow_run(env, tmp_path, "kfold", {"experiment_name": "downstream", "data": tiny_data,
                                                "model": f"runs:/{tapt_id}/model", "k_folds": 2, "epochs": 1,
                                                "max_length": 32, "batch_size": 8})
    assert kfold.returncode == 0, kfold.stderr[-3000:]
    (parent,) = parents(env, "downstream", "kfold")
    assert parent.data.tags["model_source_run_id"] == tapt_id
    assert parent.data.params["model"] == f"runs:/{tapt_id}/model"

    train = run_entrypoint("train", {"experiment_name": "downstream", "data": tiny_data,
                                     "model": "models:/tiny-tapt@domain", "epochs": 1, "max_length": 32}, env,
                           tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    (trained,) = parents(env, "downstream", "train")
    assert trained.data.tags["model_source_run_id"] == tapt_id
    # the same weights whichever way they were named: the same model digest in both fingerprints' inputs
    assert trained.data.params["model_digest"] == parent.data.params["model_digest"]

    # the masked-LM model itself predicts nothing: predict refuses it rather than bolting a random head on it
    refused = run_entrypoint("predict", {"experiment_name": "downstream", "data": tiny_data,
                                         "model_uri": f"runs:/{tapt_id}/model"}, env, tmp_path)
    assert refused.returncode == 2
    assert "is a masked-LM model" in refused.stderr and "Fine-tune it first" in refused.stderr


def test_tapt_refuses_a_model_without_masked_lm_form(tiny_data, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=1)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(folder)
    env = store_env(tmp_path)
    proc = run_entrypoint("tapt", tapt_args(tiny_data, folder), env, tmp_path)
    assert proc.returncode == 2
    assert "(gpt2) has no masked-LM form" in proc.stderr and "Pass an encoder checkpoint" in proc.stderr
