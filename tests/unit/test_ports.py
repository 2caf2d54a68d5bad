"""serve_app/ports.py: ports for side clusters come from outside the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from serve_app.ports import LOWEST, PortPicker, ephemeral_range


def test_the_ephemeral_range_is_read_from_the_kernel_and_defaults_to_iana(tmp_path: Path) -> None:
    f = tmp_path / "ip_local_port_range"
    f.write_text("32768\t60999\n")
    assert ephemeral_range(f) == (32768, 60999)
    assert ephemeral_range(tmp_path / "missing") == (49152, 65535)
    f.write_text("garbage\n")
    assert ephemeral_range(f) == (49152, 65535)


def test_ports_are_below_the_ephemeral_range_above_rays_worker_ports_and_bindable() -> None:
    pick = PortPicker()
    ports = [pick() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(LOWEST <= p < ephemeral_range()[0] for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free when handed out (nothing here took it since)


def test_a_port_in_use_or_already_given_is_skipped() -> None:
    busy = {20_005}
    tried: list[int] = []

    def is_free(port: int) -> bool:
        tried.append(port)
        return port not in busy

    # A 1,000-port window and a seeded generator: every port handed out is distinct and free.
    pick = PortPicker(rng=random.Random(7), port_range=(20_000, 20_999), is_free=is_free)
    got = [pick() for _ in range(900)]
    assert len(set(got)) == 900
    assert 20_005 in tried and 20_005 not in got  # tried, found busy, skipped
    handed_out = [p for p in tried if p not in busy]
    assert len(handed_out) == len(set(handed_out))  # a port given once is not even tried again
    assert all(20_000 <= p <= 20_999 for p in got)


def test_no_free_port_after_200_tries_is_an_error_naming_the_range() -> None:
    pick = PortPicker(port_range=(20_000, 21_000), is_free=lambda _port: False)
    with pytest.raises(RuntimeError, match=r"no free TCP port found in \(20000, 21000\)"):
        pick()


def test_a_window_under_1000_ports_falls_back_to_the_kernels_choice() -> None:
    pick = PortPicker(port_range=(20_000, 20_500))
    port = pick()
    assert port >= ephemeral_range()[0]  # bind(0) picks from the ephemeral range
