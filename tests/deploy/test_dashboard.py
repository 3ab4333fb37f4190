"""deploy/grafana/rosetta-dashboard.json: well formed, and it shows what the issue asks for."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.tools import dashboard_queries, load_dashboard, substitute


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_datasource_variable_and_known_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    queries = dashboard_queries(dashboard)  # raises KeyError on an undefined variable
    for where, expr in queries:
        assert "$" not in expr, f"{where}: uninterpolated variable in {expr}"
        assert substitute(expr, {}) == expr


@pytest.mark.parametrize("what, pattern", [
    ("request rate", r"rate\(rosetta_requests_total\{"),
    ("latency quantiles", r"histogram_quantile\(0\.99, sum by \(model, le\) \(rate\(rosetta_request_duration_second"),
    ("error ratio", r'code=~"[A-Z_|]*INTERNAL[A-Z_|]*"'),
    ("batch size", r"rosetta_batch_size_sentences_(sum|bucket)"),
    ("queue depth", r"rosetta_queue_depth_sentences\{"),
    ("tokens per second", r"rate\(rosetta_output_tokens_total\{"),
    ("decode loop rows", r"rosetta_live_rows\{"),
    ("rows per decoder step", r"rate\(rosetta_decoder_step_rows_sum\{"),
    ("KV-cache occupancy", r"rosetta_kv_cache_bytes\{kind=\"reserved\""),
    ("decoder step time by rows", r"sum by \(model, rows, le\) \(rate\(rosetta_decoder_step_by_rows_seconds_bucket"),
    ("time to first streamed word", r"rosetta_time_to_first_word_seconds_bucket"),
    ("beam reductions", r"rate\(rosetta_beam_reduced_sentences_total\{"),
])
def test_dashboard_shows(what: str, pattern: str, dashboard: dict[str, Any]) -> None:
    assert any(re.search(pattern, expr) for _, expr in dashboard_queries(dashboard)), f"no panel shows {what}"


def test_every_query_filters_by_namespace_and_model(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(r"\b(?:rosetta_|namespace_model)[\w:]*\{([^}]*)\}", target["expr"]):
                assert 'namespace=~"$namespace"' in selector and 'model=~"$model"' in selector, (
                    f"{panel['title']!r}: {{{selector}}} ignores the namespace/model variables")
