"""Node input power from the BMC (Redfish or IPMI): the ``node`` source.

- ``sample.py``: ``BmcSample`` (one answer) and ``BmcError`` (one failed read).
- ``redfish.py``: ``RedfishClient`` (discovery of Sensors / Power / PowerSubsystem).
- ``ipmi.py``: ``IpmiClient`` (ipmitool: DCMI power reading or an SDR power sensor).
- ``source.py``: ``NodeSource``, the ``Source`` with its own polling thread.

``open_node_source(cfg.node)`` builds the source a ``[node]`` section asks for, or None
(``source = "none"``: the health part ``node`` is then disabled, "no BMC configured").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...config import NodeConfig, read_password_file
from .sample import BmcError, BmcSample
from .source import MAX_NODE_POWER_W, NodeSource

if TYPE_CHECKING:
    from .ipmi import IpmiClient
    from .redfish import RedfishClient

NO_BMC = "no BMC configured ([node] source = \"none\")"

__all__ = [
    "MAX_NODE_POWER_W",
    "NO_BMC",
    "BmcError",
    "BmcSample",
    "IpmiClient",
    "NodeSource",
    "RedfishClient",
    "node_password",
    "open_node_source",
]


def __getattr__(name: str) -> Any:
    """``IpmiClient`` and ``RedfishClient``, imported on first use (issue 18: with
    ``source = "none"``, the default, the daemon loads neither, nor http.client)."""
    if name == "IpmiClient":
        from .ipmi import IpmiClient

        return IpmiClient
    if name == "RedfishClient":
        from .redfish import RedfishClient

        return RedfishClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def node_password(cfg: NodeConfig) -> str:
    """The BMC password: the first line of ``password_file`` when set, else ``password``."""
    return read_password_file(cfg.password_file) if cfg.password_file else cfg.password


def open_node_source(cfg: NodeConfig, *, start: bool = True) -> NodeSource | None:
    """The node source for ``cfg`` (its polling thread started unless ``start=False``),
    or None for ``source = "none"``."""
    client: RedfishClient | IpmiClient
    if cfg.source == "redfish":
        from .redfish import RedfishClient

        client = RedfishClient(cfg.url, cfg.username, node_password(cfg), auth=cfg.auth, ca_file=cfg.ca_file,
                               verify_tls=cfg.verify_tls, chassis=cfg.chassis, timeout_s=cfg.timeout_s)
    elif cfg.source == "ipmi":
        from .ipmi import IpmiClient

        client = IpmiClient(cfg.ipmi_host, cfg.username, node_password(cfg), port=cfg.ipmi_port,
                            interface=cfg.ipmi_interface, sensor=cfg.ipmi_sensor,
                            cipher_suite=cfg.ipmi_cipher_suite, privilege=cfg.ipmi_privilege, ipmitool=cfg.ipmitool,
                            timeout_s=cfg.timeout_s)
    else:
        return None
    return NodeSource(client, cfg.source, poll_interval_s=cfg.poll_interval_s, max_age_s=cfg.max_age_s, start=start)
