"""PyTorch models as foedus task runners: subclass `TorchRunner`, write the training loop.

Imported only by a plan whose runner is a `TorchRunner` (`pip install -e '.[torch]'`); the
rest of foedus never imports PyTorch.
"""

from foedus.torch_runner.runner import LoopOutcome, PrivateTrainingError, Sampling, TorchRunner
from foedus.torch_runner.state import (
    ModelMismatchError,
    array_to_tensor,
    load_state_dict,
    module_arrays,
    tensor_to_array,
)

__all__ = [
    "LoopOutcome",
    "ModelMismatchError",
    "PrivateTrainingError",
    "Sampling",
    "TorchRunner",
    "array_to_tensor",
    "load_state_dict",
    "module_arrays",
    "tensor_to_array",
]
