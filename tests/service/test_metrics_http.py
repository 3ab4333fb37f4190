"""The metrics listener of `ServerMetrics.serve_http`: a real HTTP server on 127.0.0.1, fetched with urllib."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from service.metrics import ServerMetrics


@pytest.fixture()
def metrics_url() -> Iterator[str]:
    metrics = ServerMetrics()
    metrics.requests.labels("tiny", "OK").inc()
    port = metrics.serve_http("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    metrics.close()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_metrics_path_serves_the_registry(metrics_url: str) -> None:
    status, headers, body = fetch(f"{metrics_url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b'rosetta_requests_total{code="OK",model="tiny"} 1.0' in body


def test_metrics_query_string_filters_series(metrics_url: str) -> None:
    status, _, body = fetch(f"{metrics_url}/metrics?name[]=rosetta_requests_total")
    assert status == 200
    assert b"rosetta_requests_total" in body
    assert b"rosetta_queue_depth_sentences" not in body


def test_head_of_metrics_answers_like_get_without_a_body(metrics_url: str) -> None:
    _, get_headers, get_body = fetch(f"{metrics_url}/metrics")
    status, headers, body = fetch(f"{metrics_url}/metrics", method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) == len(get_body)


@pytest.mark.parametrize("path", ["/", "/foo", "/metricsX", "/metrics/", "/favicon.ico"])
def test_any_other_path_is_not_found(metrics_url: str, path: str) -> None:
    status, headers, body = fetch(f"{metrics_url}{path}")
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")
    assert b"/metrics" in body and b"rosetta_" not in body
    assert fetch(f"{metrics_url}{path}", method="HEAD")[0] == 404


def test_close_stops_the_listener() -> None:
    metrics = ServerMetrics()
    port = metrics.serve_http("127.0.0.1", 0)
    assert port > 0
    assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
    metrics.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
