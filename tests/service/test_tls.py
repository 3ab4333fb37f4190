"""TLS and mutual TLS on a real server on 127.0.0.1, with a CA and certificates made for the test run;
and the listener settings next to them (metrics_host)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.cli import main
from service.client import ClientTLS, TranslatorClient
from service.config import ServerConfig
from service.options import DecodingOptions

pytest.importorskip("cryptography", reason="the test certificates are made with `cryptography` (dev extra)")

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "Ein Hund."


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 / localhost and a client certificate it signed,
    and a second CA with a client certificate of its own (trusted by nobody)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str


def make_pki(folder: Path) -> Pki:
    """EC P-256 keys, one day of validity."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, str]:
        cert_path = folder / f"{stem}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is None:
            return str(cert_path), ""
        key_path = folder / f"{stem}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path)

    def issue(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
              extensions: list[tuple[x509.ExtensionType, bool]]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name(subject), key)
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256()), key

    def ca(subject: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)
        return issue(subject, None, [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)])

    def leaf(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
             purposes: list[x509.ObjectIdentifier], names: list[x509.GeneralName] | None = None,
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage(purposes), False)]
        if names:
            extensions.append((x509.SubjectAlternativeName(names), False))
        return issue(subject, issuer, extensions)

    root, other = ca("Rosetta test CA"), ca("Another CA")
    # Client auth too, as deploy/README.md asks of a pod's certificate: the mTLS health probe presents it.
    server = leaf("rosetta test server", root, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf("rosetta test client", root, [ExtendedKeyUsageOID.CLIENT_AUTH])
    other_client = leaf("another client", other, [ExtendedKeyUsageOID.CLIENT_AUTH])
    return Pki(write("ca", root[0])[0], *write("server", *server), *write("client", *client),
               write("other-ca", other[0])[0], *write("other-client", *other_client))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def expected(tiny_engine: Any) -> str:
    """SENTENCE translated by the engine itself, with the server's default options."""
    return str(tiny_engine.translate_batch([SENTENCE], DecodingOptions())[0].hypotheses[0].text)


def refusal(target: str, tls: ClientTLS | None) -> grpc.StatusCode:
    """The status of a Translate call that must fail."""
    with TranslatorClient(target, timeout_s=10, tls=tls) as client, pytest.raises(grpc.RpcError) as info:
        client.translate([SENTENCE])
    return info.value.code()


# ---- TLS ----------------------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_translates(start_server: Any, pki: Pki, expected: str) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    with TranslatorClient(srv.address, tls=ClientTLS(ca_file=pki.ca)) as client:
        assert client.health_status() == "SERVING"
        [result] = client.translate([SENTENCE])
    assert result.text == expected


def test_tls_server_refuses_a_plaintext_client(start_server: Any, pki: Pki) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    assert refusal(srv.address, None) == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(start_server: Any, pki: Pki) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    assert refusal(srv.address, ClientTLS(ca_file=pki.other_ca)) == grpc.StatusCode.UNAVAILABLE


def test_server_name_is_checked_against_the_certificate(start_server: Any, pki: Pki, expected: str) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    # The certificate names 127.0.0.1 and localhost: another name fails even though the CA is trusted.
    with TranslatorClient(srv.address, tls=ClientTLS(ca_file=pki.ca, server_name="localhost")) as client:
        assert client.translate([SENTENCE])[0].text == expected
    wrong = ClientTLS(ca_file=pki.ca, server_name="rosetta.elsewhere.example")
    assert refusal(srv.address, wrong) == grpc.StatusCode.UNAVAILABLE


# ---- mutual TLS ---------------------------------------------------------------------------------------------


def test_mtls_client_with_a_certificate_from_the_client_ca_translates(start_server: Any, pki: Pki,
                                                                      expected: str) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    tls = ClientTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with TranslatorClient(srv.address, tls=tls) as client:
        assert client.translate([SENTENCE])[0].text == expected


@pytest.mark.parametrize("with_certificate", ["none", "from another CA"])
def test_mtls_server_refuses_a_client_without_an_accepted_certificate(start_server: Any, pki: Pki,
                                                                      with_certificate: str) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    tls = ClientTLS(ca_file=pki.ca)
    if with_certificate != "none":
        tls = ClientTLS(ca_file=pki.ca, cert_file=pki.other_client_cert, key_file=pki.other_client_key)
    assert refusal(srv.address, tls) == grpc.StatusCode.UNAVAILABLE


# ---- rosetta translate --server ... --server-tls-* ----------------------------------------------------------


def test_translate_command_over_tls_prints_the_translation(start_server: Any, pki: Pki, expected: str) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROSETTA_")}  # flags only
    proc = subprocess.run([sys.executable, "-m", "service.cli", "translate", "--server", srv.address,
                           "--server-tls-ca-file", pki.ca, SENTENCE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [expected]


def test_translate_command_takes_mtls_settings_from_the_environment(start_server: Any, pki: Pki, expected: str,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    monkeypatch.setenv("ROSETTA_SERVER", srv.address)
    monkeypatch.setenv("ROSETTA_SERVER_TLS_CA_FILE", pki.ca)
    monkeypatch.setenv("ROSETTA_SERVER_TLS_CERT_FILE", pki.client_cert)
    monkeypatch.setenv("ROSETTA_SERVER_TLS_KEY_FILE", pki.client_key)
    assert main(["translate", SENTENCE]) == 0
    assert capsys.readouterr().out.splitlines() == [expected]
    # Without the client certificate the server refuses the handshake; the command says so and exits 1.
    assert main(["translate", "--server-tls-cert-file", "", "--server-tls-key-file", "", SENTENCE]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_translate_command_tls_flags_choose_plaintext_or_tls(start_server: Any, pki: Pki, expected: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    srv = start_server()  # plaintext
    # --no-server-tls wins over a CA file given (e.g. from the environment)
    assert main(["translate", "--server", srv.address, "--server-tls-ca-file", pki.ca, "--no-server-tls",
                 SENTENCE]) == 0
    assert capsys.readouterr().out.splitlines() == [expected]
    # --server-tls alone: TLS, verified against the system's CAs; the plaintext server cannot answer it
    assert main(["translate", "--server", srv.address, "--server-tls", "--server-timeout-s", "10", SENTENCE]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_translate_command_names_an_unreadable_tls_file(start_server: Any, pki: Pki, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    missing = str(tmp_path / "missing-ca.pem")
    assert main(["translate", "--server", srv.address, "--server-tls-ca-file", missing, SENTENCE]) == 1
    assert missing in capsys.readouterr().err


# ---- the image's health check (the exec probe of deploy/k8s/components/tls) -----------------------------------


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_image_healthcheck_answers_serving_over_tls_from_the_server_settings(start_server: Any, pki: Pki,
                                                                            mtls: bool) -> None:
    client_ca = pki.ca if mtls else ""
    srv = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=client_ca)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROSETTA_", "HEALTHCHECK_"))}
    env["ROSETTA_PORT"] = str(srv.server.port)

    def healthcheck(**settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(REPO / "deploy" / "docker" / "healthcheck.py")],
                              env=env | settings, capture_output=True, text=True, timeout=60)

    # The server's own settings, as the container has them; the probe trusts the server's certificate as is.
    settings = {"ROSETTA_TLS_CERT_FILE": pki.server_cert, "ROSETTA_TLS_KEY_FILE": pki.server_key,
                "ROSETTA_TLS_CLIENT_CA_FILE": client_ca}
    proc = healthcheck(**settings)
    assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    assert healthcheck(**settings, HEALTHCHECK_TLS_CA_FILE=pki.ca).returncode == 0
    assert healthcheck(**settings, HEALTHCHECK_TLS_SERVER_NAME="rosetta.elsewhere.example").returncode == 1
    assert healthcheck().returncode == 1  # plaintext against the TLS port
    if mtls:  # it must present the pod's certificate
        assert healthcheck(**(settings | {"ROSETTA_TLS_CLIENT_CA_FILE": ""})).returncode == 1


# ---- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [{"tls_cert_file": "server.pem"}, {"tls_key_file": "server.key"},
                                   {"tls_client_ca_file": "ca.pem"}],
                         ids=["cert-without-key", "key-without-cert", "client-ca-without-cert"])
def test_server_config_refuses_incomplete_tls_settings(files: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="tls_"):
        ServerConfig(**files)


def test_unreadable_certificate_fails_the_start_naming_tls_cert_file(pki: Pki, tmp_path: Path) -> None:
    from service.server import RosettaServer

    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, tls_cert_file=str(tmp_path / "missing.pem"),
                          tls_key_file=pki.server_key)

    async def start() -> None:
        server = RosettaServer(config)  # on this loop: the aio health servicer binds to it
        await server.start()

    with pytest.raises(ValueError, match="tls_cert_file"):
        asyncio.run(start())


@pytest.mark.parametrize("metrics_host", ["127.0.0.1", "localhost"])
def test_metrics_listen_on_metrics_host(start_server: Any, metrics_host: str) -> None:
    srv = start_server(load=False, host="127.0.0.1", metrics_host=metrics_host)
    url = srv.server.endpoints.metrics_url
    assert url == f"http://{metrics_host}:{srv.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert b"# HELP rosetta_requests_total" in reply.read()
