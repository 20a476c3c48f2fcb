"""The node source through IPMI: ipmitool against OpenIPMI's BMC simulator on loopback
(tests/bmc.py) with a power sensor whose value the test sets; the DCMI parser against
recorded replies of real BMCs (tests/fixtures/ipmi/PROVENANCE.md).

Truth: the watts the test wrote to the simulator's sensor, times the ticks' intervals.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bmc import SENSOR, IpmiSimBmc
from wattprint.daemon.config import load_config
from wattprint.daemon.sources.node import (
    BmcError,
    IpmiClient,
    NodeSource,
    open_node_source,
)
from wattprint.daemon.sources.node.ipmi import parse_dcmi_power, parse_sdr_power

FIXTURES = Path(__file__).parent / "fixtures" / "ipmi"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[IpmiSimBmc]:
    bmc = IpmiSimBmc(tmp_path / "bmc").start()
    try:
        yield bmc
    finally:
        bmc.stop()


def ipmi_client(sim: IpmiSimBmc, **kw: object) -> IpmiClient:
    args: dict[str, object] = {"port": sim.port, "sensor": SENSOR, "cipher_suite": 3, "timeout_s": 5.0}
    args.update(kw)
    return IpmiClient("127.0.0.1", sim.username, sim.password, **args)  # type: ignore[arg-type]


def test_reads_the_power_the_simulator_reports(sim: IpmiSimBmc) -> None:
    watts = sim.set_power(1000.0)
    src = NodeSource(ipmi_client(sim), "ipmi", start=False)
    src.poll_once()
    assert list(src.read(time.monotonic())) == []  # the baseline tick: no node figure of its own
    intervals: list[float] = []
    energy = 0.0
    for _ in range(5):
        time.sleep(0.05)
        (r,) = src.read(time.monotonic())
        assert (r.kind, r.device, r.source, r.name, r.power_w) == ("node", "node", "power", "ipmi", watts)
        intervals.append(r.interval_s)
        energy += r.energy_j
    assert energy == pytest.approx(watts * sum(intervals), rel=1e-9)
    watts = sim.set_power(437.0)  # the sensor has 10 W steps
    assert watts == 440.0
    src.poll_once()
    time.sleep(0.05)
    src.read(time.monotonic())  # the tick the new sample arrives in still books the held power
    time.sleep(0.05)
    (r,) = src.read(time.monotonic())
    assert r.power_w == 440.0 and r.energy_j == pytest.approx(440.0 * r.interval_s, rel=1e-9)
    assert src.problems() == [] and src.counters()["node_reads_total"] == 2


def test_node_config_reads_the_simulator_through_open_node_source(sim: IpmiSimBmc, tmp_path: Path) -> None:
    sim.set_power(1000.0)
    path = tmp_path / "wattprint.toml"
    path.write_text(sim.node_config_toml(poll_interval_s=0.5, timeout_s=0.5))
    cfg = load_config(path, env={})
    src = open_node_source(cfg.node)
    assert src is not None
    try:
        deadline = time.monotonic() + 10.0
        got: list = []
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
            got = list(src.read(time.monotonic()))
        assert got and got[0].power_w == 1000.0 and got[0].name == "ipmi"
    finally:
        src.close()


def test_password_never_in_argv_nor_in_logs(sim: IpmiSimBmc, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ipmitool child's /proc/<pid>/cmdline (read by a wrapper that then execs the
    real ipmitool) never holds the password; its environment does (-E)."""
    caplog.set_level(logging.DEBUG)
    sim.set_power(600.0)
    seen = tmp_path / "seen"
    seen.mkdir()
    wrapper = tmp_path / "ipmitool-wrapper"
    wrapper.write_text("#!/bin/sh\n"
                       f'cat /proc/$$/cmdline > "{seen}/cmdline.$$"\n'
                       f'tr "\\0" "\\n" < /proc/$$/environ > "{seen}/environ.$$"\n'
                       'exec ipmitool "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    src = NodeSource(ipmi_client(sim, ipmitool=str(wrapper)), "ipmi", start=False)
    src.poll_once()
    bad = NodeSource(ipmi_client(sim, ipmitool=str(wrapper)), "ipmi", start=False)
    bad._client._password = "wrong-" + sim.password  # type: ignore[attr-defined]
    bad.poll_once()
    src.read(time.monotonic())  # the baseline tick
    time.sleep(0.01)
    assert src.read(time.monotonic()) and src.problems() == []
    (problem,) = bad.problems()
    assert "username and password" in problem
    cmdlines = sorted(seen.glob("cmdline.*"))
    assert len(cmdlines) == 2
    for cmdline in cmdlines:
        argv = cmdline.read_bytes().split(b"\0")
        assert b"-E" in argv and b"-P" not in argv
        assert sim.password.encode() not in cmdline.read_bytes()
    environs = [p.read_text() for p in seen.glob("environ.*")]
    assert any(f"IPMI_PASSWORD={sim.password}" in e for e in environs)
    text = caplog.text + " ".join(bad.problems() + src.problems())
    assert sim.password not in text


def test_a_hung_ipmitool_is_killed_at_the_deadline(tmp_path: Path) -> None:
    hung = tmp_path / "ipmitool-hung"
    pidfile = tmp_path / "pid"
    hung.write_text(f'#!/bin/sh\necho $$ > "{pidfile}"\nexec sleep 60\n')
    hung.chmod(0o755)
    client = IpmiClient("127.0.0.1", "u", "pw", sensor=SENSOR, ipmitool=str(hung), timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(BmcError) as err:
        client.read()
    assert err.value.kind == "timeout" and "killed" in err.value.detail
    assert time.monotonic() - t0 < 3.0
    pid = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped


def test_dcmi_at_user_privilege_names_ipmi_privilege(sim: IpmiSimBmc) -> None:
    """ipmi_sim wants more than USER for the (unknown) DCMI command: the detail says which key to raise."""
    with pytest.raises(BmcError) as err:
        ipmi_client(sim, sensor="").read()
    assert err.value.kind == "auth" and "ipmi_privilege (now USER)" in err.value.detail


def test_missing_ipmitool_is_a_clear_error(tmp_path: Path) -> None:
    client = IpmiClient("127.0.0.1", "u", "pw", ipmitool=str(tmp_path / "no-such-ipmitool"), timeout_s=1.0)
    with pytest.raises(BmcError, match="install ipmitool"):
        client.read()


def test_dcmi_against_the_simulator_is_reported_missing(sim: IpmiSimBmc) -> None:
    """ipmi_sim has no DCMI: the source says so and names ipmi_sensor as the way out."""
    with pytest.raises(BmcError) as err:
        ipmi_client(sim, sensor="", privilege="ADMINISTRATOR").read()
    assert err.value.kind == "missing" and "ipmi_sensor" in err.value.detail


@pytest.mark.parametrize(("name", "watts"), [
    ("dcmi-activated-215w.txt", 215.0),
    ("dcmi-activated-197w.txt", 197.0),
    ("dcmi-openbmc-deactivated-319w.txt", 319.0),
    ("dcmi-joined-timestamp-186w.txt", 186.0),
])
def test_dcmi_recorded_replies(name: str, watts: float) -> None:
    assert parse_dcmi_power((FIXTURES / name).read_text()) == watts


def test_dcmi_deactivated_zero_is_no_measurement() -> None:
    with pytest.raises(BmcError) as err:
        parse_dcmi_power((FIXTURES / "dcmi-openbmc-deactivated-0w.txt").read_text())
    assert err.value.kind == "missing"


def test_sdr_reading_must_be_in_watts() -> None:
    assert parse_sdr_power(" Sensor Reading        : 570 (+/- 0) Watts\n", "P") == 570.0
    with pytest.raises(BmcError, match="not Watts"):
        parse_sdr_power(" Sensor Reading        : 12.06 (+/- 0.05) Volts\n", "P")
    with pytest.raises(BmcError, match="no reading"):
        parse_sdr_power(" Sensor Reading        : Disabled\n", "P")
