"""Logging of both processes: the level, and text or JSON lines.

Each request ends in one log line whose fields (session, status, tokens,
time to first token, duration) are passed as ``extra``. As text they are
also in the message (``key=value``); as JSON (``LOG_FORMAT=json``) each is a
key of the line's object, for log collectors.
"""

from __future__ import annotations

import logging
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_format: LogFormat) -> None:
    """One handler on the root logger, to stderr; replaces any set before."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
