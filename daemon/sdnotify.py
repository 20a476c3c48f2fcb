"""A tiny sd_notify(3) client: tell systemd that the daemon is ready, alive or stopping.

No dependencies: one AF_UNIX datagram per message to the socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name written with a leading ``@``).
Without ``$NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``, or in a test)
every call is a no-op that returns False. A failure to send is logged at debug level
and returns False: notification must never take the daemon down.

Where the daemon calls it (deploy/systemd/wattprint.service has ``Type=notify`` and
``WatchdogSec=30``):

- ``ready()`` once the HTTP listener is bound and the first tick has completed;
- ``watchdog_ping()`` after every tick (the tick loop is what the watchdog guards: a
  tick stuck in a driver call stops the pings and systemd restarts the daemon);
- ``stopping()`` when SIGTERM/SIGINT arrives, before the final flush;
- ``status(text)`` for a one-line state shown by ``systemctl status``.

``watchdog_interval_s()`` says how often to ping: half of ``$WATCHDOG_USEC``, or None
when no watchdog is expected for this process (unset, or ``$WATCHDOG_PID`` names
another process). Pinging on every 1 s tick is well inside that; the interval matters
to a daemon whose ticks are slower than it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("wattprint.sdnotify")

__all__ = ["notify", "ready", "stopping", "watchdog_ping", "status", "watchdog_interval_s", "enabled"]


def _address(env: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or bytes with a leading NUL
    for the abstract namespace (``@name``). None when the value is unusable."""
    if not env:
        return None
    if env.startswith("@"):
        if len(env) < 2:
            return None
        return b"\0" + env[1:].encode("utf-8", "surrogateescape")
    if env.startswith("/"):
        return env
    return None  # vsock:… and relative paths are not supported here


def enabled() -> bool:
    """True when ``$NOTIFY_SOCKET`` names a socket this client can send to."""
    return _address(os.environ.get("NOTIFY_SOCKET", "")) is not None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, several assignments separated by newlines) to
    systemd. Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is
    unset or unusable, or sending failed."""
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    data = state.encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # never block the event loop for long on a full queue
            sock.connect(address)
            sent = sock.send(data)
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", state, os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return sent == len(data)


def ready(status_text: str | None = None) -> bool:
    """``READY=1`` (with an optional ``STATUS=``): startup is complete."""
    return notify(_with_status("READY=1", status_text))


def stopping(status_text: str | None = None) -> bool:
    """``STOPPING=1`` (with an optional ``STATUS=``): shutdown has begun."""
    return notify(_with_status("STOPPING=1", status_text))


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: the daemon is alive (send at least every ``watchdog_interval_s()``)."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """``STATUS=<text>``: a one-line description shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text))


def watchdog_interval_s() -> float | None:
    """How often to ping the watchdog, in seconds: half of ``$WATCHDOG_USEC``.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or
    ``$WATCHDOG_PID`` is set and is not this process's PID (as sd_watchdog_enabled(3)).
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _with_status(state: str, status_text: str | None) -> str:
    if status_text is None:
        return state
    return f"{state}\nSTATUS={_one_line(status_text)}"
