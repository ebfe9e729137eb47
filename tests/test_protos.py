"""Generated code is fresh, and our descriptors carry OpenFL 1.9's wire facts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from foedus.protos import aggregator_pb2, aggregator_pb2_grpc, base_pb2

REPO = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _proto_sources() -> list[str]:
    """The .proto files the Makefile generates from (its PROTO_SRC), in its order."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^PROTO_SRC\s*:=\s*(.+)$", makefile, re.MULTILINE)
    assert match, "Makefile has no PROTO_SRC"
    return match.group(1).split()


PROTO_SRC = _proto_sources()
EXPECTED_GENERATED = sorted(
    f"foedus/protos/{Path(source).stem}{suffix}"
    for source in PROTO_SRC
    for suffix in GENERATED_SUFFIXES
)


# --- (a) the checked-in generated code is not stale -----------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run protoc exactly as `make protos-check` does, into a temporary folder."""
    out = tmp_path_factory.mktemp("protos-check")
    plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *PROTO_SRC,
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return out


def test_makefile_generates_with_the_same_flags() -> None:
    """The Makefile's protoc command uses the flags this test runs protoc with."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert (
        "PROTOC = $(PY) -m grpc_tools.protoc -I. "
        "--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc" in makefile
    )
    check = "--python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp"
    assert f"$(PROTOC) {check} $(PROTO_SRC)" in makefile


def test_makefile_lists_every_proto() -> None:
    """Every .proto file in protos/ is one the Makefile generates from."""
    assert sorted(PROTO_SRC) == sorted(
        str(p.relative_to(REPO)) for p in REPO.glob("foedus/protos/*.proto")
    )


def test_generated_files_are_the_checked_in_ones(generated: Path) -> None:
    """protoc makes exactly the generated files that are checked in, no more, no fewer."""
    made = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file())
    checked_in = sorted(
        str(p.relative_to(REPO))
        for p in REPO.glob("foedus/protos/*")
        if "_pb2" in p.name and p.is_file()
    )
    assert made == EXPECTED_GENERATED
    assert checked_in == EXPECTED_GENERATED


@pytest.mark.parametrize("name", EXPECTED_GENERATED)
def test_generated_file_is_not_stale(generated: Path, name: str) -> None:
    """The checked-in file is byte for byte what protoc makes now (else: `make protos`)."""
    assert (generated / name).read_bytes() == (REPO / name).read_bytes(), (
        f"{name} is stale; run 'make protos'"
    )


# --- (b) OpenFL 1.9's wire facts hold for our descriptors -------------------------------------------

AGG = "openfl.aggregator."
HEADER = f"{AGG}MessageHeader"

# From /work/shared/reference/openfl-1.9-wire.md: full message name -> field -> (number, type).
WIRE: dict[str, dict[str, tuple[int, str]]] = {
    "NamedTensor": {
        "name": (1, "string"),
        "round_number": (2, "int32"),
        "lossless": (3, "bool"),
        "report": (4, "bool"),
        "tags": (5, "repeated string"),
        "transformer_metadata": (6, "repeated MetadataProto"),
        "data_bytes": (7, "bytes"),
    },
    "MetadataProto": {
        "int_to_float": (1, "map<int32, float>"),
        "int_list": (2, "repeated int32"),
        "bool_list": (3, "repeated bool"),
    },
    "DataStream": {"size": (1, "uint32"), "npbytes": (2, "bytes")},
    "ModelProto": {"tensors": (1, "repeated NamedTensor")},
    HEADER: {
        "sender": (1, "string"),
        "receiver": (2, "string"),
        "federation_uuid": (3, "string"),
        "single_col_cert_common_name": (4, "string"),
    },
    f"{AGG}PingRequest": {"header": (1, HEADER)},
    f"{AGG}PingResponse": {"header": (1, HEADER)},
    f"{AGG}GetTasksRequest": {"header": (1, HEADER)},
    f"{AGG}SendLocalTaskResultsResponse": {"header": (1, HEADER)},
    f"{AGG}Task": {
        "name": (1, "string"),
        "function_name": (2, "string"),
        "task_type": (3, "string"),
        "apply_local": (4, "bool"),
    },
    f"{AGG}GetTasksResponse": {
        "header": (1, HEADER),
        "round_number": (2, "int32"),
        "tasks": (3, f"repeated {AGG}Task"),
        "sleep_time": (4, "int32"),
        "quit": (5, "bool"),
    },
    f"{AGG}GetAggregatedTensorRequest": {
        "header": (1, HEADER),
        "tensor_name": (2, "string"),
        "round_number": (3, "int32"),
        "report": (4, "bool"),
        "tags": (5, "repeated string"),
        "require_lossless": (6, "bool"),
    },
    f"{AGG}GetAggregatedTensorResponse": {
        "header": (1, HEADER),
        "round_number": (2, "int32"),
        "tensor": (3, "NamedTensor"),
    },
    f"{AGG}TaskResults": {
        "header": (1, HEADER),
        "round_number": (2, "int32"),
        "task_name": (3, "string"),
        "data_size": (4, "int32"),
        "tensors": (5, "repeated NamedTensor"),
    },
    f"{AGG}InteropMessage": {
        "header": (1, HEADER),
        "message": (2, "DataStream"),
        "metadata": (3, "map<string, string>"),
    },
}

# Method -> (request type, response type, client streaming); none is server streaming.
RPCS: dict[str, tuple[str, str, bool]] = {
    "Ping": (f"{AGG}PingRequest", f"{AGG}PingResponse", False),
    "GetTasks": (f"{AGG}GetTasksRequest", f"{AGG}GetTasksResponse", False),
    "GetAggregatedTensor": (
        f"{AGG}GetAggregatedTensorRequest",
        f"{AGG}GetAggregatedTensorResponse",
        False,
    ),
    "SendLocalTaskResults": ("DataStream", f"{AGG}SendLocalTaskResultsResponse", True),
    "InteropRelay": (f"{AGG}InteropMessage", f"{AGG}InteropMessage", False),
}

FIRST_EXTENSION_NUMBER = 1000
# foedus's own RPCs and messages in the OpenFL service: an OpenFL peer neither calls nor serves
# them. Each RPC: (request, response, whether the response is a stream).
EXTENSION_RPCS: dict[str, tuple[str, str, bool]] = {
    "GetAggregatedModel": (f"{AGG}GetAggregatedModelRequest", f"{AGG}ModelChunk", True),
    "Heartbeat": (f"{AGG}HeartbeatRequest", f"{AGG}HeartbeatResponse", False),
    "Leave": (f"{AGG}LeaveRequest", f"{AGG}LeaveResponse", False),
    "PostSecureMessage": (f"{AGG}SecureMessage", f"{AGG}SecureReceipt", False),
    "GetSecureRelay": (f"{AGG}SecureRelayRequest", f"{AGG}SecureRelay", False),
}
EXTENSION_MESSAGES = {
    f"{AGG}GetAggregatedModelRequest",
    f"{AGG}ModelChunk",
    f"{AGG}HeartbeatRequest",
    f"{AGG}HeartbeatResponse",
    f"{AGG}LeaveRequest",
    f"{AGG}LeaveResponse",
    # secure aggregation's stages
    *(
        f"{AGG}{name}"
        for name in (
            "KeyAdvertisement",
            "SealedShare",
            "SurvivorConfirmation",
            "RevealedShare",
            "SecureMessage",
            "SecureReceipt",
            "SecureRelayRequest",
            "SecureRelay",
        )
    ),
}
_TYPE_NAMES = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def _kind(field: FieldDescriptor) -> str:
    """A field's type as the reference writes it: `int32`, `repeated NamedTensor`, `map<k, v>`."""
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = (_kind(message.fields_by_name[name]) for name in ("key", "value"))
        return f"map<{key}, {value}>"
    kind = message.full_name if message is not None else _TYPE_NAMES[field.type]
    return f"repeated {kind}" if field.is_repeated else kind


def _message(full_name: str) -> Descriptor:
    """The descriptor registered under `full_name` in the default pool."""
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


@pytest.mark.parametrize(
    ("cls", "full_name"),
    [
        (base_pb2.NamedTensor, "NamedTensor"),
        (base_pb2.MetadataProto, "MetadataProto"),
        (base_pb2.DataStream, "DataStream"),
        (base_pb2.ModelProto, "ModelProto"),
        (aggregator_pb2.TaskResults, "openfl.aggregator.TaskResults"),
        (aggregator_pb2.MessageHeader, "openfl.aggregator.MessageHeader"),
    ],
)
def test_message_full_names(cls: Any, full_name: str) -> None:
    """Base types have no package; aggregator types live in `openfl.aggregator`."""
    assert cls.DESCRIPTOR.full_name == full_name


def test_packages() -> None:
    """base.proto declares no package, aggregator.proto declares `openfl.aggregator`."""
    assert base_pb2.DESCRIPTOR.package == ""
    assert aggregator_pb2.DESCRIPTOR.package == "openfl.aggregator"


@pytest.mark.parametrize("full_name", WIRE)
def test_message_fields_match_openfl(full_name: str) -> None:
    """Every field of the reference has its number and type; other fields are extensions."""
    fields = _message(full_name).fields
    ours = {f.name: (f.number, _kind(f)) for f in fields if f.number < FIRST_EXTENSION_NUMBER}
    assert ours == WIRE[full_name]


def test_only_named_tensor_has_extensions() -> None:
    """Our extension fields are NamedTensor's, numbered 1000 or more: foedus_dtype, and the
    compression code and delta flag that travel only between foedus peers (issue #24)."""
    extensions = {
        (full_name, f.name): (f.number, _kind(f))
        for full_name in WIRE
        for f in _message(full_name).fields
        if f.number >= FIRST_EXTENSION_NUMBER
    }
    assert extensions == {
        ("NamedTensor", "foedus_dtype"): (1000, "string"),
        ("NamedTensor", "foedus_code"): (1001, "string"),
        ("NamedTensor", "foedus_delta"): (1002, "bool"),
    }
    field = base_pb2.NamedTensor.DESCRIPTOR.fields_by_name["foedus_dtype"]
    assert field.number >= FIRST_EXTENSION_NUMBER
    assert not field.has_presence


def test_aggregator_file_has_only_reference_messages() -> None:
    """aggregator.proto defines the reference's messages, and foedus's extension messages apart."""
    ours = {f"{AGG}{name}" for name in aggregator_pb2.DESCRIPTOR.message_types_by_name}
    assert not EXTENSION_MESSAGES & set(WIRE)
    assert ours == {name for name in WIRE if name.startswith(AGG)} | EXTENSION_MESSAGES
    assert set(base_pb2.DESCRIPTOR.message_types_by_name) == {
        name for name in WIRE if "." not in name
    }


def test_service_full_name() -> None:
    """The service is `openfl.aggregator.Aggregator`, the name in every method path."""
    service = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"]
    assert service.full_name == "openfl.aggregator.Aggregator"
    assert [method.name for method in service.methods] == list(RPCS) + list(EXTENSION_RPCS)


@pytest.mark.parametrize("method", EXTENSION_RPCS)
def test_extension_rpc_signature(method: str) -> None:
    """foedus's RPCs: a unary request, answered by a stream of chunks (the model download) or
    one message (the heartbeat, leaving)."""
    request, response, streamed = EXTENSION_RPCS[method]
    found = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].methods_by_name[method]
    assert method not in RPCS
    assert (found.input_type.full_name, found.output_type.full_name) == (request, response)
    assert (found.client_streaming, found.server_streaming) == (False, streamed)


@pytest.mark.parametrize("method", RPCS)
def test_rpc_signature(method: str) -> None:
    """Each RPC has the reference's request and response types and streaming shape."""
    request, response, client_streaming = RPCS[method]
    found = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].methods_by_name[method]
    assert found.full_name == f"openfl.aggregator.Aggregator.{method}"
    assert found.input_type.full_name == request
    assert found.output_type.full_name == response
    assert found.client_streaming is client_streaming
    assert found.server_streaming is False


class _RecordingChannel:
    """Stands in for a grpc.Channel and records the method paths a stub asks for."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def _recorder(self, kind: str) -> Callable[..., None]:
        def record(path: str, *args: object, **kwargs: object) -> None:
            self.paths[path] = kind

        return record

    def __getattr__(self, kind: str) -> Callable[..., None]:
        return self._recorder(kind)


def test_stub_method_paths() -> None:
    """The generated client stub calls `/openfl.aggregator.Aggregator/<Method>` with the right arity."""
    channel = _RecordingChannel()
    aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[arg-type]
    assert channel.paths == {
        f"/openfl.aggregator.Aggregator/{method}": (
            "stream_unary" if client_streaming else "unary_unary"
        )
        for method, (_, _, client_streaming) in RPCS.items()
    } | {
        f"/openfl.aggregator.Aggregator/{method}": "unary_stream" if streamed else "unary_unary"
        for method, (_, _, streamed) in EXTENSION_RPCS.items()
    }
