"""structlog set-up: console rendering on a terminal, JSON lines in containers."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger


class ExceptionTally:
    """Counts the events logged with an exception. The service survives them (its status
    shows the count); the test suite fails on them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        if event.get("exc_info"):
            self.count += 1
        return event


EXCEPTIONS = ExceptionTally()  # one per process, like the logging configuration itself


def configure_logging(service: str, *, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once per process; every event carries `service`."""
    level_name = level.upper()
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
            EXCEPTIONS,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
