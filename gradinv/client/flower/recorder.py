"""RecordingStrategy: wraps any Flower (Message API) strategy and, before it aggregates a round,
writes every client reply as gradinv folders (gradinv.client.flower.replies) under
`out_dir/round-RR/node-N`, listed in `out_dir/replies.json` (folders relative to out_dir). It sees only what the server sees. The training is the wrapped
strategy's: the recorder passes the replies on unchanged, except a reply it refuses (a missing or
misshapen array, NaN, an undeclared training config), which it keeps out of the aggregation and
names in one sentence, so one broken client cannot poison the global model."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gradinv.client.flower.replies import MODEL_INFO, TRAIN_CONFIG, Reply, write_reply
from gradinv.client.metadata import check_input_shape, check_normalisation, check_positive_int
from gradinv.client.models import build_model
from gradinv.errors import UserError
from gradinv.io import write_json

RECORDS = "replies.json"


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(arrays.to_torch_state_dict())


class RecordingStrategy(Strategy):
    """`RecordingStrategy(FedAvg(...), out_dir, model_info)`; model_info names the model the
    federation trains (arch, num_classes, input_shape, mean, std, and optionally classes and
    norm), so that every reply is checked against it and the attack can rebuild it."""

    def __init__(self, strategy: Strategy, out_dir: str | Path, model_info: dict, rounds: Iterable[int] | None = None):
        missing = [k for k in MODEL_INFO if k not in model_info]
        if missing:
            raise UserError(f"the recorder's model_info lacks '{missing[0]}' ({', '.join(MODEL_INFO)} are needed).")
        check_positive_int(model_info["num_classes"], "num_classes", "the recorder's model_info")
        check_input_shape(model_info["input_shape"], "the recorder's model_info")
        check_normalisation(model_info["mean"], model_info["std"], "the recorder's model_info")
        self.strategy, self.out_dir, self.model_info = strategy, Path(out_dir), dict(model_info)
        self.rounds = None if rounds is None else set(rounds)
        self.model = build_model(model_info["arch"], model_info["num_classes"], norm=model_info.get("norm", "batch"))
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.records: list[dict] = []
        self._global: dict[int, dict[str, torch.Tensor]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.rounds is None or server_round in self.rounds:
            # Arrays the server does not send (buffers, when clients keep theirs) stay the model's own.
            self._global[server_round] = {**self.base_state, **_state(arrays)}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if server_round in self._global:
            replies = [reply for reply in replies if self._record(server_round, reply)]
            write_json(self.out_dir / RECORDS, {"model_info": self.model_info, "replies": self.records})
            del self._global[server_round]
        return self.strategy.aggregate_train(server_round, replies)

    def _record(self, server_round: int, message: Message) -> bool:
        """Write one reply; False (and one logged sentence) when it is refused."""
        node = int(message.metadata.src_node_id)
        relative = f"round-{server_round:02d}/node-{node}"
        folder = self.out_dir / relative
        entry = {"round": server_round, "node": node, "folder": relative}
        try:
            reply = self._reply(server_round, node, message)
            self.model.load_state_dict(self._global[server_round])
            entry.update(write_reply(folder, reply, self._global[server_round], self.model, self.model_info))
            entry["status"] = "recorded"
            log(INFO, "gradinv recorder: round %s, node %s recorded in %s", server_round, node, folder)
        except UserError as err:
            entry.update(status="refused", reason=str(err))
            log(WARNING, "gradinv recorder refused a reply: %s", err)
        self.records.append(entry)
        return entry["status"] == "recorded"

    @staticmethod
    def _reply(server_round: int, node: int, message: Message) -> Reply:
        where = f"the reply of node {node} in round {server_round}"
        if message.has_error():
            raise UserError(f"{where} carries an error ({message.error.reason}).")
        arrays = list(message.content.array_records.values())
        if len(arrays) != 1:
            raise UserError(f"{where} holds {len(arrays)} ArrayRecords; one, the model's arrays, is expected.")
        config = message.content.config_records.get(TRAIN_CONFIG)
        if config is None:
            raise UserError(f"{where} has no '{TRAIN_CONFIG}' ConfigRecord declaring how the client trained.")
        return Reply(server_round, node, _state(arrays[0]), dict(config))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├── gradinv recorder: replies written to %s", self.out_dir)
        self.strategy.summary()
