"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), against the real
daemon: a simulated GPU, real labelled processes (one with a hostile label), rate limit
off for this daemon.

- every operation, with schema-valid and schema-invalid input (schemathesis' positive
  and negative modes, plus its coverage phase: boundary values, missing and extra
  parameters, undeclared methods), answers without a 5xx, with a status, content type,
  headers and body the document declares (every built-in check of schemathesis:
  not_a_server_error, status_code_conformance, content_type_conformance,
  response_headers_conformance, response_schema_conformance, negative_data_rejection,
  positive_data_acceptance, unsupported_method (405 with Allow), ...);
- the document the daemon serves is the one fuzzed from;
- the hostile label comes back exactly (``label_raw``) and sanitised (``label``).

The one rule JSON Schema cannot state, `since` not after `until`, is the only case where
a schema-valid request may be refused (400, "since is after until"): for those requests
positive_data_acceptance alone is skipped, and the 400 is asserted instead.
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (pip install -e .[test])")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from daemon_harness import DaemonProcess  # noqa: E402
from gpusim import gpu, proc, write_sim  # noqa: E402
from own_jobs import ENV as OWN_JOBS_ENV, wait_for_pid_job  # noqa: E402
from processes import Processes  # noqa: E402
from wattprint.daemon.api import BadRequest, parse_time  # noqa: E402
from wattprint.daemon.openapi import openapi_spec  # noqa: E402
from wattprint.daemon.procs import sanitize_label  # noqa: E402

pytestmark = pytest.mark.slow

# Bounded so that the whole module stays well under a minute on 2 cores.
EXAMPLES_PER_OPERATION = int(os.environ.get("WATTPRINT_FUZZ_EXAMPLES", "120"))
FUZZ_LABEL = "fuzz-job"
HOSTILE_LABEL = 'fuzz "evil"\tlabel, x=1 {a="b"} \\ ünï 💡 #' + "y" * 40

schema = schemathesis.openapi.from_dict(openapi_spec())


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory,
                labelled_process_module: Processes) -> Iterator[DaemonProcess]:
    tmp: Path = tmp_path_factory.mktemp("api-fuzz")
    procs = [labelled_process_module(FUZZ_LABEL), labelled_process_module(HOSTILE_LABEL)]
    sim = tmp / "sim.json"
    write_sim(sim, [gpu(0, power_w=200.0, processes=[proc(procs[0].pid, sm_util=70), proc(procs[1].pid, sm_util=30)])])
    daemon = DaemonProcess(tmp, sim_file=sim, powercap_root=None,
                           env={"WATTPRINT_HTTP_RATE_LIMIT_PER_S": "0", **OWN_JOBS_ENV})
    try:
        daemon.start()
        for p in procs:
            wait_for_pid_job(daemon.get, p.pid, log_tail=daemon.log_tail)
        daemon.own_pids = [p.pid for p in procs]  # type: ignore[attr-defined]
        yield daemon
    finally:
        daemon.stop()
        for p in procs:
            labelled_process_module.end(p)
    log = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def _time(value: object) -> float | None:
    try:
        return parse_time("t", str(value))
    except BadRequest:
        return None


def _inverted_range(query: dict | None) -> bool:
    """since and until both given, both valid, and since after until."""
    if not query or "since" not in query or "until" not in query:
        return False
    since, until = _time(query["since"]), _time(query["until"])
    return since is not None and until is not None and since > until


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_openapi_document(case, fuzz_daemon: DaemonProcess) -> None:
    if _inverted_range(case.query):
        response = case.call_and_validate(base_url=fuzz_daemon.url, excluded_checks=[positive_data_acceptance])
        if case.method.upper() == "GET":
            assert response.status_code == 400, response.text
        return
    case.call_and_validate(base_url=fuzz_daemon.url)


def test_real_jobs_conform(fuzz_daemon: DaemonProcess) -> None:
    """The fuzzer cannot guess job ids: every job of the daemon, by id, through the same checks."""
    jobs = fuzz_daemon.get("/api/v1/jobs?limit=10000")["jobs"]
    assert {FUZZ_LABEL, sanitize_label(HOSTILE_LABEL)} <= {j["label"] for j in jobs}
    ours = [j for j in jobs if j["root_pid"] in fuzz_daemon.own_pids]
    assert len(ours) == 2
    for job in ours + [j for j in jobs if j not in ours][:20]:  # others' labelled processes may add many
        for path in ("/api/v1/jobs/{id}", "/api/v1/jobs/{id}/series"):
            case = schema[path]["GET"].Case(path_parameters={"id": job["id"]})
            response = case.call_and_validate(base_url=fuzz_daemon.url)
            assert response.status_code == 200, (path, job["id"], response.text)
    for query in ({"state": "running"}, {"label": FUZZ_LABEL}, {"since": "0", "until": "2100-01-01T00:00:00Z"}):
        case = schema["/api/v1/jobs"]["GET"].Case(query=query)
        assert case.call_and_validate(base_url=fuzz_daemon.url).json()["count"] >= 1, query


def test_served_document_is_the_fuzzed_one(fuzz_daemon: DaemonProcess) -> None:
    assert fuzz_daemon.get("/api/v1/openapi.json") == openapi_spec()


def test_hostile_label_comes_back_exactly(fuzz_daemon: DaemonProcess) -> None:
    jobs = fuzz_daemon.get("/api/v1/jobs?limit=10000")["jobs"]
    [job] = [j for j in jobs if j["root_pid"] == fuzz_daemon.own_pids[1] and j["state"] == "running"]
    assert job["label_raw"] == HOSTILE_LABEL
    assert job["label"] == sanitize_label(HOSTILE_LABEL)
    assert job["label_sanitised"] is True
    one = fuzz_daemon.get("/api/v1/jobs/" + urllib.parse.quote(job["id"], safe=""))
    assert one["label_raw"] == HOSTILE_LABEL
    # the sanitised label is what the filter matches
    query = urllib.parse.urlencode({"label": job["label"], "limit": 10000})
    assert job["id"] in {j["id"] for j in fuzz_daemon.get(f"/api/v1/jobs?{query}")["jobs"]}
    # and what /metrics shows
    assert any(dict(labels).get("label") == job["label"] and dict(labels).get("job_id") == job["id"]
               for (_name, labels) in fuzz_daemon.metrics())


def test_fuzzing_left_the_daemon_healthy(fuzz_daemon: DaemonProcess) -> None:
    status, health = fuzz_daemon.get_status("/healthz")
    assert status == 200 and health["status"] in ("ok", "degraded"), health
    assert math.isclose(health["last_tick_at"], time.time(), abs_tol=10)
