"""Log set-up for the command line: text for people, or one JSON object per line for log pipelines.

Lines about a run carry its ids as fields (``flow``, ``run``, ``checkpoint``, ``attempt``), passed by the package's
log calls with ``extra=ids(...)``. Nothing secret is logged: urls are masked before they reach a message, and people's
answers are never part of one.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

FIELDS = ("flow", "run", "checkpoint", "attempt")


def ids(flow: str | None = None, run: str | None = None, checkpoint: str | None = None, attempt: int | None = None):
    """The ``extra`` of a log call about a run: its ids, as fields of a JSON line."""
    flow = None if flow is None else flow.partition("\x00")[0]  # a bucket's home (keys.flow_of): its flow id
    found = {"flow": flow, "run": run, "checkpoint": checkpoint, "attempt": attempt}
    return {name: value for name, value in found.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the run's ids, and a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send the root logger's records (and warnings) to stderr as ``text`` or ``json`` lines. Called before Dynamiq
    is imported, it also keeps Dynamiq's own ``basicConfig`` from adding a second format."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a log line too, in the same format
