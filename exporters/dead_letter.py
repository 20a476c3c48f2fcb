"""The InfluxDB sink's dead-letter file: lines InfluxDB rejected (400/422) or that are
too large even alone (413) are set aside here with the server's reason, in a bounded
file, so they can be fixed and replayed instead of being lost silently."""

from __future__ import annotations

import logging
import os
import time

from wattprint.daemon.timefmt import iso_z

from .influx_http import _one_line

log = logging.getLogger("wattprint.influx")

DEAD_LETTER_FILE = "dead-letter.lp"
DEFAULT_DEAD_LETTER_MAX_BYTES = 16 * 1024 * 1024


class DeadLetterFile:
    """Append-only file of rejected lines, each preceded by ``# <UTC time> <reason>``.

    When it would grow past ``max_bytes`` it is renamed to ``<name>.1`` (replacing the
    previous one) and a new file is started: at most about 2 x max_bytes on disk. The
    lines can be fixed and replayed as they are (``#`` lines are comments).
    """

    def __init__(self, path: str, max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lines_total = 0
        self._failing = False

    def add(self, line: str, reason: str) -> bool:
        """Append one line; False when the file cannot be written (logged once per
        failure spell; the caller counts the line as lost)."""
        stamp = iso_z(time.time())
        entry = f"# {stamp} {_one_line(reason, 1000)}\n{line}\n".encode("utf-8", "replace")
        try:
            try:
                size = os.path.getsize(self.path)
            except FileNotFoundError:
                size = 0
            if size > 0 and size + len(entry) > self.max_bytes:
                os.replace(self.path, self.path + ".1")
            with open(self.path, "ab") as fh:
                fh.write(entry)
            self.lines_total += 1
        except OSError as exc:
            if not self._failing:
                log.error("cannot write dead-letter file %s: %s", self.path, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("dead-letter file %s is writable again", self.path)
            self._failing = False
        return True
