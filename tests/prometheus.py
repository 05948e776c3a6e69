"""A real Prometheus server (Debian's `prometheus` package) as a subprocess, scraping Stopline's
metrics endpoints: for the test that its query API returns the stop-latency histogram, and for
bench/dashboard_plot.py, which draws the dashboard's panels from it.

Never the system service: each use gets its own configuration, data directory and port, and the
process is ended by its own id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.ports import free_port

INSTALL_HINT = "apt-get install -y prometheus (.ci/run installs it)"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def require_prometheus() -> str:
    """The binary; the calling test skips without it, but fails when STOPLINE_REQUIRE_PROMETHEUS=1
    (CI), so CI cannot go green by skipping the test."""
    binary = prometheus_binary()
    if binary is not None:
        return binary
    reason = f"no prometheus binary ({INSTALL_HINT})"
    if os.environ.get("STOPLINE_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{reason} (STOPLINE_REQUIRE_PROMETHEUS=1: the Prometheus test must run)")
    pytest.skip(reason)


def scrape_config(jobs: dict[str, list[str]], interval: str) -> str:
    """prometheus.yml for `jobs` (job name -> host:port targets); JSON is valid YAML."""
    return json.dumps(
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        },
        indent=2,
    )


class PrometheusServer:
    """`prometheus` scraping `jobs` every `interval`, listening on a free port of 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        jobs: dict[str, list[str]],
        interval: str = "500ms",
        binary: str | None = None,
    ) -> None:
        binary = binary or prometheus_binary()
        if binary is None:
            raise RuntimeError(f"no prometheus binary ({INSTALL_HINT})")
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(jobs, interval))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in {timeout}s")
            time.sleep(0.1)

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus answered {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector's samples: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self._get("/api/v1/query", {"query": expr})
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range's series: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        result: list[dict[str, Any]] = self._get("/api/v1/query_range", params)["result"]
        return result

    def targets_up(self) -> int:
        return sum(1 for s in self.query("up") if float(s["value"][1]) == 1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
