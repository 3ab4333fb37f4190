"""Fixtures of the deploy/ tests: the built kustomize overlays and the server's real settings.

Helpers and the tool install commands live in tools.py; every missing tool skips with its reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.tools import INSTALL, OVERLAYS, Builder, find_builders


@pytest.fixture(scope="session")
def builders() -> list[Builder]:
    found, notes = find_builders()
    if not found:
        pytest.skip(f"no usable kustomize ({'; '.join(notes)}); install one with: {INSTALL['kustomize']}")
    return found


@pytest.fixture(scope="session")
def overlays(builders: list[Builder]) -> dict[str, list[dict[str, Any]]]:
    """Overlay name -> its built objects (with the newest kustomize found)."""
    newest = max(builders, key=lambda b: b.version)
    return {name: newest.build(folder) for name, folder in OVERLAYS.items()}


# ---- the server's real settings --------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_defaults() -> Any:
    """ServerConfig() as the server defines it (service/config.py)."""
    from service.config import ServerConfig
    return ServerConfig()


@pytest.fixture(scope="session")
def health_services() -> tuple[str, ...]:
    """The grpc.health.v1 service names the server registers (service/server/app.py HEALTH_SERVICES)."""
    from service.server import HEALTH_SERVICES
    return tuple(HEALTH_SERVICES)


