"""Fixtures for the server tests: a real `RosettaServer` on 127.0.0.1 (free ports) serving the tiny
exported model, run on its own event loop in a background thread so tests can use blocking gRPC clients."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from service.config import ServerConfig
from service.proto import translate_pb2_grpc as pb_grpc

T = TypeVar("T")


class ServerThread:
    """A RosettaServer on a private event loop in a daemon thread.

    `call(coro)` runs a coroutine on the server's loop and returns its result; `stop()` drains."""

    def __init__(self, config: ServerConfig, load: bool = True) -> None:
        from service.server import RosettaServer

        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()

        async def make() -> RosettaServer:  # built on its loop: the aio health servicer binds to it
            return RosettaServer(config)

        self.server = self.call(make())
        self.call(self.server.start())
        if load:
            self.call(self.server.load_models())
        self.address = f"127.0.0.1:{self.server.port}"
        self._channels: list[grpc.Channel] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address)
        self._channels.append(ch)
        return ch

    def stub(self) -> pb_grpc.TranslatorStub:
        return pb_grpc.TranslatorStub(self.channel())

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of this server's registry (0.0 when absent)."""
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def stop(self, grace_s: float = 5.0) -> None:
        """Drain (unless a test already did) and end the loop thread. Idempotent."""
        if self.loop.is_closed():
            return
        for ch in self._channels:
            ch.close()
        try:
            if not self.server.translator.draining:
                self.call(self.server.drain(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def tiny_config(entry: Path, **overrides: Any) -> ServerConfig:
    """ServerConfig serving `entry` on free loopback ports with one ONNX Runtime thread."""
    base = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, model_repository=str(entry.parent.parent),
                        models=f"{entry.parent.name}/{entry.name}", intra_op_threads=1, max_wait_ms=2.0,
                        drain_grace_s=5.0)
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def tiny_entry(request: pytest.FixtureRequest) -> Path:
    """The tiny model entry the servers load: `tiny_repository_entry` (trained and exported for this run),
    or an entry exported earlier named by $ROSETTA_TEST_TINY_ENTRY (.../NAME/VERSION), to iterate quickly."""
    reuse = os.environ.get("ROSETTA_TEST_TINY_ENTRY")
    if reuse:
        return Path(reuse)
    return Path(request.getfixturevalue("tiny_repository_entry"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_entry: Path) -> Any:
    """The engine the server wraps, loaded in the test process for reference results."""
    from service.engine import Engine, EngineConfig

    return Engine.load(tiny_entry, EngineConfig(intra_op_threads=1))


@pytest.fixture(scope="session")
def server(tiny_entry: Path) -> Iterator[ServerThread]:
    """One shared server with the default limits (tests that need other limits start their own)."""
    srv = ServerThread(tiny_config(tiny_entry))
    yield srv
    srv.stop()


@pytest.fixture()
def start_server(tiny_entry: Path) -> Iterator[Callable[..., ServerThread]]:
    """Factory: `start_server(load=True, **ServerConfig overrides)` -> a ServerThread of its own,
    stopped at the end of the test."""
    started: list[ServerThread] = []

    def start(load: bool = True, **overrides: Any) -> ServerThread:
        srv = ServerThread(tiny_config(tiny_entry, **overrides), load=load)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def german(data_dir: Path) -> list[str]:
    """Real German sentences (Multi30k val), short ones first-come."""
    with gzip.open(data_dir / "val.de.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if 0 < len(line.strip()) < 80][:400]
