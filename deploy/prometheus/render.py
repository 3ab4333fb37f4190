"""Embed rules.yml in a Prometheus Operator PrometheusRule, so the plain rule file stays the single source.

    python deploy/prometheus/render.py          # rewrite prometheusrule.yaml
    python deploy/prometheus/render.py --check  # exit 1 when prometheusrule.yaml is stale

`groups:` of rules.yml becomes `spec.groups` verbatim (indented, comments kept); tests/deploy runs --check.
Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "rules.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from rules.yml by render.py; edit rules.yml and run `python deploy/prometheus/render.py`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: rosetta
  labels:
    app.kubernetes.io/name: rosetta
    # kube-prometheus-stack selects rules by its Helm release label; match yours
    # (or set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false).
    release: kube-prometheus-stack
spec:
"""


def render(source: str) -> str:
    """The PrometheusRule text for the rule-file text `source` (which must start its body at `groups:`)."""
    lines = source.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    except StopIteration:
        raise ValueError("rules.yml has no top-level `groups:` key") from None
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the output is stale")
    args = parser.parse_args(argv)
    expected = render(SOURCE.read_text())
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != expected:
            print(f"{TARGET} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(expected)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
