"""Every Triton replica behind `triton_url`, and the order to try them in for a call: client-side round robin.

A gRPC channel sends all its calls over one HTTP/2 connection to one address, so a Kubernetes
ClusterIP Service in front of several Triton pods would pin an inference replica to one of them.
Instead `triton_url` names a headless Service (its DNS name resolves to every ready pod's address)
or a comma-separated list of ``host:port``; the name is resolved again every `resolve_every_s` and
after a failure, so pods that come and go are followed. Calls start at the next address in turn;
an address that failed is tried last for `down_for_s`.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable

from concepts.errors import InvalidArgument

log = logging.getLogger(__name__)
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address of `host` as ``ip:port`` (``[ip]:port`` for IPv6), in the resolver's order, once each."""
    out: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if address not in out:
            out.append(address)
    return out


class TritonEndpoints:
    """The replicas of `url` (``host:port[,host:port...]``), resolved and rotated (module doc)."""

    def __init__(self, url: str, resolve_every_s: float = 5.0, down_for_s: float = 2.0,
                 resolver: Resolver = resolve) -> None:
        self.url = url
        self.targets = [_split(part.strip()) for part in url.split(",") if part.strip()]
        if not self.targets:
            raise InvalidArgument("triton_url", "must name at least one host:port")
        self.resolve_every_s = resolve_every_s
        self.down_for_s = down_for_s
        self._resolver = resolver
        self._lock = threading.Lock()
        self._addresses: list[str] = []
        self._resolved_at = float("-inf")
        self._down: dict[str, float] = {}
        self._turn = itertools.count()

    def addresses(self) -> list[str]:
        """Every replica's address now; the names are resolved again when the last resolution is old."""
        with self._lock:
            if time.monotonic() - self._resolved_at >= self.resolve_every_s or not self._addresses:
                self._resolve()
            return list(self._addresses)

    def order(self) -> list[str]:
        """The addresses to try for one call: from the next one in turn, the ones that failed lately last."""
        addresses = self.addresses()
        start = next(self._turn) % len(addresses) if addresses else 0
        rotated = addresses[start:] + addresses[:start]
        now = time.monotonic()
        with self._lock:
            return sorted(rotated, key=lambda a: self._down.get(a, 0.0) > now)  # stable: keeps the rotation

    def failed(self, address: str) -> None:
        """`address` did not answer: try it last for a while, and resolve the names again on the next call."""
        with self._lock:
            self._down[address] = time.monotonic() + self.down_for_s
            self._resolved_at = float("-inf")

    def _resolve(self) -> None:
        addresses: list[str] = []
        for host, port in self.targets:
            try:
                found = self._resolver(host, port)
            except OSError as e:  # a name with no ready pod right now: keep what the others give
                log.warning("Triton endpoint %s:%d does not resolve: %s", host, port, e)
                continue
            addresses += [a for a in found if a not in addresses]
        if addresses != self._addresses:
            log.info("Triton replicas of %s: %s", self.url, addresses)
        if addresses or not self._addresses:  # a failed resolution keeps the last known replicas
            self._addresses = addresses
        self._resolved_at = time.monotonic()


def _split(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument("triton_url", f"expected host:port[,host:port...], got {target!r}")
    return host.strip("[]"), int(port)
