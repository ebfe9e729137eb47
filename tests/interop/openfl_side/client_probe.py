"""Drive a foedus aggregator with OpenFL 1.9's own gRPC client: run in OpenFL's virtualenv.

    python client_probe.py SCENARIO.json

Every call goes through `openfl.transport.grpc.aggregator_client.AggregatorGRPCClient`; tensors
are encoded and decoded as `openfl.component.Collaborator` does (`TensorCodec` over the plan's
`NoCompressionPipeline`, `utils.construct_named_tensor`). The probe only observes: it writes what
it sent, fetched and was refused to `report.json` and `arrays.npz` in the scenario's `out`
folder, and the foedus-side test judges them. The scenario (JSON):

    port, ca, federation_uuid, aggregator_uuid, tensors (model tensor names),
    collaborators {name: [cert, key, train data size, validation data size]},
    duplicate (the collaborator that sends its first train result twice),
    impostors {label: {name, cert, key, federation_uuid?, aggregator_uuid?}}, out
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from openfl.pipelines import NoCompressionPipeline, TensorCodec
from openfl.protocols import utils
from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient
from openfl.utilities import TensorKey

CODEC = TensorCodec(NoCompressionPipeline())
POLL_LIMIT_SECONDS = 60
# What an OpenFL collaborator with `use_delta_updates: true` asks for from round 1 on.
DELTA_TAGS = ("aggregated", "delta", "compressed")


def client(scenario, name, cert, key, *, federation_uuid=None, aggregator_uuid=None):
    """OpenFL's client for `name`; no resend, so a refusal reaches us instead of a retry loop."""
    return AggregatorGRPCClient(
        agg_addr="localhost",
        agg_port=scenario["port"],
        aggregator_uuid=aggregator_uuid or scenario["aggregator_uuid"],
        federation_uuid=federation_uuid or scenario["federation_uuid"],
        collaborator_name=name,
        use_tls=True,
        require_client_auth=True,
        root_certificate=scenario["ca"],
        certificate=cert,
        private_key=key,
        resend_data_on_reconnection=False,
    )


def to_named_tensor(key, array):
    """What `Collaborator.nparray_to_named_tensor` sends for a tensor without delta updates."""
    compressed_key, data, metadata = CODEC.compress(key, array, require_lossless=True)
    return utils.construct_named_tensor(compressed_key, data, metadata, lossless=True)


def from_named_tensor(tensor):
    """What `Collaborator.named_tensor_to_nparray` makes of a tensor the aggregator sent."""
    metadata = [
        {"int_to_float": m.int_to_float, "int_list": m.int_list, "bool_list": m.bool_list}
        for m in tensor.transformer_metadata
    ]
    key = TensorKey(tensor.name, "probe", tensor.round_number, tensor.report, tuple(tensor.tags))
    _, array = CODEC.decompress(
        key, data=tensor.data_bytes, transformer_metadata=metadata, require_lossless=True
    )
    return array


def refusal(call):
    """The status code and details a call was refused with, or None when it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return {"code": error.code().name, "details": error.details()}
    return None


def update(index, round_number, array):
    """A deterministic stand-in for local training: the global tensor plus seeded noise."""
    noise = np.random.default_rng((index, round_number)).normal(0.0, 0.1, array.shape)
    return (array + noise).astype(np.float32)


def accuracy(index, round_number):
    """The accuracy each probe collaborator reports: known, so the test can average it."""
    return 0.5 + 0.1 * index + 0.01 * round_number


def next_tasks(col, name):
    """get_tasks until there are tasks or quit (the aggregator long-polls; this bounds it)."""
    deadline = time.monotonic() + POLL_LIMIT_SECONDS
    tasks, round_number, sleep_time, quit_ = col.get_tasks()
    while not tasks and not quit_:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no task and no quit for {POLL_LIMIT_SECONDS} s")
        time.sleep(min(sleep_time, 1))
        tasks, round_number, sleep_time, quit_ = col.get_tasks()
    return tasks, round_number, quit_


def results(task, name, index, round_number, *, model, arrays):
    """The named tensors OpenFL's collaborator would send for `task` (train: trained weights)."""
    if task == "train":
        named = []
        for tensor_name, array in model.items():
            trained = update(index, round_number, array)
            arrays[f"{round_number}/{name}/trained/{tensor_name}"] = trained
            key = TensorKey(tensor_name, name, round_number, False, ("trained",))
            named.append(to_named_tensor(key, trained))
        key = TensorKey("loss", name, round_number, True, ("metric",))
        return [*named, to_named_tensor(key, np.array(1.0 / (round_number + 1)))]
    suffix = "validate_agg" if task == "aggregated_model_validation" else "validate_local"
    key = TensorKey("accuracy", name, round_number, True, ("metric", suffix))
    return [to_named_tensor(key, np.array(accuracy(index, round_number)))]


def play_round(scenario, col, name, index, *, report, arrays):
    """One collaborator's turn: its tasks of the round in progress, or its quit. True on quit."""
    _, _, train_size, valid_size = scenario["collaborators"][name]
    tasks, round_number, quit_ = next_tasks(col, name)
    if quit_:
        report["quit"].append({"name": name, "round": round_number})
        return True
    report["rounds"].append(
        {
            "name": name,
            "round": round_number,
            "tasks": [[t.name, t.function_name, t.task_type] for t in tasks],
        }
    )
    model = {}
    for tensor_name in scenario["tensors"]:
        tensor = col.get_aggregated_tensor(tensor_name, round_number, False, ("model",), True)
        model[tensor_name] = arrays[f"{round_number}/{name}/global/{tensor_name}"] = (
            from_named_tensor(tensor)
        )
    if round_number == 1 and "delta_request" not in report:
        first = scenario["tensors"][0]
        fetch = partial(col.get_aggregated_tensor, first, round_number, False, DELTA_TAGS, True)
        report["delta_request"] = refusal(fetch)
    for task in tasks:
        named = results(task.name, name, index, round_number, model=model, arrays=arrays)
        size = train_size if task.name == "train" else valid_size
        send = partial(col.send_local_task_results, round_number, task.name, size, named)
        send()
        if name == scenario["duplicate"] and task.name == "train" and round_number == 0:
            report["duplicate_answers"].append(refusal(send))
    return False


def main(scenario_path):
    scenario = json.loads(Path(scenario_path).read_text())
    out = Path(scenario["out"])
    report = {"refusals": {}, "rounds": [], "duplicate_answers": [], "quit": []}
    arrays = {}
    for label, impostor in scenario["impostors"].items():
        probe = client(scenario, **impostor)
        report["refusals"][label] = refusal(probe.ping)
        probe.disconnect()
    clients = {}
    for name, (cert, key, _, _) in scenario["collaborators"].items():
        clients[name] = client(scenario, name, cert, key)
        clients[name].ping()
    # Turns in plan order: everyone finishes round r before anyone asks for round r + 1.
    done = set()
    while len(done) < len(clients):
        for index, (name, col) in enumerate(clients.items()):
            if name not in done and play_round(
                scenario, col, name, index, report=report, arrays=arrays
            ):
                done.add(name)
    for col in clients.values():
        col.disconnect()
    np.savez(out / "arrays.npz", **arrays)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
