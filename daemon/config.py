"""Configuration: a TOML file plus ``WATTPRINT_<SECTION>_<KEY>`` overrides, validated
into frozen, typed objects.

Every problem is collected and reported at once, each naming the file (or the
environment variable), the key and what is wrong. The CLI turns ``ConfigError`` into
exit code 2. Defaults work unprivileged: the state directory is under the user's
state directory unless running as root.

The daemon's own sections are declared here; each sink's section is declared next to
the sink (``SinkSection``, exporters/sink.py) and listed by exporters/sinks.py: this
module parses those too, in ``Config.sinks`` (``cfg.influxdb`` for ``[influxdb]``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import urllib.parse
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, get_origin, get_type_hints

# The [influxdb] section is declared next to its sink; imported here for cfg.influxdb's
# callers (doctor, fleet) and old imports.
from wattprint.exporters.influx_config import InfluxConfig

if TYPE_CHECKING:
    from wattprint.exporters.sink import SinkSection

DEFAULT_CONFIG_PATH = Path("/etc/wattprint/wattprint.toml")
ENV_PREFIX = "WATTPRINT_"


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` lists each as a sentence."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/wattprint"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "wattprint")


@dataclass(frozen=True)
class DaemonConfig:
    interval_s: float = 1.0
    state_dir: str = field(default_factory=_default_state_dir)
    host: str = field(default_factory=socket.gethostname)
    bucket_s: int = 60  # width of ledger time buckets
    log_level: str = "info"
    retention_days: float = 400.0  # ledger buckets and finished jobs older than this are deleted


@dataclass(frozen=True)
class GpuConfig:
    backend: str = "auto"  # auto | nvml | amdsmi | sim | none
    sim_file: str = ""
    power_sample_hz: float = 10.0  # power sampling of boards without an energy counter; 0: once per tick
    reinit_interval_s: float = 300.0  # re-initialise NVML this often to find GPUs added since; 0: never
    retry_s: float = 30.0  # first retry of a failed NVML init or side query (then doubling)
    retry_max_s: float = 600.0  # longest wait between retries


@dataclass(frozen=True)
class CpuConfig:
    source: str = "auto"  # auto | rapl | estimate | none
    powercap_root: str = "/sys/class/powercap"
    tdp_w: float = 85.0  # rated package power used by the estimate (CodeCarbon's default)
    # A RAPL counter glitch episode ends (health ok again, one log line) only after this
    # long without another untrusted step, so a counter that glitches now and then is
    # one degraded episode, not a log line pair per glitch.
    glitch_hold_s: float = 60.0


@dataclass(frozen=True)
class MemoryConfig:
    source: str = "auto"  # auto | rapl | estimate | none
    w_per_gb: float = 0.375  # estimate: 3 W per 8 GB


@dataclass(frozen=True)
class JobsConfig:
    label_env: tuple[str, ...] = ("WATTPRINT_JOB", "SLURM_JOB_ID")
    rescan_interval_s: float = 30.0  # re-read every process at most this often
    finished_grace_s: float = 300.0  # finished jobs stay in /metrics this long
    idle_policy: str = "unattributed"  # unattributed | share: who gets idle CPU energy
    cgroup_kinds: tuple[str, ...] = ()  # any of slurm, systemd, container, in order
    cgroup_root: str = ""  # cgroup v2 mount; "" = detect
    max_labels_per_user: int = 32  # distinct live labels per user; more become "_overflow"
    label_cap_hold_s: float = 60.0  # a label-cap episode ends after this long below the cap
    max_finished_in_metrics: int = 200  # finished jobs kept in /metrics at most (newest ended first)


class DefaultNumber(float):
    """A default that nobody set: it is the number, but ``is_set`` tells it apart from
    the same number set in the file or the environment (those are plain floats)."""

    __slots__ = ()


def is_set(value: float) -> bool:
    """Whether a number came from the file, the environment or code, not a default."""
    return not isinstance(value, DefaultNumber)


@dataclass(frozen=True)
class GridConfig:
    provider: str = "static"  # energidataservice | carbonintensity_uk | electricitymaps | static
    zone: str = ""
    token: str = ""
    # IEA Global Energy & CO2 Status Report 2019: world average 475 gCO2/kWh. Set
    # explicitly, it wins over the shipped table for the static provider (grid/static.py).
    static_g_per_kwh: float = DefaultNumber(475.0)
    base_url: str = ""  # empty: the provider's public endpoint
    fetch_interval_s: float = 3600.0


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9877"
    token: str = ""
    socket: str = ""  # optional Unix socket; callers see only their own jobs (root: all)
    max_request_bytes: int = 65536
    rate_limit_per_s: float = 50.0  # requests per second per client (0 = unlimited)
    # Open connections (TCP and Unix socket together); also capped by the open-files limit.
    max_connections: int = 256
    max_connections_per_client: int = 32  # per peer address over TCP, per uid on the Unix socket
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed


@dataclass(frozen=True)
class AccountingConfig:
    pue: float = 1.0
    price_per_kwh: float = 0.0
    currency: str = "EUR"


@dataclass(frozen=True)
class NodeConfig:
    """The node's input power from its BMC (daemon/sources/node/); docs/configuration.md."""

    source: str = "none"  # none | redfish | ipmi
    url: str = ""  # redfish: the BMC's base URL, e.g. "https://bmc-node01"
    auth: str = "basic"  # redfish: basic | session (X-Auth-Token from SessionService)
    username: str = ""
    password: str = ""  # a secret: prefer password_file or WATTPRINT_NODE_PASSWORD
    password_file: str = ""  # a file holding the password (first line); wins over password
    ca_file: str = ""  # redfish: PEM bundle to verify the BMC's certificate; "" = system CAs
    verify_tls: bool = True  # redfish: false accepts any certificate (self-signed BMCs); not advised
    chassis: str = ""  # redfish: Chassis id to read; "" = the first chassis with power data
    ipmi_host: str = ""
    ipmi_port: int = 623
    ipmi_interface: str = "lanplus"  # lanplus | lan
    ipmi_sensor: str = ""  # "" = DCMI power reading; else an SDR sensor in Watts
    ipmi_cipher_suite: int = -1  # -1 = ipmitool's choice; e.g. 3 or 17
    ipmi_privilege: str = "USER"  # USER | OPERATOR | ADMINISTRATOR: ipmitool -L
    ipmitool: str = "ipmitool"  # the ipmitool program (a name on PATH or a path)
    poll_interval_s: float = 5.0  # one BMC read this often, on the source's own thread
    timeout_s: float = 4.0  # deadline of one BMC read (all its requests)
    max_age_s: float = 30.0  # older readings are stale: not booked
    remainder: str = "proportional"  # proportional | unattributed: who gets node - (gpu+cpu+dram)


def _shipped_factor(path: str) -> Callable[[], float]:
    """A default read from the shipped footprint data file (daemon/data/
    footprint_factors.json), marked as not set (``DefaultNumber``), so the data file's
    citation, not "config", is its source."""
    def default() -> float:
        from .footprint.factors import shipped_value

        return DefaultNumber(shipped_value(path))

    return default


@dataclass(frozen=True)
class FootprintConfig:
    """Lifecycle factors (issue 16; docs/carbon.md "Lifecycle footprint"). A key left
    unset uses the shipped data file's sourced value; a key set here wins and is
    reported with the source ``config: [footprint] <key>``."""

    service_life_years: float = field(default_factory=_shipped_factor("service_life"))
    # GPU model substring (matched as the data file's entries are) -> kgCO2e per board;
    # tried before the data file's models, longest match first.
    gpu_kgco2e: dict[str, float] = field(default_factory=dict)
    cpu_kgco2e_per_socket: float = field(default_factory=_shipped_factor("cpu"))
    dram_kgco2e_per_gb: float = field(default_factory=_shipped_factor("dram"))
    platform_kgco2e: float = field(default_factory=_shipped_factor("platform"))  # chassis, board, PSU, storage
    cpu_sockets: int = 0  # 0 = detect (distinct physical package ids), else 1
    dram_gb: float = 0.0  # 0 = detect (MemTotal)
    wue_l_per_kwh: float = field(default_factory=_shipped_factor("wue"))  # on-site water per kWh of IT energy
    # Off-site water of the electricity; unset: the [grid] zone's entry in the data file,
    # else the world default shown here.
    ewif_l_per_kwh: float = field(default_factory=_shipped_factor("ewif.default"))


@dataclass(frozen=True)
class MarketConfig:
    """Contractual instruments for market-based CO2e (GHG Protocol Scope 2 dual reporting)."""

    contract_share: float = 0.0  # 0..1 of the energy covered by a supplier contract or PPA
    contract_g_per_kwh: float = DefaultNumber(0.0)  # the contract's gCO2e/kWh; required when share > 0
    residual_g_per_kwh: float = DefaultNumber(0.0)  # residual mix for the rest; unset: location-based


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    # Each sink's section (exporters/sinks.py), by section name, in SINK_TYPES order.
    sinks: Mapping[str, Any] = field(default_factory=lambda: default_sink_sections())
    http: HttpConfig = field(default_factory=HttpConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    footprint: FootprintConfig = field(default_factory=FootprintConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    source_path: str = ""  # the file it was read from, "" for embedded defaults

    @property
    def influxdb(self) -> InfluxConfig:
        """The ``[influxdb]`` section (the InfluxDB sink's; doctor and fleet read it too)."""
        section: InfluxConfig = self.sinks["influxdb"]
        return section

    def sections(self) -> list[tuple[str, Any]]:
        """(name, section) for every section, the sinks' where ``sinks`` stands."""
        out: list[tuple[str, Any]] = []
        for f in fields(self):
            if f.name == "sinks":
                out.extend(self.sinks.items())
            elif f.name != "source_path":
                out.append((f.name, getattr(self, f.name)))
        return out

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, Any]]:
        """The effective config as plain data; secrets redacted unless asked."""
        out: dict[str, dict[str, Any]] = {}
        for name, value in self.sections():
            section = dataclasses.asdict(value)
            for key, value in section.items():
                if isinstance(value, tuple):
                    section[key] = list(value)
                if redact and key in _SECRET_KEYS and value:
                    section[key] = REDACTED
                elif redact and key.endswith("url") and isinstance(value, str):
                    section[key] = redact_url(value)
            out[name] = section
        return out

    def secrets(self) -> list[str]:
        """Every secret value set (tokens, passwords, passwords in URLs), for redaction."""
        found: list[str] = []
        for _name, section in self.sections():
            for key, value in dataclasses.asdict(section).items():
                if not isinstance(value, str) or not value:
                    continue
                if key in _SECRET_KEYS:
                    found.append(value)
                elif key.endswith("url"):
                    found.extend(_url_secrets(value))
        node_password = read_password_file(self.node.password_file) if self.node.password_file else ""
        if node_password:  # [node] password_file: its content is a secret too
            found.append(node_password)
        return found

    def listen_warning(self) -> str | None:
        """A warning when the API listens beyond loopback without a bearer token."""
        try:
            host, _port = parse_listen(self.http.listen)
        except ValueError:
            return None
        if self.http.token or is_loopback_host(host):
            return None
        return (f"[http] listen = {self.http.listen!r} is not a loopback address and [http] token is not set: "
                "anyone who can reach this port reads every job's user, command and energy; set [http] token "
                "or listen on 127.0.0.1")


def read_password_file(path: str) -> str:
    """The first line of a password file (``[node] password_file``), without its line
    end; "" when it cannot be read (``_cross_checks`` reports that at load time)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError, ValueError):
        return ""


_SECRET_KEYS = {"token", "password"}
REDACTED = "<redacted>"
# Query parameters whose value is a credential when they appear in a URL.
_SECRET_PARAMS = frozenset({"token", "password", "pass", "passwd", "pwd", "secret", "key", "api_key", "apikey",
                            "access_token", "auth", "authorization", "p", "u_p"})


def _url_secrets(url: str) -> list[str]:
    """The credential parts of a URL: the userinfo password and secret query values."""
    try:
        parts = urllib.parse.urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [v for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=False)
                  if k.lower() in _SECRET_PARAMS and v]
    except ValueError:
        return []
    return found


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo and secret query values replaced by
    ``<redacted>`` (``http://user:<redacted>@host:8086``). A URL that does not parse
    is redacted whole when it has an ``@``."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None or (":" in netloc.rpartition("@")[0]):
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{REDACTED}@{hostport}"
        query = parts.query
        if query:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in _SECRET_PARAMS and v for k, v in pairs):
                query = "&".join(f"{urllib.parse.quote(k)}=" + (REDACTED if k.lower() in _SECRET_PARAMS and v
                                                                  else urllib.parse.quote(v)) for k, v in pairs)
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return REDACTED if "@" in url else url


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*):(?P<pw>[^\s/@]*)@")


def redact_text(text: str, secrets: "list[str] | tuple[str, ...]" = ()) -> str:
    """``text`` with passwords in any ``scheme://user:password@`` URL and every given
    secret value (4 characters or longer) replaced by ``<redacted>``."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _secret_problem(value: Any, typ: Any) -> str:
    """Why a secret's value is wrong, without showing the value."""
    want = {str: "a string"}.get(typ, getattr(typ, "__name__", str(typ)))
    if isinstance(value, str) and "\x00" in value:
        return "contains a NUL character (value not shown: it is a secret)"
    return f"expected {want}, got {type(value).__name__} (value not shown: it is a secret)"

# Allowed values for enumerated keys.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("gpu", "backend"): ("auto", "nvml", "amdsmi", "sim", "none"),
    ("cpu", "source"): ("auto", "rapl", "estimate", "none"),
    ("memory", "source"): ("auto", "rapl", "estimate", "none"),
    ("grid", "provider"): ("energidataservice", "carbonintensity_uk", "electricitymaps", "static"),
    ("daemon", "log_level"): ("debug", "info", "warning", "error"),
    ("jobs", "idle_policy"): ("unattributed", "share"),
    ("node", "source"): ("none", "redfish", "ipmi"),
    ("node", "auth"): ("basic", "session"),
    ("node", "ipmi_interface"): ("lanplus", "lan"),
    ("node", "ipmi_privilege"): ("USER", "OPERATOR", "ADMINISTRATOR"),
    ("node", "remainder"): ("proportional", "unattributed"),
}

# (section, key) -> (minimum, maximum) inclusive, for numbers.
_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("daemon", "interval_s"): (0.05, 3600.0),
    ("daemon", "bucket_s"): (1, 86400),
    ("daemon", "retention_days"): (1.0, 36500.0),
    ("http", "max_request_bytes"): (1024, 16 * 1024 * 1024),
    ("http", "rate_limit_per_s"): (0.0, 100000.0),
    ("http", "max_connections"): (1, 1_000_000),
    ("http", "max_connections_per_client"): (1, 1_000_000),
    ("http", "header_timeout_s"): (0.1, 300.0),
    ("cpu", "tdp_w"): (0.0, 10000.0),
    ("cpu", "glitch_hold_s"): (0.0, 86400.0),
    ("gpu", "power_sample_hz"): (0.0, 100.0),
    ("gpu", "reinit_interval_s"): (0.0, 86400.0),
    ("gpu", "retry_s"): (0.1, 86400.0),
    ("gpu", "retry_max_s"): (0.1, 86400.0),
    ("memory", "w_per_gb"): (0.0, 100.0),
    ("jobs", "rescan_interval_s"): (0.0, 3600.0),
    ("jobs", "finished_grace_s"): (0.0, 30 * 86400.0),
    ("jobs", "max_labels_per_user"): (1, 100_000),
    ("jobs", "label_cap_hold_s"): (0.0, 86400.0),
    ("jobs", "max_finished_in_metrics"): (0, 100_000),
    ("grid", "static_g_per_kwh"): (0.0, 5000.0),
    ("grid", "fetch_interval_s"): (1.0, 86400.0),
    ("accounting", "pue"): (1.0, 5.0),
    ("accounting", "price_per_kwh"): (0.0, 1000.0),
    ("node", "ipmi_port"): (1, 65535),
    ("node", "ipmi_cipher_suite"): (-1, 255),
    ("node", "poll_interval_s"): (0.2, 3600.0),
    ("node", "timeout_s"): (0.1, 600.0),
    ("node", "max_age_s"): (1.0, 86400.0),
    # Lifecycle factors: never negative (docs/carbon.md); the upper bounds catch unit slips.
    ("footprint", "service_life_years"): (0.1, 100.0),
    ("footprint", "cpu_kgco2e_per_socket"): (0.0, 100_000.0),
    ("footprint", "dram_kgco2e_per_gb"): (0.0, 1000.0),
    ("footprint", "platform_kgco2e"): (0.0, 1_000_000.0),
    ("footprint", "cpu_sockets"): (0, 1024),
    ("footprint", "dram_gb"): (0.0, 1_000_000.0),
    ("footprint", "wue_l_per_kwh"): (0.0, 100.0),
    ("footprint", "ewif_l_per_kwh"): (0.0, 1000.0),
    ("market", "contract_share"): (0.0, 1.0),
    ("market", "contract_g_per_kwh"): (0.0, 5000.0),
    ("market", "residual_g_per_kwh"): (0.0, 5000.0),
}
# [footprint] gpu_kgco2e: kgCO2e per GPU board, each value within this range.
GPU_KGCO2E_RANGE = (0.0, 100_000.0)


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _coerce(value: Any, typ: Any, from_env: bool) -> Any:
    """Convert ``value`` to ``typ`` or raise ValueError with a short reason."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"expected true or false, got {_shown(value)}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_shown(value)}")
        if isinstance(value, int):
            return value
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {_shown(value)}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_shown(value)}")
        if isinstance(value, (int, float)):
            try:
                v = float(value)
            except OverflowError:
                raise ValueError(f"expected a finite number, got an integer of {value.bit_length()} bits") from None
        elif from_env and isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {_shown(value)}") from None
        else:
            raise ValueError(f"expected a number, got {_shown(value)}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {_shown(value)}")
        return v
    if typ is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("contains a NUL character")
            return value
        raise ValueError(f"expected a string, got {type(value).__name__} {_shown(value)}")
    if get_origin(typ) is dict:
        return _coerce_table(value, from_env)
    if get_origin(typ) is tuple:
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {_shown(value)}")
        return tuple(value)
    raise ValueError(f"unsupported type {typ}")  # pragma: no cover - programming error


def _coerce_table(value: Any, from_env: bool) -> dict[str, float]:
    """A table of name -> number (``[footprint] gpu_kgco2e``): a TOML table, or from the
    environment ``NAME=NUMBER,NAME=NUMBER``. Raises ValueError with a short reason."""
    if from_env and isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in (p for p in value.split(",") if p.strip()):
            name, sep, number = item.partition("=")
            if not sep:
                raise ValueError(f"expected NAME=NUMBER pairs separated by ',', got {_shown(item.strip())}")
            pairs[name.strip()] = number.strip()
        value = pairs
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of name = number, got {type(value).__name__} {_shown(value)}")
    out: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            raise ValueError(f"{_shown(name)}: expected a non-empty name")
        try:
            out[name.strip()] = _coerce(number, float, from_env)
        except ValueError as exc:
            raise ValueError(f"{_shown(name)}: {exc}") from None
    return out


def _sink_sections() -> list[SinkSection[Any]]:
    """The sections the sink list owns (exporters/sinks.py ``SINK_TYPES``), in its order.
    Imported here, not at the top: the sinks import the daemon's modules."""
    from wattprint.exporters.sinks import SINK_TYPES

    return [t.section for t in SINK_TYPES]


def default_sink_sections() -> Mapping[str, Any]:
    """Every sink's section with its defaults (``Config()`` without a file)."""
    return MappingProxyType({s.name: s.config_type() for s in _sink_sections()})


def section_types() -> dict[str, type]:
    """Every config section's name and dataclass in file order: the daemon's own and,
    where ``Config.sinks`` stands, each sink's (declared next to the sink)."""
    hints = get_type_hints(Config)
    out: dict[str, type] = {}
    for f in fields(Config):
        if f.name == "sinks":
            for sink in _sink_sections():
                if sink.name in out or sink.name in hints:
                    raise RuntimeError(f"sink section [{sink.name}] collides with another section")
                out[sink.name] = sink.config_type
        elif f.name != "source_path":
            out[f.name] = hints[f.name]
    return out


def choices(section: str, key: str) -> tuple[str, ...] | None:
    """The allowed values of an enumerated key, None for a free one."""
    found = _CHOICES.get((section, key))
    if found is None:
        sink = next((s for s in _sink_sections() if s.name == section), None)
        found = sink.choices.get(key) if sink is not None else None
    return found


def _bounds(section: str, key: str) -> tuple[float, float] | None:
    found = _RANGES.get((section, key))
    if found is None:
        sink = next((s for s in _sink_sections() if s.name == section), None)
        found = sink.ranges.get(key) if sink is not None else None
    return found


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the default file when it exists) and the environment.

    ``path=None`` uses /etc/wattprint/wattprint.toml if present, else embedded
    defaults. An explicit path that does not exist is an error.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    source = ""
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{source}: file not found"]) from None
        except PermissionError:
            raise ConfigError([f"{source}: permission denied"]) from None
        except IsADirectoryError:
            raise ConfigError([f"{source}: is a directory, expected a TOML file"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{source}: not valid UTF-8"]) from None
        except (OSError, ValueError) as exc:  # a name too long, a loop of links, a NUL in the path, I/O errors
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError([f"{source}: cannot read: {reason}"]) from None

    sections = section_types()
    built: dict[str, Any] = {}
    where_file = source or "<defaults>"
    # Where each value set by the user came from, for the messages: the file or the variable.
    origin: dict[tuple[str, str], str] = {}
    for name in raw:
        if name not in sections:
            problems.append(f"{where_file}: unknown section [{name}] (known: {', '.join(sections)})")
        elif not isinstance(raw[name], dict):
            problems.append(f"{where_file}: {name} must be a table [{name}], got {type(raw[name]).__name__}")

    for sec_name, sec_type in sections.items():
        hints = get_type_hints(sec_type)
        sec_raw = raw.get(sec_name, {})
        if not isinstance(sec_raw, dict):
            sec_raw = {}
        values: dict[str, Any] = {}
        for key, value in sec_raw.items():
            if key not in hints:
                problems.append(
                    f"{where_file}: [{sec_name}] {key}: unknown key (known: {', '.join(hints)})"
                )
                continue
            origin[(sec_name, key)] = where_file
            try:
                values[key] = _coerce(value, hints[key], from_env=False)
            except ValueError as exc:
                why = _secret_problem(value, hints[key]) if key in _SECRET_KEYS else exc
                problems.append(f"{where_file}: [{sec_name}] {key}: {why}")
                values.pop(key, None)
        prefix = f"{ENV_PREFIX}{sec_name.upper()}_"
        for env_key, env_value in env.items():
            if not env_key.startswith(prefix):
                continue
            key = env_key[len(prefix):].lower()
            if key not in hints:
                problems.append(f"environment {env_key}: unknown key {sec_name}.{key} (known: {', '.join(hints)})")
                continue
            origin[(sec_name, key)] = f"environment {env_key}"
            try:
                values[key] = _coerce(env_value, hints[key], from_env=True)
            except ValueError as exc:
                why = _secret_problem(env_value, hints[key]) if key in _SECRET_KEYS else exc
                problems.append(f"environment {env_key}: [{sec_name}] {key}: {why}")
                values.pop(key, None)
        for key, value in values.items():
            where = f"{origin[(sec_name, key)]}: [{sec_name}] {key}"
            allowed = choices(sec_name, key)
            if allowed and value not in allowed:
                problems.append(f"{where}: {_shown(value)} is not one of {', '.join(allowed)}")
            bounds = _bounds(sec_name, key)
            if bounds and not (bounds[0] <= value <= bounds[1]):
                problems.append(f"{where}: {_shown(value)} is outside {bounds[0]}..{bounds[1]}")
        try:
            built[sec_name] = sec_type(**values)
        except TypeError as exc:  # pragma: no cover - guarded above
            problems.append(f"{where_file}: [{sec_name}]: {exc}")

    sink_sections = _sink_sections()
    if not problems:
        def origin_of(sec: str, key: str) -> str:
            return origin.get((sec, key), where_file)

        problems.extend(_cross_checks(built, origin_of))
        for sink in sink_sections:
            if sink.check is not None:
                problems.extend(sink.check(built[sink.name], lambda key, sec=sink.name: origin_of(sec, key)))
    if problems:
        raise ConfigError(problems)
    sinks = MappingProxyType({s.name: built.pop(s.name) for s in sink_sections})
    return Config(**built, sinks=sinks, source_path=source)


def _cross_checks(c: dict[str, Any], origin: Callable[[str, str], str]) -> list[str]:
    """Combinations that cannot work. Each problem names the key and where the value
    that makes it a problem was set (``origin(section, key)``: the file or the variable)."""
    problems: list[str] = []
    gpu: GpuConfig = c["gpu"]
    if gpu.backend == "sim" and not gpu.sim_file:
        problems.append(f"{origin('gpu', 'backend')}: [gpu] sim_file: required when backend = \"sim\"")
    for sec_name, section in c.items():
        for key in _SECRET_KEYS:
            value = getattr(section, key, "")
            if not isinstance(value, str) or not value:
                continue
            bad = next((i for i, ch in enumerate(value) if not ch.isprintable()), None)
            if bad is not None:
                problems.append(f"{origin(sec_name, key)}: [{sec_name}] {key}: contains a control or non-printable "
                                f"character at position {bad} (value not shown: it is a secret)")
            elif key == "token" and not value.isascii():
                problems.append(f"{origin(sec_name, key)}: [{sec_name}] {key}: must be ASCII (it is sent in an "
                                "HTTP header; value not shown: it is a secret)")
    http: HttpConfig = c["http"]
    try:
        parse_listen(http.listen)
    except ValueError as exc:
        problems.append(f"{origin('http', 'listen')}: [http] listen: {exc}")
    if http.socket:
        try:
            too_long = len(os.fsencode(os.path.abspath(http.socket))) > 107
        except (UnicodeError, ValueError):
            too_long = False
        if too_long:
            problems.append(f"{origin('http', 'socket')}: [http] socket: path longer than 107 bytes "
                            "(the limit of a Unix socket address)")
    grid: GridConfig = c["grid"]
    if grid.provider == "electricitymaps" and not grid.token:
        problems.append(f"{origin('grid', 'provider')}: [grid] token: required for provider electricitymaps")
    if grid.provider in ("energidataservice",) and grid.zone and grid.zone not in ("DK1", "DK2"):
        problems.append(f"{origin('grid', 'zone')}: [grid] zone: {_shown(grid.zone)} is not DK1 or DK2 for energidataservice")
    for kind in c["jobs"].cgroup_kinds:
        if kind not in ("slurm", "systemd", "container"):
            problems.append(f"{origin('jobs', 'cgroup_kinds')}: [jobs] cgroup_kinds: {_shown(kind)} is not one of "
                            "slurm, systemd, container")
    for name in c["jobs"].label_env:
        if not name or not all(ch.isalnum() or ch == "_" for ch in name):
            problems.append(f"{origin('jobs', 'label_env')}: [jobs] label_env: {_shown(name)} is not an environment "
                            "variable name")
    problems.extend(_node_checks(c["node"], origin))
    problems.extend(_footprint_checks(c["footprint"], c["market"], origin))
    return problems


def _footprint_checks(fp: FootprintConfig, market: MarketConfig, origin: Callable[[str, str], str]) -> list[str]:
    """``[footprint] gpu_kgco2e`` values in range and names that can match a model;
    ``[market]``: a contract share needs the contract's factor."""
    from .footprint.factors import normalise

    problems: list[str] = []
    low, high = GPU_KGCO2E_RANGE
    for name, kg in fp.gpu_kgco2e.items():
        where = f"{origin('footprint', 'gpu_kgco2e')}: [footprint] gpu_kgco2e: {_shown(name)}"
        if not normalise(name):
            problems.append(f"{where}: the name matches no GPU model (it is empty once 'NVIDIA', 'Tesla', "
                            "'GeForce', 'Quadro' and separators are removed)")
        if not (low <= kg <= high):
            problems.append(f"{where}: {kg:g} kgCO2e is outside {low:g}..{high:g} (a factor cannot be negative)")
    if market.contract_share > 0 and not is_set(market.contract_g_per_kwh):
        problems.append(f"{origin('market', 'contract_share')}: [market] contract_g_per_kwh: required when "
                        f"contract_share > 0 (got contract_share = {market.contract_share:g}): the gCO2e/kWh of "
                        "the supplier contract or PPA")
    return problems


def _node_checks(node: NodeConfig, origin: Callable[[str, str], str]) -> list[str]:
    """What ``[node]`` needs for its ``source`` (a BMC address, credentials, readable files)."""
    problems: list[str] = []
    if node.source == "none":
        return problems
    if node.source == "redfish":
        parts = urllib.parse.urlsplit(node.url) if node.url else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"{origin('node', 'url')}: [node] url: required for source = \"redfish\": the BMC's "
                            f"base URL, e.g. \"https://bmc-node01\" (got {_shown(redact_url(node.url))})")
        elif parts.password:
            problems.append(f"{origin('node', 'url')}: [node] url: put the password in [node] password or "
                            "password_file, not in the URL (value not shown: it is a secret)")
    if node.source == "ipmi":
        if not node.ipmi_host:
            problems.append(f"{origin('node', 'ipmi_host')}: [node] ipmi_host: required for source = \"ipmi\"")
        elif node.ipmi_host.startswith("-") or any(ch.isspace() or not ch.isprintable() for ch in node.ipmi_host):
            problems.append(f"{origin('node', 'ipmi_host')}: [node] ipmi_host: {_shown(node.ipmi_host)} is not a "
                            "host name or address")
        if node.ipmi_sensor.startswith("-") or not node.ipmi_sensor.isprintable():
            problems.append(f"{origin('node', 'ipmi_sensor')}: [node] ipmi_sensor: {_shown(node.ipmi_sensor)} is "
                            "not a sensor name")
    if not node.username:
        problems.append(f"{origin('node', 'username')}: [node] username: required for source = {node.source!r}")
    if node.password_file:
        try:
            with open(node.password_file, encoding="utf-8") as fh:
                first = fh.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable UTF-8 text"
            problems.append(f"{origin('node', 'password_file')}: [node] password_file: cannot read "
                            f"{_shown(node.password_file)}: {why}")
        else:
            if not first:
                problems.append(f"{origin('node', 'password_file')}: [node] password_file: "
                                f"{_shown(node.password_file)} is empty")
    if node.ca_file and not os.path.isfile(node.ca_file):
        problems.append(f"{origin('node', 'ca_file')}: [node] ca_file: {_shown(node.ca_file)} is not a file")
    if node.timeout_s > node.poll_interval_s:
        problems.append(f"{origin('node', 'timeout_s')}: [node] timeout_s: {node.timeout_s:g} is longer than "
                        f"poll_interval_s ({node.poll_interval_s:g}); one read must end before the next is due")
    if node.max_age_s < node.poll_interval_s:
        problems.append(f"{origin('node', 'max_age_s')}: [node] max_age_s: {node.max_age_s:g} is shorter than "
                        f"poll_interval_s ({node.poll_interval_s:g}): every reading would be stale")
    return problems


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); raise ValueError when malformed."""
    host, sep, port_s = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{listen!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{listen!r}: port {port} is outside 0..65535")
    return host, port
