"""`rosetta serve` and the client mode `rosetta translate --server HOST:PORT`.

Registered by service/cli.py after service/engine_cli.py. `rosetta translate` itself (the local engine,
stdin -> stdout) belongs to engine_cli; this module adds `--server` (env ROSETTA_SERVER) to it and
routes the call to the gRPC client when the option is given. Where engine_cli is absent,
`rosetta translate` is registered here in client-only form. `--server-tls*` (env ROSETTA_SERVER_TLS*)
make that client connect over TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Callable
from typing import Any

SERVER_ENV = "ROSETTA_SERVER"
# --server-tls-SUFFIX -> the ClientTLS field it sets; each flag's env twin is SERVER_ENV + _TLS_<SUFFIX>
TLS_FLAGS = {"ca-file": "ca_file", "cert-file": "cert_file", "key-file": "key_file", "server-name": "server_name"}


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.cli import build_dataclass
    from service.config import ServerConfig
    from service.server import serve

    config = build_dataclass(ServerConfig, args)
    return asyncio.run(serve(config, announce=lambda line: print(line, flush=True)))


def _decoding_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The DecodingOptions flags given on the command line (or via ROSETTA_*); the rest stay server-side."""
    from service.options import DecodingOptions

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingOptions) if hasattr(args, f.name)}


def _client_tls(args: argparse.Namespace) -> Any:
    """The ClientTLS of the --server-tls* flags, or None (plaintext). TLS is on with --server-tls, off with
    --no-server-tls, and otherwise on when any --server-tls-* value is given; without --server-tls-ca-file
    the server is verified against the system's roots."""
    from service.client import ClientTLS

    given = {field: getattr(args, "server_tls_" + suffix.replace("-", "_")) or ""
             for suffix, field in TLS_FLAGS.items()}
    on = any(given.values()) if args.server_tls is None else args.server_tls
    return ClientTLS(**given) if on else None


def _client_translate(args: argparse.Namespace) -> int:
    from service.client import translate_command

    sentences = [s for s in (getattr(args, "sentences", None) or []) if isinstance(s, str)]
    return translate_command(args.server, sentences, input_path=getattr(args, "input", "-"),
                             output_path=getattr(args, "output", "-"), options=_decoding_fields(args),
                             model=args.server_model or "", timeout_s=args.server_timeout_s,
                             batch_sentences=args.server_batch_sentences,
                             with_scores=bool(getattr(args, "with_scores", False)), tls=_client_tls(args))


def _with_server_mode(local: Callable[[argparse.Namespace], int] | None) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "server", None):
            return _client_translate(args)
        if local is None:
            raise SystemExit("rosetta translate: --server HOST:PORT is required (the local engine is not installed)")
        return local(args)

    return run


def _add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def _add_tls_options(translate: argparse.ArgumentParser) -> None:
    from service.cli import _parse_bool

    env = f"{SERVER_ENV}_TLS"
    _add_option(translate, "--server-tls", action=argparse.BooleanOptionalAction,
                default=_parse_bool(os.environ[env]) if env in os.environ else None,
                help="with --server: connect over TLS (verifying the server against the system's trusted CAs "
                     "unless --server-tls-ca-file is given), or not; default: TLS when any --server-tls-* "
                     f"option is given (env {env}=1 or 0)")
    helps = {
        "ca-file": "PEM CA bundle that verifies the server's certificate, instead of the system's CAs",
        "cert-file": "PEM client certificate chain, for a server that requires one (mTLS; with the key file)",
        "key-file": "PEM private key of --server-tls-cert-file",
        "server-name": "name expected in the server's certificate when it differs from HOST (e.g. through "
                       "kubectl port-forward to localhost)",
    }
    for suffix in TLS_FLAGS:
        env = f"{SERVER_ENV}_TLS_{suffix.replace('-', '_').upper()}"
        _add_option(translate, f"--server-tls-{suffix}", default=os.environ.get(env, ""),
                    help=f"with --server: {helps[suffix]} (env {env})")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from service.cli import add_dataclass_flags
    from service.config import ServerConfig

    p = subparsers.add_parser(
        "serve", help="serve model-repository entries over gRPC (rosetta.v1.Translator), metrics on HTTP",
        description="Serve translation models over gRPC. Every flag has a ROSETTA_<FLAG> environment twin. "
                    "Stops on SIGTERM: health NOT_SERVING, in-flight calls get --drain-grace-s, exit 0.")
    add_dataclass_flags(p, ServerConfig)
    p.set_defaults(func=_cmd_serve)

    translate = subparsers.choices.get("translate")
    local = None
    if translate is None:
        from service.options import DecodingOptions

        translate = subparsers.add_parser("translate", help="translate sentences (arguments or stdin lines) "
                                                            "on a running server")
        translate.add_argument("sentences", nargs="*", help="sentences to translate; stdin lines when none")
        add_dataclass_flags(translate, DecodingOptions)
    else:
        local = translate.get_default("func")
    _add_option(translate, "--server", default=os.environ.get(SERVER_ENV),
                help=f"HOST:PORT of a rosetta server: translate there instead of locally (env {SERVER_ENV})")
    _add_option(translate, "--server-model", default="",
                help="with --server: the served model, NAME or NAME/VERSION (default: the server's default; "
                     "--model names a local entry and is not sent)")
    _add_option(translate, "--server-timeout-s", type=float, default=60.0,
                help="with --server: deadline of each call in seconds")
    _add_option(translate, "--server-batch-sentences", type=int, default=64,
                help="with --server: sentences sent per call")
    _add_tls_options(translate)
    translate.set_defaults(func=_with_server_mode(local))
