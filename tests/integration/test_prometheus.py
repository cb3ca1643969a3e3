"""The shipped alert rules and dashboard: promtool checks and unit-tests the rules, and a real
Prometheus scraping a real daemon answers every dashboard query and raises the run-failure alert
when PostgreSQL goes away.

Needs Debian's `prometheus` package (/usr/bin/prometheus and promtool; `.ci/run` installs it):
skipped with the reason without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from etl_service.postgres.embedded import postgres
from etl_service.run import metrics

from .conftest import World
from .helpers import REPO, running, stop, wait_for, write_env

RULES = REPO / "deploy" / "prometheus" / "etl-service.rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "etl-service.rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "etl-service.json"
ALERTS = ("EtlServiceDown", "EtlRunsFailing", "EtlNoRecentSuccess", "EtlLagHigh", "EtlQuarantineNotEmpty",
          "EtlBacklogGrowing")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: Debian's prometheus package provides it"
                    " (apt-get install prometheus; .ci/run installs it)")
    return path


def _promtool(*args: str) -> str:
    done = subprocess.run([_tool("promtool"), *args], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    print(f"$ promtool {' '.join(args)}\n{output}")
    assert done.returncode == 0, output
    return output


def test_promtool_checks_the_rules() -> None:
    assert "SUCCESS: 6 rules found" in _promtool("check", "rules", str(RULES))
    assert tuple(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)) == ALERTS


def test_promtool_unit_tests_pass_with_a_firing_case_for_every_alert() -> None:
    assert "SUCCESS" in _promtool("test", "rules", str(RULE_TESTS))
    text = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:", text))
    quiet = set(re.findall(r"alertname: (\w+)\n(?!\s+exp_alerts:)", text))
    assert firing == quiet == set(ALERTS)


def _dashboard_queries() -> dict[str, str]:
    """Panel title and target -> the PromQL a Grafana sends for job `src`."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{panel['title']} [{target['refId']}]": target["expr"].replace("$job", "src")
            .replace("$__rate_interval", "1m") for panel in panels for target in panel["targets"]}


def test_every_dashboard_query_reads_metrics_the_daemon_exports() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]}
    used = {name for expr in _dashboard_queries().values() for name in re.findall(r"\betl_\w+", expr)}
    assert used and used <= exported, used - exported


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    """Prometheus's HTTP API on 127.0.0.1:`port`."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's series: (labels, value)."""
        return [(series["metric"], float(series["value"][1]))
                for series in self.get("/api/v1/query", query=expr)["result"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing."""
        return list(self.get("/api/v1/alerts")["alerts"])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


@contextlib.contextmanager
def _prometheus(tmp: Path, metrics_port: int) -> Iterator[Api]:
    """Prometheus scraping 127.0.0.1:`metrics_port` every second with the shipped rules, as README says."""
    binary = _tool("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: etl-service
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    _promtool("check", "config", str(config))
    port = _free_port()
    log = tmp / "prometheus.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=out)
    api = Api(port)
    try:
        wait_for(lambda: api.ready() or proc.poll() is not None, 60, "Prometheus to be ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_dashboard(api: Api, move: Callable[[], None]) -> None:
    """Every panel's query returns numbers for job `src`; rows moved by `move` are seen moving; `job` lists it.

    The rows move only once every panel has data: the rate panel looks back one minute, and the
    wait for the slower panels must not use that minute up.
    """
    queries = _dashboard_queries()

    def every_query_has_data() -> bool:
        return all(api.query(expr) and not any(math.isnan(value) for _, value in api.query(expr))
                   for expr in queries.values())

    def steps_moving() -> set[str]:
        return {labels["step"] for labels, value in api.query(queries["Rows moved / s [A]"]) if value > 0}

    wait_for(every_query_has_data, 60, "every dashboard query to return data")
    move()
    wait_for(lambda: steps_moving() == {"extracted", "loaded", "marked"}, 30, "the rate panel to show rows moving")
    for title, expr in queries.items():
        print(f"{title}: {expr} -> {api.query(expr)}")
    assert [value for _, value in api.query('etl_rows_total{job="src", step="marked"}')] == [800.0]
    assert "src" in api.get("/api/v1/label/job/values", **{"match[]": "etl_run_duration_seconds_count"})


def _check_quiet(api: Api) -> None:
    """Every shipped rule evaluates without error on the real series, and none is pending or firing."""
    def rules() -> list[dict[str, Any]]:
        return [rule for group in api.get("/api/v1/rules")["groups"] for rule in group["rules"]]

    assert sorted(rule["name"] for rule in rules()) == sorted(ALERTS)
    wait_for(lambda: all(rule["health"] == "ok" for rule in rules()), 30, "every rule to evaluate without error")
    assert api.alerts() == []


@pytest.mark.slow
def test_a_real_prometheus_answers_the_dashboard_and_alerts_when_runs_fail(world: World, tmp_path: Path) -> None:
    _tool("prometheus")
    with postgres(tmp_path / "outage-pg") as pg:
        def sql(query: str) -> int:
            with psycopg2.connect(pg.uri) as conn, conn.cursor() as cur:
                cur.execute(query)
                return int(cur.fetchone()[0]) if cur.description else 0  # type: ignore[index]

        sql("CREATE TABLE src (id bigint PRIMARY KEY, amount numeric(12,2), name text, ts timestamptz,"
            " processed boolean NOT NULL DEFAULT false);"
            "INSERT INTO src SELECT g, g, 'r', now(), false FROM generate_series(1, 500) g")
        metrics_port = _free_port()
        env_file = write_env(world, tmp_path / "chdb", PG_DSN=pg.uri, ETL_SCHEDULE="*/1 * * * * *",
                             ETL_RETRY_BACKOFF="0.2", ETL_METRICS_PORT=str(metrics_port))
        with running("--env-file", str(env_file), log=tmp_path / "daemon.log") as daemon, \
                _prometheus(tmp_path, metrics_port) as api:
            wait_for(lambda: sql("SELECT count(*) FROM src WHERE processed") == 500, 60, "the first drain")
            wait_for(lambda: bool(api.query('etl_rows_total{step="marked"}')), 30, "a scrape after the drain")

            def move() -> None:
                sql("INSERT INTO src SELECT g, g, 'r', now(), false FROM generate_series(501, 800) g")
                wait_for(lambda: sql("SELECT count(*) FROM src WHERE processed") == 800, 60, "the second drain")

            _check_dashboard(api, move)
            _check_quiet(api)

            pg.stop()
            wait_for(lambda: bool(api.alerts()), 60, "an alert once runs fail")
            alert = api.alerts()[0]
            print("alert:", json.dumps(alert))
            assert (alert["labels"]["alertname"], alert["state"] in ("pending", "firing")) == ("EtlRunsFailing", True)
            assert {k: alert["labels"][k] for k in ("job", "status", "severity")} == \
                {"job": "src", "status": "failed", "severity": "warning"}
            assert "journalctl -u etl.service -p err --since -1h -g 'job=src'" in alert["annotations"]["description"]
            assert [a["labels"]["alertname"] for a in api.alerts()] == ["EtlRunsFailing"]
            assert daemon.poll() is None, "the daemon must survive a PostgreSQL outage"
            assert stop(daemon) == 0
    assert "status=failed" in (tmp_path / "daemon.log").read_text()
