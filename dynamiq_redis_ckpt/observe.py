"""A store operation wrapped with what the metrics need: its duration, and a save's outcome and sizes.

Only a backend with metrics on wraps its operations (a backend without them runs the bare operation: no cost). The
observer is duck-typed (:class:`dynamiq_redis_ckpt.metrics.StoreMetrics`), so this module never imports
prometheus-client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointTooLargeError,
    LeaseLostError,
    UnsupportedFormatError,
)

logger = logging.getLogger(__name__)
FENCING = ("taken_over", "vanished")  # LeaseLostError kinds where another holder's lease refused the write


def observed(observer: Any, operation: str, op, flow: str | None = None):
    """Run ``op`` (a store operation) as a store operation, reporting it to ``observer``."""
    started = time.perf_counter()
    outcome, result = "error", None
    try:
        result = yield from op
        outcome = "ok"
        return result
    except LeaseLostError as lost:  # fenced by another holder, or the lease was lost another way (Redis silent)
        outcome = "fenced" if lost.kind in FENCING else "lease_lost"
        raise
    except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt):  # the caller gave up: not a store error
        outcome = "canceled"
        raise
    except CheckpointTooLargeError:
        outcome = "too_large"
        raise
    except CheckpointNotFoundError:
        outcome = "not_found"
        raise
    except (CheckpointCorruptedError, UnsupportedFormatError):
        observer.damaged_found()
        raise
    finally:
        try:
            if outcome != "canceled":
                observer.call(operation, time.perf_counter() - started, flow)
            if operation == "save":
                sizes = (result.encoded_bytes, result.new_raw_bytes, result.new_stored_bytes) if outcome == "ok" else None
                observer.saved(outcome, flow, sizes)
        except Exception:  # a metric must never replace a save's result or its real error
            logger.exception("recording a metric failed")
