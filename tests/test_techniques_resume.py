"""Training techniques through the `train` stage: EMA (with focal loss, balanced class weights and layer-wise
rates, chosen by a YAML variant) and SWA, SIGKILLed mid-epoch and resumed bit for bit; `init_from` against
`resume`."""

from __future__ import annotations

import signal

import mlflow
import pytest
import torch
from conftest import run_entrypoint, store_env
from helpers import artifact_text, client, parents
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
VARIANTS = """\
early_stopping_patience: 3
variants:
  ema: {ema_decay: 0.9, loss: focal, focal_gamma: 2.0, class_weights: balanced, layerwise_lr_decay: 0.8}
  swa: {swa_epochs: 2, early_stopping_patience: 0}
"""


def train_args(data, model, config_file, **extra) -> dict:
    # 90 training rows, 12 steps of 8 per epoch
    return {"data": data, "model": model, "epochs": 2, "batch_size": 8, "max_length": 32, "learning_rate": 1e-3,
            "seed": 3, "validation_fraction": 0.25, "experiment_name": "tech", "config_file": config_file, **extra}


def download(env: dict, run_id: str, path: str, dst) -> str:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


def weights(env: dict, run_id: str, dst) -> dict[str, torch.Tensor]:
    return load_file(f"{download(env, run_id, 'model', dst)}/model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_killed_and_resumed(tiny_data, tiny_model, folder, variant: str, kill_step: int, checkpoint: str, **extra):
    """Reference, SIGKILLed and resumed runs of ``variant``; the killed run's checkpoint downloaded to look at."""
    config = folder / "variants.yaml"
    config.write_text(VARIANTS)
    (folder / "ref").mkdir()
    ref_env, env = store_env(folder / "ref"), store_env(folder)
    args = train_args(tiny_data, tiny_model, config, variant=variant, **extra)
    done = run_entrypoint("train", args, ref_env, folder / "ref")
    assert done.returncode == 0, done.stderr[-3000:]
    (ref,) = parents(ref_env, "tech", "train")

    killed = run_entrypoint("train", args, {**env, "PIPELINES_FAILPOINT": f"train_step:{kill_step}"}, folder)
    assert killed.returncode == -signal.SIGKILL
    (run,) = parents(env, "tech", "train")
    assert run.data.tags["checkpoint"] == f"checkpoints/{checkpoint}"
    saved = download(env, run.info.run_id, f"checkpoints/{checkpoint}", folder / "killed")

    resumed = run_entrypoint("train", {**args, "resume": "true"}, env, folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(checkpoint.split("-")[1])
    assert f"training starts at step {step} of" in resumed.stderr
    (after,) = parents(env, "tech", "train")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert artifact_text(env, after.info.run_id, "predictions.csv", folder / "p1") == \
        artifact_text(ref_env, ref.info.run_id, "predictions.csv", folder / "p2")
    assert same(weights(env, after.info.run_id, folder / "w1"), weights(ref_env, ref.info.run_id, folder / "w2"))
    return env, after, saved


@pytest.fixture(scope="module")
def ema_runs(tiny_data, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    # checkpoints every 5 steps: the resume starts mid-epoch, from step 15
    return (*run_killed_and_resumed(tiny_data, tiny_model, folder, "ema", 17, "checkpoint-15", save_steps=5), folder)


def test_ema_focal_weighted_layerwise_run_resumes_bit_for_bit(ema_runs):
    env, run, saved, _ = ema_runs
    params, tags = run.data.params, run.data.tags
    assert tags["variant"] == "ema"  # the variant is a tag; its settings are the recorded params
    assert (params["ema_decay"], params["loss"], params["class_weights"], params["layerwise_lr_decay"]) == \
        ("0.9", "focal", "balanced", "0.8")
    ema = torch.load(f"{saved}/ema.pt", weights_only=True)
    raw = load_file(f"{saved}/model.safetensors")
    assert ema["count"] == 15  # one update per optimizer step
    assert not torch.equal(ema["average"]["classifier.weight"], raw["classifier.weight"])


def test_swa_run_resumes_bit_for_bit_and_checkpoints_its_average(tiny_data, tiny_model, tmp_path):
    # checkpoints every 6 steps: the one at an epoch's last step must already hold that epoch in its average
    env, run, saved = run_killed_and_resumed(tiny_data, tiny_model, tmp_path, "swa", 28, "checkpoint-24", epochs=3,
                                             save_steps=6)
    assert run.data.params["swa_epochs"] == "2" and run.data.params["epochs"] == "3"
    swa = torch.load(f"{saved}/swa.pt", weights_only=True)
    raw = load_file(f"{saved}/model.safetensors")
    # epoch 2 of 3 is the first averaged one: the average is that epoch's weights
    assert swa["count"] == 1
    assert all(torch.equal(swa["average"][name], raw[name]) for name in swa["average"])

    # init_epoch=continue from that end-of-epoch checkpoint: a new run at epoch 2 with a fresh optimizer whose
    # learning-rate schedule is where the source's was
    args = train_args(tiny_data, tiny_model, tmp_path / "variants.yaml", init_from=saved, init_epoch="continue",
                      epochs=3, early_stopping_patience=0, save_steps=4)
    continued = run_entrypoint("train", args, env, tmp_path)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "init_epoch=continue: training starts at epoch 2 (step 24)" in continued.stderr
    assert "training starts at step 24 of 36" in continued.stderr
    assert "path=checkpoints/checkpoint-28 " in continued.stderr  # this run's save_steps, not the source's
    (new,) = [r for r in parents(env, "tech", "train") if r.info.run_id != run.info.run_id]
    rate = {r.info.run_id: {m.step: m.value for m in client(env).get_metric_history(r.info.run_id, "learning_rate")}
            for r in (run, new)}
    assert rate[new.info.run_id][30] == pytest.approx(rate[run.info.run_id][30])


def test_init_from_starts_a_new_run_from_the_weights_where_resume_continues_the_run(ema_runs, tiny_data, tiny_model):
    env, source, saved, folder = ema_runs
    config = folder / "variants.yaml"
    # a finished unit run's id: its model's weights, a fresh optimizer, training from step 0, in a new run
    args = train_args(tiny_data, tiny_model, config, init_from=source.info.run_id, epochs=1, save_steps=5)
    killed = run_entrypoint("train", args, {**env, "PIPELINES_FAILPOINT": "train_step:8"}, folder)
    assert killed.returncode == -signal.SIGKILL
    assert f"init_from={source.info.run_id}: " in killed.stderr and "tensors loaded" in killed.stderr
    assert "training starts at step 0 of 12" in killed.stderr
    (new,) = [r for r in parents(env, "tech", "train") if r.info.run_id != source.info.run_id]
    assert new.data.tags["init_from"] == source.info.run_id

    # resume continues that run from its own checkpoint: the init_from weights are not loaded again
    resumed = run_entrypoint("train", {**args, "resume": "true"}, env, folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming train run {new.info.run_id}" in resumed.stderr
    assert "training starts at step 5 of 12" in resumed.stderr and "tensors loaded" not in resumed.stderr

    # a mid-epoch checkpoint's EMA weights: init_epoch=continue needs an epoch's end, restart starts at step 0
    args = train_args(tiny_data, tiny_model, config, init_from=saved, init_ema="true", init_epoch="continue")
    refused = run_entrypoint("train", args, env, folder)
    assert refused.returncode == 2 and "Pass init_epoch=restart" in refused.stderr
    restarted = run_entrypoint("train", {**args, "init_epoch": "restart", "epochs": 1}, env, folder)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "tensors loaded (EMA)" in restarted.stderr and "training starts at step 0 of 12" in restarted.stderr
    assert len(parents(env, "tech", "train")) == 3
