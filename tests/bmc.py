"""A real IPMI BMC for tests: OpenIPMI's simulator (``ipmi_sim``, Debian ``openipmi``)
on a free loopback UDP port, read with Debian's ``ipmitool -I lanplus``.

``IpmiSimBmc(base_dir)`` writes into ``base_dir`` a ``lan.conf`` (one admin user, the
loopback port) and an emulator file that defines one BMC (0x20) with a power sensor,
"Pwr Consumption" (sensor 2, type Other, a full SDR whose unit is Watts, M = 10: one
raw step is 10 W, 0..2550 W). ipmi_sim polls the sensor's value from a file every
``POLL_MS``; ``set_power(w)`` writes it (rounded to 10 W: ``power_w`` is what the BMC
then reads) and waits until the simulator has picked it up.

ipmi_sim has no DCMI (``dcmi power reading`` answers "Invalid command"): the DCMI
parser is tested against recorded replies (tests/fixtures/ipmi/). Cipher suite 3 is
used: ipmi_sim does not answer "Get Channel Cipher Suites", and ipmitool 1.8.19 waits
for that query's retries (10 s) unless a suite is named with -C.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from servers import LOOPBACK, STOP_TIMEOUT_S, ServerError, _Process, require_binary

SENSOR = "Pwr Consumption"
SENSOR_NUMBER = 2
WATTS_PER_STEP = 10  # the SDR's M
POLL_MS = 200
CIPHER_SUITE = 3


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def power_sdr() -> list[int]:
    """The full sensor record (IPMI 2.0 table 43-1) of the power sensor."""
    name = SENSOR.encode()
    body = [
        0x20, 0x00, SENSOR_NUMBER,  # owner: the BMC, LUN 0, sensor number
        0x15, 0x01,  # entity: power management, instance 1
        0x67, 0x88,  # initialisation: scanning and events on; capabilities
        0x0B, 0x01,  # sensor type: other units-based; event/reading type: threshold
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  # assertion, deassertion, reading masks: none
        0x00,  # units 1: unsigned analog
        0x06,  # base unit: Watts
        0x00, 0x00,  # modifier unit, linearisation: linear
        WATTS_PER_STEP, 0x00,  # M = 10, tolerance
        0x00, 0x00, 0x00,  # B = 0, accuracy
        0x00,  # R and B exponents: 0
        0x01, 100, 0xFF, 0x00,  # analog flags (nominal given), nominal 1000 W, normal max, normal min
        0xFF, 0x00,  # sensor max, min
        0, 0, 0, 0, 0, 0,  # thresholds: none
        0, 0,  # hysteresis
        0, 0, 0,  # reserved, OEM
        0xC0 | len(name), *name,  # ID string: 8-bit ASCII
    ]
    return [0x00, 0x00, 0x51, 0x01, len(body), *body]


class IpmiSimBmc:
    """ipmi_sim with one power sensor, on 127.0.0.1:``port`` (UDP), in ``base_dir``."""

    def __init__(self, base_dir: Path, username: str = "wattprint", password: str = "ipmi-s3cret!") -> None:
        self.base_dir = Path(base_dir)
        self.username = username
        self.password = password
        self.port = 0
        self.power_w = 0.0
        self.value_file = self.base_dir / "power.value"
        self._proc: _Process | None = None

    def _write_config(self) -> tuple[Path, Path]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lan = self.base_dir / "lan.conf"
        lan.write_text(
            'name "wattprint-test-bmc"\n'
            "set_working_mc 0x20\n"
            "  startlan 1\n"
            f"    addr {LOOPBACK} {self.port}\n"
            "    priv_limit admin\n"
            "    allowed_auths_callback none md2 md5 straight\n"
            "    allowed_auths_user none md2 md5 straight\n"
            "    allowed_auths_operator none md2 md5 straight\n"
            "    allowed_auths_admin none md2 md5 straight\n"
            "    guid a123456789abcdefa123456789abcdef\n"
            "  endlan\n"
            f'  user 2 true "{self.username}" "{self.password}" admin 10 none md2 md5 straight\n'
        )
        sdr = " \\\n  ".join(" ".join(f"0x{b:02x}" for b in chunk)
                              for chunk in (power_sdr()[i:i + 16] for i in range(0, len(power_sdr()), 16)))
        emu = self.base_dir / "bmc.emu"
        emu.write_text(
            "mc_setbmc 0x20\n"
            "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n"
            "sel_enable 0x20 50 0x0a\n"
            f'sensor_add 0x20 0 {SENSOR_NUMBER} 0x0b 0x01 poll {POLL_MS} file "{self.value_file}"\n'
            f"main_sdr_add 0x20 \\\n  {sdr}\n"
            f"sensor_set_event_support 0x20 0 {SENSOR_NUMBER} enable scanning per-state "
            "000000000000000 000000000000000 000000000000000 000000000000000\n"
            "mc_enable 0x20\n"
        )
        return lan, emu

    def start(self, timeout: float = 15.0) -> IpmiSimBmc:
        binary = require_binary("ipmi_sim")
        require_binary("ipmitool")
        self.port = _free_udp_port()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._write_raw(0)
        lan, emu = self._write_config()
        state = self.base_dir / "state"
        state.mkdir(exist_ok=True)
        self._proc = _Process("ipmi_sim", [binary, "-c", str(lan), "-f", str(emu), "-s", str(state), "-n"],
                              self.base_dir / "ipmi_sim.log")
        self._proc.start()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self._proc.alive():
                raise ServerError(f"ipmi_sim exited at start:\n{self._proc.log_tail()}")
            result = self.ipmitool("sdr", "get", SENSOR)
            if result.returncode == 0 and "Watts" in result.stdout:
                return self
            last = (result.stdout + result.stderr).strip()[-300:]
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"ipmi_sim did not answer ipmitool within {timeout:.0f} s ({last})")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self) -> IpmiSimBmc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ipmitool(self, *args: str, password: str | None = None, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run ipmitool against the simulator (the password through IPMI_PASSWORD)."""
        env = dict(os.environ, IPMI_PASSWORD=self.password if password is None else password, LC_ALL="C")
        argv = ["ipmitool", "-I", "lanplus", "-C", str(CIPHER_SUITE), "-H", LOOPBACK, "-p", str(self.port),
                "-U", self.username, "-E", *args]
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)

    def _write_raw(self, raw: int) -> None:
        tmp = self.value_file.with_suffix(".tmp")
        tmp.write_text(f"{raw}\n")
        os.replace(tmp, self.value_file)

    def set_power(self, watts: float, wait_s: float = 10.0) -> float:
        """Make the sensor read ``watts`` (rounded to 10 W); wait until ipmi_sim has
        polled it. Returns the value the BMC now reads (also ``power_w``)."""
        raw = max(0, min(255, round(watts / WATTS_PER_STEP)))
        self._write_raw(raw)
        self.power_w = float(raw * WATTS_PER_STEP)
        deadline = time.monotonic() + wait_s
        want = f"Sensor Reading        : {raw * WATTS_PER_STEP} "
        while time.monotonic() < deadline:
            result = self.ipmitool("sdr", "get", SENSOR)
            if want in result.stdout:
                return self.power_w
            time.sleep(POLL_MS / 1000 / 2)
        raise ServerError(f"ipmi_sim did not pick up {self.power_w:g} W within {wait_s:g} s")

    def node_config_toml(self, **extra: object) -> str:
        """A ``[node]`` section that reads this BMC (password inline: tests only)."""
        lines = ["[node]", 'source = "ipmi"', f'ipmi_host = "{LOOPBACK}"', f"ipmi_port = {self.port}",
                 f'username = "{self.username}"', f'password = "{self.password}"', f'ipmi_sensor = "{SENSOR}"',
                 f"ipmi_cipher_suite = {CIPHER_SUITE}"]
        for key, value in extra.items():
            lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
        return "\n".join(lines) + "\n"


__all__ = ["SENSOR", "STOP_TIMEOUT_S", "IpmiSimBmc"]
