"""Failpoints: let tests kill this process with a real SIGKILL at an exact instant, or make a trial raise.

``PIPELINES_FAILPOINT=checkpoint_upload:2`` kills the process the 2nd time it reaches
``failpoint("checkpoint_upload")``.  Unset (always, outside tests) it does nothing.

Before killing, a failpoint lets background work registered with :func:`settle_before_kill` (checkpoint
uploads) finish, unless it fires inside that work: a kill at ``train_step:16`` then lands after the
checkpoints saved before step 16 are committed, whatever the upload speed, and a kill during an upload
is the ``checkpoint_upload`` failpoint, inside it.
"""

import logging
import os
import signal
import threading
import weakref
from collections import Counter

logger = logging.getLogger(__name__)
_hits: Counter = Counter()
_background: weakref.WeakSet = weakref.WeakSet()


def settle_before_kill(thread: threading.Thread) -> None:
    _background.add(thread)


def failpoint(name: str) -> None:
    spec = os.environ.get("PIPELINES_FAILPOINT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count or 1):
        for thread in list(_background):
            if thread is not threading.current_thread():
                thread.join()
        logger.warning("failpoint %s reached (hit %d): killing this process with SIGKILL", name, _hits[name])
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def raise_if(params: dict) -> None:
    """``PIPELINES_RAISE_IF=batch_size=16`` (``name=value``, several joined by ``,``) raises RuntimeError when every
    named parameter, as text, equals its value: a trial that fails deterministically for one parameter value."""
    spec = os.environ.get("PIPELINES_RAISE_IF")
    if not spec:
        return
    parts = [part for part in spec.split(",") if part]
    if not all("=" in part for part in parts):
        raise ValueError(f"PIPELINES_RAISE_IF={spec!r}: expected name=value[,name=value...]")
    wanted = dict(part.split("=", 1) for part in parts)
    if all(name in params and str(params[name]) == value for name, value in wanted.items()):
        raise RuntimeError(f"PIPELINES_RAISE_IF={spec} matches the parameters {params}")
