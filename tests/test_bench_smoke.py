"""The benchmark harness still runs (tiny sizes): benchmarks that rot are worse than none."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import psutil
import pytest

from bench import floor, interceptors, load_scenarios, node_client, scenarios
from bench.report import table
from bench.stack import Stack
from bench.stats import ratio_interval
from bench.table import DASH, TIMES, markdown
from stopline.gateway.v1 import gateway_service_pb2 as gw
from stopline.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from stopline.transport import open_channel
from tests.credentials import TOKEN, WithToken


async def test_benchmark_scenarios_run_end_to_end(tmp_path: Path) -> None:
    with Stack("sqlite", tmp_path) as stack:
        # A floor block with processes of its own; then processes kept up, as bench.run does,
        # for stops paired with floor trials and for the block after them.
        ground = await floor.floor(stack, tmp_path, {0.01: 2, 0.05: 2})
        paired = await floor.Floor.open(stack, tmp_path)
        try:
            stop = await scenarios.stop_latency(stack, 0.05, trials=2)
            second = await scenarios.stop_latency(
                stack, 0.05, trials=3, own_connection=True, floor=paired
            )
            early = await scenarios.early_stop(stack, trials=2, delays_ms=(0.0,))
            start = await scenarios.start_latency(stack, trials=2, floor=paired)
            steps = await scenarios.per_step_overhead(stack, steps=20, repeats=1)
            after = await floor.floor(stack, tmp_path, {0.01: 2, 0.05: 2}, paired)
        finally:
            await paired.close()
    # As bench.run does: the floor measured before and after the figures, pooled.
    pooled = floor.pooled(ground, after)
    for step in ("0.01s", "0.05s"):
        assert pooled[step]["unary_ms"]["n"] == 4 and pooled[step]["push_ms"]["n"] == 4
        both = ground[step]["push_ms"]["samples"] + after[step]["push_ms"]["samples"]
        assert sorted(pooled[step]["push_ms"]["samples"]) == sorted(both)
    for step in ("0.01s", "0.05s"):
        assert ground[step]["unary_ms"]["n"] == 2 and ground[step]["push_ms"]["n"] == 2
        assert ground[step]["unary_ms"]["median"] > 0 and ground[step]["push_ms"]["median"] > 0
    assert stop["halt_ms"]["n"] == 2 and stop["mid_step"] >= 1
    assert second["stop_connection"] == "own" and second["halt_ms"]["n"] == 3
    # A trial of each kind of the floor beside each stop.
    assert second["floor"]["unary_ms"]["n"] == 3 and second["floor"]["push_ms"]["n"] == 3
    assert "floor" not in stop
    # early_stop stops by key right after the start call is made, before its answer (issue 14):
    # no step may run. (Later delays are for bench/: by then the start may have been answered.)
    assert early["trials"] == 2 and early["operations_with_a_step_started"] == 0
    assert start["first_step_ms"]["n"] == 2 and start["no_hold_first_step_ms"]["n"] == 2
    assert start["floor"]["push_ms"]["n"] == 2
    assert steps["runtime_ms_per_step"]["median"] > 0
    # As bench.run records it: beside the same run's stop-to-halt.
    start["stop_halt_1s_ms"] = stop["halt_ms"]
    for arm in ("", "no_hold_"):
        median = start[f"{arm}first_step_ms"]["median"]
        start[f"{arm}ratio_to_stop_halt"] = median / stop["halt_ms"]["median"]
    suite = {
        "floor_before": ground,
        "floor_after": after,
        "floor": pooled,
        "stop_latency/0.05s": stop,
        "stop_own_connection/0.05s": second,
        "early_stop": early,
        "start_latency": start,
        "per_step": steps,
    }
    results = {"machine": {"when": "now"}, "quick": True, "stopline": {"sqlite": suite}}
    text = table(results)
    assert "stop_latency/0.05s halt_ms" in text and "floor/0.05s (b)" in text
    assert "floor_before/0.05s (b)" in text and "floor_after/0.05s (b)" in text
    # The published table divides each figure by its own floor: (a) for the acknowledgment,
    # (b) for stop -> terminal event and (at 10 ms pacing) for start -> first step.
    lines = [line.split(" | ") for line in markdown(results).splitlines() if line[:2] == "| "]
    rows = {cells[1]: cells for cells in lines}
    ack = rows["stop, same connection: acknowledgment"]
    assert float(ack[4].split()[0]) == round(pooled["0.05s"]["unary_ms"]["median"], 2)
    ratio = stop["ack_ms"]["median"] / pooled["0.05s"]["unary_ms"]["median"]
    assert ack[5] == f"**{ratio:.2f}{TIMES}**" or ratio >= 100 or ratio < 0.1
    # A scenario with paired floor trials is divided by them, not by the blocks.
    halt = rows["stop from a second connection: stop → terminal event"]
    assert float(halt[4].split()[0]) == round(second["floor"]["push_ms"]["median"], 2)
    # With the bootstrap interval of that ratio beside it, which holds the ratio itself. The
    # table prints the bounds to two decimals, so the ratio is compared at that precision (a
    # bound equal to the ratio, as the bootstrap of a few trials often gives, rounds with it).
    low, high = (float(bound) for bound in halt[6].split(DASH))
    point = second["halt_ms"]["median"] / second["floor"]["push_ms"]["median"]
    assert low <= round(point, 2) <= high
    for figure in ("start → first step event", "start with `no_hold` → first step event"):
        first = rows[figure]
        assert float(first[4].split()[0]) == round(start["floor"]["push_ms"]["median"], 2)
    assert "  no hold" in text
    assert "Quick run" in markdown(results)


async def test_the_concurrency_scenario_checks_each_end_against_the_stop_recorded(
    tmp_path: Path,
) -> None:
    """bench.load_scenarios.concurrency at a small size: every operation ends, and ends
    interrupted exactly when a stop was recorded on it (a stop still pending at its
    acknowledgment is looked up, not assumed recorded)."""
    with Stack("sqlite", tmp_path) as stack:
        result = await load_scenarios.concurrency(stack, n=20, steps=5)
    assert result["missing"] == 0 and result["wrong_final_state"] == 0
    assert 0 < result["stopped"] <= 10 and result["acknowledged_pending"] <= 10


def test_a_ratio_interval_pairs_equal_counts_and_holds_the_ratio() -> None:
    """stats.ratio_interval: pairs (same index) move together, so a floor that doubles with the
    stops beside it gives no spread at all; unpaired samples give an interval around the ratio."""
    floor_ms = [1.0, 2.0, 4.0, 8.0, 3.0]
    assert ratio_interval([2 * f for f in floor_ms], floor_ms) == (2.0, 2.0)
    ours, below = [5.0, 6.0, 7.0, 5.5, 9.0, 6.5], [3.0, 3.5, 4.0, 3.2]
    low, high = ratio_interval(ours, below) or (0.0, 0.0)
    assert low < statistics.median(ours) / statistics.median(below) < high
    assert ratio_interval([], below) is None


@pytest.mark.postgres
async def test_the_balanced_stack_routes_through_one_gateway_over_both_replicas(
    tmp_path: Path,
) -> None:
    with Stack("postgresql", tmp_path, replicas=2, advertise=True, balanced=True) as stack:
        assert len(stack.gateways) == 3  # one pinned to each replica, then the balanced one
        await scenarios.warm_up(stack, gateway=-1, operations=2)
        stop = await scenarios.stop_latency(stack, 0.05, trials=2, gateway=-1)
        start = await scenarios.start_latency(stack, trials=1, gateway=-1)
    assert stop["halt_ms"]["n"] == 2 and start["first_step_ms"]["n"] == 1
    suite = {"balanced_routed_stop/0.05s": stop, "balanced_routed_start": start}
    text = markdown({"machine": {"when": "now"}, "stopline": {"postgresql": suite}})
    assert "two replicas behind one gateway, named (routed): stop → terminal event" in text
    assert "start → first step event, two replicas behind one gateway, named (routed)" in text


@pytest.mark.postgres
async def test_the_shapes_benchmark_alternates_one_and_two_replicas() -> None:
    """bench.shapes at two trials: every shape measured, both figures of each."""
    from bench import shapes

    result = await shapes.compare(0.05, trials=2)
    assert set(result) == {"one replica", "one replica, routed", "two replicas, routed"}
    for medians in result.values():
        assert 0 < medians["ack_ms"] <= medians["halt_ms"]


async def test_own_connection_option_opens_a_connection_of_its_own(tmp_path: Path) -> None:
    """gRPC shares one TCP connection between a process's channels to one address unless told
    otherwise: the second-client stop figure means something only if its option works."""
    with Stack("sqlite", tmp_path) as stack:
        address = stack.gateways[0].address
        port = int(address.rsplit(":", 1)[1])
        channels = [
            open_channel(address),
            open_channel(address),
            open_channel(address, options=[scenarios.OWN_CONNECTION]),
        ]
        try:
            for channel in channels:
                stub = WithToken(gw_grpc.GatewayServiceStub(channel), TOKEN)
                await stub.ListOperations(gw.ListOperationsRequest())
            mine = psutil.Process(os.getpid()).net_connections(kind="tcp")
            to_gateway = [c for c in mine if c.raddr and c.raddr.port == port]
            assert len(to_gateway) == 2
        finally:
            for channel in channels:
                await channel.close(grace=None)


async def test_node_client_stops_through_the_gateway(tmp_path: Path) -> None:
    """bench/node/stop_client.mjs (grpc-js, protos loaded from protos/) against a real stack;
    `npm ci` on first use. .ci/run installs the packages, so this never skips in CI. Told one
    trial at a time, with a floor trial of each kind paired with each, as bench.run runs it."""
    with Stack("sqlite", tmp_path) as stack:
        paired = await floor.Floor.open(stack, tmp_path)
        try:
            runs = await node_client.stop_latency(stack, {0.05: 3, 0.01: 2}, floor=paired)
        finally:
            await paired.close()
    run = runs["0.05s"]
    assert run["client"] == "node" and run["versions"]["@grpc/grpc-js"]
    assert run["ack_ms"]["n"] == 3 and run["halt_ms"]["n"] == 3
    assert run["halt_ms"]["min"] >= run["ack_ms"]["min"] > 0
    assert run["floor"]["unary_ms"]["n"] == 3 and run["floor"]["push_ms"]["n"] == 3
    assert runs["0.01s"]["halt_ms"]["n"] == 2 and runs["0.01s"]["floor"]["push_ms"]["n"] == 2
    # The table divides the Node rows by those paired trials, not by a block floor.
    results = {"machine": {}, "stopline": {"sqlite": {"stop_node/0.05s": run}}}
    lines = [line.split(" | ") for line in markdown(results).splitlines() if line[:2] == "| "]
    ack = next(line for line in lines if "Node" in line[1] and "acknowledgment" in line[1])
    assert ack[4] == f"{run['floor']['unary_ms']['median']:,.2f} ms"


async def test_agent_scenarios_run_end_to_end(tmp_path: Path) -> None:
    """Issue 13's scenarios at quick sizes (a few trials, a short answer, loads of 2 and 4)."""
    from bench import agent_scenarios

    results = await agent_scenarios.suite("sqlite", tmp_path, quick=True)
    assert results["llm_stop"]["disconnect_ms"]["n"] == 5
    assert results["tool_stop"]["process_exited_ms"]["n"] == 3
    assert results["tool_stop"]["tool_calls_cancelled"] == 3
    assert results["token_latency"]["tokens_received"] == 100
    assert [run["operations"] for run in results["llm_capacity"]["runs"]][:1] == [5]
    text = table({"machine": {}, "stopline": {"sqlite": results}})
    assert "stop -> model server sees close" in text
    assert "token p99 at largest load" in text or not results["llm_capacity"]["largest_passing"]


async def test_waiting_capacity_scenario_runs(tmp_path: Path) -> None:
    """Issue 15's figure at a tiny size: waiting operations hold no slot."""
    from bench import waiting_scenarios

    with Stack("sqlite", tmp_path, runtime_args=waiting_scenarios.RUNTIME_ARGS) as stack:
        result = await waiting_scenarios.waiting_capacity(stack, 30, window_seconds=1.0)
    assert result["waiting"] == 30
    assert result["running_beside_them"] == waiting_scenarios.MAX_RUNNING
    assert result["slots_used_by_waiting"] == 0
    assert result["steps_per_second_beside_waiting"] > 0


async def test_observability_overhead_scenario_runs_with_everything_on(tmp_path: Path) -> None:
    """Issue 16's overhead benchmark (bench/overhead.py) at tiny sizes: both arms measured, and
    the "on" arm really on: the OTLP sink received spans from the runtime, the gateway and the
    benchmark client, both metrics endpoints were scraped without a failure, JSON lines logged."""
    from bench import overhead

    result = await overhead.observability(
        "sqlite", tmp_path, rounds=2, stop_trials=2, steps=20, repeats=1
    )
    for name in ("stop/halt_ms", "stop/ack_ms", "per_step/runtime_ms_per_step"):
        figure = result["figures"][name]
        assert figure["off"]["n"] > 0 and figure["on"]["n"] == figure["off"]["n"]
        assert figure["ratio_median"] > 0 and len(figure["ratio_per_round"]) == 2
        low, high = figure["ratio_ci95"]
        assert 0 < low <= high
    spans = result["sink"]["spans_by_service"]
    assert spans["stopline-runtime"] > 0 and spans["stopline-gateway"] > 0
    assert spans[overhead.CLIENT_SERVICE] == 2 * (2 + 1)  # one client span per trial
    scrapes = result["sink"]["scrapes_ok"]
    assert len(scrapes) == 2 and all(n > 0 for n in scrapes.values())
    assert not any(result["sink"]["scrapes_failed"].values())
    assert result["logs"]["operation_finished_lines"] >= 2 * (2 + 1)
    assert result["really_on"], result["checks"]
    assert "stop → terminal event" in overhead.markdown({"observability": {"sqlite": result}})
    run = {"machine": {}, "observability": {"sqlite": result}}
    twice = overhead.pooled([run, run])["observability"]["sqlite"]
    assert twice["rounds"] == 4
    once = result["figures"]["stop/halt_ms"]["on"]["n"]
    assert twice["figures"]["stop/halt_ms"]["on"]["n"] == 2 * once


async def test_interceptor_chains_benchmark_runs() -> None:
    medians = await interceptors.measure(rounds=1, calls=3)
    assert set(medians) == set(interceptors.CHAINS)
    assert all(len(values) == 1 and values[0] > 0 for values in medians.values())


def test_the_overhead_verdict_needs_the_whole_interval_under_the_target() -> None:
    """bench/overhead.py's interval resamples whole rounds: arms that differ by the same factor
    in every round get a tight interval around it; arms whose rounds disagree get a wide one,
    and a ratio under 1.10 with an interval reaching over it is only "at the line"."""
    from bench import overhead

    off = [[10.0 + i % 3 for i in range(12)] for _ in range(8)]
    doubled = [[2 * s for s in r] for r in off]
    assert overhead.ratio_interval(off, doubled) == (2.0, 2.0)
    drifting = [[s * (0.9 if n % 2 else 1.25) for s in r] for n, r in enumerate(off)]
    low, high = overhead.ratio_interval(off, drifting)
    assert low < 1.0 < 1.10 < high
    figure = {"ratio_median": 1.05, "ratio_ci95": (low, high)}
    assert overhead.verdict(figure) == "at the line"
    assert overhead.verdict({"ratio_median": 1.05, "ratio_ci95": (1.01, 1.09)}) == "yes"
    assert overhead.verdict({"ratio_median": 1.12, "ratio_ci95": (1.05, 1.2)}) == "no"


def test_the_capacity_ceiling_steps_its_bare_operations() -> None:
    """bench.capacity_ceiling (the capacity target's counterpart of the floor) runs its child and
    counts its steps: 50 bare operations stepping once a second, over a two-second window."""
    from bench import capacity_ceiling

    result = capacity_ceiling.measure(50, window=2.0, settle=0.5)
    assert result["operations"] == 50
    # Each operation steps once a second: about 100 steps in the window, never none.
    assert result["steps_per_second_achieved"] > 10
    assert result["cpu_us_per_step"] > 0


def test_the_postgresql_idle_write_probe_measures_each_pacing() -> None:
    from bench import pg_idle

    medians = pg_idle.measure(trials=2)
    assert set(medians) == {
        f"{table} {pacing}"
        for table in ("idle_probe_temp", "idle_probe")
        for pacing in ("busy", "idle")
    }
    assert all(value > 0 for value in medians.values())


def test_the_capacity_benchmark_names_each_busy_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.capacity's split of the runtime's CPU by thread: busiest first, in % of a core over
    the window, named by Python's thread name where py-spy tells it, idle threads left out."""
    from bench import capacity

    monkeypatch.setattr(capacity, "_thread_names", lambda pid: {1: "MainThread"})
    before = {1: 10.0, 2: 5.0, 3: 1.0}
    after = {1: 14.5, 2: 9.6, 3: 1.001, 4: 0.2}
    shares = capacity._thread_shares(1, before, after, elapsed=10.0)
    assert shares == {"thread (2)": 46.0, "MainThread (1)": 45.0, "thread (4)": 2.0}
    assert list(shares) == ["thread (2)", "MainThread (1)", "thread (4)"]


async def test_the_in_process_step_benchmark_counts_steps_and_cpu() -> None:
    """bench.step_cpu (the runtime's CPU per step with no gRPC, for A/B pairs of the step loop):
    its tickers step, and the CPU it reports is per completed step."""
    from bench import step_cpu

    result = await step_cpu.measure(20, window=1.5, settle=1.2, profile=0)
    assert 5 <= result["steps_per_second"] <= 40
    assert result["cpu_us_per_step"] > 0


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_the_stop_under_load_benchmark_times_each_stop(backend: str) -> None:
    """bench.stop_under_load: every stop it sends is acknowledged and then interrupted (the
    halt after the acknowledgment), with the load's tickers running beside them."""
    from bench import stop_under_load

    result = await stop_under_load.measure(20, stops=3, settle=0.5, backend=backend)
    assert len(result["ack_ms"]) == len(result["interrupted_ms"]) == 3
    for ack, halted in zip(result["ack_ms"], result["interrupted_ms"], strict=True):
        assert 0 < ack <= halted


def _event_kinds(url: str) -> list[str]:
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            rows = db.execute("SELECT kind FROM events ORDER BY kind").fetchall()
    else:
        import psycopg

        with psycopg.connect(url) as db:
            rows = db.execute("SELECT kind FROM events ORDER BY kind").fetchall()
    return [str(row[0]) for row in rows]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_the_durable_floor_writes_the_stop_before_answering_and_the_halt_before_pushing(
    tmp_path: Path, backend: str
) -> None:
    """bench.durable_floor's backend: an acknowledged stop is in its database (one
    stop_requested), and a pushed terminal event has its halt there too (a second stop and one
    interrupted): the two durable writes any design pays, and nothing more."""
    from bench import durable_floor

    with Stack(backend, tmp_path) as stack:
        scratch = durable_floor.ScratchDatabase(backend, tmp_path)
        try:
            opened = await floor.Floor.open(stack, tmp_path, database=scratch.url)
            try:
                assert await opened.unary(0.05, 0.0) > 0
                assert _event_kinds(scratch.url) == ["stop_requested"]
                assert await opened.push(0.05, 0.0) > 0
                kinds = _event_kinds(scratch.url)
            finally:
                await opened.close()
        finally:
            scratch.drop()
    assert kinds == ["interrupted", "stop_requested", "stop_requested"]


async def test_the_durable_floor_benchmark_pairs_both_floors_with_every_stop() -> None:
    """bench.durable_floor at two trials on SQLite: each figure has a Stopline sample, a floor
    sample and a durable floor sample per stop, and the report gives all three ratios."""
    from bench import durable_floor

    result = await durable_floor.compare(["sqlite"], [0.05], trials=2)
    figures = result["sqlite"]["0.05s"]
    for kind in ("ack", "halt"):
        assert {name: len(samples) for name, samples in figures[kind].items()} == {
            "stopline": 2,
            "floor": 2,
            "durable": 2,
        }
        ratios = durable_floor.ratios(figures[kind])
        assert ratios["stopline_over_floor"] == pytest.approx(
            ratios["stopline_ms"] / ratios["floor_ms"]
        )
    assert "| sqlite | 0.05s | acknowledgment |" in durable_floor.report(result)


async def test_the_by_process_benchmark_swaps_each_server_for_stoplines() -> None:
    """bench.by_process at two rounds: a gateway in front of the floor's backend and the floor's
    relay in front of a runtime each carry a stop end to end (acknowledgment, then terminal
    event), beside the floor and Stopline, and the report splits the difference by process."""
    from bench import by_process

    result = await by_process.compare([0.05], trials=2)
    samples = result["0.05s"]
    assert set(samples) == set(by_process.PATHS)
    for path in by_process.PATHS:
        assert len(samples[path]["ack"]) == len(samples[path]["halt"]) == 2
        assert all(
            0 < a < h for a, h in zip(samples[path]["ack"], samples[path]["halt"], strict=True)
        )
    assert "| 0.05s | acknowledgment |" in by_process.report(result)
