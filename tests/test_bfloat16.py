"""bfloat16 (and the other dtypes of a PyTorch state dict) bit for bit: codec, FedAvg, aggregator.

numpy knows bfloat16 only through `ml_dtypes`; foedus sends it as its 2-byte values named
``bfloat16``, stores it as it came and averages it in float64 like every float.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.fedavg import ArraySource, TensorSource, average_sources
from foedus.aggregator.upload import receive_upload
from foedus.pki.layout import CertsLayout
from foedus.plans.schema import RunnerSettings
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import TensorFormatError, decode_tensor, encode_tensor, tensor_field_frame
from foedus.protos.dtypes import BFLOAT16, bfloat16_dtype, is_float, wire_dtype

from fedavg_reference import Contribution, RunningAverage, federated_average
from federation_processes import COLLABORATORS, FederationProcesses, child_python_path, write_plan
from mixed_dtypes_runner import NAME as MIXED_RUNNER
from mixed_dtypes_runner import MixedDtypesRunner

BF16 = bfloat16_dtype()
EVERY_BF16 = np.arange(2**16, dtype=np.uint16).view(BF16)  # every bit pattern, NaNs included
MAX_BYTES = 2**20


def test_every_bfloat16_bit_pattern_round_trips() -> None:
    """All 65,536 values (NaN payloads, infinities, -0.0, subnormals) decode to the bytes sent."""
    tensor = encode_tensor("w", EVERY_BF16.reshape(256, 256))
    assert tensor.foedus_dtype == BFLOAT16
    assert list(tensor.transformer_metadata[0].int_list) == [256, 256]
    assert tensor.data_bytes == EVERY_BF16.tobytes()  # the 2-byte values, little-endian
    decoded = decode_tensor(
        base_pb2.NamedTensor.FromString(tensor.SerializeToString()), max_bytes=MAX_BYTES
    )
    assert decoded.dtype == BF16 and decoded.shape == (256, 256)
    assert decoded.tobytes() == EVERY_BF16.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,)])
def test_bfloat16_scalars_and_empty_arrays_round_trip(shape: tuple[int, ...]) -> None:
    """Shapes numpy treats specially keep their shape and dtype."""
    array = np.full(shape, -1.5, dtype=BF16)
    decoded = decode_tensor(encode_tensor("w", array), max_bytes=MAX_BYTES)
    assert (decoded.dtype, decoded.shape, decoded.tobytes()) == (BF16, shape, array.tobytes())


def test_bfloat16_frame_is_the_serialized_field() -> None:
    """Streams and files write bfloat16 from the array as encode_tensor would serialize it."""
    array = EVERY_BF16[:1000]
    frame = tensor_field_frame(1, "w", array)
    written = b"".join(bytes(part) for part in frame.parts())
    expected = base_pb2.ModelProto(tensors=[encode_tensor("w", array)])
    assert written == expected.SerializeToString(deterministic=True)


def test_bfloat16_as_float32_is_exact_for_openfl() -> None:
    """Asked for OpenFL's float32, bfloat16 widens exactly (every finite value is a float32)."""
    finite = EVERY_BF16[np.isfinite(EVERY_BF16)]
    tensor = encode_tensor("w", finite, as_float32=True)
    assert tensor.foedus_dtype == ""
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype == np.float32
    assert decoded.astype(BF16).tobytes() == finite.tobytes()


def test_opaque_two_byte_dtypes_are_not_bfloat16() -> None:
    """Only ml_dtypes' bfloat16 is sent as bfloat16; other 2-byte void dtypes are refused."""
    assert wire_dtype(BF16) == BFLOAT16 and is_float(BF16)
    assert wire_dtype(np.dtype("V2")) is None and not is_float(np.dtype("V2"))
    with pytest.raises(TensorFormatError, match="cannot be sent"):
        encode_tensor("w", np.zeros(2, dtype="V2"))
    forged = encode_tensor("w", np.zeros(2, np.uint16))
    forged.foedus_dtype = "<V2"
    with pytest.raises(TensorFormatError, match="unknown dtype '<V2'"):
        decode_tensor(forged, max_bytes=MAX_BYTES)


# --- FedAvg ---------------------------------------------------------------------------------------

FINITE = EVERY_BF16[np.isfinite(EVERY_BF16)]


def contributions(count: int) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """`count` collaborators' bfloat16 tensors (every finite value, shuffled) and weights."""
    rng = np.random.default_rng(7)
    return {
        f"c{index}": (int(rng.integers(1, 1000)), {"w": rng.permutation(FINITE).reshape(-1, 255)})
        for index in range(count)
    }


def test_bfloat16_average_is_bit_identical_by_every_path_and_order() -> None:
    """federated_average, RunningAverage and sliced/threaded sources give the same bits."""
    parts = contributions(4)
    reference = {"w": np.zeros_like(parts["c0"][1]["w"])}
    with np.errstate(over="ignore"):  # the largest values' mean may round past bfloat16's range
        expected = federated_average(
            {name: Contribution(weight, tensors) for name, (weight, tensors) in parts.items()},
            reference,
        )["w"]
        for order in (sorted(parts), sorted(parts, reverse=True)):
            shuffled = {name: Contribution(parts[name][0], parts[name][1]) for name in order}
            assert federated_average(shuffled, reference)["w"].tobytes() == expected.tobytes()
        running = RunningAverage(reference, sum(weight for weight, _ in parts.values()))
        for name in sorted(parts):
            running.add(name, *parts[name])
        assert running.result()["w"].tobytes() == expected.tobytes()
        sources: dict[str, tuple[int, TensorSource]] = {
            name: (weight, ArraySource(tensors)) for name, (weight, tensors) in parts.items()
        }
        for slice_elements, workers in ((64, 1), (1000, 3), (2**18, 2)):
            sliced = average_sources(
                reference, sources, slice_elements=slice_elements, workers=workers
            )["w"]
            assert sliced.tobytes() == expected.tobytes()
    assert expected.dtype == BF16
    # The mean is computed in float64 and rounded once to bfloat16 (to nearest, ties to even).
    total = sum(weight for weight, _ in parts.values())
    exact = sum(weight * tensors["w"].astype(np.float64) for weight, tensors in parts.values())
    finite = np.isfinite(expected)
    close = np.abs(expected.astype(np.float64) - exact / total)
    assert np.all(close[finite] <= np.abs(exact / total)[finite] * 2**-8 + 1e-38)


def test_copies_of_a_bfloat16_model_average_to_it() -> None:
    """Every collaborator sending the same bfloat16 values gives those values back, bit for bit.

    Except -0.0, which comes back +0.0, as it does for every float dtype (-0.0 + 0.0 is +0.0).
    """
    values = FINITE[FINITE.view(np.uint16) != 0x8000]
    model = {"w": values, "n": np.arange(5, dtype=np.int64)}
    parts = {name: Contribution(weight, model) for name, weight in (("a", 3), ("b", 5), ("c", 1))}
    averaged = federated_average(parts, model)
    assert averaged["w"].tobytes() == values.tobytes() and averaged["w"].dtype == BF16
    assert averaged["n"].tobytes() == model["n"].tobytes()


# --- the aggregator -------------------------------------------------------------------------------


def upload(array: np.ndarray) -> Iterator[bytes]:
    """A serialized train result holding one bfloat16 tensor, in 3-byte chunks (values cut)."""
    results = aggregator_pb2.TaskResults(round_number=0, task_name="train", data_size=1)
    results.tensors.append(encode_tensor("w", array))
    data = results.SerializeToString()
    return (data[start : start + 3] for start in range(0, len(data), 3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_bfloat16_is_found_in_an_upload(tmp_path: Path, bad: float) -> None:
    """The aggregator's NaN/Inf scan covers bfloat16 as it covers float16/32/64."""
    values = FINITE[:999].copy()
    received = receive_upload(
        upload(values),
        tmp_path / "ok",
        max_tensor_bytes=MAX_BYTES,
        model_dtype=lambda _: BF16,
        on_head=lambda _: None,
    )
    (tensor,) = received.tensors
    assert tensor.finite is True and tensor.array.tobytes() == values.tobytes()
    values[500] = bad
    received = receive_upload(
        upload(values),
        tmp_path / "bad",
        max_tensor_bytes=MAX_BYTES,
        model_dtype=lambda _: BF16,
        on_head=lambda _: None,
    )
    assert received.tensors[0].finite is False


def read_model(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a `ModelProto` file, decoded exactly."""
    proto = base_pb2.ModelProto.FromString(path.read_bytes())
    return {tensor.name: decode_tensor(tensor, max_bytes=MAX_BYTES) for tensor in proto.tensors}


@pytest.mark.slow
def test_every_state_dict_dtype_survives_a_federation_of_processes(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """bfloat16, float16, float32 and int64 tensors through a real aggregator and collaborators.

    Two rounds over mTLS: the final model file holds, bit for bit, the FedAvg of the
    collaborators' updates computed here in memory (the codec, the upload to disk, the state and
    the average on the aggregator's side all keep every bit).
    """
    rounds = 2
    plan = write_plan(
        tmp_path,
        certs,
        rounds,
        runner={"name": MIXED_RUNNER, "seed": 3, "settings": {}},
    )
    federation = FederationProcesses(plan, tmp_path)
    environment = {"PYTHONPATH": child_python_path()}
    try:
        federation.start("aggregator", env=environment)
        for name in COLLABORATORS:
            federation.start(name, env=environment)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, (codes, federation.output(), list(tmp_path.iterdir()))

    settings = RunnerSettings(name=MIXED_RUNNER, seed=3, settings={})
    model: dict[str, np.ndarray] = MixedDtypesRunner.initial_model(settings)
    runners = {
        name: MixedDtypesRunner(settings, collaborator=name, collaborators=COLLABORATORS)
        for name in COLLABORATORS
    }
    for round_number in range(rounds):
        outcomes = {name: runner.train(model, round_number) for name, runner in runners.items()}
        model = federated_average(
            {name: Contribution(o.data_size, o.model) for name, o in outcomes.items()}, model
        )
    final = read_model(tmp_path / "output" / "last_model.pbuf")
    assert sorted(final) == sorted(model)
    for name, expected in model.items():
        assert final[name].dtype == expected.dtype, name
        assert final[name].tobytes() == expected.tobytes(), name
    assert final["bn/num_batches_tracked"] == rounds
    assert final["conv/weight"].dtype == BF16
