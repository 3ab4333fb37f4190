"""TLS for the gRPC listener and its clients: PEM files in, grpc credentials out.

Server: `ServerConfig.tls_cert_file` + `tls_key_file` turn TLS on; `tls_client_ca_file` on top makes
the server require a client certificate signed by that CA (mutual TLS). Files are read once, at start;
a missing or unreadable file is a ValueError naming the setting, before anything listens.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def read_pem(path: str, setting: str) -> bytes:
    """The bytes of a PEM file; ValueError naming `setting` when it cannot be read or is not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{setting}={path!r} cannot be read ({err.strerror or err})") from err
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting}={path!r} is not a PEM file")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """Credentials for `grpc.aio.Server.add_secure_port`; client certificates are required when
    `client_ca_file` is given."""
    cert = read_pem(cert_file, "tls_cert_file")
    key = read_pem(key_file, "tls_key_file")
    ca = read_pem(client_ca_file, "tls_client_ca_file") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Credentials for a client channel: `ca_file` verifies the server (default: the system's roots);
    `cert_file` + `key_file` present a client certificate (mTLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both its certificate and its key file")
    ca = read_pem(ca_file, "tls_ca_file") if ca_file else None
    cert = read_pem(cert_file, "tls_cert_file") if cert_file else None
    key = read_pem(key_file, "tls_key_file") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
