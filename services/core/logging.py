"""structlog set-up: console rendering on a terminal, JSON lines in containers."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(service: str, *, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process; every event carries `service`."""
    level_name = (level or os.environ.get("EDGECOLLAB_LOG_LEVEL", "info")).upper()
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
