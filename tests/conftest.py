"""Shared pytest fixtures. Server machinery lives in tests/servers.py; only fixtures here."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import pytest
from aiohttp import web

if TYPE_CHECKING:
    from redfish_server import RedfishBmc
    from slurm import SlurmCluster

from gpusim import FakeClock
from processes import Processes
from servers import (
    BackgroundApp,
    BackgroundAppFactory,
    InfluxServer,
    PrometheusFactory,
    PrometheusServer,
    require_binary,
)

# ------------------------------------------------------------------------- hermetic
PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial PID namespace's inode (include/linux/proc_ns.h)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI=true the suite must run in a PID namespace of its own (scripts/test.sh
    does it), so that other users' processes on a shared machine cannot change results."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    own_ns = os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO
    if os.environ.get("WATTPRINT_TEST_PIDNS") != "1" or not own_ns:
        pytest.exit("CI=true: run the suite through ./scripts/test.sh, which gives it a PID namespace of its "
                    "own (unshare --pid --fork --mount-proc); it is not hermetic otherwise", returncode=3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI=true a skipped test is a failed test: CI runs as root with every server
    installed, so a skip there means something the suite relies on is missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a skip is a failure in CI): {reason}"


# ------------------------------------------------------------------------- servers
# influxd and prometheus start in well under a second here, so every test gets its own.
# A missing binary skips the test, or fails it under CI=true (see require_binary).


@pytest.fixture
def influxdb_server(tmp_path: Path) -> Iterator[InfluxServer]:
    """A started InfluxDB 1.x on a free loopback port, data in tmp_path; stopped afterwards."""
    server = InfluxServer(tmp_path / "influxdb", binary=require_binary("influxd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Call with ``(targets, metrics_path="/metrics")`` to get a started Prometheus
    scraping ``host:port`` targets every second; all are stopped afterwards."""
    binary = require_binary("prometheus")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], metrics_path: str = "/metrics") -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", targets, metrics_path, binary=binary)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def promtool() -> str:
    """Path of promtool (skip, or fail under CI=true, when missing)."""
    return require_binary("promtool")


@pytest.fixture
def background_app() -> Iterator[BackgroundAppFactory]:
    """Call with an aiohttp ``web.Application`` to serve it on a free loopback port from a
    thread; returns the started ``BackgroundApp`` (``.url``, ``.host_port``). Stopped afterwards."""
    started: list[BackgroundApp] = []

    def start(app: web.Application) -> BackgroundApp:
        server = BackgroundApp(app)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


# ------------------------------------------------------------------------- processes


@pytest.fixture
def labelled_process() -> Iterator[Processes]:
    """Call with a label to start a real sleeping process with ``WATTPRINT_JOB`` set, in
    its own session, with no other ``WATTPRINT_*`` / ``SLURM_*`` variable of the runner
    (tests/processes.py: ``variable=``, ``code=``, ``argv=``, ``env=``, ``uid=``,
    ``cgroup=``, ``new_session=``); ``labelled_process.end(p)`` kills one mid-test.
    Every one is killed (its whole group) afterwards."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="module")
def labelled_process_module() -> Iterator[Processes]:
    """``labelled_process`` for module-scoped fixtures: killed after the test module."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
def tag() -> str:
    """A per-test tag: every label a test sets carries it, and only those are looked at."""
    return uuid.uuid4().hex[:8]


# ------------------------------------------------------------------------- GPU simulators


@pytest.fixture
def clock() -> FakeClock:
    """A hand-moved clock at t = 1000 s for the NVML / amdsmi simulators (tests/gpusim.py)."""
    return FakeClock()


@pytest.fixture
def sim_path(tmp_path: Path) -> Path:
    """Where a test writes its GPU sim file (tests/gpusim.py ``write_sim``)."""
    return tmp_path / "gpus.json"


@pytest.fixture
def bmc() -> Iterator[RedfishBmc]:
    """A started Redfish test BMC (tests/redfish_server.py), stopped afterwards."""
    from redfish_server import RedfishBmc

    server = RedfishBmc().start()
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------- engine

STATIC_G_PER_KWH = 400.0  # make_engine's default intensity (the static provider)


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Call with ``sources=[...]`` and any other ``Engine`` keyword to get the real
    in-process Engine with, unless given: a store at ``tmp_path / store`` (``store=
    "s.sqlite3"``, ``bucket_s=60``, ``host="h"``; ``engine.ledger.path`` names it), a
    ``ProcessTracker(rescan_interval_s=0, max_labels_per_user=100_000)`` (every tick sees
    the processes as they are), a static ``IntensityBook`` at 400 g/kWh, a fresh
    ``HealthBoard`` and ``read_timeout_s=30.0`` (the tests drive a simulated clock: a
    loaded machine must not time reads out; pass ``read_timeout_s=None`` for the real
    deadline). Every engine is closed afterwards, once (``engine.close()`` in a test is
    fine: a closed engine is not closed again)."""
    from wattprint.daemon.carbon import IntensityBook
    from wattprint.daemon.config import GridConfig
    from wattprint.daemon.engine import Engine
    from wattprint.daemon.health import HealthBoard
    from wattprint.daemon.ledger import Ledger
    from wattprint.daemon.procs import ProcessTracker

    made: list[Any] = []

    def make(*, store: str = "s.sqlite3", bucket_s: int = 60, host: str = "h", **kw: Any) -> Engine:
        kw.setdefault("sources", [])
        if "ledger" not in kw:
            kw["ledger"] = Ledger(str(tmp_path / store), host=host, bucket_s=bucket_s)
        if "tracker" not in kw:
            kw["tracker"] = ProcessTracker(rescan_interval_s=0, max_labels_per_user=100_000)
        if "intensity" not in kw:
            kw["intensity"] = IntensityBook(GridConfig(), "static", "static", STATIC_G_PER_KWH)
        if "health" not in kw:
            kw["health"] = HealthBoard()
        kw.setdefault("read_timeout_s", 30.0)
        engine = Engine(**kw)
        close, closed = engine.close, []

        def close_once() -> None:  # a second close would wait on the stopped source threads
            if not closed:
                closed.append(True)
                close()

        engine.close = close_once  # type: ignore[method-assign]
        made.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in reversed(made):
            engine.close()


# ------------------------------------------------------------------------- Slurm


@pytest.fixture
def slurm_factory(tmp_path: Path) -> Iterator[Callable[..., "SlurmCluster"]]:
    """Call with ``(extra_conf="", accounting=False, env=None, **SlurmCluster keywords
    such as nodes=2, scheduler=...)`` to get a started
    one-node Slurm (tests/slurm.py: munged, slurmctld, slurmd as root from tmp_path;
    with ``accounting=True`` also MariaDB + slurmdbd). ``env``: more variables for
    slurmctld (its EpilogSlurmctld sees them). Everything is stopped afterwards; a
    missing binary skips, or fails under CI=true."""
    import shutil

    from slurm import Munge, SlurmAccounting, SlurmCluster, public_dir

    started: list[Any] = []
    root = public_dir()  # jobs of other users need its spool and munge socket (tmp_path is 0700)

    def start(extra_conf: str = "", accounting: bool = False, env: dict[str, str] | None = None,
              **cluster_kw: Any) -> SlurmCluster:
        base = root / f"slurm-{len(started)}"
        munge = Munge(base / "munge")
        munge.start()
        started.append(munge)
        acct = None
        if accounting:
            acct = SlurmAccounting(base / "acct", munge)
            started.append(acct)
            acct.start()
        cluster = SlurmCluster(base, extra_conf=extra_conf, accounting=acct, munge=munge, ctld_env=env, **cluster_kw)
        started.append(cluster)
        cluster.start()
        if acct is not None:
            acct.register(cluster)
        return cluster

    try:
        yield start
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(root, ignore_errors=True)
