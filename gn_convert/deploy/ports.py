"""The TCP ports a local server listens on: checking them, and choosing free ones (port 0).

A port chosen by one process and bound later by another can be taken in between by a third
(the race of "find a free port, then start the server on it"). A server asked for port 0 gets
ports the kernel chose (:func:`free_ports`, all bound at once so they differ) and, should one be
taken before the server binds it, is started again on new ones
(:meth:`gn_convert.deploy.server.TritonModelServer.start`).
"""

from __future__ import annotations

import contextlib
import socket

from gn_convert.errors import DeployError

AUTO = 0
"""The port number that asks for a free port chosen at start."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on, chosen by the kernel (bind to 0)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, AUTO))
        return [int(sock.getsockname()[1]) for sock in socks]


def find_free_port(host: str = "127.0.0.1") -> int:
    """One TCP port on ``host`` that nothing listens on at the time of the call (prefer port 0:
    a server asked for it chooses its own ports when it starts, without this race)."""
    return free_ports(host, 1)[0]


def busy_port(host: str, ports: dict[str, int]) -> tuple[str, int, OSError] | None:
    """The first of ``ports`` (purpose -> port; 0 is skipped) that cannot be bound on ``host``, or None."""
    for purpose, port in ports.items():
        if port == AUTO:
            continue
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                sock.bind((host, port))
            except OSError as err:
                return purpose, port, err
    return None


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail with one line when one of ``ports`` (purpose -> port) cannot be bound on ``host``.

    Raises:
        DeployError: a port is in use, repeated, or the address is not this machine's.
    """
    fixed = [port for port in ports.values() if port != AUTO]
    if len(set(fixed)) != len(fixed):
        raise DeployError(f"the server needs distinct ports, got {ports}")
    busy = busy_port(host, ports)
    if busy is not None:
        purpose, port, err = busy
        raise DeployError(f"cannot listen on {host}:{port} for {purpose} ({err.strerror or err}); "
                          "choose another port (--port, --grpc-port, --metrics-port; 0 chooses a free one)")
