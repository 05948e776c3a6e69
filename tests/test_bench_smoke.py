"""The benchmark harness still runs (tiny sizes): benchmarks that rot are worse than none."""

from __future__ import annotations

from pathlib import Path

from bench import scenarios
from bench.report import table
from bench.stack import Stack


async def test_benchmark_scenarios_run_end_to_end(tmp_path: Path) -> None:
    with Stack("sqlite", tmp_path) as stack:
        stop = await scenarios.stop_latency(stack, 0.05, trials=2)
        early = await scenarios.early_stop(stack, trials=2, delays_ms=(0.0,))
        start = await scenarios.start_latency(stack, trials=2)
        steps = await scenarios.per_step_overhead(stack, steps=20, repeats=1)
    assert stop["halt_ms"]["n"] == 2 and stop["mid_step"] >= 1
    # early_stop stops by key right after the start call is made, before its answer (issue 14):
    # no step may run. (Later delays are for bench/: by then the start may have been answered.)
    assert early["trials"] == 2 and early["operations_with_a_step_started"] == 0
    assert start["first_step_ms"]["n"] == 2
    assert steps["runtime_ms_per_step"]["median"] > 0
    text = table(
        {
            "machine": {},
            "stopline": {
                "sqlite": {"stop_latency/0.05s": stop, "early_stop": early, "per_step": steps}
            },
        }
    )
    assert "stop_latency/0.05s halt_ms" in text


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
