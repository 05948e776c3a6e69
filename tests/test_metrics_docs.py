"""The metric documentation stays true (issue 16, item 5): README's table lists exactly the
metrics both services register, with their types and label names, and every query of the
committed Grafana dashboard names metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from gateway_service.metrics import GatewayMetrics
from runtime_service.metrics import RuntimeMetrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "stopline.json"
SERVICES = ("runtime", "gateway")
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, frozenset[str]]]:
    """Exposed name (counters with _total) -> (type, label names), from the registry itself."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for collector in list(registry._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            kind, name = str(collector._type), collector._name
            labels = frozenset(collector._labelnames)
            found[name + ("_total" if kind == "counter" else "")] = (kind, labels)
        else:
            for family in collector.describe():  # type: ignore[attr-defined]
                labels = frozenset(getattr(family, "_labelnames", ()))
                suffix = "_total" if family.type == "counter" else ""
                found[family.name + suffix] = (family.type, labels)
    return found


def registered() -> dict[str, tuple[str, frozenset[str]]]:
    return {**_families(RuntimeMetrics().registry), **_families(GatewayMetrics().registry)}


def readme_table() -> dict[str, tuple[str, frozenset[str]]]:
    """README's metric table: `| `name` | type | labels | meaning |`, `<service>` expanded."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Operating Stopline") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `(stopline_[a-z_<>]+)` \| (\w+) \|([^|]*)\|", line)
        if match is None:
            continue
        name, kind, labels_cell = match.groups()
        # Label names are the backticked words outside parentheses (which list their values).
        labels = frozenset(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels_cell)))
        for service in SERVICES if "<service>" in name else ("",):
            rows[name.replace("<service>", service)] = (kind, labels)
    return rows


def test_readme_lists_every_registered_metric_with_its_type_and_labels() -> None:
    documented = readme_table()
    actual = registered()
    assert set(documented) - set(actual) == set(), "README lists metrics that do not exist"
    assert set(actual) - set(documented) == set(), "metrics missing from README's table"
    for name, (kind, labels) in actual.items():
        assert documented[name] == (kind, labels), name


def dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "stopline"
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    for wanted in ("Stop: whole, as clients saw it", "Stream lag", "Operations by status"):
        assert wanted in titles
    actual = registered()
    exposed = set(actual) | {
        name + suffix
        for name, (kind, _) in actual.items()
        if kind == "histogram"
        for suffix in HISTOGRAM_SERIES
    }
    used: set[str] = set()
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")"), expr
        names = set(re.findall(r"\bstopline_[a-z_]+", expr))
        assert names, expr
        assert names <= exposed, (expr, names - exposed)
        used |= names
    # The stop path, every phase of it, is on the dashboard.
    for phase in (
        "stopline_gateway_stop_ack_seconds",
        "stopline_gateway_stop_delivery_seconds",
        "stopline_runtime_stop_step_cancelled_seconds",
        "stopline_runtime_stop_interrupted_seconds",
        "stopline_gateway_stop_seen_by_client_seconds",
    ):
        assert f"{phase}_bucket" in used, phase


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine
