"""The monitoring assets under cluster/monitoring: Prometheus rules, their promtool unit
tests, the Prometheus config and the Grafana dashboard.

- ``promtool`` (Debian package ``prometheus``; ``make test`` installs it) must be on PATH:
  without it these tests FAIL, they do not skip, so an unchecked rule file never passes CI.
- Every PromQL expression parses: the rules through ``promtool check rules``, the dashboard's
  queries by writing them into a temporary rules file as recording rules and checking that.
- Every metric name used is one of the app's ``ray_dspy_*`` families, a recording rule of
  alerts.yaml, or a ``ray_serve_*`` series whose definition is found in the installed Ray
  source (so a Ray upgrade that renames one fails here, not silently on the dashboard).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "cluster" / "monitoring"
RULES = MON / "alerts.yaml"
RULE_TESTS = [MON / "alerts_test.yaml", MON / "alerts_long_test.yaml"]
PROM_CONFIG = MON / "prometheus.yml"
DASHBOARD = MON / "dashboards" / "serve_app.json"
README = MON / "README.md"

PROMTOOL_MISSING = (
    "promtool is not on PATH, so the Prometheus rules and dashboard queries cannot be checked. "
    "It ships in the Debian package `prometheus` (/usr/bin/promtool): `make test` installs it, "
    "or run `sudo apt-get install -y --no-install-recommends prometheus`."
)

# The app's metric families (exported from the replicas by ray.serve.metrics; Ray adds the
# `ray_` prefix and `_total` to counters). The budget gauges arrive with the budgets feature.
COUNTERS = {
    "ray_dspy_predictions_total",
    "ray_dspy_cache_operations_total",
    "ray_dspy_cost_usd_total",
    "ray_dspy_tokens_total",
    "ray_dspy_errors_total",
    "ray_dspy_rate_limited_total",
    "ray_dspy_budget_exceeded_total",
}
GAUGES = {
    "ray_dspy_breaker_state",
    "ray_dspy_active_predictions",
    "ray_dspy_budget_spent_ratio",
    "ray_dspy_budget_soft_limit_ratio",
    "ray_dspy_budget_spend_usd",
}
HISTOGRAMS = {"ray_dspy_prediction_latency_ms"}
DSPY_NAMES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# Ray Serve series used (or named in the README), verified in Ray 2.60's source: exported
# name -> (file under ray/serve/_private, instrument, name literal as written there).
# Counters get `_total` and histograms `_bucket`/`_sum`/`_count` on export.
RAY_SERVE = {
    "ray_serve_num_http_requests_total": ("request_ingress_metrics.py", "Counter", 'f"serve_num_{protocol_name}_requests"'),
    "ray_serve_num_http_error_requests_total": ("request_ingress_metrics.py", "Counter", 'f"serve_num_{protocol_name}_error_requests"'),
    "ray_serve_num_deployment_http_error_requests_total": ("request_ingress_metrics.py", "Counter", 'f"serve_num_deployment_{protocol_name}_error_requests"'),
    "ray_serve_deployment_request_counter_total": ("replica.py", "Counter", '"serve_deployment_request_counter"'),
    "ray_serve_deployment_error_counter_total": ("replica.py", "Counter", '"serve_deployment_error_counter"'),
    "ray_serve_deployment_replica_starts_total": ("replica.py", "Counter", '"serve_deployment_replica_starts"'),
    "ray_serve_deployment_processing_latency_ms_bucket": ("replica.py", "Histogram", '"serve_deployment_processing_latency_ms"'),
    "ray_serve_deployment_replica_healthy": ("deployment_state.py", "Gauge", '"serve_deployment_replica_healthy"'),
    "ray_serve_autoscaling_target_replicas": ("deployment_state.py", "Gauge", '"serve_autoscaling_target_replicas"'),
    "ray_serve_autoscaling_desired_replicas": ("autoscaling_state.py", "Gauge", '"serve_autoscaling_desired_replicas"'),
    "ray_serve_autoscaling_total_requests": ("autoscaling_state.py", "Gauge", '"serve_autoscaling_total_requests"'),
    "ray_serve_autoscaling_target_ongoing_requests": ("autoscaling_state.py", "Gauge", '"serve_autoscaling_target_ongoing_requests"'),
}

SEVERITIES = {"page", "ticket"}
RUNBOOK_PREFIX = "https://github.com/<org>/serve_app/blob/main/cluster/monitoring/README.md#"

# Grafana variables in dashboard queries and what to put there so that Prometheus can parse
# the query (every variable sits in a regex matcher or a range).
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${application}": ".*",
    "$application": ".*",
    "${model}": ".*",
    "$model": ".*",
}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def promtool() -> str:
    """promtool's path, or a test FAILURE (never a skip) when it is missing."""
    return shutil.which("promtool") or ""


def _require(promtool: str) -> None:
    if not promtool:
        pytest.fail(PROMTOOL_MISSING, pytrace=False)


def run_promtool(promtool: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    _require(promtool)
    return subprocess.run(
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_groups() -> list[dict[str, Any]]:
    return load_yaml(RULES)["groups"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable's selector."""
    for p in dashboard_panels():
        for t in p["targets"]:
            yield f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"]
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", v["query"]["query"])
            assert m, f"variable {v['name']}: expected label_values(selector, label)"
            yield f"variable {v['name']}", m.group(1)


def substitute_grafana_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (good enough for our expressions)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("("):  # a function (or an aggregation)
            continue
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # exponent or suffix of a number literal
        names.add(m.group(0))
    return names


def rule_exprs() -> Iterator[tuple[str, str]]:
    for g in rule_groups():
        for r in g["rules"]:
            yield r.get("alert") or r["record"], r["expr"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


# ----------------------------------------------------------------------------- promtool


def test_promtool_is_installed(promtool: str) -> None:
    out = run_promtool(promtool, "--version")
    assert out.returncode == 0, out.stderr


def test_rules_pass_promtool_check(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", *RULE_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_TESTS), out.stdout


def test_prometheus_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "config", PROM_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr
    cfg = load_yaml(PROM_CONFIG)
    assert cfg["rule_files"] == ["alerts.yaml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["ray"]["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    where: dict[str, str] = {}
    rules = []
    for i, (loc, expr) in enumerate(dashboard_queries()):
        name = f"dashboard:query_{i}"
        where[name] = loc
        rules.append({"record": name, "expr": substitute_grafana_vars(expr)})
    assert len(rules) >= 20
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", path)
    legend = "\n".join(f"  {k}: {v}" for k, v in where.items())
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\nrecord names:\n{legend}"


# ----------------------------------------------------------------------------- metric names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(ray_dspy_prediction_latency_ms_bucket'
        '{model=~"qa|x", le=~"500(\\\\.0)?"}[5m]))) / on (model) group_left a:b:c '
        "> 1e3 and ray_dspy_breaker_state offset 5m"
    )
    assert metric_names(expr) == {
        "ray_dspy_prediction_latency_ms_bucket",
        "a:b:c",
        "ray_dspy_breaker_state",
    }


def test_every_metric_used_is_known() -> None:
    recorded = recorded_names()
    known = DSPY_NAMES | set(RAY_SERVE) | recorded
    used: dict[str, set[str]] = {}
    for loc, expr in [*rule_exprs(), *dashboard_queries()]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(loc)
    unknown = {n: sorted(locs) for n, locs in used.items() if n not in known}
    assert not unknown, f"metric names that are neither ray_dspy_* families, recording rules nor verified ray_serve_*: {unknown}"
    # The dashboard reads every family of the app (the budget gauges arrive later).
    dash_used = {n for _, e in dashboard_queries() for n in metric_names(e)}
    for family in COUNTERS | GAUGES - {"ray_dspy_budget_spent_ratio", "ray_dspy_budget_soft_limit_ratio"}:
        assert family in dash_used, f"dashboard does not use {family}"
    assert "ray_dspy_prediction_latency_ms_bucket" in dash_used


def test_dspy_families_match_the_code() -> None:
    """The families the rules and dashboard read are the ones serve_app.metrics exports,
    with the labels the queries match on, and the histogram has the SLO buckets."""
    from serve_app import metrics

    exported_labels: dict[str, set[str]] = {}
    for kind, exported, tag_keys, _ in metrics.FAMILIES.values():
        name = "ray_" + exported + ("_total" if kind == "counter" else "")
        expected = {"counter": COUNTERS, "gauge": GAUGES, "histogram": HISTOGRAMS}[kind]
        assert name in expected, f"serve_app.metrics exports {name} ({kind}), unknown here"
        labels = set(tag_keys) | {"application", "deployment", "replica"}
        if kind == "histogram":
            exported_labels.update({name + s: labels | {"le"} for s in ("_bucket", "_sum", "_count")})
        else:
            exported_labels[name] = labels
    future: set[str] = set()
    assert DSPY_NAMES - future == set(exported_labels), "families here and in serve_app.metrics differ"
    assert {500.0, 1000.0} <= set(map(float, metrics.LATENCY_BUCKETS_MS)), "the latency SLOs need le=500 and le=1000"
    for loc, expr in [*rule_exprs(), *dashboard_queries()]:
        for m in re.finditer(r"\b(ray_dspy_\w+)\{([^}]*)\}", expr):
            if m.group(1) in future:
                continue
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:\\.|[^"\\])*"', '""', m.group(2))))
            assert used <= exported_labels[m.group(1)], f"{loc}: {m.group(1)} has no label {used - exported_labels[m.group(1)]}"


def test_ray_serve_metric_names_exist_in_installed_ray() -> None:
    import ray
    import ray.serve

    assert ray.__version__.startswith("2.60"), ray.__version__
    private = Path(ray.serve.__file__).parent / "_private"
    for exported, (fname, kind, literal) in RAY_SERVE.items():
        src = (private / fname).read_text()
        pattern = rf"\b(?:metrics|ray_metrics)\.{kind}\(\s*(?:name=)?{re.escape(literal)}"
        assert re.search(pattern, src), f"{exported}: no {kind}({literal}) in ray/serve/_private/{fname}"
        base = "ray_" + re.sub(r"\{protocol_name\}", "http", literal.lstrip("f").strip('"'))
        suffix = {"Counter": "" if base.endswith("_total") else "_total", "Gauge": ""}.get(kind)
        if kind == "Histogram":
            assert exported in {base + s for s in ("_bucket", "_sum", "_count")}, exported
        else:
            assert exported == base + suffix, (exported, base)


# ----------------------------------------------------------------------------- rules


def test_alerts_have_severity_annotations_and_runbooks() -> None:
    readme = README.read_text()
    anchors = {slug(m.group(1)) for m in re.finditer(r"^#{2,4} +(.+)$", readme, flags=re.M)}
    assert "runbooks" in anchors
    alerts = alert_rules()
    assert len(alerts) >= 10
    for r in alerts:
        name = r["alert"]
        assert r["labels"]["severity"] in SEVERITIES, name
        ann = r["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{name}: annotation {key} missing"
        assert ann["runbook_url"] == RUNBOOK_PREFIX + name.lower(), name
        assert name.lower() in anchors, f"{name}: no '### {name}' runbook heading in README.md"


def test_expected_alerts_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert names >= {
        "DSPyErrorBudgetBurnFast",
        "DSPyErrorBudgetBurnSlow",
        "DSPyLatencyP95BudgetBurnFast",
        "DSPyLatencyP95BudgetBurnSlow",
        "DSPyLatencyP99BudgetBurnFast",
        "DSPyLatencyP99BudgetBurnSlow",
        "DSPyCircuitBreakerOpen",
        "DSPyCacheHitRatioCollapse",
        "ServeDeploymentAtMaxReplicas",
        "DSPyBudgetSoftLimitReached",
    }


def test_burn_rate_alerts_use_the_sre_workbook_windows() -> None:
    by_name = {r["alert"]: r for r in alert_rules()}
    for slo, budget in (("errors", "0.001"), ("latency_over_500ms", "0.05"), ("latency_over_1000ms", "0.01")):
        fast = [r for r in by_name.values() if f"dspy_slo_{slo}:" in r["expr"] and r["labels"]["severity"] == "page"]
        slow = [r for r in by_name.values() if f"dspy_slo_{slo}:" in r["expr"] and r["labels"]["severity"] == "ticket"]
        assert len(fast) == 1 and len(slow) == 1, slo
        f, s = fast[0]["expr"], slow[0]["expr"]
        for window, factor in (("1h", "14.4"), ("5m", "14.4"), ("6h", "6"), ("30m", "6")):
            assert f"ratio_rate{window} > ({factor} * {budget})" in f, (slo, window)
        for window in ("3d", "6h"):
            assert f"ratio_rate{window} > (1 * {budget})" in s, (slo, window)


def test_client_errors_do_not_burn_the_availability_budget() -> None:
    from serve_app import errors

    client_codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServeAppError) and 400 <= cls.default_status < 500
    }
    server_codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServeAppError) and cls.default_status >= 500
    }
    assert {"invalid_request", "rate_limited", "unknown_model"} <= client_codes
    for name, expr in rule_exprs():
        if name.startswith("application:dspy_slo_errors:"):
            m = re.search(r'ray_dspy_errors_total\{code!~"([^"]+)"\}', expr)
            assert m, name
            assert set(m.group(1).split("|")) == client_codes, name
            assert not set(m.group(1).split("|")) & server_codes


def test_every_alert_has_firing_and_quiet_test_cases() -> None:
    fired: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for path in RULE_TESTS:
        for group in load_yaml(path)["tests"]:
            series = [s["series"] for s in group["input_series"]]
            for case in group.get("alert_rule_test", []):
                name, exp = case["alertname"], case["exp_alerts"]
                if exp:
                    fired[name] = fired.get(name, 0) + 1
                    # A scenario whose key labels match no expected alert stays quiet.
                    keys = [k for k in exp[0]["exp_labels"] if k not in {"severity", "slo"}]
                    expected = {tuple(a["exp_labels"][k] for k in keys) for a in exp}
                    present = set()
                    for s in series:
                        labels = dict(re.findall(r'(\w+)="([^"]*)"', s))
                        if all(k in labels for k in keys):
                            present.add(tuple(labels[k] for k in keys))
                    if present - expected:
                        quiet[name] = quiet.get(name, 0) + 1
                else:
                    quiet[name] = quiet.get(name, 0) + 1
    for r in alert_rules():
        assert fired.get(r["alert"]), f"{r['alert']}: no test case where it fires"
        assert quiet.get(r["alert"]), f"{r['alert']}: no test case where it must stay quiet"


def test_rule_tests_evaluate_recording_rules_before_alerts() -> None:
    groups = [g["name"] for g in rule_groups()]
    recording = [g["name"] for g in rule_groups() if all("record" in r for r in g["rules"])]
    alerting = [g["name"] for g in rule_groups() if all("alert" in r for r in g["rules"])]
    assert sorted(recording + alerting) == sorted(groups), "a group mixes recording and alerting rules"
    for path in RULE_TESTS:
        t = load_yaml(path)
        assert t["rule_files"] == ["alerts.yaml"], path
        order = t["group_eval_order"]
        assert sorted(order) == sorted(groups), f"{path.name}: group_eval_order must list every group"
        assert max(order.index(g) for g in recording) < min(order.index(g) for g in alerting), path.name


# ----------------------------------------------------------------------------- dashboard


def test_dashboard_is_a_grafana_dashboard_with_variables() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("application", "model"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["query"]["query"].startswith("label_values(")
        assert v["datasource"]["uid"] == "${datasource}"
    assert "$application" in variables["model"]["query"]["query"]


def test_dashboard_panels_are_well_formed() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("description", "").strip(), f"panel {p['title']!r} has no description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
            if "ray_dspy_" in t["expr"]:
                assert 'application=~"$application"' in t["expr"], (p["title"], t["expr"])


def _panel(keyword: str) -> dict[str, Any]:
    found = [p for p in dashboard_panels() if keyword.lower() in p["title"].lower()]
    assert found, f"no panel titled like {keyword!r}"
    return found[0]


@pytest.mark.parametrize(
    ("keyword", "must_contain"),
    [
        ("QPS (total and by model)", ["sum(rate(ray_dspy_predictions_total", "sum by (model)"]),
        ("Error rate by code", ["sum by (code)", "ray_dspy_errors_total"]),
        ("Latency p50 / p95 / p99", ["histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                                     "ray_dspy_prediction_latency_ms_bucket", "by (model, le)"]),
        ("Cache hit ratio by tier", ['result="hit"', "sum by (tier)"]),
        ("Cache operations by result", ["sum by (tier, op, result)"]),
        ("Tokens per minute", ["sum by (model, type)", "ray_dspy_tokens_total", "* 60"]),
        ("Dollars per minute", ["ray_dspy_cost_usd_total", "* 60"]),
        ("Dollars per day", ["increase(ray_dspy_cost_usd_total", "[24h]"]),
        ("Circuit breaker state", ["max by (model) (ray_dspy_breaker_state"]),
        ("Active predictions", ["ray_dspy_active_predictions"]),
        ("Degraded answers", ['outcome="degraded"']),
        ("Replicas per deployment", ["ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"]),
        ("Serve HTTP error rate", ["ray_serve_num_http_requests_total", 'status_code=~"5.."']),
    ],
)
def test_dashboard_has_panel(keyword: str, must_contain: list[str]) -> None:
    exprs = " ".join(t["expr"] for t in _panel(keyword)["targets"])
    for text in must_contain:
        assert text in exprs, (keyword, text)


def test_breaker_panel_maps_states_to_names() -> None:
    p = _panel("Circuit breaker state")
    assert p["type"] == "state-timeline"
    options = p["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {k: v["text"] for k, v in options.items()} == {"0": "closed", "1": "half-open", "2": "open"}
