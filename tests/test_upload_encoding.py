"""A site's update in the plan's `compression.upload` code: the delta, the XOR, error feedback,
the residuals kept before the upload leaves, and the frame the aggregator reads.

Each upload here is framed by the client's own `task_results_parts` and parsed back as the
`TaskResults` an aggregator receives, then decoded with `foedus.compression`'s decoders: what a
receiver that adds the base back gets is checked against what the site trained; one test sends
it to a real aggregator over mutual TLS, which must hold the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from test_collaborator_loop import ScriptedAggregator, Sleeps, client_for, digits_plan

from foedus.collaborator.cli import main
from foedus.collaborator.client import OutgoingTensor, Tasks, task_results_parts
from foedus.collaborator.compressed import (
    RESIDUALS_FOLDER,
    ResidualsError,
    UploadEncoder,
    encode_upload,
    residual_store,
)
from foedus.collaborator.digits import SHAPES, DigitsRunner
from foedus.collaborator.loop import run_collaborator
from foedus.compression.codes import LOSSY_MIN_DIMENSIONS, Code
from foedus.compression.download import round_trip
from foedus.compression.feedback import ResidualStore, read_residuals
from foedus.compression.lossless import TensorDecompressor
from foedus.compression.quantize import bfloat16_decode, int8_decode, int8_encode
from foedus.compression.topk import topk_decode
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan
from foedus.plans.runners import Array
from foedus.plans.schema import CodeSettings, CompressionSettings
from foedus.privacy.clipping import clipped_model
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import COMPRESSED_TAG, LOSSY_TAG, coded_layout, decode_tensor
from foedus.protos.stream import joined

from servers import TASKS, make_federation, make_plan, plan_document, running_aggregator

MAX_BYTES = 1 << 30
LOSSY_CODES = [
    CodeSettings(Code.BFLOAT16),
    CodeSettings(Code.INT8),
    CodeSettings(Code.TOPK, fraction=0.05),
    CodeSettings(Code.TOPK, fraction=0.01, values="int8"),
]


def model_pair(seed: int = 0) -> tuple[dict[str, Array], dict[str, Array]]:
    """A global model of many dtypes and a 'trained' one a small step from it: a float32 tensor
    of more than one lossless chunk, a Fortran-ordered one, a scalar and an empty one."""
    rng = np.random.default_rng(seed)
    base: dict[str, Array] = {
        "big": rng.standard_normal((600, 500)).astype(np.float32),  # 1.2 MB: two chunks
        "fortran": np.asfortranarray(rng.standard_normal((40, 30)).astype(np.float32)),
        "scalar": np.float32(0.5).reshape(()),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "wide": rng.standard_normal((7, 5)),
        "half": rng.standard_normal(33).astype(np.float16),
        "brain": rng.standard_normal(40).astype(ml_dtypes.bfloat16),
        "steps": np.array([3, 9, -2], dtype=np.int64),
        "mask": rng.random(17) > 0.5,
    }
    trained: dict[str, Array] = {}
    for name, array in base.items():
        if array.dtype.kind in "fV":
            step = rng.standard_normal(array.shape) * 0.01
            trained[name] = (array.astype(np.float64) + step).astype(array.dtype)
        elif array.dtype.kind == "b":
            trained[name] = ~array
        else:
            trained[name] = array + 1
    trained["fortran"] = np.asfortranarray(trained["fortran"])
    return base, trained


def parsed_upload(
    base: Mapping[str, Array], trained: Mapping[str, Array], coded: Mapping[str, object]
) -> list[base_pb2.NamedTensor]:
    """The train result as the client frames it, parsed back as the aggregator's TaskResults."""
    tensors = [
        OutgoingTensor(name, array, tags=("trained",), coded=coded.get(name))  # type: ignore[arg-type]
        for name, array in trained.items()
    ]
    head = aggregator_pb2.TaskResults(round_number=4, task_name="train", data_size=10)
    parts = task_results_parts(head, tensors)
    results = aggregator_pb2.TaskResults.FromString(joined(parts))
    assert (results.round_number, results.task_name, results.data_size) == (4, "train", 10)
    assert [tensor.name for tensor in results.tensors] == list(trained)
    return list(results.tensors)


def decoded_delta(tensor: base_pb2.NamedTensor, settings: CodeSettings) -> np.ndarray:
    """A lossy tensor's decoded delta, in its shape, after its layout is checked."""
    layout = coded_layout(tensor, max_bytes=MAX_BYTES)
    assert (layout.code, layout.delta) == (settings.code, True)
    assert layout.dtype == np.float32 and LOSSY_TAG in tensor.tags and not tensor.lossless
    decode = {Code.BFLOAT16: bfloat16_decode, Code.INT8: int8_decode, Code.TOPK: topk_decode}
    return decode[settings.code](tensor.data_bytes, layout.count).reshape(layout.shape)


def test_lossless_xor_gives_the_trained_bits_back_for_every_dtype() -> None:
    """Every tensor travels lossless as trained XOR base; the receiver XORs the base back and
    has the very bits trained (bfloat16, bool, a scalar and an empty tensor among them)."""
    base, trained = model_pair()
    coded = encode_upload(CodeSettings(Code.LOSSLESS), base, trained, {})
    assert coded.residuals == {}
    for tensor in parsed_upload(base, trained, coded.coded):
        name = tensor.name
        layout = coded_layout(tensor, max_bytes=MAX_BYTES)
        assert (layout.code, layout.delta) == (Code.LOSSLESS, True), name
        assert (layout.dtype, layout.shape) == (trained[name].dtype, trained[name].shape), name
        assert tensor.lossless and COMPRESSED_TAG in tensor.tags and "trained" in tensor.tags
        raw = np.empty(layout.nbytes, dtype=np.uint8)
        decompressor = TensorDecompressor(memoryview(raw), layout.dtype.itemsize, tensor=name)
        payload = tensor.data_bytes
        for start in range(0, len(payload), 65_537):  # fed in slices, as a stream cuts them
            decompressor.feed(payload[start : start + 65_537])
        decompressor.finish()
        base_bytes = np.frombuffer(np.ascontiguousarray(base[name]).tobytes(), np.uint8)
        back = np.bitwise_xor(raw, base_bytes).tobytes()
        assert back == np.ascontiguousarray(trained[name]).tobytes(), name
    # An update close to its base compresses: far fewer bytes than the raw model.
    assert len(coded.coded["big"].payload) < 0.8 * trained["big"].nbytes  # type: ignore[union-attr]


@pytest.mark.parametrize("settings", LOSSY_CODES, ids=lambda s: f"{s.code}-{s.values}")
def test_a_lossy_code_sends_the_delta_and_keeps_what_it_left_out(settings: CodeSettings) -> None:
    """float32 tensors of two dimensions or more travel as the coded delta (base + decoded is
    what the aggregator gets; decoded + residual is the delta), the others raw as trained (the
    float32 scalar and vector too)."""
    base, trained = model_pair()
    encoded = encode_upload(settings, base, trained, {})
    float32 = {
        name
        for name, array in trained.items()
        if array.dtype == np.float32 and array.ndim >= LOSSY_MIN_DIMENSIONS
    }
    assert float32 == {"big", "fortran", "empty"}
    assert set(encoded.residuals) == float32
    for tensor in parsed_upload(base, trained, encoded.coded):
        name = tensor.name
        if name not in float32:
            assert not tensor.foedus_code and not tensor.foedus_delta, name
            assert decode_tensor(tensor, max_bytes=MAX_BYTES).tobytes() == trained[name].tobytes()
            continue
        delta = np.subtract(trained[name], base[name], dtype=np.float32)
        decoded = decoded_delta(tensor, settings)
        residual = encoded.residuals[name]
        assert residual.shape == delta.shape and residual.dtype == np.float32
        np.testing.assert_allclose(decoded + residual, delta, rtol=0, atol=1e-7)
        if settings.code is Code.TOPK and delta.size:
            kept = np.count_nonzero(decoded)
            assert kept == max(1, int(np.ceil(settings.fraction * delta.size))), name  # type: ignore[operator]
            left = decoded == 0  # what topk left out stays at the site whole
            assert np.array_equal(residual[left], delta[left]), name
            if settings.values == "float32":  # and what it kept arrived whole
                assert not residual[~left].any(), name
        elif delta.size:
            assert np.max(np.abs(decoded - delta)) <= 0.01 * np.max(np.abs(delta)), name


def test_error_feedback_carries_what_was_left_out_into_the_next_round(tmp_path: Path) -> None:
    """Over rounds, the deltas the aggregator receives add up to the site's deltas but for the
    last residual; each round's residuals are on disk under its number."""
    settings = CodeSettings(Code.TOPK, fraction=0.01, values="int8")
    encoder = UploadEncoder(settings, ResidualStore(tmp_path))
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((50, 100)).astype(np.float32)}
    sent = np.zeros((50, 100), dtype=np.float64)
    wanted = np.zeros((50, 100), dtype=np.float64)
    for round_number in range(4):
        trained = {"w": (base["w"] + 0.01 * rng.standard_normal((50, 100))).astype(np.float32)}
        coded = encoder.encode(round_number, base, trained)
        payload = coded["w"]
        assert payload is not None and payload.code is Code.TOPK
        sent += topk_decode(payload.payload, 5000).reshape(50, 100)
        wanted += np.subtract(trained["w"], base["w"], dtype=np.float32)
        residual = read_residuals(encoder.residuals.path(round_number), round_number)["w"]  # type: ignore[union-attr]
        np.testing.assert_allclose(sent + residual, wanted, rtol=0, atol=1e-5)
    assert encoder.residuals.rounds() == [2, 3]  # type: ignore[union-attr]


def test_a_restarted_site_sends_the_same_bytes_for_the_round(tmp_path: Path) -> None:
    """A site that saved round 1's residuals and died before its upload arrived, started again
    and trained round 1 again, reads round 0's residuals as the first time: the same bytes."""
    settings = CodeSettings(Code.INT8)
    base, trained = model_pair()
    second = {name: (array + array).astype(array.dtype) for name, array in trained.items()}
    first = UploadEncoder(settings, ResidualStore(tmp_path))
    first.encode(0, base, trained)
    before = first.encode(1, trained, second)
    restarted = UploadEncoder(settings, ResidualStore(tmp_path))
    again = restarted.encode(1, trained, second)
    assert before.keys() == again.keys()
    for name, payload in before.items():
        other = again[name]
        assert (payload is None) == (other is None), name
        if payload is not None and other is not None:
            assert payload.payload == other.payload, name
    # Round 0's residuals were not used up: without them round 1 codes other bytes.
    fresh = UploadEncoder(settings, ResidualStore(tmp_path / "new")).encode(1, trained, second)
    assert fresh["big"].payload != before["big"].payload  # type: ignore[union-attr]


def test_a_delta_that_is_not_finite_travels_raw_and_keeps_its_residual() -> None:
    """A diverged tensor cannot be coded lossily: it goes as trained (the aggregator answers it
    as any such tensor), and what the code owed it from before is kept."""
    base = {"w": np.zeros((2, 4), dtype=np.float32), "v": np.zeros((2, 2), dtype=np.float32)}
    trained = {"w": np.full((2, 4), np.nan, dtype=np.float32), "v": np.ones((2, 2), np.float32)}
    owed = {"w": np.full((2, 4), 0.25, dtype=np.float32)}
    encoded = encode_upload(CodeSettings(Code.INT8), base, trained, owed)
    assert encoded.coded["w"] is None and encoded.coded["v"] is not None
    assert encoded.residuals["w"] is owed["w"]


def test_a_trained_tensor_unlike_its_base_is_refused() -> None:
    """A trained tensor of another shape or dtype than the base is not coded against it."""
    base = {"w": np.zeros(4, dtype=np.float32)}
    with pytest.raises(ValueError, match="against a base of float32"):
        encode_upload(CodeSettings(Code.LOSSLESS), base, {"w": np.zeros(4)}, {})


class Uploads(ScriptedAggregator):
    """The scripted aggregator, keeping every result's tensors and, at each send, the residual
    files on disk (what a kill -9 right then would leave)."""

    def __init__(self, model: dict[str, Array], answers: Sequence[Tasks], store: Path) -> None:
        super().__init__(model, answers, closed=set())
        self.store = ResidualStore(store)
        self.results: dict[tuple[int, str], list[OutgoingTensor]] = {}
        self.on_disk: dict[int, list[int]] = {}

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[OutgoingTensor]
    ) -> None:
        super().send_local_task_results(round_number, task_name, data_size, tensors)
        self.results[round_number, task_name] = list(tensors)
        if task_name == "train":
            self.on_disk[round_number] = self.store.rounds()


def two_rounds() -> list[Tasks]:
    """Round 0 and round 1 of every task, then quit."""
    return [
        Tasks(round_number=0, tasks=TASKS, sleep_seconds=0, quit=False),
        Tasks(round_number=1, tasks=TASKS, sleep_seconds=0, quit=False),
        Tasks(round_number=2, tasks=(), sleep_seconds=0, quit=True),
    ]


def digits(plan: Plan) -> DigitsRunner:
    """Alice's digits runner."""
    return DigitsRunner(plan.runner, collaborator="alice", collaborators=plan.collaborators)


def test_the_loop_saves_the_residuals_before_it_sends_the_update(tmp_path: Path) -> None:
    """With a lossy upload code the train result's tensors are coded against the round's global
    model, and the round's residuals are on disk before the result is sent; metrics stay raw."""
    plan = make_plan(None)
    model = DigitsRunner.initial_model(plan.runner)
    aggregator = Uploads(model, two_rounds(), tmp_path)
    encoder = UploadEncoder(CodeSettings(Code.INT8), ResidualStore(tmp_path))
    run_collaborator(aggregator, digits(plan), plan.runner, sleep=Sleeps(), upload=encoder)  # type: ignore[arg-type]
    assert aggregator.on_disk == {0: [0], 1: [0, 1]}
    for round_number in (0, 1):
        trained = digits(plan).train(model, round_number).model
        residuals = read_residuals(encoder.residuals.path(round_number), round_number)  # type: ignore[union-attr]
        for tensor in aggregator.results[round_number, "train"]:
            if tensor.name not in SHAPES:
                assert tensor.coded is None and "metric" in tensor.tags, tensor.name
                continue
            if len(SHAPES[tensor.name]) < LOSSY_MIN_DIMENSIONS:  # a bias: raw, as trained
                assert tensor.coded is None and tensor.name not in residuals, tensor.name
                continue
            assert tensor.coded is not None and tensor.coded.code is Code.INT8, tensor.name
            delta = np.subtract(trained[tensor.name], model[tensor.name], dtype=np.float32)
            decoded = int8_decode(tensor.coded.payload, delta.size).reshape(delta.shape)
            if round_number == 0:  # no residual before: decoded + residual is the delta
                np.testing.assert_allclose(decoded + residuals[tensor.name], delta, atol=1e-7)
        for task in ("aggregated_model_validation", "locally_tuned_model_validation"):
            assert all(t.coded is None for t in aggregator.results[round_number, task])


def test_a_dp_site_clips_its_update_then_codes_it(tmp_path: Path) -> None:
    """With differential privacy's clip and a lossless code, what the receiver gets back by XOR
    is the clipped model, bit for bit, not the model as trained."""
    plan = make_plan(None)
    model = DigitsRunner.initial_model(plan.runner)
    aggregator = Uploads(model, two_rounds()[:1] + two_rounds()[2:], tmp_path)
    encoder = UploadEncoder(CodeSettings(Code.LOSSLESS), None)
    clip = 0.01
    run_collaborator(
        aggregator,  # type: ignore[arg-type]
        digits(plan),
        plan.runner,
        sleep=Sleeps(),
        upload=encoder,
        clip=clip,
    )
    trained = digits(plan).train(model, 0).model
    clipped = clipped_model(model, trained, clip)
    sent = aggregator.results[0, "train"]
    received = {
        tensor.name: tensor
        for tensor in parsed_upload(
            model, {t.name: np.asarray(t.array) for t in sent}, {t.name: t.coded for t in sent}
        )
    }
    for name in SHAPES:
        tensor = received[name]
        layout = coded_layout(tensor, max_bytes=MAX_BYTES)
        raw = np.empty(layout.nbytes, dtype=np.uint8)
        decompressor = TensorDecompressor(memoryview(raw), 4, tensor=name)
        decompressor.feed(tensor.data_bytes)
        decompressor.finish()
        back = np.bitwise_xor(raw, np.frombuffer(model[name].tobytes(), np.uint8)).tobytes()
        assert back == clipped[name].tobytes(), name
        assert back != trained[name].tobytes(), name


def test_the_residuals_folder_is_made_only_for_a_lossy_code(tmp_path: Path) -> None:
    """`residual_store` makes `state/residuals` (mode 0700) for a lossy code, none otherwise."""
    assert residual_store(tmp_path / "a", CodeSettings(Code.LOSSLESS)) is None
    assert not (tmp_path / "a").exists()
    store = residual_store(tmp_path / "b", CodeSettings(Code.BFLOAT16))
    assert store is not None and store.folder == tmp_path / "b" / RESIDUALS_FOLDER
    assert store.folder.stat().st_mode & 0o777 == 0o700
    (store.folder / "residuals-2.f32").write_bytes(b"foedus residuals v1\n" + bytes(40))
    with pytest.raises(ResidualsError, match=r"residuals-2\.f32: not an intact residuals file"):
        residual_store(tmp_path / "b", CodeSettings(Code.BFLOAT16))


def test_a_corrupt_residuals_file_stops_the_collaborator_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`collaborator start` with an int8 upload and a torn residuals file in its state folder
    exits 2 with one line naming the file, before it calls anyone."""
    plan = tmp_path / "plan.yaml"
    document = plan_document(None, compression={"upload": "int8"})
    plan.write_text(yaml.safe_dump(document), encoding="utf-8")
    state = tmp_path / "state"
    store = ResidualStore(state / RESIDUALS_FOLDER)
    store.save(3, {"w": np.ones(4, dtype=np.float32)})
    data = bytearray(store.path(3).read_bytes())
    data[-40] ^= 1
    store.path(3).write_bytes(bytes(data))
    code = main(["start", "-n", "alice", "--plan", str(plan), "--state-dir", str(state)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "INSECURE" not in line]
    assert code == 2, captured.err
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"collaborator: error: --state-dir: {store.path(3)}: not an intact residuals file"
    )


def test_residuals_of_another_model_stop_the_site(tmp_path: Path) -> None:
    """A residual whose tensor has another shape now is another model's: refused naming the file."""
    store = ResidualStore(tmp_path)
    store.save(0, {"w": np.zeros(3, dtype=np.float32)})
    encoder = UploadEncoder(CodeSettings(Code.INT8), store)
    model = {"w": np.zeros(4, dtype=np.float32)}
    with pytest.raises(ResidualsError, match=r"residuals-0\.f32: the residual of tensor 'w' has"):
        encoder.encode(1, model, model)


def test_a_real_aggregator_gets_the_trained_bits_or_base_plus_decoded(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Alice's coded train result through a real aggregator over mutual TLS: under lossless the
    aggregator holds the very bits she trained; under int8 both ways her delta from the decoded
    download, decoded and added back to that same model, with her residuals on her disk."""
    initial = DigitsRunner.initial_model(make_plan(None).runner)
    runs = {
        "lossless": CompressionSettings(upload=CodeSettings(Code.LOSSLESS)),
        "int8": CompressionSettings(
            upload=CodeSettings(Code.INT8), download=CodeSettings(Code.INT8)
        ),
    }
    for label, settings in runs.items():
        plan = dataclasses.replace(digits_plan(certs), compression=settings)
        federation = make_federation(plan, initial)
        store = residual_store(tmp_path / label, settings.upload)
        encoder = UploadEncoder(settings.upload, store)
        with (
            running_aggregator(plan, federation) as server,
            client_for(plan, server.port) as client,
        ):
            run_collaborator(
                client,
                digits(plan),
                plan.runner,
                sleep=Sleeps(),
                max_idle_polls=2,
                upload=encoder,
            )
        (train,) = [result for result in federation.results() if result.task_name == "train"]
        got = {tensor.name: np.asarray(tensor.array) for tensor in train.tensors}
        received = {
            name: round_trip(settings.download.code, array) for name, array in initial.items()
        }
        trained = digits(plan).train(received, 0).model
        if label == "lossless":
            for name in SHAPES:
                assert got[name].tobytes() == trained[name].tobytes(), name
            continue
        assert store is not None
        residuals = read_residuals(store.path(0), 0)
        for name in SHAPES:
            if len(SHAPES[name]) < LOSSY_MIN_DIMENSIONS:  # a bias: raw both ways, as trained
                assert got[name].tobytes() == trained[name].tobytes(), name
                assert name not in residuals, name
                continue
            delta = np.subtract(trained[name], received[name], dtype=np.float32)
            decoded = int8_decode(int8_encode(delta.reshape(-1)), delta.size).reshape(delta.shape)
            wanted = np.add(received[name], decoded, dtype=np.float32)
            assert got[name].tobytes() == wanted.tobytes(), name
            assert got[name].tobytes() != trained[name].tobytes(), name  # int8 lost a little
            np.testing.assert_array_equal(residuals[name], delta - decoded)
