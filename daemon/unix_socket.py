"""The HTTP API's Unix socket (``[http] socket``): made with the right modes, a stale
socket file left by a crash replaced, one another daemon still listens on refused, and
removed at stop only if it is still the one this daemon made."""

from __future__ import annotations

import os
import socket
import stat

from aiohttp import web

from .startup import StartupError


class UnixSocket:
    """The API's Unix socket: ``[http] socket``, mode 0666 (any local user may connect;
    the daemon learns each caller's uid from the kernel), its parent directory made
    (0755) when missing. A stale socket file left by a crash is replaced; one that
    another process still listens on is not."""

    def __init__(self, path: str, site: web.UnixSite, ident: tuple[int, int]):
        self.path = path
        self.site = site
        self._ident = ident  # (st_dev, st_ino) of the socket file this daemon made

    @classmethod
    async def start(cls, runner: web.AppRunner, path: str) -> "UnixSocket":
        where = f"[http] socket {path}"
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > 107:
            raise StartupError(f"{where}: path longer than 107 bytes (the limit of a Unix socket address)")
        parent = os.path.dirname(path)
        try:
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
                os.chmod(parent, 0o755)  # whatever the umask: callers must reach the socket
        except OSError as exc:
            raise StartupError(f"{where}: cannot create {parent}: {exc.strerror or exc}") from None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StartupError(f"{where}: {exc.strerror or exc}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise StartupError(f"{where}: exists and is not a socket")
            if _socket_in_use(path):
                raise StartupError(f"{where}: another process is listening on it")
            try:
                os.unlink(path)  # stale, from a daemon that did not stop cleanly
            except OSError as exc:
                raise StartupError(f"{where}: cannot remove the stale socket: {exc.strerror or exc}") from None
        site = web.UnixSite(runner, path)
        try:
            await site.start()
            os.chmod(path, 0o666)
            st = os.stat(path)
        except OSError as exc:
            raise StartupError(f"{where}: {exc.strerror or exc}") from None
        return cls(path, site, (st.st_dev, st.st_ino))

    def remove(self) -> None:
        """Unlink the socket file, if it is still the one this daemon made."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass


def _socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
