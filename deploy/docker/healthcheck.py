"""Container health check: exit 0 when the local server reports SERVING on grpc.health.v1.

    python healthcheck.py [SERVICE]   # default service "rosetta.v1.Translator"

Used by the images' HEALTHCHECK (docker run / compose); Kubernetes uses its native gRPC probes instead.
The port comes from ROSETTA_PORT, as for `rosetta serve`.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    service = sys.argv[1] if len(sys.argv) > 1 else "rosetta.v1.Translator"
    target = f"127.0.0.1:{os.environ.get('ROSETTA_PORT', '50051')}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
        except grpc.RpcError as err:
            print(f"{target} {service!r}: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
