"""A module's state dict as named numpy arrays and back, bit for bit, for every dtype it holds.

PyTorch's `Tensor.numpy()` shares the tensor's bytes, except for bfloat16, which numpy has no
dtype for: a bfloat16 tensor is viewed as int16 (the same 2 bytes) and those bytes as
`ml_dtypes.bfloat16`, which foedus sends, stores and averages as itself. No value is ever
converted, so every bit (NaN payloads, -0.0, subnormals) comes back as it went.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import torch

from foedus.plans.runners import RunnerError
from foedus.protos.dtypes import bfloat16_dtype, is_bfloat16

Array = npt.NDArray[np.generic]

# The state dict dtypes that travel; `Tensor.numpy()` gives each its numpy twin (bfloat16 apart).
SENDABLE = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


SHOWN = 6  # differences named in a ModelMismatchError's one line; the rest are counted


class ModelMismatchError(RunnerError):
    """The global model does not fit this site's module: names, shapes or dtypes differ."""


def tensor_to_array(name: str, tensor: torch.Tensor) -> Array:
    """A copy of `tensor`'s values as a numpy array of the same dtype (bfloat16 included)."""
    if tensor.dtype not in SENDABLE:
        raise RunnerError(f"state dict tensor {name!r}: dtype {tensor.dtype} cannot be sent")
    values = tensor.detach().to("cpu", copy=True).contiguous()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(bfloat16_dtype())
    array: Array = values.numpy()
    return array


def array_to_tensor(array: Array) -> torch.Tensor:
    """A new CPU tensor holding `array`'s bytes, of the matching torch dtype (bfloat16 included)."""
    # A writable copy: torch warns of read-only arrays, whose bytes it would share.
    return _sharing_tensor(np.array(array, order="C", copy=True))


def _sharing_tensor(values: Array) -> torch.Tensor:
    """A CPU tensor over a writable C-ordered array's own bytes, of its dtype (bfloat16 too)."""
    if is_bfloat16(values.dtype):
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A foedus model file (`best_model.pbuf`, say) as a state dict for `Module.load_state_dict`.

    The tensors own the arrays `foedus.model.load` reads (no second copy, no read-only warning),
    with every dtype as it was sent; `foedus.model.ModelFileError` names a file that is not one.
    """
    # Imported here: foedus.model reads with the aggregator's reader, and a collaborator that
    # imports this module to train never needs it (nor imports the aggregator).
    from foedus.model import load  # noqa: PLC0415

    return {name: _sharing_tensor(array) for name, array in load(path).items()}


def numpy_dtype(dtype: torch.dtype) -> np.dtype[np.generic]:
    """The numpy dtype a tensor of `dtype` travels as."""
    if dtype == torch.bfloat16:
        return bfloat16_dtype()
    twin: np.dtype[np.generic] = torch.empty(0, dtype=dtype).numpy().dtype
    return twin


def module_arrays(module: torch.nn.Module, shared: Callable[[str], bool]) -> dict[str, Array]:
    """The tensors of `module`'s state dict for which `shared(name)` holds, as numpy arrays."""
    return {
        name: tensor_to_array(name, tensor)
        for name, tensor in module.state_dict().items()
        if shared(name)
    }


def describe(dtype: torch.dtype | np.dtype[np.generic], shape: tuple[int, ...]) -> str:
    """`float32[10, 64]`: a tensor's dtype and shape as a person reads them."""
    name = str(dtype).removeprefix("torch.")
    return f"{name}{list(shape)}"


def load_arrays(
    module: torch.nn.Module, model: Mapping[str, Array], shared: Callable[[str], bool]
) -> None:
    """Copy the global `model` into `module`'s shared state, in place, after checking it fits.

    Every shared tensor must be in `model` with the module's shape and dtype, and `model` must
    hold nothing else; otherwise `ModelMismatchError` names each difference (nothing is copied).
    Tensors kept local (not shared) are left as they are.
    """
    everything = module.state_dict()
    state = {name: tensor for name, tensor in everything.items() if shared(name)}
    problems = [f"{name!r} is missing from it" for name in sorted(set(state) - set(model))]
    problems += [
        f"{name!r} is not in this module"
        + (" (it keeps that tensor local)" if name in everything else "")
        for name in sorted(set(model) - set(state))
    ]
    for name in sorted(set(state) & set(model)):
        array = np.asarray(model[name])
        tensor = state[name]
        if array.dtype != numpy_dtype(tensor.dtype) or array.shape != tuple(tensor.shape):
            problems.append(
                f"{name!r} is {describe(array.dtype, array.shape)}, the module's is "
                f"{describe(tensor.dtype, tuple(tensor.shape))}"
            )
    if problems:
        shown = "; ".join(problems[:SHOWN]) + (
            f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        )
        raise ModelMismatchError(
            f"the global model does not fit this site's module ({len(problems)} "
            f"difference{'s' if len(problems) > 1 else ''}): {shown}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(array_to_tensor(np.asarray(model[name])))
