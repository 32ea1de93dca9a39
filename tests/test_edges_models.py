"""Model sources at the edges of a resume (issue 19 items 8 and 9): what a run starts from is what it resumes from.

In-process on a real SQLite store; the unit's training is replaced by a stand-in that records what it was given
(the first attempt dies, the resume finishes), so only the stage's model resolution and resume contract run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from pipelines.config import TrainConfig
from pipelines.models import ModelError, resolve_model
from pipelines.stages import common, train
from pipelines.tracking import Tracker
from pipelines.training import FitResult

FIRST, SECOND = "1" * 40, "2" * 40  # hub commits


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture
def units(monkeypatch):
    """Stand-in for training a unit: records ``ctx.model`` (and the init weights' bytes); dies the first time."""
    seen = []

    def fit_unit(ctx, run_id, train_rows, valid_rows, lease, **_):
        init = ctx.model.init
        seen.append({"path": ctx.model.path, "digest": init and init.digest,
                     "weights": init and (init.path / "model.safetensors").read_bytes()})
        if len(seen) == 1:
            raise RuntimeError("killed mid-training")
        return FitResult(metrics={name: 0.5 for name in ctx.task.metrics(ctx.cfg)}, predictions=None)

    monkeypatch.setattr(common, "fit_unit", fit_unit)
    return seen


def parent_run(experiment: str):
    with Tracker(experiment) as tracker:
        (run,) = tracker.parent_runs("train")
        return run


def test_init_from_resume_loads_the_snapshot_taken_at_start_not_the_source_that_moved_on(store, units, tiny_model,
                                                                                         tiny_data):
    """Item 8: a runs:/.../checkpoints/... source is snapshotted into the new run; the source then finishes and
    deletes its checkpoints, and the resume continues from the snapshot with the digest recorded at start."""
    checkpoint = store / "checkpoint-4"
    checkpoint.mkdir()
    shutil.copy(tiny_model / "model.safetensors", checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 1.0, "global_step": 4}))
    with Tracker("edges-source") as tracker:
        source = tracker.start_parent("train", "fp-source", {})
        tracker.upload(source, checkpoint, "checkpoints/checkpoint-4")
    cfg = dict(data=str(tiny_data), model=str(tiny_model), experiment_name="edges-init", epochs=2,
               init_from=f"runs:/{source}/checkpoints/checkpoint-4")
    with pytest.raises(RuntimeError, match="killed"):
        train.run(TrainConfig(**cfg))
    with Tracker("edges-source") as tracker:  # the source run goes on, finishes and clears its checkpoints
        tracker.delete_artifacts(source, "checkpoints")
        tracker.finish(source)

    train.run(TrainConfig(**cfg, resume=True))

    started, resumed = units
    assert resumed["digest"] == started["digest"]
    assert resumed["weights"] == (tiny_model / "model.safetensors").read_bytes()
    run = parent_run("edges-init")
    assert run.info.status == "FINISHED"
    assert run.data.tags["init_digest"] == started["digest"]
    assert run.data.tags["init_snapshot"] == "init_weights"


def add_snapshot(cache: Path, commit: str, model: Path) -> None:
    """A hub model in a Hugging Face cache as the hub client lays it out; ``refs/main`` now names ``commit``."""
    repo = cache / "models--org--tiny"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_model_is_pinned_to_its_commit_at_start_and_a_resume_loads_that_commit_or_refuses(
        store, units, tiny_model, tiny_data, monkeypatch):
    """Item 9: no hub is reachable; a new upstream commit (a second snapshot, refs/main moved) appears between
    start and resume: the resume still loads the first, and refuses, naming model and commit, when it is gone."""
    cache = store / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read when called
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    add_snapshot(cache, FIRST, tiny_model)
    cfg = dict(data=str(tiny_data), model="org/tiny", experiment_name="edges-hub", epochs=1)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(TrainConfig(**cfg))
    add_snapshot(cache, SECOND, tiny_model)  # upstream moved on

    pinned = cache / "models--org--tiny" / "snapshots" / FIRST
    pinned.rename(pinned.with_name("elsewhere"))
    with pytest.raises(ModelError, match=f"'org/tiny' is pinned to revision {FIRST}.*resume=false"):
        train.run(TrainConfig(**cfg, resume=True))
    pinned.with_name("elsewhere").rename(pinned)
    train.run(TrainConfig(**cfg, resume=True))

    assert [Path(unit["path"]).name for unit in units] == [FIRST, FIRST]
    run = parent_run("edges-hub")
    assert run.data.tags["model_revision"] == FIRST
    assert run.data.params["model_digest"] == f"org/tiny@{FIRST}"
    assert resolve_model("org/tiny", store / "models").revision == SECOND  # a new run pins the new commit
