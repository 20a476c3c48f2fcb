"""A logging filter that keeps secrets out of the daemon's log: passwords in URLs and
the configured secrets (tokens, passwords) are redacted from every record, its
traceback included."""

from __future__ import annotations

import logging

from .config import redact_text


class RedactingFilter(logging.Filter):
    """Redacts passwords in URLs and the configured secrets from every log record."""

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact_text(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True
