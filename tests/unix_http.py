"""Test helper: HTTP GET over a Unix socket, as this process or as another user.

``unix_get`` speaks HTTP/1.1 over ``AF_UNIX`` with http.client. ``unix_get_as`` forks a
child that drops to ``uid``/``gid`` (no supplementary groups) before it connects, so
the daemon's ``SO_PEERCRED`` sees that user; the answers come back through a pipe.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import traceback
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def unix_get(path: str, target: str, headers: dict[str, str] | None = None,
             conn: UnixHTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of ``GET target`` over the socket at ``path``."""
    own = conn is None
    conn = conn or UnixHTTPConnection(path)
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        if own:
            conn.close()


def unix_get_json(path: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _headers, body = unix_get(path, target, headers)
    return status, json.loads(body)


def unix_get_as(uid: int, gid: int, path: str, targets: list[str],
                headers: dict[str, str] | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    """``unix_get`` of each target, from a forked child running as ``uid``:``gid``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, ask, report, exit without cleanup handlers
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            answers = []
            for target in targets:
                status, hdrs, body = unix_get(path, target, headers)
                answers.append([status, hdrs, body.decode("utf-8", "surrogateescape")])
            out = json.dumps({"ok": answers}).encode()
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()}).encode()
            code = 1
        try:
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(out)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    _pid, _status = os.waitpid(pid, 0)
    doc = json.loads(data)
    if "error" in doc:
        raise RuntimeError(f"child running as uid {uid} failed:\n{doc['error']}")
    return [(s, h, b.encode("utf-8", "surrogateescape")) for s, h, b in doc["ok"]]
