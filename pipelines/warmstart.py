"""``init_from``: fine-tune from the weights of an existing checkpoint, in a new run with a fresh optimizer.

Not ``resume`` (which continues the same run from its checkpoint with its optimizer, scheduler and random
states): ``init_from`` takes only weights (optionally the checkpoint's EMA weights), and with
``init_epoch=continue`` its epoch counter and learning-rate schedule position.

Sources: a Trainer checkpoint folder, a model folder, ``runs:/<run_id>/<path>``, or the id of a unit run
(its logged ``model/`` once finished, else its latest verified checkpoint).

A source moves on (a run saves newer checkpoints, deletes ``checkpoints/`` when it finishes, a folder is
overwritten), so the run it starts keeps its own copy: at its start the files the units load are snapshotted
into the run (``init_weights/``, tags ``init_digest`` and ``init_snapshot``), and a resume loads that snapshot
with the recorded digest, never the source again.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from pipelines import tracking
from pipelines.checkpoints import MANIFEST, TAG, verify
from pipelines.config import StageConfig
from pipelines.data import folder_digest
from pipelines.errors import ConfigError
from pipelines.techniques import EMA

logger = logging.getLogger(__name__)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class InitWeights:
    source: str  # as the user gave it
    path: Path  # local folder
    epoch: float | None  # epochs its Trainer state had trained (None: a model folder without one)
    digest: str  # of everything in the source folder (on a resume: as recorded at the run's start)


SNAPSHOT = "init_weights"  # artifact folder of a run's copy of its init_from weights
SNAPSHOT_TAG = "init_snapshot"
DIGEST_TAG = "init_digest"


def resolve_init(source: str, cache_dir: Path, ema: bool, epoch: str, snapshot: str = "",
                 digest: str = "") -> InitWeights:
    """Fetch and check ``init_from`` before any run is created; a resume passes the ``runs:/`` URI of its run's
    snapshot and the ``digest`` recorded at its start instead (the source is not read again)."""
    path = _download(snapshot, cache_dir) if snapshot else _fetch(source, cache_dir)
    if not any((path / name).is_file() for name in WEIGHTS):
        raise ConfigError(f"init_from={source}: {path} holds no weights ({' or '.join(WEIGHTS)}); pass a checkpoint "
                          "or model folder, runs:/<run_id>/<path> or a unit run id")
    if ema and not (path / EMA.FILE).is_file():
        raise ConfigError(f"init_ema=true but init_from={source} has no {EMA.FILE}: it was not trained with "
                          "ema_decay (or is a saved model, which already holds its EMA weights); pass init_ema=false")
    trained = _epoch(path)
    if epoch == "continue" and (trained is None or trained != int(trained)):
        raise ConfigError(f"init_epoch=continue needs a checkpoint saved at the end of an epoch; init_from={source} "
                          f"has {'no trainer state' if trained is None else f'epoch {trained}'}. Pass "
                          "init_epoch=restart, or a Trainer checkpoint folder")
    return InitWeights(source, path, trained, digest or folder_digest(path, recursive=True))


def keep_snapshot(tracker: tracking.Tracker, run_id: str, init: InitWeights) -> dict[str, str]:
    """Copy what the units load from ``init`` (weights, EMA weights, trainer state) into run ``run_id``; the
    tags to set once it is there (they mark the snapshot complete)."""
    names = [next(name for name in WEIGHTS if (init.path / name).is_file()), EMA.FILE, TRAINER_STATE_NAME]
    for name in (name for name in names if (init.path / name).is_file()):
        tracker.upload(run_id, init.path / name, SNAPSHOT)
    logger.info("init_from=%s: snapshot of its weights kept in run %s (%s/), digest %s", init.source, run_id,
                SNAPSHOT, init.digest)
    return {DIGEST_TAG: init.digest, SNAPSHOT_TAG: SNAPSHOT}


def _fetch(source: str, cache_dir: Path) -> Path:
    if source.startswith("runs:/"):
        return _download(source, cache_dir)
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve()
    if RUN_ID.match(source):
        return _from_run(source, cache_dir)
    raise ConfigError(f"init_from={source} is neither a folder, runs:/<run_id>/<path> nor a run id")


def _download(uri: str, cache_dir: Path) -> Path:
    try:
        return tracking.download_model(uri, cache_dir / "init")
    except FileNotFoundError as exc:
        raise ConfigError(f"init_from: {exc}") from None


def _from_run(run_id: str, cache_dir: Path) -> Path:
    """A unit run's model once it finished, else its latest verified checkpoint."""
    status, tags = tracking.run_state(run_id)
    if status == "FINISHED":
        try:
            return _download(f"runs:/{run_id}/model", cache_dir)
        except ConfigError:
            kind = tags.get("stage") or "an optuna trial or a stage's parent run"
            raise ConfigError(f"init_from={run_id}: the run is finished but keeps no model/ ({kind}); pass a train, "
                              "retrain or fold run, or runs:/<run_id>/<path> of a model folder") from None
    if not tags.get(TAG):
        raise ConfigError(f"init_from={run_id}: the run is {status} and has no checkpoint yet; pass a finished run "
                          "or one that has saved a checkpoint")
    local = _download(f"runs:/{run_id}/{tags[TAG]}", cache_dir)
    manifest = json.loads((local / MANIFEST).read_text()) if (local / MANIFEST).is_file() else {}
    problem = verify(local, manifest.get("fingerprint"))
    if problem:
        raise ConfigError(f"init_from={run_id}: its checkpoint {tags[TAG]} is unusable ({problem})")
    return local


def _epoch(path: Path) -> float | None:
    state = path / TRAINER_STATE_NAME
    return json.loads(state.read_text()).get("epoch") if state.is_file() else None


def load_weights(network: torch.nn.Module, init: InitWeights, ema: bool) -> None:
    """Copy ``init``'s weights (or EMA weights) into ``network``; names that match must have the same shapes, a
    head of another task (missing or extra names) is left as built."""
    if ema:
        weights = torch.load(init.path / EMA.FILE, map_location="cpu", weights_only=True)["average"]
    elif (init.path / WEIGHTS[0]).is_file():
        weights = load_file(str(init.path / WEIGHTS[0]))
    else:
        weights = torch.load(init.path / WEIGHTS[1], map_location="cpu", weights_only=True)
    own = network.state_dict()
    weights = _as_body(weights, own, getattr(network, "base_model_prefix", ""), init.source)
    wrong = [name for name, tensor in weights.items() if name in own and own[name].shape != tensor.shape]
    if wrong or not set(weights) & set(own):
        raise ConfigError(f"init_from={init.source} does not fit this model: "
                          f"{'shapes differ for ' + ', '.join(wrong[:5]) if wrong else 'no parameter name matches'}. "
                          "Pass a checkpoint of the same architecture as `model`")
    _check_body(network, weights, init.source)
    result = network.load_state_dict(weights, strict=False)
    logger.info("init_from=%s: %d tensors loaded%s; new (kept as built): %s; not used: %s", init.source,
                len(set(weights) & set(own)), " (EMA)" if ema else "", result.missing_keys[:8] or "none",
                result.unexpected_keys[:8] or "none")


def _as_body(weights: dict, own: dict, prefix: str, source: str) -> dict:
    """``weights`` as they are if a name matches; else with the first name part that makes the most names match
    renamed to this network's body prefix (e.g. a classifier's or masked LM's ``bert.`` as a multitask model's
    ``encoder.``, and back)."""
    if not prefix or set(weights) & set(own):
        return weights

    def renamed(first: str) -> dict:
        return {f"{prefix}{name[len(first):]}" if name.startswith(f"{first}.") else name: tensor
                for name, tensor in weights.items()}

    first = max(sorted({name.split(".", 1)[0] for name in weights}), key=lambda f: len(set(renamed(f)) & set(own)),
                default="")
    if not set(renamed(first)) & set(own):
        return weights
    logger.info("init_from=%s: its body %s.* loaded as this model's %s.*", source, first, prefix)
    return renamed(first)


def _check_body(network: torch.nn.Module, weights: dict, source: str) -> None:
    """The network's body (all under its ``base_model_prefix`` but the pooler, which masked-LM checkpoints lack)
    must come from ``weights``: a checkpoint of another architecture matching a few names is refused."""
    prefix = f"{getattr(network, 'base_model_prefix', '')}."
    own = network.state_dict()
    loaded = {own[name].data_ptr() for name in weights if name in own}  # a tied alias loads with its twin
    body = [name for name in own if name.startswith(prefix) and ".pooler." not in name]
    missing = [name for name in body if name not in weights and own[name].data_ptr() not in loaded]
    if body and len(missing) > 0.1 * len(body):
        raise ConfigError(f"init_from={source} holds only {len(body) - len(missing)} of the {len(body)} tensors of "
                          f"this model's body (missing e.g. {', '.join(missing[:3])}). Pass a checkpoint of the same "
                          "architecture as `model`")
    if missing:
        logger.warning("init_from=%s lacks %d body tensors, kept as built: %s", source, len(missing), missing[:8])


def continue_folder(trainer, init: InitWeights, cfg: StageConfig, dst: Path) -> tuple[Path, int]:
    """A checkpoint folder from which ``trainer.train`` starts at ``init``'s epoch: the loaded weights and a
    trainer state of this run (its batches per epoch, logging/evaluation/save steps and fresh callback states,
    e.g. early stopping's patience), with no optimizer, scheduler or random state (those stay fresh)."""
    epoch = int(init.epoch)
    if cfg.epochs <= epoch:
        raise ConfigError(f"init_epoch=continue: epochs={cfg.epochs} must exceed the {epoch} epoch(s) init_from has "
                          "trained (epochs counts them too)")
    per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / cfg.gradient_accumulation_steps), 1)
    shutil.rmtree(dst, ignore_errors=True)
    trainer.model.save_pretrained(dst)
    trainer.processing_class.save_pretrained(dst)
    state = TrainerState(epoch=float(epoch), global_step=epoch * per_epoch, max_steps=cfg.epochs * per_epoch,
                         num_train_epochs=cfg.epochs, train_batch_size=trainer._train_batch_size,
                         stateful_callbacks=dict(trainer.state.stateful_callbacks))
    state.compute_steps(trainer.args, state.max_steps)
    state.save_to_json(str(dst / TRAINER_STATE_NAME))
    logger.info("init_epoch=continue: training starts at epoch %d (step %d) with a fresh optimizer", epoch,
                epoch * per_epoch)
    return dst, epoch * per_epoch
