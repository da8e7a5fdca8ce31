"""Monitoring end to end: a real Prometheus scrapes a live relay with agents; every
dashboard query returns data, every alert expression evaluates; promtool checks the
exposition and runs the alert rules' unit tests.

Prometheus and promtool come from the Debian package ``prometheus`` (``.ci/run``
installs it); without them these tests fail and say so.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.fleet_support import V2, populate, start_fleet
from tests.support import free_port, relay_state

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relay.json"
SCRAPE = 1  # seconds, for the test's Prometheus
GRAFANA_VARS = {"$__rate_interval": f"{10 * SCRAPE}s", "$instance": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not on PATH: install the Debian package prometheus (.ci/run does)"
        )
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            queries.append((panel["title"], expr))
    return queries


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_dashboard_and_rules_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {"instance", "datasource"} <= {v["name"] for v in dash["templating"]["list"]}
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "requests",
        "cache",
        "upstream",
        "fan-out",
        "delta",
        "agents by state",
        "version",
        "sync",
    ):
        assert topic in titles, topic
    assert alert_names() == [
        "RelayDown",
        "RelaySyncFailing",
        "RelayTimestampExpiringSoon",
        "RelayUpstreamUnreachable",
        "RelayStoreNearQuota",
        "RelayManyInstallFailures",
        "RelayDeltaEngineFailing",
    ]
    for provisioning in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert (
            provisioning.read_text().startswith("#") and "apiVersion: 1" in provisioning.read_text()
        )


def test_promtool_rules_check_and_unit_tests():
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "tests.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


@pytest.fixture
async def live(tmp_path, aiohttp_server):
    """A relay with agents that installed, failed, deferred, waited and took a delta."""
    fleet = await start_fleet(tmp_path, aiohttp_server, **{"store.max_bytes": "50MB"})
    await populate(fleet)
    await fleet.publish(V2, "1.1.0")
    await fleet.approve("1.1.0")
    summary = await fleet.run("ok")
    assert [o.via for o in summary.outcomes if o.event == "installed"] == ["delta"]
    return fleet


async def test_metrics_pass_promtool_check(live):
    async with aiohttp.ClientSession() as s, s.get(live.relay.make_url("/metrics")) as r:
        assert r.status == 200
        text = await r.read()
    check = await asyncio.to_thread(
        subprocess.run, [tool("promtool"), "check", "metrics"], input=text, capture_output=True
    )
    assert check.returncode == 0 and not check.stdout and not check.stderr, check
    body = text.decode()
    for series in (
        'relay_build_info{version="0.1.0"} 1.0',
        "relay_agents 4.0",
        'relay_agents_by_state{state="failed"} 1.0',
        'relay_agents_by_version{product="app",version="1.1.0"} 1.0',
        "process_cpu_seconds_total",
        "python_info",
    ):
        assert series in body, series


@pytest.mark.slow
async def test_prometheus_scrapes_the_relay_and_every_query_answers(tmp_path, live):
    prometheus = tool("prometheus")
    port = live.relay.port
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE}s\n  evaluation_interval: {SCRAPE}s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: relay\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    web = free_port()
    api = f"http://127.0.0.1:{web}/api/v1"
    proc = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as s:

            async def query(expr):
                async with s.get(f"{api}/query", params={"query": expr}) as r:
                    return r.status, await r.json()

            async def wait_for(check, what):
                for _ in range(600):
                    if proc.returncode is not None:
                        err = (await proc.stderr.read()).decode()[-2000:]
                        raise AssertionError(f"prometheus exited: {err}")
                    try:
                        if await check():
                            return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                raise AssertionError(f"timed out waiting for {what}")

            async def scraped_enough():
                status, body = await query('count_over_time(up{job="relay"}[1m]) >= 5')
                return status == 200 and body["data"]["result"]

            await wait_for(scraped_enough, "five scrapes of the relay")

            rules = []

            async def rules_evaluated():
                async with s.get(f"{api}/rules") as r:
                    groups = (await r.json())["data"]["groups"]
                rules[:] = [rule for g in groups for rule in g["rules"]]
                return [r["name"] for r in rules] == alert_names() and all(
                    rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001")
                    for rule in rules
                )

            await wait_for(rules_evaluated, "every alert rule evaluated")
            status, body = await query('up{job="relay"}')
            assert body["data"]["result"][0]["value"][1] == "1"

            empty = []
            for title, expr in dashboard_queries():
                status, body = await query(expr)
                assert status == 200 and body["status"] == "success", (title, expr, body)
                if not body["data"]["result"]:
                    empty.append((title, expr))
            assert not empty, f"dashboard queries without data: {empty}"
            for rule in rules:  # as Prometheus loaded them from alerts.yml
                status, body = await query(rule["query"])
                assert status == 200 and body["status"] == "success", (rule["name"], body)
            # The fleet as Prometheus sees it.
            status, body = await query('relay_agents_by_state{state="failed"}')
            assert body["data"]["result"][0]["value"][1] == "1"
            assert len(relay_state(live.relay).registry) == 4
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
