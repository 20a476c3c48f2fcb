"""What stops the daemon at start, and the state-directory check made before anything
opens files in it: ``StartupError`` (a message saying what to fix, and the exit code
that tells systemd whether restarting can help) and ``prepare_state_dir``."""

from __future__ import annotations

import errno
import os
import tempfile


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix. ``exit_code`` is 1 (a
    runtime failure: systemd restarts the unit) or 2 (only the configuration or the
    host's setup can fix it: the unit's RestartPreventExitStatus=2 stops there)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# A state_dir failing with one of these cannot get better by restarting (a path under
# a file, a read-only file system, no permission): exit 2, like a config error.
_STATE_DIR_CONFIG_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                                      errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


def prepare_state_dir(path: str) -> None:
    """Create ``path`` (0750) when missing and check that a file can be created in it.
    Raises StartupError with exit code 2 when that can never work (see above), 1 for
    other errors (a full disk, an I/O error)."""
    where = f"[daemon] state_dir {path}"
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as exc:
        code = 2 if exc.errno in _STATE_DIR_CONFIG_ERRNOS else 1
        raise StartupError(f"{where}: cannot create it: {exc.strerror or exc}", code) from None
    except ValueError as exc:  # a NUL in the path
        raise StartupError(f"{where}: {exc}", 2) from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".wattprint-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        code = 2 if exc.errno in _STATE_DIR_CONFIG_ERRNOS else 1
        raise StartupError(f"{where}: not writable: {exc.strerror or exc}", code) from None
