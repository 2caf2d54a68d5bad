"""Free TCP ports for the side clusters that tests, benchmarks and the multi-node check start.

A port picked with ``bind(0)`` comes from the kernel's ephemeral range and is free only at the
moment it is picked. A Ray cluster opens hundreds of sockets in that range while it starts
(gRPC servers on ``bind(0)``, the source ports of every outgoing connection), and HAProxy's
metrics and stats ports are bound seconds later, after Serve's controller starts it: one CI run
lost that race (``cannot bind socket (Address already in use) for [0.0.0.0:39421]``, and 51
integration tests errored at set-up). ``PortPicker`` therefore hands out ports from below the
ephemeral range and above Ray's worker ports (10002-19999 by default), where nothing picks a
port by itself, checks each one is free on every interface, and never hands one out twice.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path

__all__ = ["PortPicker", "ephemeral_range", "LOWEST"]

LOWEST = 20000  # above Ray's default worker port range (min_worker_port 10002, max 19999)
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_IANA_DYNAMIC = (49152, 65535)  # the ephemeral range where /proc does not say (macOS, BSD)


def ephemeral_range(path: Path = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (``ip_local_port_range``); IANA's dynamic range
    where the file is missing or unreadable."""
    try:
        low, high = (int(part) for part in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return _IANA_DYNAMIC


def _is_free(port: int) -> bool:
    # The wildcard address: HAProxy binds 0.0.0.0, and on Linux a wildcard bind conflicts with
    # a bind of the same port on any one address, so free here is free on loopback too.
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortPicker:
    """Callable handing out distinct free ports in ``[LOWEST, start of the ephemeral range)``,
    in random order (two pickers on one machine rarely try the same port first).

    A port it returns was free on every interface when returned and is never returned again by
    this picker. Where that window has fewer than 1,000 ports (an unusual
    ``ip_local_port_range``) it falls back to the kernel's ``bind(0)``. Raises ``RuntimeError``
    when 200 tries in a row find no free port."""

    def __init__(self, rng: random.Random | None = None,
                 port_range: tuple[int, int] | None = None,
                 is_free: Callable[[int], bool] = _is_free) -> None:
        self._rng = rng or random.Random()
        low, high = port_range or (LOWEST, ephemeral_range()[0] - 1)
        self._range = (low, high) if high - low + 1 >= 1000 else None
        self._is_free = is_free
        self._given: set[int] = set()

    def __call__(self) -> int:
        for _ in range(200):
            port = self._rng.randint(*self._range) if self._range else _kernel_port()
            if port not in self._given and self._is_free(port):
                self._given.add(port)
                return port
        raise RuntimeError(f"no free TCP port found in {self._range or 'the ephemeral range'}")
