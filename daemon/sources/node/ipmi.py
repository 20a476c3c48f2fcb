"""An IPMI client that reads the node's input power from its BMC through ``ipmitool``.

Runs ``ipmitool -I lanplus -H <host> -p <port> -U <user> -E -L USER ...`` (``-E``: the password
comes from the environment variable ``IPMI_PASSWORD``, never from the command line,
where every user would see it in ``ps``), either

- ``dcmi power reading`` (``ipmi_sensor = ""``): the DCMI "Instantaneous power
  reading: N Watts", or
- ``sdr get <sensor>`` (``ipmi_sensor`` set): one SDR sensor whose reading must be in
  Watts ("Sensor Reading : N (+/- x) Watts").

IPMI has no energy counter here: the result is sampled power only. Each call has a
deadline (``timeout_s``); a call that runs past it is killed (its whole process group)
and reported as a timeout. Blocking; the node source calls it on its own thread.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

from .sample import BmcError, BmcSample

_DCMI_POWER = re.compile(r"^\s*Instantaneous power reading\s*:\s*(\d+(?:\.\d+)?)\s*Watts?\s*$", re.MULTILINE | re.IGNORECASE)
_DCMI_STATE = re.compile(r"^\s*Power reading state is\s*:[ \t]*(\w+)", re.MULTILINE | re.IGNORECASE)
_DCMI_FIGURE = re.compile(r"^\s*(?:Instantaneous|Minimum|Maximum|Average)[^:\n]*:\s*(\d+(?:\.\d+)?)\s*Watts?",
                          re.MULTILINE | re.IGNORECASE)
_SDR_READING = re.compile(r"^\s*Sensor Reading\s*:\s*(-?\d+(?:\.\d+)?)\s*(?:\(\+/-\s*[\d.]+\)\s*)?(.*?)\s*$",
                          re.MULTILINE | re.IGNORECASE)
_AUTH_FAILURES = ("unable to establish ipmi v2", "rakp", "unauthorized name", "invalid user name",
                  "password", "activate session")
MAX_OUTPUT_BYTES = 256 * 1024


def parse_dcmi_power(text: str) -> float:
    """The watts of ``ipmitool dcmi power reading``'s output. Raises BmcError when the
    reading is missing, or when the BMC says "deactivated" and every figure is 0 (no
    measurement). "Deactivated" alone is no verdict: OpenBMC reports real readings
    under it (tests/fixtures/ipmi/PROVENANCE.md)."""
    m = _DCMI_POWER.search(text)
    if m is None:
        raise BmcError("protocol", "no 'Instantaneous power reading: N Watts' in the output of "
                                   "ipmitool dcmi power reading")
    watts = float(m.group(1))
    state = _DCMI_STATE.search(text)
    figures = [float(f) for f in _DCMI_FIGURE.findall(text)]
    if state and state.group(1).lower() == "deactivated" and not any(figures):
        raise BmcError("missing", "the BMC's DCMI power reading is deactivated and reads 0 W: set [node] "
                                  "ipmi_sensor to a power sensor instead")
    return watts


def parse_sdr_power(text: str, sensor: str) -> float:
    """The watts of ``ipmitool sdr get <sensor>``'s output. Raises BmcError when the
    sensor has no reading (disabled, not available) or is not in Watts."""
    m = _SDR_READING.search(text)
    if m is None:
        raise BmcError("missing", f"IPMI sensor {sensor!r} has no reading (disabled or not available)")
    unit = m.group(2).strip()
    if unit.lower() not in ("watts", "watt", "w"):
        raise BmcError("protocol", f"IPMI sensor {sensor!r} reads in {unit[:40]!r}, not Watts: set [node] "
                                   "ipmi_sensor to the node's input power sensor")
    return float(m.group(1))


class IpmiClient:
    """Reads one node's input power with ipmitool (DCMI or an SDR power sensor)."""

    def __init__(self, host: str, username: str, password: str, *, port: int = 623,
                 interface: str = "lanplus", sensor: str = "", cipher_suite: int = -1, privilege: str = "USER",
                 ipmitool: str = "ipmitool", timeout_s: float = 4.0):
        self.sensor = sensor
        self.timeout_s = timeout_s
        self._password = password
        # -L USER by default: reading sensors needs no more, so a read-only BMC account works too.
        argv = [ipmitool, "-I", interface, "-H", host, "-p", str(port), "-U", username, "-E", "-L", privilege]
        if cipher_suite >= 0:
            argv += ["-C", str(cipher_suite)]
        argv += ["sdr", "get", sensor] if sensor else ["dcmi", "power", "reading"]
        self.argv: tuple[str, ...] = tuple(argv)  # never holds the password
        self.runs_total = 0
        self._running: subprocess.Popen[bytes] | None = None  # the ipmitool of a read in progress

    def read(self) -> BmcSample:
        """One power reading. Raises BmcError (``timeout`` after killing ipmitool)."""
        text = self._run()
        if self.sensor:
            return BmcSample(power_w=parse_sdr_power(text, self.sensor), where=f"IPMI sensor {self.sensor!r}")
        return BmcSample(power_w=parse_dcmi_power(text), where="IPMI DCMI power reading")

    def _run(self) -> str:
        env = {k: v for k, v in os.environ.items() if k != "IPMI_PASSWORD"}
        env["IPMI_PASSWORD"] = self._password
        env["LC_ALL"] = "C"  # ipmitool's messages in English, for the parser
        self.runs_total += 1
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise BmcError("connect", f"cannot run {self.argv[0]!r}: {exc.strerror or exc} (install ipmitool, "
                                      "or set [node] ipmitool)") from None
        self._running = proc
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise BmcError("timeout", f"ipmitool did not answer within timeout_s ({self.timeout_s:g} s); "
                                      "killed") from None
        finally:
            self._running = None
        text = out[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
        errors = err[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
        if proc.returncode != 0:
            low = (errors + text).lower()
            first = next((ln.strip() for ln in (errors + "\n" + text).splitlines() if ln.strip()), "")[:200]
            if "insufficient privilege" in low:
                raise BmcError("auth", "the BMC refused the command at this privilege level: raise [node] "
                                       f"ipmi_privilege (now {self.argv[self.argv.index('-L') + 1]}) ({first})")
            if any(s in low for s in _AUTH_FAILURES):
                raise BmcError("auth", "no IPMI session with the BMC (credentials refused?): check [node] username and "
                                       f"password (or password_file) and ipmi_cipher_suite ({first})")
            if "not found" in low and self.sensor:
                raise BmcError("missing", f"IPMI sensor {self.sensor!r} not found on the BMC")
            if "invalid command" in low and not self.sensor:
                raise BmcError("missing", "the BMC has no DCMI power reading (Invalid command): set [node] "
                                          "ipmi_sensor to a power sensor ('ipmitool sdr elist full' lists the sensors)")
            raise BmcError("http", f"ipmitool exited with status {proc.returncode}: {first}")
        return text


    def abort(self) -> None:
        """Kill an ipmitool still running (the daemon is stopping; any thread may call it)."""
        proc = self._running
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        """Nothing to release: each read is one ipmitool run."""
        self.abort()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill ipmitool (and anything it started) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass
