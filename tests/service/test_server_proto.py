"""The committed gRPC stubs are generated from protos/ and are not stale."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from service.proto import translate_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_protos() -> None:
    """Regenerating from protos/translate.proto gives the same API as the committed stubs (compared by
    the serialized file descriptor, so a different grpcio-tools version alone does not fail this)."""
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (dev extra) is not installed: cannot regenerate the stubs")
    import tempfile

    from service.proto.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        [fresh_pb2, _, fresh_grpc] = generate(Path(tmp))
        source = fresh_pb2.read_text()
        fresh_grpc_text = fresh_grpc.read_text()
    start = source.index("AddSerializedFile(") + len("AddSerializedFile(")
    serialized = ast.literal_eval(source[start: source.index(")\n", start)])  # the bytes literal protoc wrote
    fresh = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)
    assert fresh == committed, "service/proto is stale: run `python -m service.proto.generate` and commit"
    committed_grpc = (REPO / "service" / "proto" / "translate_pb2_grpc.py").read_text()
    methods = [m.name for m in fresh.service[0].method]
    for name in methods:
        assert f"def {name}(" in committed_grpc and f"def {name}(" in fresh_grpc_text


def test_api_conventions_every_enum_value_prefixed() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name
    assert pb.DESCRIPTOR.package == "rosetta.v1"
    assert [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()] == ["rosetta.v1.Translator"]


def test_every_proto_field_and_enum_value_is_commented() -> None:
    text = (REPO / "protos" / "translate.proto").read_text().splitlines()
    for i, line in enumerate(text):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "package", "//"))
        if is_field:
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
