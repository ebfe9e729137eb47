"""Error feedback: the residual a lossy upload leaves, carried to the next round and kept durably at the site."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt
import pytest

from foedus.compression.feedback import (
    MAGIC,
    MAGIC_V1,
    ResidualsFileError,
    ResidualStore,
    compensated,
    residual_after,
)
from foedus.compression.quantize import int8_decode, int8_encode
from foedus.compression.topk import topk_decode, topk_encode

Floats = npt.NDArray[np.float32]
Encode = Callable[[Floats], bytes]
Decode = Callable[[bytes, int], Floats]
CODES: dict[str, tuple[Encode, Decode]] = {
    "int8": (int8_encode, int8_decode),
    "topk 1% int8": (lambda v: topk_encode(v, 0.01, values_code="int8"), topk_decode),
    "topk 1% float32": (lambda v: topk_encode(v, 0.01), topk_decode),
}


def _residuals(seed: int) -> dict[str, Floats]:
    """A site's residuals of several shapes, names not all ASCII."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.standard_normal((3, 4, 2)).astype(np.float32),
        "fc/权重": rng.standard_normal(5).astype(np.float32),
        "scalar": np.array(rng.standard_normal(), np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def _same(left: dict[str, Floats], right: dict[str, Floats]) -> bool:
    """Whether two mappings of arrays hold the same names, shapes, dtypes and bits."""
    return list(left) == list(right) and all(
        left[name].shape == right[name].shape
        and left[name].dtype == right[name].dtype
        and left[name].tobytes() == right[name].tobytes()
        for name in left
    )


# -- the arithmetic --------------------------------------------------------------------------


def test_compensated_and_residual_after() -> None:
    """delta + residual is what is encoded; what decoding lost is the next residual, in float32."""
    delta = np.array([1.0, -2.0, 0.5], np.float32)
    residual = np.array([0.25, 0.0, -0.5], np.float32)
    total = compensated(delta, residual)
    assert total.dtype == np.float32 and total.tolist() == [1.25, -2.0, 0.0]
    assert compensated(delta, None) is delta
    left = residual_after(total, np.array([1.0, -2.0, 0.0], np.float32))
    assert left.dtype == np.float32 and left.tolist() == [0.25, 0.0, 0.0]


def test_arithmetic_refuses_mismatches() -> None:
    """Another shape or dtype is the caller's bug: a ValueError that says which."""
    delta = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"a residual of shape \(4,\) for a delta of shape \(3,\)"):
        compensated(delta, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="the residual is float64"):
        compensated(delta, np.ones(3))
    with pytest.raises(ValueError, match="the delta is float16"):
        compensated(delta.astype(np.float16), None)
    with pytest.raises(ValueError, match=r"decoded shape \(1, 3\) is not \(3,\)"):
        residual_after(delta, delta.reshape(1, 3))


# -- the store -------------------------------------------------------------------------------


def test_store_round_trip(tmp_path: Path) -> None:
    """What is saved for round r is loaded for round r + 1 bit for bit, names and shapes kept,
    in a file only the site's user may read."""
    store = ResidualStore(tmp_path / "residuals")
    assert store.load(3) == {}  # no folder yet
    saved = _residuals(1)
    store.save(2, saved)
    loaded = ResidualStore(tmp_path / "residuals").load(3)
    assert _same(loaded, saved)
    loaded["fc/权重"][0] += 1  # the caller may work on what it loaded
    mode = stat.S_IMODE((tmp_path / "residuals" / "residuals-2.f32").stat().st_mode)
    assert mode == 0o600
    assert store.load(2) == {} and store.load(0) == {}


def test_store_loads_the_newest_round_before(tmp_path: Path) -> None:
    """A site that sat out rounds reads the residuals of the last round it sent."""
    store = ResidualStore(tmp_path)
    store.save(2, _residuals(2))
    store.save(5, _residuals(5))
    assert _same(store.load(5), _residuals(2))
    assert _same(store.load(6), _residuals(5))
    assert _same(store.load(100), _residuals(5))


def test_store_keeps_the_newest_two(tmp_path: Path) -> None:
    """After saving round r, r and the newest before it stay; older files, a crash's temporaries
    and (going back over a round) later rounds' files go; files not ours stay."""
    store = ResidualStore(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".residuals-1.f32.0123456789ab.tmp").write_bytes(b"torn")
    for round_number in range(5):
        store.save(round_number, _residuals(round_number))
    assert store.rounds() == [3, 4]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "notes.txt",
        "residuals-3.f32",
        "residuals-4.f32",
    ]
    store.save(2, _residuals(9))  # round 2 again: 3 and 4 were superseded
    assert store.rounds() == [2]


def test_a_torn_temporary_is_not_read(tmp_path: Path) -> None:
    """A crash inside save leaves a temporary beside the files; load reads the last whole one."""
    store = ResidualStore(tmp_path)
    store.save(2, _residuals(2))
    (tmp_path / ".residuals-3.f32.0123456789ab.tmp").write_bytes(MAGIC + b"\x00")
    assert _same(store.load(4), _residuals(2))


def _site_round(store: ResidualStore, round_number: int, delta: Floats, code: str) -> bytes:
    """A site's lossy upload of round `round_number`: encode delta + residual, keep what was
    lost (saved before the upload is sent), return the upload's bytes."""
    encode, decode = CODES[code]
    residual = store.load(round_number).get("w")
    total = compensated(delta, residual)
    payload = encode(total)
    store.save(round_number, {"w": residual_after(total, decode(payload, total.size))})
    return payload


@pytest.mark.parametrize("code", sorted(CODES))
def test_a_site_restarted_sends_the_same_bytes(tmp_path: Path, code: str) -> None:
    """A site killed after saving round 3's residuals, before its upload left, trains round 3
    again from round 2's residuals: every upload and its files end as the undisturbed run's."""
    rng = np.random.default_rng(4)
    deltas = [(rng.standard_normal(3000) * 0.01).astype(np.float32) for _ in range(6)]
    calm = ResidualStore(tmp_path / "calm")
    expected = [_site_round(calm, number, delta, code) for number, delta in enumerate(deltas)]
    crashed = ResidualStore(tmp_path / "crashed")
    sent = [_site_round(crashed, number, deltas[number], code) for number in range(3)]
    _site_round(crashed, 3, deltas[3], code)  # saved, then killed before the upload was sent
    restarted = ResidualStore(tmp_path / "crashed")
    sent += [_site_round(restarted, number, deltas[number], code) for number in range(3, 6)]
    assert sent == expected
    for number in (4, 5):
        assert (tmp_path / "crashed" / f"residuals-{number}.f32").read_bytes() == (
            (tmp_path / "calm" / f"residuals-{number}.f32").read_bytes()
        )


def _file(tmp_path: Path) -> Path:
    """Round 3's residuals file, saved whole."""
    ResidualStore(tmp_path).save(3, _residuals(3))
    return tmp_path / "residuals-3.f32"


def _sealed(header: object, data: bytes) -> bytes:
    """A residuals file with this header and data and a digest that matches them."""
    encoded = json.dumps(header).encode()
    body = MAGIC + struct.pack("<I", len(encoded)) + encoded + data
    return body + blake3.blake3(body).digest()


def test_a_version_1_file_is_still_read(tmp_path: Path) -> None:
    """A file an earlier foedus saved (version 1: a BLAKE2b digest) loads as it was, so a site
    upgraded in the middle of a federation goes on with its residuals; altered, it is refused."""
    saved = _residuals(3)
    path = _file(tmp_path)
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    body = MAGIC_V1 + data[len(MAGIC) : -32]
    path.write_bytes(body + hashlib.blake2b(body, digest_size=32).digest())
    assert _same(ResidualStore(tmp_path).load(4), saved)
    path.write_bytes(
        body + blake3.blake3(body).digest()
    )  # a version 1 file with version 2's digest
    with pytest.raises(ResidualsFileError, match="its digest does not match"):
        ResidualStore(tmp_path).load(4)


def test_a_store_loads_what_it_saved_last_from_memory(tmp_path: Path) -> None:
    """The next round's load takes the residuals a store saved last without reading its file (a
    file altered since is not read); another store, a restarted site's, reads the file, and
    refuses it altered."""
    store = ResidualStore(tmp_path)
    store.save(3, _residuals(3))
    path = tmp_path / "residuals-3.f32"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert _same(store.load(4), _residuals(3))
    with pytest.raises(ResidualsFileError, match="its digest does not match"):
        ResidualStore(tmp_path).load(4)


@pytest.mark.parametrize(
    ("alter", "reason"),
    [
        (lambda data: data[:-1], "its digest does not match: torn or altered"),
        (lambda data: data + b"\x00", "its digest does not match"),
        (lambda data: data[:100], "its digest does not match"),
        (lambda data: data[:40], r"40 bytes, not starting with"),
        (lambda data: b"", r"0 bytes, not starting with"),
        (lambda data: data[:-40] + bytes([data[-40] ^ 1]) + data[-39:], "its digest does not"),
        (lambda data: b"x" + data[1:], r"not starting with b'foedus residuals v2\\n'"),
        (
            lambda data: _sealed({"round": 3, "dtype": "<f8", "tensors": []}, b""),
            r"its header: round 3 of '<f8' in round 3's file",
        ),
        (
            lambda data: _sealed({"round": 4, "dtype": "<f4", "tensors": []}, b""),
            r"its header: round 4 of '<f4' in round 3's file",
        ),
        (lambda data: _sealed([1, 2], b""), r"its header: not a residuals header"),
        (
            lambda data: _sealed({"round": 3.0, "dtype": "<f4", "tensors": []}, b""),
            r"its header: round 3\.0 of '<f4' in round 3's file",
        ),
        (
            lambda data: _sealed({"round": 3, "dtype": "<f4", "tensors": [["a", [2]]]}, bytes(4)),
            r"81 bytes before its digest where its header says 85",
        ),
        (
            lambda data: _sealed(
                {"round": 3, "dtype": "<f4", "tensors": [["a", [1]], ["a", [1]]]}, bytes(8)
            ),
            r"a tensor named twice",
        ),
        (
            lambda data: _sealed({"round": 3, "dtype": "<f4", "tensors": [["a", [-1]]]}, b""),
            r"tensor 'a' of shape \[-1\]",
        ),
        (
            lambda data: _sealed({"round": 3, "dtype": "<f4", "tensors": [["a", [1.5]]]}, b""),
            r"tensor 'a' of shape \[1\.5\]",
        ),
        (
            lambda data: _sealed({"round": 3, "dtype": "<f4", "tensors": [["a"]]}, b""),
            r"its header: not enough values to unpack",
        ),
    ],
)
def test_a_corrupt_file_is_refused_naming_it(
    tmp_path: Path, alter: Callable[[bytes], bytes], reason: str
) -> None:
    """A torn, altered or foreign file is a ValueError naming the file and what is wrong."""
    path = _file(tmp_path)
    path.write_bytes(alter(path.read_bytes()))
    with pytest.raises(
        ResidualsFileError,
        match=f"^{re.escape(str(path))}: not an intact residuals file .*{reason}",
    ):
        ResidualStore(tmp_path).load(4)
    assert issubclass(ResidualsFileError, ValueError)


def test_an_unreadable_file_is_refused_naming_it(tmp_path: Path) -> None:
    """A file that cannot be read at all is named with the system's reason."""
    (tmp_path / "residuals-3.f32").mkdir()
    with pytest.raises(
        ResidualsFileError, match=f"^{re.escape(str(tmp_path))}/residuals-3.f32: cannot read"
    ):
        ResidualStore(tmp_path).load(4)


def test_save_refuses_what_is_not_residuals(tmp_path: Path) -> None:
    """Round numbers are integers >= 0, residuals float32 arrays keyed by name."""
    store = ResidualStore(tmp_path)
    for number in (-1, 1.0, True):
        with pytest.raises(ValueError, match="a round number is an integer >= 0"):
            store.save(number, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the residual of 'w' is float64"):
        store.save(1, {"w": np.zeros(2)})  # type: ignore[dict-item]
    assert store.rounds() == []


# -- feedback through the rounds -------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(CODES))
def test_error_feedback_converges(code: str) -> None:
    """Over the rounds, what was decoded sums to the deltas' sum but the last residual; the
    residual stays bounded, where without feedback the error grows round after round."""
    encode, decode = CODES[code]
    rng = np.random.default_rng(7)
    count, rounds = 2000, 400
    signal = (rng.standard_normal(count) * 0.01).astype(np.float32)
    residual: Floats | None = None
    total = np.zeros(count)
    received = np.zeros(count)
    without_feedback = np.zeros(count)
    norms = []
    for _ in range(rounds):
        delta = signal + (rng.standard_normal(count) * 0.02).astype(np.float32)
        sent = compensated(delta, residual)
        decoded = decode(encode(sent), count)
        residual = residual_after(sent, decoded)
        total += delta
        received += decoded
        without_feedback += decode(encode(delta), count)
        norms.append(float(np.linalg.norm(residual)))
    assert residual is not None
    np.testing.assert_allclose(received, total - residual, rtol=0, atol=1e-5)
    assert norms[-1] <= 1.25 * norms[rounds // 2 - 1]
    assert 5 * np.linalg.norm(received - total) < np.linalg.norm(without_feedback - total)
