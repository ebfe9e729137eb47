"""A `lossless` download as the change from the model the site holds (issue #24).

Under `compression.download: lossless` the aggregator names each round's whole model by a digest
(`EncodedModel.model_digest`); a site that holds the previous round's model whole says so in its
next request, and gets each tensor as the XOR of its bits with the held one's, which a round that
moved few values makes nearly all zeros. The site XORs them back: the very bits of the model.
Any other site (none held, an older model, a model the aggregator never named) gets the whole
tensor as before; a delta the client cannot apply is refused, naming the tensor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_download_codes import coded_plan
from test_model_stream import client_for, header_chunk, large_model

from foedus.aggregator.encoded_model import EncodedModel, model_digest
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array
from foedus.collaborator.client import AggregatorGRPCClient, HeldModel, OutgoingTensor
from foedus.collaborator.errors import ResponseValidationError
from foedus.compression.codes import Code
from foedus.pki.layout import CertsLayout
from foedus.protos import aggregator_pb2

from servers import closing_rounds, make_plan, running_aggregator


def moved(model: dict[str, Array], every: int = 100) -> dict[str, Array]:
    """`model` with one value in `every` of its large tensor moved (a sparse round's change)."""
    large = model["large"].copy()
    large.reshape(-1)[::every] += 1
    return {**model, "large": large}


def stream(encoded: EncodedModel, round_number: int, model: dict[str, Array], held: str) -> list:
    """The chunks a request for `model`'s every tensor gets, after the header naming its digest."""
    digest = encoded.model_digest(round_number, lambda: model)
    chunks = [
        aggregator_pb2.ModelChunk.FromString(chunk)
        for name in sorted(model)
        for chunk in encoded.chunks(round_number, name, model[name], held=held)
    ]
    return [header_chunk(), *chunks] if not digest else [_named(digest), *chunks]


def _named(digest: str) -> aggregator_pb2.ModelChunk:
    header = header_chunk()
    header.foedus_model_digest = digest
    return header


def received(client: AggregatorGRPCClient, chunks: list, round_number: int) -> dict[str, Array]:
    return client._assemble_model(iter(chunks), [], round_number)


@pytest.fixture
def receiver(certs: CertsLayout) -> AggregatorGRPCClient:
    """A real client of the test plan, fed streams without a socket (it never connects)."""
    return client_for(certs, 1)


def test_a_site_holding_the_last_model_gets_the_change_and_its_bits(
    receiver: AggregatorGRPCClient,
) -> None:
    """Round 1 after round 0, to a site that holds round 0 whole: every tensor a lossless XOR
    (`foedus_delta`), the large one in under a tenth of its whole lossless bytes, and the
    model the site assembles is round 1's, bit for bit; it then holds round 1."""
    encoded = EncodedModel(download=Code.LOSSLESS)
    first, second = large_model(), moved(large_model())
    model = received(receiver, stream(encoded, 0, first, ""), 0)
    held = receiver._held
    assert held is not None and held.digest == model_digest(first)
    delta = stream(encoded, 1, second, held.digest)
    metas = [chunk for chunk in delta[1:] if chunk.HasField("tensor")]
    assert all(meta.tensor.foedus_delta for meta in metas)
    whole = EncodedModel(download=Code.LOSSLESS)
    whole_large = sum(len(c) for c in whole.chunks(1, "large", second["large"]))
    delta_large = sum(len(c) for c in encoded.chunks(1, "large", second["large"], held=held.digest))
    assert delta_large < whole_large / 10
    model = received(receiver, delta, 1)
    assert {n: (a.dtype, a.shape, a.tobytes()) for n, a in model.items()} == {
        n: (a.dtype, a.shape, a.tobytes()) for n, a in second.items()
    }
    assert all(not array.flags.writeable for array in model.values())
    assert receiver._held is not None and receiver._held.digest == model_digest(second)


@pytest.mark.parametrize("held", ["", "0" * 64, "current", "older"])
def test_a_site_holding_anything_else_gets_the_whole_model(held: str) -> None:
    """No model held, one the aggregator never named, this round's own, or the one before the
    previous: each tensor whole (no `foedus_delta`)."""
    encoded = EncodedModel(download=Code.LOSSLESS)
    zeroth = large_model()
    first, second = moved(zeroth, 7), moved(moved(zeroth, 7))
    digests = [
        encoded.model_digest(r, lambda m=m: m) for r, m in enumerate((zeroth, first, second))
    ]
    held = {"current": digests[2], "older": digests[0]}.get(held, held)
    chunks = stream(encoded, 2, second, held)
    assert not any(chunk.tensor.foedus_delta for chunk in chunks if chunk.HasField("tensor"))
    assert encoded.model_digest(2, lambda: second) == digests[2]


def test_only_a_lossless_download_names_its_model() -> None:
    """Other codes' sites never hold the model as sent: no digest, no delta, whatever is held."""
    for code in (Code.NONE, Code.INT8, Code.BFLOAT16):
        encoded = EncodedModel(download=code)
        never = lambda: pytest.fail("no code but lossless asks for the whole model")  # noqa: E731
        assert encoded.model_digest(0, never) == ""
        chunks = stream(encoded, 0, large_model(), "0" * 64)
        assert not any(chunk.tensor.foedus_delta for chunk in chunks if chunk.HasField("tensor"))


def test_the_digest_names_the_models_bits() -> None:
    """The same bits give the same digest; a bit, a name, a dtype or a shape changed does not."""
    model = large_model()
    same = {name: np.array(array, copy=True) for name, array in model.items()}
    assert model_digest(same) == model_digest(model)
    flipped = large_model()
    flipped["large"].view(np.uint32).reshape(-1)[12345] ^= 1
    renamed = {("other" if n == "steps" else n): a for n, a in model.items()}
    retyped = {**model, "steps": model["steps"].astype(np.int32)}
    reshaped = {**model, "large": model["large"].reshape(1024, 1280)}
    digests = {model_digest(m) for m in (model, flipped, renamed, retyped, reshaped)}
    assert len(digests) == 5


def test_a_delta_the_site_cannot_apply_is_refused(receiver: AggregatorGRPCClient) -> None:
    """A delta for a model the site does not hold, whose tensor has another shape there, or
    that its request did not name: `ResponseValidationError` naming the tensor."""
    encoded = EncodedModel(download=Code.LOSSLESS)
    first, second = large_model(), moved(large_model())
    digest = encoded.model_digest(0, lambda: first)
    delta = stream(encoded, 1, second, digest)
    with pytest.raises(ResponseValidationError, match="does not hold"):
        received(receiver, delta, 1)
    reshaped = {**first, "large": first["large"].reshape(1024, 1280)}
    receiver._held = HeldModel(digest, reshaped, whole=True)
    with pytest.raises(ResponseValidationError, match="'large' is a delta for float32"):
        received(receiver, delta, 1)
    # Tensors held by name do not cover a request for the whole model: it named no digest.
    receiver._held = HeldModel(digest, first, whole=False)
    with pytest.raises(ResponseValidationError, match="does not hold"):
        received(receiver, delta, 1)


def test_a_site_names_the_model_it_holds_only_for_tensors_it_holds() -> None:
    """Held tensors asked for by name cover a request for them or fewer, not for another; a
    whole model covers a request for the whole model, tensors asked for by name do not."""
    model = large_model()
    some = HeldModel("d", {"large": model["large"], "steps": model["steps"]}, whole=False)
    assert some.covers(["large"]) and some.covers(["steps", "large"])
    assert not some.covers(["large", "embedding"]) and not some.covers([])
    assert HeldModel("d", model, whole=True).covers([])


def test_a_real_site_downloads_the_next_round_as_its_change(certs: CertsLayout) -> None:
    """Over mutual TLS, asking for the model's tensors by name as the collaborator's loop does:
    alice downloads round 0, trains (one value in a hundred moved), the round closes, and her
    download of round 1 comes as the change (the aggregator spooled the delta for her) and is
    round 1's model to the bit."""
    plan = coded_plan(make_plan(certs), Code.LOSSLESS)
    federation = Federation(collaborators=["alice"], tasks=["train"], rounds=2, model=large_model())
    with (
        running_aggregator(plan, federation) as server,
        closing_rounds(federation),
        AggregatorGRPCClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=server.port
        ) as client,
    ):
        names = sorted(large_model())
        first = client.get_aggregated_model(names, 0)
        trained = moved(dict(first))
        sent = [OutgoingTensor(name, array, tags=("trained",)) for name, array in trained.items()]
        client.send_local_task_results(0, "train", 10, sent)
        deadline = time.monotonic() + 20
        while federation.round_number < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert federation.round_number == 1
        second = client.get_aggregated_model(names, 1)
        model = federation.model()
        assert {n: a.tobytes() for n, a in second.items()} == {
            n: np.asarray(a).tobytes() for n, a in model.items()
        }
        assert np.array_equal(second["large"], trained["large"])
        entries = server.servicer._encoded._entries
        assert entries["large"].delta_chunks is not None


def test_the_previous_model_is_read_from_its_file_once_it_is_tidied_away(
    receiver: AggregatorGRPCClient, tmp_path: Path
) -> None:
    """The previous round's model mapped from a file the state has since deleted: its file was
    kept open when the round was digested, the change is made from it, and the site gets round
    1's bits."""
    first, second = large_model(), moved(large_model())
    path = tmp_path / "round-0.bin"
    first["large"].tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=first["large"].shape)
    held_first = {**first, "large": mapped}
    encoded = EncodedModel(download=Code.LOSSLESS)
    received(receiver, stream(encoded, 0, held_first, ""), 0)
    path.unlink()  # tidied away once round 1's model is committed
    assert receiver._held is not None
    delta = stream(encoded, 1, second, receiver._held.digest)
    assert all(chunk.tensor.foedus_delta for chunk in delta[1:] if chunk.HasField("tensor"))
    model = received(receiver, delta, 1)
    assert model["large"].tobytes() == second["large"].tobytes()
    previous = encoded._previous  # round 0's, its file still open though it has no name
    assert previous is not None and os.fstat(previous.files[str(path)]).st_nlink == 0
