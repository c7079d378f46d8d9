"""Log lines of the long-running processes (``run``, ``worker``): structlog to stdout,
JSON or console, one event name per line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def configure_logging(level: str, fmt: str) -> None:
    """structlog to stdout (journald adds time and unit); JSON or console lines.

    Called again on SIGHUP: the renderer and level are rebuilt and stdout is
    re-resolved, which is what "reopen logs" means for a journald service.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str = "fsrecrypt.daemon") -> Any:
    """A process's logger (resolved per call site, so a reload's configuration applies)."""
    return structlog.get_logger(name)
