"""Container health check: exit 0 when the local server reports SERVING on grpc.health.v1.

    python healthcheck.py [SERVICE]   # default service "rosetta.v1.Translator"

Used by the images' HEALTHCHECK (docker run / compose), and by Kubernetes as an exec probe where the server
listens with TLS (deploy/k8s/components/tls: the kubelet's native gRPC probe speaks plaintext only);
otherwise Kubernetes uses its native gRPC probes. It reads the server's own settings, as `rosetta serve`
does: the port from ROSETTA_PORT, and TLS from ROSETTA_TLS_CERT_FILE (TLS on when set), presenting that
certificate and ROSETTA_TLS_KEY_FILE as its client certificate when ROSETTA_TLS_CLIENT_CA_FILE requires one.

With TLS, two settings of its own (not ROSETTA_*: every ROSETTA_* variable is a server setting):
    HEALTHCHECK_TLS_SERVER_NAME  a name in the server's certificate (default "localhost"): the probe dials
                                 127.0.0.1, which certificates for a Service name do not carry
    HEALTHCHECK_TLS_CA_FILE      CA bundle verifying the server (default: the server's certificate itself,
                                 trusted as is, so a probe needs no CA whoever issued the certificate)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(target: str, env: dict[str, str]) -> grpc.Channel:
    """A plaintext channel, or a TLS one when the server's settings say it listens with TLS."""
    cert_file = env.get("ROSETTA_TLS_CERT_FILE", "")
    if not cert_file:
        return grpc.insecure_channel(target)
    cert = Path(cert_file).read_bytes()
    ca = Path(env["HEALTHCHECK_TLS_CA_FILE"]).read_bytes() if env.get("HEALTHCHECK_TLS_CA_FILE") else cert
    key = None
    if env.get("ROSETTA_TLS_CLIENT_CA_FILE"):  # mTLS: the server wants a client certificate; show it its own
        key = Path(env["ROSETTA_TLS_KEY_FILE"]).read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=cert if key else None)
    name = env.get("HEALTHCHECK_TLS_SERVER_NAME") or "localhost"
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])


def main() -> int:
    service = sys.argv[1] if len(sys.argv) > 1 else "rosetta.v1.Translator"
    target = f"127.0.0.1:{os.environ.get('ROSETTA_PORT', '50051')}"
    try:
        ch = channel(target, dict(os.environ))
    except OSError as err:
        print(f"{target}: cannot read a TLS file: {err}", file=sys.stderr)
        return 1
    with ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
        except grpc.RpcError as err:
            print(f"{target} {service!r}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
