"""The LangGraph Agent Server peer: how fast, and how completely, a cancel stops a streaming run.

Stopline's claim is that a stop lands in milliseconds whatever the step is doing. The LangGraph
Agent Server is the peer a user would otherwise reach for, so this module measures the same thing
on it, in the same run and on the same machine: a client streams a run of sequential async steps
that sleep for the step length, the test cancels it (``runs.cancel``, action ``interrupt``) at a
random moment inside a step, and we record

* how long the cancel call takes to return,
* how long after the cancel call the client's stream ends, and whether it ended with a terminal
  event (``end``/``error``) or simply closed,
* whether the step in flight was cut (the graph recorded ``cancelled``, or never recorded its
  finish) or ran to completion, and whether any later step started.

A second scenario cancels as soon as the client holds the run id and checks that no step started.

The server is ``langgraph dev`` from ``langgraph-cli[inmem]``, run locally and offline (see
``OFFLINE_ENV`` and ``DEV_FLAGS``). It lives in a virtualenv of its own because langgraph-api pins
grpcio and protobuf below the versions Stopline requires; ``ensure_server_env`` creates that
virtualenv from ``langgraph_app/server-requirements.txt`` on first use. The graph it serves is
``langgraph_app/sleeper_graph.py``; each step appends start/finish/cancelled records with wall-clock
times to a per-trial trace file, which is how the client side tells whether a step was cut.

The server and its virtualenv are in ``langgraph_server``, the client helpers in
``langgraph_client``, scenario 1 in ``langgraph_mid_step``, scenario 2 and the uncancelled
reference in ``langgraph_early_stop``; this module runs them all and re-exports them.

Run a small version and print JSON with ``python -m bench.peers.langgraph_peer``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.peers.langgraph_client import GRAPH_ID, STREAM_MODES, client_versions
from bench.peers.langgraph_early_stop import (
    acancel_right_after_start,
    astream_to_completion,
    cancel_right_after_start,
    stream_to_completion,
)
from bench.peers.langgraph_mid_step import acancel_while_streaming, cancel_while_streaming
from bench.peers.langgraph_server import (
    APP_DIR,
    DEV_FLAGS,
    OFFLINE_ENV,
    SCRUBBED_ENV,
    SERVER_REQUIREMENTS,
    LangGraphServer,
    ensure_server_env,
    langgraph_server,
)
from bench.stats import summary_nearest_rank as summarize

__all__ = [
    "APP_DIR",
    "DEV_FLAGS",
    "GRAPH_ID",
    "OFFLINE_ENV",
    "SERVER_REQUIREMENTS",
    "LangGraphServer",
    "acancel_right_after_start",
    "acancel_while_streaming",
    "astream_to_completion",
    "cancel_right_after_start",
    "cancel_while_streaming",
    "client_versions",
    "ensure_server_env",
    "langgraph_server",
    "main",
    "run_all",
    "stream_to_completion",
    "summarize",
]


def run_all(quick: bool = False) -> dict[str, Any]:
    """Every LangGraph scenario on one server (what `python -m bench.run` records)."""
    trials = (5, 3, 1, 5) if quick else (20, 8, 2, 10)
    started = time.monotonic()
    with langgraph_server() as server:
        stream_to_completion(2, server=server)  # warm-up: first-run imports and graph loading
        result: dict[str, Any] = {
            "peer": "langgraph-agent-server",
            "how": {
                "command": [
                    "langgraph",
                    "dev",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "<free port>",
                    "--config",
                    "langgraph.json",
                    *DEV_FLAGS,
                ],
                "env": OFFLINE_ENV,
                "scrubbed_env": list(SCRUBBED_ENV),
                "stream_mode": STREAM_MODES,
                "cancel": "client.runs.cancel(thread_id, run_id, action='interrupt')",
            },
            "versions": {"server": server.versions, "client": client_versions()},
            "reference_stream_to_completion": stream_to_completion(3, server=server),
            "cancel_while_streaming": [
                cancel_while_streaming(0.01, trials[0], server=server, seed=1),
                cancel_while_streaming(1.0, trials[1], server=server, seed=2),
                cancel_while_streaming(30.0, trials[2], server=server, seed=3),
            ],
            "cancel_right_after_start": cancel_right_after_start(trials[3], server=server),
        }
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    """Run every LangGraph scenario on one server and print JSON."""
    json.dump(run_all(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
