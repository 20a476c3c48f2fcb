"""The API on a Unix socket (``[http] socket``), for real: the daemon, a job owned by
root and a job owned by nobody (uid 65534, started with ``setpriv``), and clients that
connect as root and, from a forked child that dropped to uid 65534, as nobody.

- the socket is mode 0666 and its missing parent directory is made (0755);
- nobody sees only nobody's jobs: the list is filtered (also against ``user=`` and
  ``label=``), root's job answers 404 (job and series), its own job 200, all without
  the bearer token that TCP needs;
- root (uid 0) on the socket sees every job;
- /metrics and /healthz are what TCP serves, bearer token included;
- TCP keeps its behaviour: the token is needed and every job is listed;
- a socket another daemon listens on is not taken over (exit 1, a clear message); a
  stale socket file left by a crash is replaced, and removed at a clean stop.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon_harness import DaemonProcess
from gpusim import gpu, proc, write_sim
from own_jobs import ENV as OWN_JOBS_ENV, wait_for_pid_job
from processes import Processes
from unix_http import unix_get, unix_get_as, unix_get_json

pytestmark = pytest.mark.slow

NOBODY = 65534
TOKEN = "sock-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _require_root_and_setpriv() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: starts a process as uid 65534 and connects as it")
    path = shutil.which("setpriv")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("setpriv (util-linux) is missing")
        pytest.skip("setpriv (util-linux) is missing")
    return path


class TokenDaemon(DaemonProcess):
    """The harness daemon, sending the bearer token on its own TCP requests."""

    def get(self, path: str, allow_error: bool = False, headers: dict[str, str] | None = None) -> Any:
        return super().get(path, allow_error=allow_error, headers={**AUTH, **(headers or {})})

    def metrics_text(self) -> str:
        with urllib.request.urlopen(urllib.request.Request(self.url + "/metrics", headers=AUTH), timeout=10) as r:
            return r.read().decode()


class Setup:
    def __init__(self, daemon: TokenDaemon, sock: str, root_job: dict, nobody_job: dict) -> None:
        self.daemon = daemon
        self.sock = sock
        self.root_job = root_job
        self.nobody_job = nobody_job


def _public_tmpdir() -> Path:
    """A directory under /tmp that uid 65534 can reach (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="wp-sock-", dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, labelled_process_module: Processes) -> Iterator[Setup]:
    setpriv = _require_root_and_setpriv()
    tmp = tmp_path_factory.mktemp("unix-socket")
    base = _public_tmpdir()
    sock = str(base / "run" / "api.sock")  # run/ does not exist yet: the daemon makes it
    tag = secrets.token_hex(4)
    root_label, nobody_label = f"sock-root-{tag}", f"sock-nobody-{tag}"
    root_proc = labelled_process_module(root_label)
    nobody_proc = labelled_process_module(
        nobody_label, argv=[setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "600"])
    sim = tmp / "sim.json"
    write_sim(sim, [gpu(0, processes=[proc(root_proc.pid, sm_util=50), proc(nobody_proc.pid, sm_util=50)])])
    daemon = TokenDaemon(tmp, sim_file=sim, powercap_root=None,
                         env={"WATTPRINT_HTTP_SOCKET": sock, "WATTPRINT_HTTP_TOKEN": TOKEN,
                              "WATTPRINT_HTTP_RATE_LIMIT_PER_S": "0", **OWN_JOBS_ENV})
    try:
        try:
            daemon.start()
            root_job = wait_for_pid_job(daemon.get, root_proc.pid, log_tail=daemon.log_tail)
            nobody_job = wait_for_pid_job(daemon.get, nobody_proc.pid, log_tail=daemon.log_tail)
            assert (root_job["label"], nobody_job["label"]) == (root_label, nobody_label)
            assert root_job["uid"] == 0 and nobody_job["uid"] == NOBODY, (root_job, nobody_job)
            yield Setup(daemon, sock, root_job, nobody_job)
        finally:
            rc = daemon.stop()
            labelled_process_module.end(root_proc)
            labelled_process_module.end(nobody_proc)
        assert rc == 0, daemon.log_tail()
        assert not os.path.exists(sock), "the socket file stays after a clean stop"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def as_nobody(setup: Setup, *targets: str, headers: dict[str, str] | None = None) -> list[tuple[int, Any]]:
    answers = unix_get_as(NOBODY, NOBODY, setup.sock, list(targets), headers=headers)
    return [(status, body) for status, _h, body in answers]


def test_socket_is_world_connectable_and_its_directory_was_made(setup: Setup) -> None:
    st = os.stat(setup.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.dirname(setup.sock)).st_mode) == 0o755


def test_nobody_sees_only_its_own_jobs(setup: Setup) -> None:
    root_id, nobody_id = quote(setup.root_job["id"]), quote(setup.nobody_job["id"])
    answers = as_nobody(
        setup,
        "/api/v1/jobs?limit=10000",
        f"/api/v1/jobs/{root_id}",
        f"/api/v1/jobs/{root_id}/series",
        f"/api/v1/jobs/{nobody_id}",
        f"/api/v1/jobs/{nobody_id}/series",
        "/api/v1/jobs?user=root&limit=10000",
        "/api/v1/jobs?" + urllib.parse.urlencode({"label": setup.root_job["label"]}),
        "/api/v1/jobs?user=nobody&state=running&limit=10000",
    )
    (s_list, b_list), (s_root, b_root), (s_root_series, b_root_series), (s_own, b_own), (s_own_series, _), \
        (s_user_root, b_user_root), (s_label_root, b_label_root), (s_user_own, b_user_own) = answers
    assert s_list == 200, b_list
    jobs = json.loads(b_list)["jobs"]
    assert jobs and {j["uid"] for j in jobs} == {NOBODY}, jobs
    assert setup.nobody_job["id"] in {j["id"] for j in jobs}
    assert setup.root_job["id"] not in {j["id"] for j in jobs}
    # another user's job is "not there", exactly as an id that never existed
    assert (s_root, s_root_series) == (404, 404), (b_root, b_root_series)
    assert json.loads(b_root)["error"]["status"] == 404
    assert (s_own, s_own_series) == (200, 200), b_own
    assert json.loads(b_own)["uid"] == NOBODY
    assert s_user_root == 200 and json.loads(b_user_root)["count"] == 0
    assert s_label_root == 200 and json.loads(b_label_root)["count"] == 0
    assert s_user_own == 200 and setup.nobody_job["id"] in {j["id"] for j in json.loads(b_user_own)["jobs"]}


def test_unknown_id_and_foreign_id_answer_alike(setup: Setup) -> None:
    (s1, b1), (s2, b2) = as_nobody(setup, "/api/v1/jobs/" + quote(setup.root_job["id"]), "/api/v1/jobs/1-1")
    assert s1 == s2 == 404
    assert json.loads(b1)["error"]["message"].replace(setup.root_job["id"], "X") == \
        json.loads(b2)["error"]["message"].replace("1-1", "X")


def test_root_sees_every_job_on_the_socket(setup: Setup) -> None:
    status, body = unix_get_json(setup.sock, "/api/v1/jobs?limit=10000")
    assert status == 200
    ids = {j["id"] for j in body["jobs"]}
    assert {setup.root_job["id"], setup.nobody_job["id"]} <= ids
    for job in (setup.root_job, setup.nobody_job):
        assert unix_get_json(setup.sock, f"/api/v1/jobs/{quote(job['id'])}")[0] == 200


def test_metrics_and_healthz_are_as_over_tcp(setup: Setup) -> None:
    (s_metrics, b_metrics), (s_health, _), (s_metrics_tok, b_metrics_tok), (s_health_tok, b_health_tok), \
        (s_host, _), (s_spec, _) = as_nobody(setup, "/metrics", "/healthz") + \
        as_nobody(setup, "/metrics", "/healthz", headers=AUTH) + as_nobody(setup, "/api/v1/host", "/api/v1/openapi.json")
    assert (s_metrics, s_health) == (401, 401), b_metrics  # the token guards them on the socket too
    assert json.loads(b_metrics)["error"]["status"] == 401
    assert (s_metrics_tok, s_health_tok, s_host, s_spec) == (200, 200, 200, 200)
    text = b_metrics_tok.decode()
    for job in (setup.root_job, setup.nobody_job):  # unchanged: every job, as over TCP
        assert f'job_id="{job["id"]}"' in text
    tcp_health = setup.daemon.get("/healthz")
    assert set(json.loads(b_health_tok)) == set(tcp_health)
    # however the path is spelled
    assert [s for s, _b in as_nobody(setup, "/%6Detrics", "/metrics?x=1", "/healthz/")] == [401, 401, 404]


def test_tcp_keeps_its_token_and_shows_every_job(setup: Setup) -> None:
    status, body = setup.daemon.get_status("/api/v1/jobs")  # no token
    assert status == 401 and body["error"]["status"] == 401
    status, body = setup.daemon.get_status("/api/v1/jobs?limit=10000", headers=AUTH)
    assert status == 200
    assert {setup.root_job["id"], setup.nobody_job["id"]} <= {j["id"] for j in body["jobs"]}


def test_keep_alive_connection_keeps_its_identity(setup: Setup) -> None:
    from unix_http import UnixHTTPConnection

    conn = UnixHTTPConnection(setup.sock)
    try:
        for _ in range(3):
            status, _h, body = unix_get(setup.sock, "/api/v1/jobs?limit=10000", conn=conn)
            assert status == 200
            assert setup.nobody_job["id"] in {j["id"] for j in json.loads(body)["jobs"]}
    finally:
        conn.close()


def test_live_socket_is_not_taken_over(setup: Setup, tmp_path: Path) -> None:
    second = DaemonProcess(tmp_path, sim_file=None, powercap_root=None, env={"WATTPRINT_HTTP_SOCKET": setup.sock})
    with pytest.raises(RuntimeError, match="another process is listening"):
        second.start()
    assert second.proc is not None and second.proc.returncode == 1
    assert unix_get_json(setup.sock, "/api/v1/jobs")[0] == 200  # the first daemon still answers


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    base = _public_tmpdir()
    try:
        path = str(base / "api.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)  # bound, never listening, closed: what a crash leaves
        stale.close()
        daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None, env={"WATTPRINT_HTTP_SOCKET": path})
        daemon.start()
        try:
            status, body = unix_get_json(path, "/healthz")
            assert status == 200 and body["tick"] >= 1
        finally:
            assert daemon.stop() == 0
        assert not os.path.exists(path)
        not_a_socket = base / "file"
        not_a_socket.write_text("x")
        daemon = DaemonProcess(tmp_path, sim_file=None, powercap_root=None,
                               env={"WATTPRINT_HTTP_SOCKET": str(not_a_socket)})
        with pytest.raises(RuntimeError, match="exists and is not a socket"):
            daemon.start()
        assert not_a_socket.read_text() == "x"
    finally:
        shutil.rmtree(base, ignore_errors=True)
