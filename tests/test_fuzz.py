"""Property-based fuzzing of what reads untrusted bytes: the tensor decoder, the upload path, the plan loader.

Whatever the input, each gives a valid value or one of our named errors (`TensorFormatError`,
`StreamError`, `PlanError`), never another exception. Examples are bounded so the file runs in
seconds (FOEDUS_FUZZ_EXAMPLES=20000 searches longer); each `@example` is an input that once
escaped as another exception, or one worth keeping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foedus.aggregator.upload import receive_upload
from foedus.plans import Plan, PlanError, load_plan, parse_plan
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import EXACT_DTYPES, TensorFormatError, decode_tensor, encode_tensor
from foedus.protos.stream import StreamError, StreamTooLargeError, chunk_bytes, chunk_payloads
from foedus.refusals.errors import InvalidRequestError

from servers import plan_document, small_model

FUZZ = settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)


# -- the tensor decoder -----------------------------------------------------------------------

DTYPE_NAMES = st.one_of(
    st.sampled_from(sorted(EXACT_DTYPES)),
    st.sampled_from(["", "<c16", ">f4", "O", "V8", "<M8", "|S4", "f4", "float32", "<U2"]),
    st.text(max_size=6),
)
TAGS = st.lists(
    st.sampled_from(["compressed", "lossy_compressed", "metric", "model", "delta"])
    | st.text(max_size=8),
    max_size=4,
)


@st.composite
def named_tensors(draw: st.DrawFn) -> base_pb2.NamedTensor:
    """A `NamedTensor` of any fields: often consistent, often a little off, sometimes nonsense."""
    dtype = draw(DTYPE_NAMES)
    if draw(st.booleans()):  # a small shape, with bytes that fit it or nearly
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
        itemsize = np.dtype(dtype).itemsize if dtype in EXACT_DTYPES else 4
        size = int(np.prod(shape)) * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, 7]))
        data = draw(st.binary(min_size=max(0, size), max_size=max(0, size)))
    else:
        shape = draw(st.lists(INT32 | st.integers(0, 8), max_size=40))
        data = draw(st.binary(max_size=256))
    metadata = [base_pb2.MetadataProto(int_list=shape)]
    metadata += draw(
        st.lists(st.builds(base_pb2.MetadataProto, int_list=st.lists(INT32)), max_size=1)
    )
    return base_pb2.NamedTensor(
        name=draw(st.text(max_size=20)),
        round_number=draw(INT32),
        lossless=draw(st.booleans()),
        report=draw(st.booleans()),
        tags=draw(TAGS),
        transformer_metadata=draw(st.sampled_from([metadata, []])),
        data_bytes=data,
        foedus_dtype=dtype,
    )


def check_decode(tensor: base_pb2.NamedTensor, max_bytes: int) -> None:
    """Decoding gives exactly the tensor's bytes in its shape and a dtype we send, or our error."""
    try:
        array = decode_tensor(tensor, max_bytes=max_bytes)
    except TensorFormatError:
        return
    assert array.dtype.str in EXACT_DTYPES
    assert array.shape == tuple(tensor.transformer_metadata[0].int_list)
    assert array.nbytes == len(tensor.data_bytes) <= max_bytes
    assert array.tobytes() == tensor.data_bytes
    assert not array.flags.writeable


@FUZZ
@given(tensor=named_tensors(), max_bytes=st.integers(0, 2**40))
@example(  # a zero dimension makes 0 bytes, but numpy cannot make the other dimensions
    tensor=base_pb2.NamedTensor(
        transformer_metadata=[base_pb2.MetadataProto(int_list=[0, 2**31 - 1, 2**31 - 1, 2**31 - 1])]
    ),
    max_bytes=1,
)
def test_decode_tensor_gives_an_array_or_tensor_format_error(
    tensor: base_pb2.NamedTensor, max_bytes: int
) -> None:
    """Any NamedTensor decodes to its exact bytes, or is refused with TensorFormatError."""
    check_decode(tensor, max_bytes)


@FUZZ
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(["<f4", ">f8", "<i8", ">i4", "|u1", "|b1", "<f2", ">u2", "|i1"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_encode_then_decode_is_exact(array: np.ndarray[Any, Any]) -> None:
    """Every array of a dtype we send comes back with the same values in its little-endian dtype."""
    decoded = decode_tensor(encode_tensor("t", array), max_bytes=2**20)
    assert decoded.dtype == array.dtype.newbyteorder("<")
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


# -- the upload path: chunks, then the streaming reader -----------------------------------------

HONEST_CHUNKS = st.binary(max_size=64).map(lambda b: base_pb2.DataStream(size=len(b), npbytes=b))
ANY_CHUNKS = st.builds(base_pb2.DataStream, size=UINT32, npbytes=st.binary(max_size=64))
CHUNK_LISTS = st.lists(HONEST_CHUNKS | ANY_CHUNKS, max_size=50)


@FUZZ
@given(chunks=CHUNK_LISTS, max_bytes=st.integers(0, 4096))
@example(chunks=[base_pb2.DataStream(size=0, npbytes=b"")] * 1000, max_bytes=10)
def test_chunk_payloads_give_the_bytes_or_stream_error(
    chunks: list[base_pb2.DataStream], max_bytes: int
) -> None:
    """The payloads are exactly the chunks' bytes, within the cap; else StreamError, for a reason."""
    sizes_lie = any(chunk.size != len(chunk.npbytes) for chunk in chunks)
    total = sum(len(chunk.npbytes) for chunk in chunks)
    try:
        joined = b"".join(chunk_payloads(iter(chunks), max_bytes=max_bytes))
    except StreamTooLargeError:
        assert total > max_bytes
        return
    except StreamError:
        assert sizes_lie
        return
    assert not sizes_lie
    assert joined == b"".join(chunk.npbytes for chunk in chunks)
    assert len(joined) <= max_bytes


def honest_payload() -> bytes:
    """A real TaskResults as a collaborator sends it."""
    message = aggregator_pb2.TaskResults(
        round_number=0,
        task_name="train",
        data_size=10,
        tensors=[encode_tensor(name, array) for name, array in small_model().items()],
    )
    return message.SerializeToString()


HONEST = honest_payload()


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a real TaskResults with a few bytes changed, cut or added."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    payload = bytearray(HONEST)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(payload)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(payload):
            payload[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del payload[at : at + draw(st.integers(1, 16))]
        else:
            payload[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(payload)


def received_results(chunks: Iterator[base_pb2.DataStream], max_bytes: int, folder: Path) -> None:
    """What the aggregator does with an upload before the federation (`receive_upload`)."""
    model = small_model()
    try:
        received = receive_upload(
            chunk_payloads(chunks, max_bytes=max_bytes),
            folder,
            on_head=lambda head: None,
            model_dtype=lambda name: model[name].dtype if name in model else None,
            max_tensor_bytes=max_bytes,
        )
    except (StreamError, TensorFormatError, InvalidRequestError):
        assert not any(folder.iterdir())  # nothing of a refused upload is kept
        return
    for tensor in received.tensors:
        assert tensor.array.nbytes <= max_bytes
    received.file.path.unlink()


@FUZZ
@given(payload=payloads(), chunk_size=st.integers(1, 300), max_bytes=st.integers(1, 4096))
@example(payload=b"\xff\xff\xff\xff", chunk_size=1, max_bytes=4096)
@example(payload=HONEST[: len(HONEST) // 2], chunk_size=64, max_bytes=4096)
@example(payload=b"\x7b" * 10000, chunk_size=2048, max_bytes=2**20)  # groups nested 10,000 deep
def test_uploads_give_results_or_our_errors(
    payload: bytes, chunk_size: int, max_bytes: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Any bytes, in any chunking, give checked tensors, or one of our refusals and no file."""
    received_results(chunk_bytes(payload, chunk_size), max_bytes, tmp_path_factory.mktemp("up"))


@FUZZ
@given(chunks=CHUNK_LISTS)
def test_any_chunk_list_gives_results_or_stream_error(
    chunks: list[base_pb2.DataStream], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Any list of chunks, sizes lying or not, gives checked tensors or one of our refusals."""
    received_results(iter(chunks), 4096, tmp_path_factory.mktemp("up"))


# -- the plan loader --------------------------------------------------------------------------

SECTIONS = (
    "federation",
    "aggregator",
    "tls",
    "collaborators",
    "tasks",
    "runner",
    "straggler",
    "best_model",
    "limits",
    "connection",
    "differential_privacy",
    "compression",
)
FIELDS = (
    *("name", "uuid", "aggregator_id", "rounds", "host", "port", "listen_address", "san_dns"),
    *("san_ips", "grace_seconds", "output_dir", "initial_model", "long_poll_seconds"),
    *("quit_grace_seconds", "certs_dir", "insecure", "seed", "settings", "policy"),
    *("cutoff_seconds", "min_reports", "percentage", "task", "metric", "mode"),
    *("max_message_bytes", "max_upload_bytes", "max_tensor_bytes", "max_data_size"),
    *("allow_non_finite", "upload_seconds", "max_calls_per_collaborator", "deadline_seconds"),
    *("max_retries", "max_wait_seconds", "backoff_initial_seconds", "backoff_max_seconds"),
    *("atomic_connections", "resend_on_reconnect"),
    *("enabled", "clip", "noise_multiplier", "delta", "max_epsilon"),
    *("upload", "download", "code", "fraction", "values"),
)
CODES = ("none", "lossless", "bfloat16", "int8", "topk", "float32")
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["", "\0", "a" * 5000, "train", "wait_for_all", "digits", "127.0.0.1"]),
    st.sampled_from(CODES),
)
KEYS = st.sampled_from((*SECTIONS, *FIELDS)) | st.text(max_size=8) | st.integers() | st.none()


def containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Lists and mappings of `children`, as YAML nests them."""
    return st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5)


YAML_LIKE = st.recursive(SCALARS, containers, max_leaves=25)


@st.composite
def plan_documents(draw: st.DrawFn) -> object:
    """Anything YAML could give, or a valid plan with a few keys set to anything."""
    if draw(st.booleans()):
        return draw(YAML_LIKE)
    document: dict[Any, Any] = plan_document(None)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS) | KEYS)
        value = draw(YAML_LIKE)
        if isinstance(document.get(section), dict) and draw(st.booleans()):
            document[section] = {**document[section], draw(KEYS): value}
        else:
            document[section] = value
    return document


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the plan files the fuzzer writes."""
    return tmp_path_factory.mktemp("fuzz")


def check_plan(load: Any) -> None:
    """`load()` gives a Plan, or a PlanError whose every line names the plan file."""
    try:
        plan = load()
    except PlanError as error:
        assert error.problems
        assert all(line.startswith(f"{error.path}: ") for line in error.problems)
        return
    assert isinstance(plan, Plan)


@FUZZ
@given(document=plan_documents())
@example(document=plan_document(None, aggregator={"output_dir": "out\0put"}))
@example(document=plan_document(None, aggregator={"initial_model": "m" * 5000}))
@example(document=plan_document(None, tls={"certs_dir": "a\0"}))
def test_parse_plan_gives_a_plan_or_plan_error(folder: Path, document: object) -> None:
    """Any YAML-like document is a plan or a PlanError naming the file."""
    check_plan(lambda: parse_plan(document, folder / "plan.yaml"))


def billion_laughs(levels: int) -> str:
    """YAML whose aliases unfold into 10**levels strings, all under federation.name."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"l{level}: &l{level} [{refs}]")
    lines.append(f"federation: {{name: *l{levels - 1}}}")
    return "\n".join(lines)


@st.composite
def plan_texts(draw: st.DrawFn) -> bytes:
    """Bytes of a plan file: anything, text, or a dumped document with text spliced in."""
    kind = draw(st.sampled_from(["bytes", "text", "dumped"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    text = yaml.safe_dump(draw(plan_documents()))
    at = draw(st.integers(0, len(text)))
    text = text[:at] + draw(st.text(max_size=10)) + text[at:]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(text=plan_texts())
@example(text=b"[" * 2000)  # nested deeper than the YAML parser's recursion
@example(text=b"federation: {rounds: " + b"1" * 5000 + b"}")  # past Python's int digits limit
@example(text=b"federation: {rounds: 2020-13-45}")  # a timestamp that is no date
@example(text=b"federation: {rounds: !!int x}")
@example(text=b'aggregator: {output_dir: "\\0"}')
@example(text=billion_laughs(9).encode())  # 10**9 strings if anyone printed them whole
def test_load_plan_gives_a_plan_or_plan_error(folder: Path, text: bytes) -> None:
    """Any file content is a plan or a PlanError naming the file."""
    path = folder / "plan.yaml"
    path.write_bytes(text)
    check_plan(lambda: load_plan(path))
