"""The fixed-point ring and the AES-CTR masks: round trips, no wrap at the extremes, slices."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from foedus.plans.schema import SecureAggregationSettings
from foedus.secure.context import WEIGHT_TENSOR
from foedus.secure.masks import VectorLayout, add_mask, add_masks, keystream
from foedus.secure.ring import FixedPoint


def fixed(bits: int, sites: int, max_weight: int, clip: float = 1.0) -> FixedPoint:
    """The fixed point of a federation of `sites` with these settings."""
    section = SecureAggregationSettings(enabled=True, bits=bits, clip=clip, max_weight=max_weight)
    return FixedPoint.for_federation(section, sites)


@pytest.mark.parametrize(("bits", "max_weight"), [(16, 10), (32, 1000), (64, 65536)])
def test_encode_then_decode_is_within_half_a_unit(bits: int, max_weight: int) -> None:
    """A value comes back times its weight, off by at most half a unit of the fixed point (and
    float64's own rounding, which a 64-bit ring's units go below)."""
    point = fixed(bits, 4, max_weight, clip=2.0)
    values = np.random.default_rng(1).uniform(-2.0, 2.0, 1000)
    encoded = point.encode(values, max_weight)
    assert encoded.dtype == np.dtype(f"<u{bits // 8}")
    error = np.abs(point.decode(encoded) - values * max_weight)
    assert (error <= 0.5 / point.scale + np.abs(values * max_weight) * 2.0**-51).all()


@pytest.mark.parametrize("bits", [16, 32, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_site_at_the_clip_and_max_weight_does_not_wrap(bits: int, sign: float) -> None:
    """Every site at +-clip (or beyond: clipped) with max_weight: the ring sum reads back as
    sites x clip x max_weight, with its sign."""
    sites, max_weight = 3, 40 if bits == 16 else 65536
    point = fixed(bits, sites, max_weight, clip=0.5)
    total = np.zeros(2, dtype=point.dtype)
    for _ in range(sites):
        np.add(total, point.encode(np.array([sign * 0.5, sign * 7.0]), max_weight), out=total)
    decoded = point.decode(total)
    assert (np.sign(decoded) == sign).all()
    assert np.abs(decoded - sign * sites * 0.5 * max_weight).max() <= sites * 1.0 / point.scale


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    weights=st.lists(st.integers(1, 1000), min_size=2, max_size=8),
    values=st.lists(st.floats(-1e6, 1e6), min_size=8, max_size=8),
    clip=st.floats(1e-3, 1e3),
)
def test_any_sites_values_sum_without_wrapping(
    bits: int, weights: list[int], values: list[float], clip: float
) -> None:
    """Whatever the sites send (clipped), the ring's sum is their weighted sum within half a unit
    per site (and float64's own rounding of each weighted value, which a 64-bit ring's units go
    below): no wrap, with any number of sites up to the federation's and any weights."""
    point = fixed(bits, 8, 1000, clip=clip)
    total = np.zeros(1, dtype=point.dtype)
    exact, magnitude = 0.0, 0.0
    for weight, value in zip(weights, values, strict=False):
        np.add(total, point.encode(np.array([value]), weight), out=total)
        exact += min(max(value, -clip), clip) * weight
        magnitude += min(abs(value), clip) * weight
    bound = len(weights) * 0.5 / point.scale + magnitude * 2.0**-51
    assert abs(point.decode(total)[0] - exact) <= bound


def test_the_weight_element_is_the_integer_weight() -> None:
    """The weight travels unscaled; the sum decodes to the sum of the weights."""
    point = fixed(32, 3, 1000)
    total = point.encode_weight(1000) + point.encode_weight(7) + point.encode_weight(1)
    assert point.decode_weight(total) == 1008


def test_nan_and_infinity_are_not_encoded() -> None:
    """A delta with NaN or inf cannot become ring elements."""
    point = fixed(32, 3, 1000)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            point.encode(np.array([0.0, bad]), 1)


def test_encoding_against_a_reference_encodes_the_float64_delta() -> None:
    """`encode(trained, w, reference=global)` gives the very elements of `encode(trained - global)`
    taken whole in float64, across chunk boundaries; NaN or inf on either side is refused."""
    point = fixed(32, 8, 1, clip=0.01)
    rng = np.random.default_rng(7)
    size = (1 << 18) * 2 + 5  # past two of encode's chunks
    global_values = rng.random(size, dtype=np.float32)
    trained = global_values + rng.uniform(-0.02, 0.02, size).astype(np.float32)
    delta = trained.astype(np.float64) - global_values.astype(np.float64)
    chunked = point.encode(trained, 1, reference=global_values)
    assert np.array_equal(chunked, point.encode(delta, 1))
    assert not np.array_equal(chunked, point.encode(trained, 1))
    for bad in (np.nan, np.inf):
        spoiled = global_values.copy()
        spoiled[-1] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            point.encode(trained, 1, reference=spoiled)
    with pytest.raises(ValueError, match="reference has 3 values"):
        point.encode(trained, 1, reference=np.zeros(3))


def test_ring_problem_names_the_fix() -> None:
    """Fewer than 8 bits per value: the line names bits, the sites, max_weight and what would do."""
    assert SecureAggregationSettings(bits=32, max_weight=65536).ring_problem(100) is None
    line = SecureAggregationSettings(bits=16, max_weight=65536).ring_problem(3)
    assert line == (
        "a ring of 16 bits is too small for 3 collaborators with max_weight 65536: it leaves "
        "fewer than 8 bits per value (2^15 - 1 < 256 x 3 x 65536); use bits 32 or max_weight "
        "at most 42"
    )
    line = SecureAggregationSettings(bits=64, max_weight=2**60).ring_problem(3)
    assert line is not None and line.endswith("use max_weight at most 12009599006321322")
    assert (
        SecureAggregationSettings(bits=8).ring_problem(3) == "bits must be one of 16, 32, 64, not 8"
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_keystream_slices_are_the_whole_streams(dtype: type[np.unsignedinteger]) -> None:
    """Any [start, stop), mid-block too, equals that slice of the whole stream, which is AES-256-CTR
    of zeros from counter 0 read little-endian."""
    key = secrets.token_bytes(32)
    width = np.dtype(dtype).itemsize
    whole = keystream(key, 0, 5000, dtype)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    reference = np.frombuffer(
        encryptor.update(bytes(5000 * width)), dtype=np.dtype(dtype).newbyteorder("<")
    )
    np.testing.assert_array_equal(whole, reference)
    for start, stop in [(0, 1), (1, 2), (3, 17), (7, 4999), (4096, 5000), (9, 9)]:
        np.testing.assert_array_equal(keystream(key, start, stop, dtype), whole[start:stop])
    assert not np.array_equal(keystream(secrets.token_bytes(32), 0, 5000, dtype), whole)


def test_a_mask_added_then_subtracted_is_gone() -> None:
    """add_mask wraps in the ring; subtracting the same slice gives the values back."""
    key = secrets.token_bytes(32)
    values = np.arange(100, dtype=np.uint32)
    masked = values.copy()
    add_mask(masked, key, 40)
    assert (masked != values).mean() > 0.9
    add_mask(masked, key, 40, subtract=True)
    np.testing.assert_array_equal(masked, values)
    with pytest.raises(ValueError, match="32 bytes"):
        keystream(b"short", 0, 1, np.uint32)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("start", [0, 3, 1000])
def test_masks_added_at_once_are_the_masks_added_one_by_one(
    dtype: type[np.unsignedinteger], start: int
) -> None:
    """`add_masks` gives the elements `add_mask` gives key by key, from any start (mid-block
    too) and past several of its steps; its own keystream bytes are AES-CTR's."""
    rng = np.random.default_rng(5)
    size = (1 << 20) // np.dtype(dtype).itemsize * 2 + 7  # past two steps of a MB
    masks = [(secrets.token_bytes(32), bool(index % 2)) for index in range(5)]
    base = rng.integers(0, np.iinfo(dtype).max, size, dtype=dtype, endpoint=True)
    one_by_one, at_once = base.copy(), base.copy()
    for key, subtract in masks:
        add_mask(one_by_one, key, start, subtract=subtract)
    add_masks(at_once, masks, start)
    assert np.array_equal(one_by_one, at_once)
    alone = np.zeros(size, dtype=dtype)
    add_masks(alone, masks[:1], start)
    assert np.array_equal(alone, keystream(masks[0][0], start, start + size, dtype))
    nothing = base.copy()
    add_masks(nothing, [], start)
    assert np.array_equal(nothing, base)


def test_the_vector_layout_is_sorted_names_then_the_weight() -> None:
    """Tensors in sorted name order, each its size, the weight element last."""
    layout = VectorLayout.of({"fc": (2, 3), "conv": (4,), "bias": ()})
    assert dict(layout.slices) == {"bias": (0, 1), "conv": (1, 5), "fc": (5, 11)}
    assert (layout.weight, layout.length) == (11, 12)
    with pytest.raises(ValueError, match="may not be named"):
        VectorLayout.of({WEIGHT_TENSOR: (1,)})
