"""Ports for the servers tests start as processes, which must be chosen before the process binds.

Asking the kernel for a free port (bind to 0, close, pass the number on) races: the port is free
again the moment it is closed, and another test worker asking the same way may be handed the same
number before our process binds it. That happened in CI: a gateway lost the port to another
worker's runtime, and the test, whose health check was answered by that runtime, sent its calls
there (UNIMPLEMENTED "Method not found!"). So each pytest-xdist worker takes ports from a block
of its own, below the kernel's ephemeral range (where neither `bind(0)` nor outgoing connections
ever pick), and in sequence, so no two live servers of one run are ever handed the same port.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading

# Below Linux's default ephemeral range (32768-60999), in blocks of one per worker.
FIRST_PORT = 20_000
BLOCK = 1_500
BLOCKS = 8


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) % BLOCKS if worker.startswith("gw") else 0


_lock = threading.Lock()
# A random start within the block: two test sessions run side by side (a clean-clone CI run
# beside a developer's) walk different stretches of it.
_offsets = itertools.count(random.randrange(BLOCK))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that no other worker of this test
    run will be handed."""
    base = FIRST_PORT + _worker_index() * BLOCK
    for _ in range(BLOCK):
        with _lock:
            port = base + next(_offsets) % BLOCK
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {base}-{base + BLOCK - 1}")
