"""The embedded federation as a Flower app: `server_app` (FedAvg wrapped by the recorder) and
`client_app` (clients holding small partitions of the embedded pool, fine-tuning the victim).

Both engines run the same objects: the Simulation Engine through `run_simulation(settings)`, the
Deployment Engine through `flwr run` of an app folder whose components are
`gradinv.client.flower.apps:server_app` and `:client_app`, with the settings as run config. The
server sends the clients its training config (E, η, b, whether to send buffers) and where the
embedded data lies; each client takes partition `partition-id` of its node config, trains, and
replies with its state dict and a `train-config` record declaring how it trained."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradinv.client.data import load_set, normalize
from gradinv.client.flower.partitions import client_partitions
from gradinv.client.flower.recorder import RecordingStrategy
from gradinv.client.flower.replies import TRAIN_CONFIG
from gradinv.client.flower.training import train_locally
from gradinv.client.victim import load_victim
from gradinv.io import read_json, write_tensors
from gradinv.pipeline.folders import SETS, VICTIM

FINAL_WEIGHTS = "final_global.safetensors"
# Run-config keys (flat: Flower's run config holds scalars); lists are comma-separated.
DEFAULTS = {"root": ".", "out-dir": "data/federation/replies", "rounds": 3, "client-sizes": "8,16,16,32",
            "split": "iid", "seed": 0, "local-epochs": 1, "lr": 0.01, "batch-size": 8, "send-buffers": True,
            "record-rounds": "all", "record": True, "timeout": 600.0}


def numbers(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part.strip()]


def recorded_rounds(settings: dict) -> list[int] | None:
    return None if settings["record-rounds"] == "all" else numbers(settings["record-rounds"])


server_app = ServerApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    settings = {**DEFAULTS, **context.run_config}
    root = Path(settings["root"])
    model, _ = load_victim(root / VICTIM)
    info = read_json(root / VICTIM / "model.json", "victim metadata")
    clients = len(numbers(settings["client-sizes"]))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    if settings["record"]:
        strategy = RecordingStrategy(strategy, settings["out-dir"], {k: info[k] for k in info if k in (
            "arch", "num_classes", "input_shape", "mean", "std", "classes", "norm")}, recorded_rounds(settings))
    train_config = ConfigRecord({key: settings[key] for key in (
        "root", "client-sizes", "split", "seed", "local-epochs", "lr", "batch-size", "send-buffers")})
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=int(settings["rounds"]),
                            train_config=train_config, timeout=float(settings["timeout"]))
    final = {**model.state_dict(), **result.arrays.to_torch_state_dict()}
    write_tensors(Path(settings["out-dir"]) / FINAL_WEIGHTS, final)


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    config = message.content["config"]
    partition = int(context.node_config["partition-id"])
    root = Path(str(config["root"]))
    model, meta = load_victim(root / VICTIM)
    pool = load_set(root / SETS, "pool")
    index = client_partitions(pool.labels, numbers(config["client-sizes"]), str(config["split"]),
                              int(config["seed"]))[partition]
    state = message.content["arrays"].to_torch_state_dict()
    model.load_state_dict({**model.state_dict(), **state})
    epochs, lr, batch_size = int(config["local-epochs"]), float(config["lr"]), int(config["batch-size"])
    loss = train_locally(model, normalize(pool.images[index], meta.mean, meta.std), pool.labels[index], epochs, lr,
                         batch_size)
    reply = model.state_dict()
    if not bool(config["send-buffers"]):
        reply = {name: p for name, p in model.named_parameters()}
    declared = ConfigRecord({"local-epochs": epochs, "lr": lr, "batch-size": batch_size, "num-examples": len(index),
                             "client": partition})
    content = RecordDict({"arrays": ArrayRecord({k: v.detach() for k, v in reply.items()}),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(index)}),
                          TRAIN_CONFIG: declared})
    return Message(content=content, reply_to=message)


def run_simulation(settings: dict) -> None:
    """The federation on Flower's Simulation Engine, one virtual SuperNode per client."""
    from flwr.simulation import run_simulation as simulate

    clients = len(numbers(settings["client-sizes"]))
    app = ServerApp()

    @app.main()
    def serve_with(grid: Grid, context: Context) -> None:
        context.run_config.update(settings)
        serve(grid, context)

    torch.set_num_threads(1)
    simulate(server_app=app, client_app=client_app, num_supernodes=clients,
             backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
