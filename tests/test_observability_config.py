"""deploy/observability: alert rules, scrape config and Grafana dashboard are valid and use moemesh's metrics.

promtool (Debian package `prometheus`, installed by `make install`) checks the rules and the config, runs the
alert unit tests (alerts_test.yml) and parses every dashboard query; without it those tests skip.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "observability"
PROM = ROOT / "prometheus"
DASHBOARD = ROOT / "grafana" / "moemesh.json"

HISTOGRAMS = {
    "moemesh_time_to_first_token_seconds",
    "moemesh_inter_token_latency_seconds",
    "moemesh_e2e_request_latency_seconds",
    "moemesh_request_queue_seconds",
    "moemesh_router_replica_call_seconds",
    "moemesh_expert_call_seconds",
}
METRICS = HISTOGRAMS | {
    "moemesh_num_requests_running",
    "moemesh_num_requests_waiting",
    "moemesh_prompt_tokens_total",
    "moemesh_generation_tokens_total",
    "moemesh_requests_total",
    "moemesh_kv_cache_usage_bytes",
    "moemesh_session_kv_hit_tokens_total",
    "moemesh_session_kv_miss_tokens_total",
    "moemesh_router_replica_failures_total",
    "moemesh_router_expert_tokens_total",
    "moemesh_expert_tokens_total",
    "moemesh_expert_queue_depth",
    "moemesh_expert_parameter_bytes",
    "moemesh_redis_errors_total",
}
JOBS = {"moemesh-gateway", "moemesh-router", "moemesh-expert"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (`make install` installs it: apt-get install prometheus)"
)


def promtool(*args: str, cwd: Path = PROM) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=50)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def metric_names(expr: str) -> set[str]:
    """moemesh_* names in a PromQL expression, histogram series mapped to their histogram."""
    names = set()
    for name in re.findall(r"\bmoemesh_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def leaf_panels(panels: list[dict]) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    out = []
    for p in panels:
        if p["type"] == "row":
            out += leaf_panels(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so Prometheus can parse it."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_check_rules():
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_check_config():
    out = promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file syntax" in out


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_alert_unit_tests():
    """alerts_test.yml fires (and holds back) the alerts on synthetic series, at least these."""
    tested = {
        t["alertname"]
        for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert {"MoemeshExpertLoadImbalance", "MoemeshHighErrorRate", "MoemeshReplicaFailingOver"} <= tested
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


@needs_promtool
@pytest.mark.timeout(60)
def test_dashboard_queries_parse(tmp_path):
    """Every dashboard query, Grafana variables substituted, is valid PromQL (as recording rules)."""
    exprs = [grafana_to_promql(t["expr"]) for p in leaf_panels(dashboard()["panels"]) for t in p["targets"]]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


@pytest.mark.timeout(60)
def test_dashboard_structure():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    everything = [p for p in dash["panels"]] + [c for p in dash["panels"] if p["type"] == "row" for c in p["panels"]]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    panels = leaf_panels(dash["panels"])
    assert len(panels) >= 20
    refs = {"${DS_PROMETHEUS}", "$DS_PROMETHEUS"}
    for p in panels:
        assert p["datasource"]["uid"] in refs, p["title"]
        assert p["targets"], p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in refs, p["title"]
            assert t["expr"].strip(), p["title"]


@pytest.mark.timeout(60)
def test_dashboard_uses_only_moemesh_metrics_and_all_of_them():
    used = set()
    for p in leaf_panels(dashboard()["panels"]):
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names <= METRICS, f"{p['title']}: unknown metrics {names - METRICS}"
            used |= names
    assert used == METRICS, f"metrics without a panel: {METRICS - used}"


@pytest.mark.timeout(60)
def test_alerts_use_moemesh_metrics_and_are_annotated():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "MoemeshTargetDown",
        "MoemeshHighTTFT",
        "MoemeshHighErrorRate",
        "MoemeshExpertPoolSaturated",
        "MoemeshGatewaySaturated",
        "MoemeshReplicaFailingOver",
        "MoemeshRedisErrors",
        "MoemeshExpertLoadImbalance",
    } <= names
    readme = (ROOT / "README.md").read_text()
    for r in rules:
        assert metric_names(r["expr"]) <= METRICS, r["alert"]
        assert r["for"] and r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        anchor = r["annotations"]["runbook"].split("#")[1]
        assert anchor == r["alert"].lower() and f"### {r['alert']}" in readme, r["alert"]
        assert all(job in JOBS for job in re.findall(r'job="([^"]+)"', r["expr"])), r["alert"]


@pytest.mark.timeout(60)
def test_scrape_config_jobs_and_rule_files():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == JOBS
    assert any(r.get("target_label") == "pool" for r in jobs["moemesh-expert"]["relabel_configs"])
