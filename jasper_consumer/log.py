"""Structured logs: one JSON object per line on stderr, secrets never included.

Every record may carry ``extra={"fields": {...}}``; those fields are merged into
the JSON object. Event outcomes are logged with :func:`outcome`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("jasper_consumer")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            data["exception"] = f"{type(exc).__name__}: {exc}"
            # Code lines and exception texts, never local values: no secret gets here.
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    """Send every log record of the process to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aio_pika").setLevel("WARNING")
    logging.getLogger("aiormq").setLevel("WARNING")
    logging.getLogger("aiohttp.access").setLevel("WARNING")


def outcome(**fields: Any) -> None:
    """One line per event outcome: event id, client id, type, command, outcome, error…"""
    level = logging.INFO if fields.get("outcome") == "succeeded" else logging.WARNING
    logger.log(level, "event %s", fields.get("outcome"), extra={"fields": fields})
