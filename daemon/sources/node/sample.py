"""What one read of a BMC returns (``BmcSample``) and how it fails (``BmcError``).

Shared by the Redfish and IPMI clients and the node source. Units are in the names:
``power_w`` watts, ``energy_j`` joules (a BMC's cumulative counter, converted), ``*_age_s``
how old the BMC said the value was when it answered (None: it did not say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ErrorKind = Literal["auth", "timeout", "connect", "http", "protocol", "missing"]


class BmcError(Exception):
    """One read of the BMC failed. ``kind`` is what went wrong (``auth``: credentials
    refused, ``timeout``: no answer within the deadline, ``connect``: no connection or
    TLS failure, ``http``: another HTTP error status, ``protocol``: an answer that does
    not parse, ``missing``: no power data where discovery found it). ``detail`` is a
    sentence for /healthz; it never holds a credential."""

    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(detail)
        self.kind: ErrorKind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class BmcSample:
    """One answer of the BMC: the node's input power and/or its input energy counter.

    ``power_w`` / ``energy_j`` are None when the BMC has no such reading.
    ``power_age_s`` / ``energy_age_s``: how old each value was when the BMC answered
    (its ``ReadingTime`` against the HTTP ``Date`` of the same answer, both on the
    BMC's clock), None when the BMC gives no reading time (then it counts as fresh).
    ``where`` says which resource it came from (for logs and /healthz).
    """

    power_w: float | None
    energy_j: float | None = None
    power_age_s: float | None = None
    energy_age_s: float | None = None
    where: str = ""
