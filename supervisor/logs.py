"""structlog set-up: JSON lines in production, the console renderer on a TTY."""

import logging
import sys

import structlog


_debug = True  # structlog passes everything until configure() says otherwise


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once for the process."""
    global _debug
    _debug = logging.getLevelName(level.upper()) <= logging.DEBUG
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if json else structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**bound):
    """A logger with the given keys bound; lazy, so module-level loggers follow ``configure``."""
    return structlog.get_logger("corral", **bound)


def debug_enabled() -> bool:
    """Whether debug events pass the configured level (lets hot paths skip building them)."""
    return _debug
