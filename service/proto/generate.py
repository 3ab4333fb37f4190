"""Generate the Python gRPC stubs of protos/translate.proto into service/proto/. Never edit the output.

    python -m service.proto.generate          # regenerate (needs grpcio-tools, in the dev extra)
    python -m service.proto.generate --check  # exit 1 when the committed stubs differ from a fresh run

The stubs are committed so the serving image needs no grpcio-tools; tests/service/test_server_proto.py
fails when they are stale against protos/. The proto directory is mapped onto the package path
(`-Iservice/proto=protos`) so the generated `_grpc` module imports `service.proto.translate_pb2` instead
of a top-level `translate_pb2`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
PACKAGE_DIR = Path("service") / "proto"  # where the stubs go, relative to the repository root
PROTOS = ("translate.proto",)
GENERATED = ("translate_pb2.py", "translate_pb2.pyi", "translate_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every file of PROTOS; stubs land in `out_root`/service/proto. Returns their paths."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency only

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    for name in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE_DIR.as_posix()}={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            (PACKAGE_DIR / name).as_posix(),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / name}")
    return [out_root / PACKAGE_DIR / g for g in GENERATED]


def stale_files() -> list[str]:
    """Names of committed stubs that differ from (or are missing next to) a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh
                if not (REPO / PACKAGE_DIR / p.name).exists()
                or (REPO / PACKAGE_DIR / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python -m service.proto.generate", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, REPO / PACKAGE_DIR / path.name)
            print(f"wrote {PACKAGE_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
