"""The fault matrix, the grid API (issue 7): a grid API that never answers degrades
``grid`` alone; the ticks, the energy and the rest go on. What every case checks:
tests/faults_common.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web
from faults_common import (
    Cadence,
    assert_conserved,
    assert_logged_once,
    assert_no_traceback,
    assert_part,
    degraded_parts,
    make_daemon,
    rate,
    wait_part,
)
from gpusim import gpu, proc, write_sim


def test_grid_api_hanging(tmp_path, labelled_process, tag, background_app):
    released = threading.Event()
    hits: list[float] = []

    async def dataset(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        while not released.is_set():
            await asyncio.sleep(0.05)
        return web.json_response({"total": 0, "records": []})

    app = web.Application()
    app.router.add_get("/dataset/{name}", dataset)
    server = background_app(app)
    job = labelled_process(f"grid-{tag}")
    sim = tmp_path / "sim.json"
    write_sim(sim, [gpu(0, power_w=90.0, processes=[proc(job.pid, sm_util=90)])])
    daemon = make_daemon(tmp_path, sim_file=sim, powercap_root=None,
                           extra_toml=f'[grid]\nprovider = "energidataservice"\nzone = "DK1"\n'
                                      f'base_url = "{server.url}"\n')
    try:
        daemon.start()
        started = time.monotonic()
        cadence = Cadence(daemon)
        while not hits and time.monotonic() - started < 10:
            time.sleep(0.1)
        assert hits, "the daemon never asked the grid API"
        m1 = daemon.metrics()
        wait_part(daemon, "grid", "degraded", timeout_s=14.0, contains="timeout")
        assert time.monotonic() - hits[0] <= 12.0  # the request gave up within its 10 s bound
        cadence.check()
        m2 = daemon.metrics()
        assert rate(m1, m2, "gpu", "gpu0") == pytest.approx(90.0, rel=0.03)
        assert_part(daemon, "grid", "degraded")
        assert degraded_parts(daemon) == {"grid"}
        assert_logged_once(daemon, "grid", recovered=False)
        assert_conserved(daemon)
        assert_no_traceback(daemon)
        released.set()
        assert daemon.stop() == 0
    finally:
        released.set()
        daemon.kill()

