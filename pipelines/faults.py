"""Failpoints: let tests kill this process with a real SIGKILL at an exact instant.

``PIPELINES_FAILPOINT=checkpoint_upload:2`` kills the process the 2nd time it reaches
``failpoint("checkpoint_upload")``.  Unset (always, outside tests) it does nothing.
"""

import logging
import os
import signal
from collections import Counter

logger = logging.getLogger(__name__)
_hits: Counter = Counter()


def failpoint(name: str) -> None:
    spec = os.environ.get("PIPELINES_FAILPOINT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count or 1):
        logger.warning("failpoint %s reached (hit %d): killing this process with SIGKILL", name, _hits[name])
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
