"""A PyTorch state dict as named arrays and back, bit for bit, every dtype; fitting it is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from foedus import model
from foedus.plans.runners import RunnerError, check_runner_settings, load_runner
from foedus.plans.schema import RunnerSettings
from foedus.plans.site_settings import merge_site_settings
from foedus.protos import base_pb2
from foedus.protos.codec import decode_tensor, encode_tensor
from foedus.protos.dtypes import bfloat16_dtype
from foedus.torch_runner import (
    ModelMismatchError,
    array_to_tensor,
    load_state_dict,
    tensor_to_array,
)
from foedus.torch_runner.digits import DigitsCNNRunner

from net_runner import (
    DropoutRunner,
    HalfRunner,
    LocalStatisticsRunner,
    Net,
    NetRunner,
    WiderRunner,
)

MAX_BYTES = 2**24
NAMES = ("alice", "bob", "carol")


def every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `dtype` holding every bit pattern of a 16-bit type, or random bits of wider ones."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    if dtype == torch.bool:
        return torch.tensor([True, False, True])
    rng = np.random.default_rng(5)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = rng.integers(0, 256, size=4096 * size, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(64, -1)


def same_bits(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (NaNs compared by their bits)."""
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    as_bytes = [t.contiguous().view(-1).view(torch.uint8) for t in (left, right)]
    return bool(torch.equal(*as_bytes))


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_dtypes_round_trip_bit_for_bit_through_the_codec(dtype: torch.dtype) -> None:
    """Every bit pattern of each state dict dtype survives array, wire bytes and back to torch."""
    tensor = every_bit_pattern(dtype)
    array = tensor_to_array("t", tensor)
    assert same_bits(array_to_tensor(array), tensor)
    sent = encode_tensor("t", array).SerializeToString()
    received = decode_tensor(base_pb2.NamedTensor.FromString(sent), max_bytes=MAX_BYTES)
    assert received.dtype == array.dtype and received.tobytes() == array.tobytes()
    assert same_bits(array_to_tensor(received), tensor)  # a read-only array is copied, not refused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_load_state_dict_reads_a_model_file_bit_for_bit(dtype: torch.dtype, tmp_path: Path) -> None:
    """A model file of each dtype (and a 0-d counter) comes back as tensors of the same bits that
    own their memory: writable, no read-only warning (warnings are errors here)."""
    tensor = every_bit_pattern(dtype)
    path = tmp_path / "model.pbuf"
    model.save(path, {"t": tensor_to_array("t", tensor), "steps": np.array(9, dtype=np.int64)})
    state = load_state_dict(path)
    assert list(state) == ["steps", "t"]
    assert same_bits(state["t"], tensor)
    assert state["steps"].shape == () and state["steps"].dtype == torch.int64
    state["t"].view(-1)[:1] = state["t"].view(-1)[1:2]  # writable, and the file unchanged
    assert same_bits(load_state_dict(path)["t"], tensor)


def test_load_state_dict_names_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    """A PyTorch checkpoint (or any file not a model) is foedus.model.ModelFileError naming it."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(model.ModelFileError, match=f"^{path}: "):
        load_state_dict(path)


def test_float32_goes_as_openfl_reads_it_and_bfloat16_by_name() -> None:
    """float32 weights keep OpenFL's encoding; bfloat16 is named, as ml_dtypes' numpy dtype."""
    assert encode_tensor("w", tensor_to_array("w", torch.ones(3))).foedus_dtype == ""
    array = tensor_to_array("w", torch.ones(3, dtype=torch.bfloat16))
    assert array.dtype == bfloat16_dtype()
    assert encode_tensor("w", array).foedus_dtype == "bfloat16"


def test_arrays_are_copies_not_views_of_the_module() -> None:
    """Changing an array handed out (or the tensor made from one) leaves the other side alone."""
    weight = torch.zeros(4)
    array = tensor_to_array("w", weight)
    array[0] = 5
    assert float(weight[0]) == 0
    back = array_to_tensor(array)
    back[1] = 7
    assert float(array[1]) == 0


def test_complex_tensors_are_refused_by_name() -> None:
    """A dtype foedus cannot send is named with its tensor, not failed on deep in numpy."""
    with pytest.raises(
        RunnerError, match=r"state dict tensor 'z': dtype torch\.complex64 cannot be sent"
    ):
        tensor_to_array("z", torch.zeros(2, dtype=torch.complex64))


SETTINGS = RunnerSettings(name="net_runner:NetRunner", seed=4, settings={})


def test_a_model_with_buffers_travels_whole_and_comes_back_as_sent() -> None:
    """Parameters and buffers (BatchNorm's int64 counter too) are the global model, bit for bit."""
    model = NetRunner.initial_model(SETTINGS)
    assert model["bn.num_batches_tracked"].dtype == np.int64
    assert model["scale"].dtype == bfloat16_dtype() and model["fc.weight"].dtype == np.float32
    assert sorted(model) == sorted(Net().state_dict())
    assert NetRunner.initial_model(SETTINGS)["fc.weight"].tobytes() == model["fc.weight"].tobytes()
    runner = NetRunner(SETTINGS, collaborator="bob", collaborators=NAMES)
    outcome = runner.train(model, 0)
    trained = outcome.model
    assert trained["bn.num_batches_tracked"] == 4  # 4 batches: the buffer moved and is sent
    assert trained["fc.weight"].tobytes() != model["fc.weight"].tobytes()
    other = NetRunner(SETTINGS, collaborator="alice", collaborators=NAMES)
    other.load(trained)  # the trained model, as it would come back averaged, loads bit for bit
    for name, tensor in other.module.state_dict().items():
        assert tensor_to_array(name, tensor).tobytes() == trained[name].tobytes(), name


def test_buffers_kept_local_are_neither_sent_nor_overwritten() -> None:
    """keep_local tensors are not in the global model and keep each site's own values."""
    model = LocalStatisticsRunner.initial_model(SETTINGS)
    assert not any(name.startswith("bn.running") or "num_batches" in name for name in model)
    assert "bn.weight" in model and "bn.bias" in model  # BatchNorm's affine weights are shared
    runner = LocalStatisticsRunner(SETTINGS, collaborator="alice", collaborators=NAMES)
    outcome = runner.train(model, 0)
    assert sorted(outcome.model) == sorted(model)
    statistics = runner.module.state_dict()["bn.running_mean"].clone()
    runner.validate(model)  # the global model loads; the site's statistics stay
    assert torch.equal(runner.module.state_dict()["bn.running_mean"], statistics)
    assert int(runner.module.state_dict()["bn.num_batches_tracked"]) == 4


def test_a_round_trains_alike_whatever_this_process_ran_before() -> None:
    """Round 2 (shuffles and dropout) gives the same bits on a fresh runner as after rounds 0
    and 1 and other draws from PyTorch's global generator; another round trains otherwise."""
    model = DropoutRunner.initial_model(SETTINGS)
    worked = DropoutRunner(SETTINGS, collaborator="bob", collaborators=NAMES)
    for round_number in (0, 1):
        worked.train(model, round_number)
    torch.rand(7)  # whatever else this process drew meanwhile
    after_work = worked.train(model, 2).model
    fresh = DropoutRunner(SETTINGS, collaborator="bob", collaborators=NAMES).train(model, 2).model
    assert all(after_work[name].tobytes() == fresh[name].tobytes() for name in model), model
    assert worked.train(model, 3).model["fc.weight"].tobytes() != fresh["fc.weight"].tobytes()


def test_a_mismatched_model_is_refused_before_training_naming_every_difference() -> None:
    """Names, shapes and dtypes that differ are listed in one line; nothing is trained or copied."""
    runner = NetRunner(SETTINGS, collaborator="alice", collaborators=NAMES)
    before = {name: tensor.clone() for name, tensor in runner.module.state_dict().items()}
    wider = WiderRunner.initial_model(SETTINGS)
    with pytest.raises(ModelMismatchError) as refused:
        runner.train(wider, 0)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the global model does not fit this site's module (")
    assert "'fc.weight' is float32[3, 8], the module's is float32[3, 6]" in message
    assert "'bn.running_mean' is float32[8], the module's is float32[6]" in message
    half = HalfRunner.initial_model(SETTINGS)
    with pytest.raises(
        ModelMismatchError, match=r"'fc.weight' is float16\[3, 6\], the module's is float32\[3, 6\]"
    ):
        runner.validate(half)
    renamed = {("head." + name if name.startswith("fc.") else name): a for name, a in half.items()}
    with pytest.raises(ModelMismatchError) as refused:
        runner.train(renamed, 0)
    assert "'fc.bias' is missing from it" in str(refused.value)
    assert "'head.fc.bias' is not in this module" in str(refused.value)
    local = LocalStatisticsRunner(SETTINGS, collaborator="alice", collaborators=NAMES)
    with pytest.raises(
        ModelMismatchError,
        match=r"'bn.running_mean' is not in this module \(it keeps that tensor local\)",
    ):
        local.validate(NetRunner.initial_model(SETTINGS))
    strangers = {f"x{index}": np.zeros(1, np.float32) for index in range(10)}
    with pytest.raises(ModelMismatchError) as refused:
        runner.validate(strangers)
    assert "(18 differences)" in str(refused.value)  # 8 missing, 10 not in the module
    assert str(refused.value).endswith("; and 12 more")
    for name, tensor in runner.module.state_dict().items():
        assert same_bits(tensor, before[name]), name


def test_the_example_names_a_bad_site_key_with_its_file(tmp_path: Path) -> None:
    """The CNN example refuses a site file's bad device or unknown key, naming file and key."""
    settings = load_runner(
        RunnerSettings(name="foedus.torch_runner.digits:DigitsCNNRunner", seed=0, settings={})
    )
    assert settings is DigitsCNNRunner
    site = tmp_path / "site.yaml"
    base = RunnerSettings(
        name="foedus.torch_runner.digits:DigitsCNNRunner", seed=0, settings={"epochs": 1}
    )
    for bad, message in (
        (
            {"device": "abacus"},
            f"{site}: device: expected a PyTorch device such as cpu or cuda, got 'abacus'",
        ),
        ({"data": "/srv"}, f"{site}: data: unknown key"),
        ({"batch_size": -1}, f"{site}: batch_size: expected an integer >= 1, got -1"),
    ):
        merged = merge_site_settings(base, bad, source=site)
        with pytest.raises(RunnerError) as refused:
            DigitsCNNRunner(merged, collaborator="alice", collaborators=NAMES)
        assert str(refused.value).startswith(message)


def test_the_adapters_check_is_the_line_its_constructor_raises() -> None:
    """The CNN example's `check_settings` refuses a plan's bad device or unknown key with the very
    line the constructor raises at a site, before anything is built or loaded."""
    name = "foedus.torch_runner.digits:DigitsCNNRunner"
    for bad, line in (
        (
            {"device": "abacus"},
            "runner.settings.device: expected a PyTorch device such as cpu or cuda, got 'abacus'",
        ),
        (
            {"epoch": 2},
            "runner.settings.epoch: unknown key (known: split, test_fraction, epochs, "
            "batch_size, learning_rate, skew)",
        ),
    ):
        settings = RunnerSettings(name=name, seed=0, settings=bad)
        with pytest.raises(RunnerError) as checked:
            check_runner_settings(DigitsCNNRunner, settings)
        with pytest.raises(RunnerError) as built:
            DigitsCNNRunner(settings, collaborator="alice", collaborators=NAMES)
        assert str(checked.value) == str(built.value) == line
    check_runner_settings(DigitsCNNRunner, RunnerSettings(name=name, seed=0, settings={}))


class StrictNetRunner(NetRunner):
    """`NetRunner` taking no settings at all, and noting whether `setup` ran."""

    set_up = False

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> None:
        """Every key is refused."""
        for key in settings.settings:
            raise RunnerError(f"{settings.key_path(key)}: unknown key (this runner takes none)")

    def setup(self) -> None:
        """Note it ran."""
        type(self).set_up = True
        super().setup()


def test_a_subclass_check_runs_before_setup_and_the_base_takes_everything() -> None:
    """`TorchRunner.__init__` runs the subclass's check before `setup`; the base class's own check
    refuses nothing (a runner that reads no settings)."""
    settings = RunnerSettings(name="net_runner:StrictNetRunner", seed=0, settings={"lr": 1})
    with pytest.raises(RunnerError, match=r"^runner\.settings\.lr: unknown key"):
        StrictNetRunner(settings, collaborator="alice", collaborators=NAMES)
    assert not StrictNetRunner.set_up
    check_runner_settings(NetRunner, settings)
