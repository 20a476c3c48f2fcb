"""The node source through Redfish, against a real HTTP server serving the DMTF's
mockup (tests/redfish_server.py) whose power and energy counter the test controls.

Truth: the power the test sets, and the energy counter values the server itself
answered (``served_energy_j``, integrated on the server's clock from that power).
Most tests poll by hand (``start=False`` + ``poll_once()``) so that which counter value
was read when is known; the stall test runs the real polling thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from redfish_server import RedfishBmc
from wattprint.daemon.config import ConfigError, load_config
from wattprint.daemon.sources.node import (
    BmcError,
    NodeSource,
    RedfishClient,
    open_node_source,
)

TICK_S = 0.05


def client(bmc: RedfishBmc, **kw: object) -> RedfishClient:
    args: dict[str, object] = {"timeout_s": 2.0}
    args.update(kw)
    return RedfishClient(bmc.url, bmc.username, bmc.password, **args)  # type: ignore[arg-type]


class Clock:
    """``time.monotonic`` for a source polled by hand, remembering the last value it
    gave: the time the source stamped on the last sample it took."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self) -> float:
        self.last = time.monotonic()
        return self.last


class Ticks:
    """Drives ``read()`` like the engine: one call per tick, real monotonic time."""

    def __init__(self, src: NodeSource):
        self.src = src
        self.readings: list[list] = []
        self.read_at: list[float] = []
        self.max_read_s = 0.0

    def tick(self, n: int = 1, poll_every: int = 0) -> None:
        for i in range(n):
            time.sleep(TICK_S)
            if poll_every and i % poll_every == 0:
                self.src.poll_once()
            t0 = time.monotonic()
            got = list(self.src.read(t0))
            self.max_read_s = max(self.max_read_s, time.monotonic() - t0)
            self.readings.append(got)
            self.read_at.append(t0)

    def energy_j(self, since: int = 0) -> float:
        return sum(r.energy_j for got in self.readings[since:] for r in got)

    def after_last_value_j(self, clock: Clock, watts: float) -> float:
        """The energy since the last counter value was read, to the last tick: the
        power the test set x the time between them (the ticks book it in the span
        the next counter value closes, so their sum is the counter's last value plus
        this)."""
        return watts * max(0.0, self.read_at[-1] - clock.last)


# ----------------------------------------------------------------------- discovery


def test_discovers_sensors_power_and_energy_counter(bmc: RedfishBmc) -> None:
    bmc.set_power(1000.0)
    c = client(bmc)
    sample = c.read()
    assert c.plan is not None and c.plan.shape == "sensors"
    assert c.plan.power_uri.endswith("/Chassis/1U/Sensors/TotalPower")  # not CPU1Power nor PS1InputPower
    assert c.plan.energy_uri.endswith("/Chassis/1U/Sensors/TotalEnergy")  # not PS1Energy
    assert sample.power_w == 1000.0
    assert sample.energy_j == pytest.approx(bmc.served_energy_j[-1], abs=1e-3)  # kWh -> J
    src = NodeSource(c, "redfish", start=False)
    src.poll_once()
    assert list(src.read(time.monotonic())) == []  # the baseline: no figure of its own
    time.sleep(TICK_S)
    (r,) = src.read(time.monotonic())
    assert (r.kind, r.device, r.source, r.name, r.attributable) == ("node", "node", "counter", "redfish", True)
    assert r.energy_j == pytest.approx(1000.0 * r.interval_s, rel=1e-9)  # held power, no counter value since


def test_falls_back_to_legacy_power_without_sensors(bmc: RedfishBmc) -> None:
    bmc.shape = "power"
    bmc.set_power(640.0)
    c = client(bmc)
    src = NodeSource(c, "redfish", start=False)
    ticks = Ticks(src)
    ticks.tick(1, poll_every=1)  # baseline tick
    t0 = time.monotonic()
    ticks.tick(10)
    elapsed = sum(r.interval_s for got in ticks.readings[1:] for r in got)
    assert c.plan is not None and c.plan.shape == "power"
    assert all(r.source == "power" for got in ticks.readings for r in got)
    # Held power x the ticks' own intervals: 640 W over the time the test spent.
    assert ticks.energy_j(since=1) == pytest.approx(640.0 * elapsed, rel=1e-9)
    assert elapsed == pytest.approx(time.monotonic() - t0, abs=3 * TICK_S)
    assert not any("/Sensors" in path for _, path, status in bmc.requests if status == 200)


def test_falls_back_to_power_subsystem(bmc: RedfishBmc) -> None:
    bmc.shape = "powersubsystem"
    bmc.set_power(480.0)
    c = client(bmc)
    assert c.read().power_w == 480.0
    assert c.plan is not None and c.plan.shape == "powersubsystem"
    assert c.plan.psu_metrics == ("/redfish/v1/Chassis/1U/PowerSubsystem/PowerSupplies/Bay1/Metrics",)


def test_power_only_sensors_without_counter(bmc: RedfishBmc) -> None:
    bmc.energy_counter = False
    bmc.set_power(300.0)
    c = client(bmc)
    sample = c.read()
    assert c.plan is not None and c.plan.shape == "sensors" and c.plan.energy_uri == ""
    assert sample.energy_j is None and sample.power_w == 300.0


def test_unknown_chassis_is_a_clear_error(bmc: RedfishBmc) -> None:
    with pytest.raises(BmcError, match="chassis 'Blade7' is not among"):
        client(bmc, chassis="Blade7").read()
    assert client(bmc, chassis="1U").read().power_w == 0.0


def test_session_auth_logs_in_and_out(bmc: RedfishBmc) -> None:
    bmc.set_power(200.0)
    c = client(bmc, auth="session")
    assert c.read().power_w == 200.0
    assert len(bmc.sessions) == 1
    c.close()
    assert bmc.sessions == set()
    assert not any(path.endswith("/Sensors/TotalPower") and status == 401 for _, path, status in bmc.requests)


# ----------------------------------------------------------------------- counters win


def test_energy_over_ticks_equals_counter_difference(bmc: RedfishBmc) -> None:
    """Power steps up and down between BMC samples; the ticks' energy (held power +
    corrections) sums to the difference of the counter values the server answered."""
    bmc.set_power(600.0)
    clock = Clock()
    src = NodeSource(client(bmc), "redfish", start=False, clock=clock)
    ticks = Ticks(src)
    ticks.tick(1, poll_every=1)
    first = len(bmc.served_energy_j) - 1
    for watts in (1000.0, 300.0, 750.0):
        bmc.set_power(watts)
        ticks.tick(12, poll_every=6)
    src.poll_once()
    ticks.tick(1)  # the last counter value arrives: its correction is booked in this tick
    served = bmc.served_energy_j
    assert served[-1] - served[first] > 0
    expected = served[-1] - served[first] + ticks.after_last_value_j(clock, 750.0)
    assert ticks.energy_j() == pytest.approx(expected, abs=0.01 * 750.0)  # (10 ms: the HTTP answer's lag)
    assert all(r.energy_j >= 0 and r.source == "counter" for got in ticks.readings for r in got)
    # And the counter is the power the test set, integrated: about 600..1000 W x the time.
    elapsed = sum(r.interval_s for got in ticks.readings[1:] for r in got)
    assert 300.0 * elapsed * 0.9 < ticks.energy_j() < 1000.0 * elapsed * 1.1


def test_counter_without_power_sensor_books_its_rate(bmc: RedfishBmc, tmp_path: Path) -> None:
    """A BMC with an energy counter and no power sensor: the power is the counter's rate."""
    bmc.set_power(900.0)
    c = client(bmc)
    c.read()
    assert c.plan is not None
    c.plan = type(c.plan)(chassis="1U", shape="sensors", energy_uri=c.plan.energy_uri,
                          energy_j_per_unit=c.plan.energy_j_per_unit)  # as if TotalPower did not exist
    src = NodeSource(c, "redfish", start=False)
    ticks = Ticks(src)
    ticks.tick(1, poll_every=1)
    assert ticks.readings[-1] == []  # one counter value: no power yet
    ticks.tick(6, poll_every=3)
    readings = [r for got in ticks.readings for r in got]
    assert readings and readings[-1].power_w == pytest.approx(900.0, rel=0.05)


# ----------------------------------------------------------------------- failures


def test_stale_reading_is_not_booked_then_recovers(bmc: RedfishBmc) -> None:
    bmc.set_power(800.0)
    clock = Clock()
    src = NodeSource(client(bmc), "redfish", start=False, max_age_s=30.0, clock=clock)
    ticks = Ticks(src)
    ticks.tick(1, poll_every=1)
    first = len(bmc.served_energy_j) - 1  # the baseline
    ticks.tick(3, poll_every=2)
    assert src.problems() == []
    bmc.stale_s = 120.0  # the BMC's sensor stopped updating two minutes ago
    before = len(ticks.readings)
    ticks.tick(8, poll_every=2)
    assert all(got == [] for got in ticks.readings[before:])  # no node figure for the stale span
    assert src.counters()["node_stale_readings_total"] >= 3
    assert any("stale" in p and "max_age_s" in p for p in src.problems())
    bmc.stale_s = 0.0
    ticks.tick(1, poll_every=1)
    # Back: the counter did not go back, so this tick books its difference over the gap,
    # in one reading that covers the whole span since the last tick with a node figure.
    (back,) = ticks.readings[-1]
    assert back.energy_j > 0.0 and back.source == "counter"
    assert back.interval_s >= 9 * TICK_S  # the 8 dark ticks and its own
    assert src.problems() == []
    ticks.tick(10, poll_every=5)
    src.poll_once()
    ticks.tick(1)
    # Over the whole run the ticks sum to the counter's difference, the gap included.
    expected = bmc.served_energy_j[-1] - bmc.served_energy_j[first] + ticks.after_last_value_j(clock, 800.0)
    assert ticks.energy_j() == pytest.approx(expected, abs=0.01 * 800.0)


def test_counter_reset_is_counted_and_rebaselined(bmc: RedfishBmc) -> None:
    bmc.set_power(500.0)
    clock = Clock()
    src = NodeSource(client(bmc), "redfish", start=False, clock=clock)
    ticks = Ticks(src)
    ticks.tick(6, poll_every=3)
    bmc.reset_energy()
    ticks.tick(1, poll_every=1)
    assert src.counters()["node_counter_resets_total"] == 1
    assert any("reset" in p for p in src.problems())
    assert all(r.energy_j >= 0 for got in ticks.readings for r in got)
    # The reset tick booked held power only (500 W x its interval), not the counter's fall.
    (r,) = ticks.readings[-1]
    assert r.energy_j == pytest.approx(500.0 * r.interval_s, rel=1e-9)
    anchor = len(bmc.served_energy_j) - 1
    since = len(ticks.readings)
    ticks.tick(6, poll_every=3)
    assert src.problems() == []  # the next good step ends the episode
    src.poll_once()
    ticks.tick(1)
    expected = bmc.served_energy_j[-1] - bmc.served_energy_j[anchor] + ticks.after_last_value_j(clock, 500.0)
    assert ticks.energy_j(since=since) == pytest.approx(expected, abs=0.01 * 500.0)


def test_401_degrades_with_an_auth_message_and_stops_booking(bmc: RedfishBmc, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bmc.set_power(700.0)
    src = NodeSource(client(bmc), "redfish", start=False, poll_interval_s=0.2, max_age_s=0.5)
    ticks = Ticks(src)
    ticks.tick(2, poll_every=1)
    bmc.reject_auth = True
    ticks.tick(2, poll_every=1)
    (problem,) = src.problems()
    assert "HTTP 401" in problem and "username and password" in problem
    assert src.counters()["node_auth_errors_total"] >= 1
    time.sleep(0.6)  # past max_age_s: the held power is no longer trusted
    ticks.tick(2, poll_every=1)
    assert ticks.readings[-1] == []
    text = caplog.text + " ".join(src.problems())
    assert bmc.password not in text


def test_a_10s_stall_never_delays_read_and_totals_recover(bmc: RedfishBmc) -> None:
    """The real polling thread; the BMC answers nothing for 10 s. Every read() returns
    within milliseconds, the held power is booked through the stall, and after it the
    totals equal the counter's difference."""
    bmc.set_power(1000.0)
    clock = Clock()
    src = NodeSource(client(bmc, timeout_s=1.0), "redfish", poll_interval_s=1.0, max_age_s=30.0, clock=clock)
    ticks = Ticks(src)
    try:
        deadline = time.monotonic() + 5.0
        while not any(ticks.readings) and time.monotonic() < deadline:
            ticks.tick(1)
        assert any(ticks.readings), "no reading from the BMC within 5 s"
        start_idx = next(i for i, got in enumerate(ticks.readings) if got)
        bmc.stall_s = 10.0
        stall_end = time.monotonic() + 10.0
        while time.monotonic() < stall_end:
            ticks.tick(1)
        assert src.counters()["node_read_timeouts_total"] >= 2
        assert any("did not answer within timeout_s" in p for p in src.problems())
        assert all(got for got in ticks.readings[start_idx:])  # held power booked through the stall
        bmc.stall_s = 0.0
        deadline = time.monotonic() + 5.0
        while src.problems() and time.monotonic() < deadline:
            ticks.tick(1)
        assert src.problems() == []
    finally:
        src.close()
    assert ticks.max_read_s < 0.05, ticks.max_read_s  # lock + arithmetic; 50 ms leaves room for a loaded CI box
    # The baseline: the first value the thread read (served[0] is discovery's look at the sensor).
    first_served = bmc.served_energy_j[1]
    src.poll_once()  # (the thread has stopped: the clock's last value is this sample's)
    ticks.tick(1)
    expected = bmc.served_energy_j[-1] - first_served + ticks.after_last_value_j(clock, 1000.0)
    assert ticks.energy_j() == pytest.approx(expected, abs=0.01 * 1000.0)
    elapsed = sum(r.interval_s for got in ticks.readings[start_idx:] for r in got)
    assert ticks.energy_j() == pytest.approx(1000.0 * elapsed, rel=0.05)


# ----------------------------------------------------------------------- config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wattprint.toml"
    path.write_text(text)
    return path


def test_node_config_defaults_to_no_bmc() -> None:
    cfg = load_config(None, env={})
    assert cfg.node.source == "none" and cfg.node.remainder == "proportional"
    assert open_node_source(cfg.node) is None


@pytest.mark.parametrize(("text", "message"), [
    ('source = "redfish"\nusername = "u"\n', "[node] url: required"),
    ('source = "ipmi"\nusername = "u"\n', "[node] ipmi_host: required"),
    ('source = "ipmi"\nipmi_host = "-oProxyCommand=x"\nusername = "u"\n', "is not a host name"),
    ('source = "redfish"\nurl = "https://bmc"\n', "[node] username: required"),
    ('source = "redfish"\nurl = "https://u:hunter2@bmc"\nusername = "u"\n', "not in the URL"),
    ('source = "bmc"\n', "is not one of none, redfish, ipmi"),
    ('remainder = "spread"\n', "is not one of proportional, unattributed"),
    ('source = "redfish"\nurl = "https://bmc"\nusername = "u"\ntimeout_s = 9.0\n', "longer than poll_interval_s"),
    ('source = "redfish"\nurl = "https://bmc"\nusername = "u"\npassword_file = "/nonexistent/pw"\n',
     "[node] password_file: cannot read"),
    ('poll_interval_s = 0.0\n', "outside"),
])
def test_bad_node_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[node]\n" + text), env={})
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)


def test_node_password_and_password_file_are_secrets(tmp_path: Path) -> None:
    pw_file = tmp_path / "bmc.pw"
    pw_file.write_text("file-s3cret\n")
    cfg = load_config(write(tmp_path, f'[node]\nsource = "redfish"\nurl = "https://bmc"\nusername = "u"\n'
                                      f'password = "inline-s3cret"\npassword_file = "{pw_file}"\n'), env={})
    assert "inline-s3cret" in cfg.secrets() and "file-s3cret" in cfg.secrets()
    shown = str(cfg.to_dict())
    assert "inline-s3cret" not in shown and "file-s3cret" not in shown
    from wattprint.daemon.sources.node import node_password

    assert node_password(cfg.node) == "file-s3cret"  # the file wins


def test_build_engine_registers_the_node_source(bmc: RedfishBmc, tmp_path: Path) -> None:
    from wattprint.daemon.app import build_engine
    from wattprint.daemon.health import HealthBoard

    base = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[gpu]\nbackend = "none"\n[cpu]\nsource = "none"\n' \
           '[memory]\nsource = "none"\n'
    health = HealthBoard()
    engine = build_engine(load_config(write(tmp_path, base), env={}), health)
    try:
        node_health = health.get("node")
        assert node_health is not None and node_health.state == "disabled" and "no BMC" in node_health.detail
    finally:
        engine.close()
    health = HealthBoard()
    cfg = load_config(write(tmp_path, base + f'[node]\nsource = "redfish"\nurl = "{bmc.url}"\n'
                                             f'username = "{bmc.username}"\npassword = "{bmc.password}"\n'
                                             'poll_interval_s = 0.2\ntimeout_s = 0.2\n'), env={})
    engine = build_engine(cfg, health)
    try:
        nodes = [s for s in engine.sources if s.name == "node"]
        assert len(nodes) == 1 and isinstance(nodes[0], NodeSource)
        deadline = time.monotonic() + 5.0
        while nodes[0].counters()["node_reads_total"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nodes[0].counters()["node_reads_total"] >= 1
        feeds: dict[str, float] = {}
        for feed in engine.counter_feeds:
            feeds.update(feed())
        assert "node_reads_total" in feeds
    finally:
        engine.close()


def test_real_daemon_reads_the_bmc_and_keeps_the_password_out(bmc: RedfishBmc, tmp_path: Path) -> None:
    """The daemon with a [node] section: node health ok, the self-metrics on /metrics with
    their HELP text; with a wrong password node is degraded naming the credentials, and the
    password is in no log line, /healthz detail or check-config output."""
    import subprocess
    import sys

    from daemon_harness import DaemonProcess, scrape, wait_ticks

    bmc.set_power(800.0)
    node = (f'[node]\nsource = "redfish"\nurl = "{bmc.url}"\nusername = "{bmc.username}"\n'
            'poll_interval_s = 0.5\ntimeout_s = 0.5\n')
    (tmp_path / "good").mkdir()
    daemon = DaemonProcess(tmp_path / "good", sim_file=None, powercap_root=None, extra_toml=node,
                           env={"WATTPRINT_NODE_PASSWORD": bmc.password})
    daemon.start()
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            wait_ticks(daemon, 1)
            parts = {p["name"]: p for p in daemon.get("/healthz")["parts"]}
            if scrape(daemon).counter("wattprint_node_reads_total") >= 2 and parts["node"]["state"] == "ok":
                break
        assert parts["node"]["state"] == "ok", parts["node"]
        text = daemon.metrics_text()
        assert "# HELP wattprint_node_reads_total Successful reads" in text
        checked = subprocess.run([sys.executable, "-m", "wattprint.daemon", "check-config", "--config",
                                  str(daemon.config_path)], check=False, capture_output=True, text=True, timeout=60,
                                 env=daemon.env)
        assert checked.returncode == 0 and bmc.password not in checked.stdout + checked.stderr
    finally:
        daemon.stop()
    (tmp_path / "bad").mkdir()
    daemon = DaemonProcess(tmp_path / "bad", sim_file=None, powercap_root=None, extra_toml=node,
                           env={"WATTPRINT_NODE_PASSWORD": "wrong-" + bmc.password})
    daemon.start()
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            wait_ticks(daemon, 1)
            part = {p["name"]: p for p in daemon.get("/healthz")["parts"]}["node"]
            if part["state"] == "degraded":
                break
        assert part["state"] == "degraded" and "HTTP 401" in part["detail"] and "username" in part["detail"], part
        assert scrape(daemon).counter("wattprint_node_auth_errors_total") >= 1
    finally:
        daemon.stop()
    for log in (tmp_path / "good" / "daemon.log", tmp_path / "bad" / "daemon.log"):
        text = log.read_text()
        assert bmc.password not in text
    assert "node degraded" in (tmp_path / "bad" / "daemon.log").read_text()


def test_tls_is_verified_by_default(tmp_path: Path) -> None:
    """HTTPS BMC with a certificate from a private CA: refused by default (the message
    names ca_file), read with ca_file, and with verify_tls = false."""
    with RedfishBmc(tls_dir=tmp_path / "tls") as tls_bmc:
        assert tls_bmc.url.startswith("https://") and tls_bmc.ca_file is not None
        tls_bmc.set_power(350.0)
        with pytest.raises(BmcError) as err:
            client(tls_bmc).read()
        assert err.value.kind == "connect" and "ca_file" in err.value.detail
        assert not any(status == 200 for _, _, status in tls_bmc.requests)  # nothing sent in the clear
        assert client(tls_bmc, ca_file=str(tls_bmc.ca_file)).read().power_w == 350.0
        assert client(tls_bmc, verify_tls=False).read().power_w == 350.0


def test_implausible_counter_jump_is_counted_and_not_booked(bmc: RedfishBmc) -> None:
    bmc.set_power(500.0)
    clock = Clock()
    src = NodeSource(client(bmc), "redfish", start=False, clock=clock)
    ticks = Ticks(src)
    ticks.tick(4, poll_every=2)
    bmc.add_energy_j(3.6e9)  # 1 MWh in a few ms: no node draws that
    ticks.tick(1, poll_every=1)
    assert src.counters()["node_implausible_steps_total"] == 1
    assert any("jumped" in p for p in src.problems())
    (r,) = ticks.readings[-1]
    assert r.energy_j == pytest.approx(500.0 * r.interval_s, rel=1e-9)  # held power only, not the jump
