"""The one top-level wrapper every entry point goes through: parse, log, run, exit with the right code."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from pipelines.errors import UserError
from pipelines.leases import new_owner
from pipelines.settings import Settings, parse_config
from pipelines.tracking import Interrupted, claim_launcher, install_signal_handlers

logger = logging.getLogger("pipelines")


def main(config_cls: type[Settings], stage: str, argv: list[str] | None = None) -> None:
    """Parse ``config_cls`` and call ``run`` of the module ``stage``, imported only once the launcher run (under
    ``mlflow run``) is claimed: importing transformers takes seconds, during which a kill would leave the
    launcher indistinguishable from a live one."""
    logging.basicConfig(level=os.environ.get("PIPELINES_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per shard download otherwise
    install_signal_handlers()
    try:
        claim_launcher(new_owner())
        cfg = parse_config(config_cls, argv)
        importlib.import_module(stage).run(cfg)
    except UserError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    except Interrupted as exc:
        logger.error("stopped: %s; continue later with resume=true", exc)
        sys.exit(128 + exc.signum)
