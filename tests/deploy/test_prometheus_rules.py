"""deploy/prometheus: the rule file passes promtool (syntax and unit tests), the PrometheusRule is generated
from it, and every series the rules, the dashboard and the adapter read is one the server exposes."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.tools import (
    DEPLOY,
    RULES_FILE,
    adapter_queries,
    dashboard_queries,
    load_dashboard,
    load_rules,
    metric_names,
    one,
    server_series_names,
    tool,
    yaml,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules_passes() -> None:
    proc = promtool("check", "rules", str(RULES_FILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    """deploy/prometheus/rules_test.yml: the alerts fire on an overloaded pod and stay quiet on a healthy one."""
    proc = promtool("test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheusrule_is_generated_from_the_rule_file() -> None:
    spec = importlib.util.spec_from_file_location("render_rules", DEPLOY / "prometheus" / "render.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    generated = render.render(RULES_FILE.read_text())
    committed = (DEPLOY / "prometheus" / "prometheusrule.yaml").read_text()
    assert committed == generated, "prometheusrule.yaml is stale: run python deploy/prometheus/render.py"
    assert yaml.safe_load(committed)["spec"] == yaml.safe_load(RULES_FILE.read_text())


def test_built_prometheusrule_passes_promtool(overlays: Any, tmp_path: Path) -> None:
    """What the operator receives after kustomize, not just the source file."""
    rule = one(overlays["cpu"], "PrometheusRule", "rosetta")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, variables interpolated, parses (checked by promtool as a recording rule)."""
    rules = [{"record": f"dashboard:query_{i}:check", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_queries(load_dashboard()))]
    rules += [{"record": f"adapter:query_{i}:check", "expr": expr}
              for i, (_, expr) in enumerate(adapter_queries({"namespace": "ns", "pod": "p"}, "pod"))]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_series_read_is_exposed_by_the_server() -> None:
    """A metric renamed in service/metrics.py fails here, not silently on a dashboard."""
    exposed = server_series_names() | {"up"}
    sources = [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in load_rules()]
    sources += dashboard_queries(load_dashboard())
    sources += adapter_queries({"namespace": "ns", "pod": "p"}, "pod")
    unknown = {f"{where}: {name}" for where, expr in sources for name in metric_names(expr) - exposed}
    assert not unknown, "series the server does not expose:\n" + "\n".join(sorted(unknown))


def test_alerts_cover_latency_errors_and_saturation() -> None:
    rules = load_rules()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert 'quantile="0.99"' in alerts["RosettaHighLatencyP99"]["expr"]
    assert "rosetta_request_errors:ratio_rate5m" in alerts["RosettaHighErrorRatio"]["expr"]
    assert "rosetta_queue_saturation" in alerts["RosettaQueueSaturated"]["expr"]
    assert 'code="RESOURCE_EXHAUSTED"' in alerts["RosettaRequestsShed"]["expr"]
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(alert["annotations"])


def test_recording_rules_record_the_latency_quantiles() -> None:
    recorded = [r for r in load_rules() if r.get("record") == "namespace_model:rosetta_request_duration_seconds"
                                                                   ":histogram_quantile"]
    assert sorted(float(r["labels"]["quantile"]) for r in recorded) == [0.5, 0.9, 0.99]
    for r in recorded:
        assert f"histogram_quantile({r['labels']['quantile']}," in r["expr"]
