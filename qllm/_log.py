"""The package logger and a log-once helper (fallbacks are logged, once per distinct message)."""

from __future__ import annotations

import logging

log = logging.getLogger("qllm")
_seen: set[str] = set()


def log_once(level: int, msg: str) -> None:
    """Log ``msg`` at ``level`` the first time it is seen in this process."""
    if msg not in _seen:
        _seen.add(msg)
        log.log(level, msg)
