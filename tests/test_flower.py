"""The Flower federation: client partitions, the BatchNorm-buffer leak, the recorder's artifacts
(replayable through gradinv's FedAvg step, refused in one sentence when malformed), and whole
federations on the Simulation Engine."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("flwr")

from gradinv.client.data import load_set, normalize  # noqa: E402
from gradinv.client.flower.bn_leak import derive_batch_statistics  # noqa: E402
from gradinv.client.flower.partitions import client_partitions  # noqa: E402
from gradinv.client.flower.replies import Reply, reply_artifact  # noqa: E402
from gradinv.client.flower.training import train_locally  # noqa: E402
from gradinv.client.models import batchnorm_layers  # noqa: E402
from gradinv.client.step import batch_statistics, local_update, train_mode_copy  # noqa: E402
from gradinv.client.victim import load_victim  # noqa: E402
from gradinv.errors import UserError  # noqa: E402
from gradinv.io import read_json  # noqa: E402
from gradinv.pipeline.folders import SETS, VICTIM  # noqa: E402


@pytest.fixture
def client(tiny_project):
    """The tiny victim as a round's global model, and 4 pool images as one client's data."""
    model, meta = load_victim(tiny_project / VICTIM)
    pool = load_set(tiny_project / SETS, "pool")
    index = torch.tensor([0, 5, 9, 13])
    info = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape, "mean": meta.mean,
            "std": meta.std}
    return model, normalize(pool.images[index], meta.mean, meta.std), pool.labels[index], info


def trained_reply(model, images, labels, epochs: int, lr: float, batch_size: int, node: int = 7) -> Reply:
    trained = copy.deepcopy(model)
    train_locally(trained, images, labels, epochs, lr, batch_size)
    declared = {"local-epochs": epochs, "lr": lr, "batch-size": batch_size, "num-examples": len(labels), "client": 0}
    return Reply(1, node, {k: v.detach().clone() for k, v in trained.state_dict().items()}, declared)


def per_step_statistics(model, images, labels, epochs, lr, batch_size) -> list[dict]:
    """Every local step's batch statistics at every BN layer, as the client's forwards saw them."""
    seen, hooks = [], []
    trained = copy.deepcopy(model)
    for name, bn in batchnorm_layers(trained).items():
        hooks.append(bn.register_forward_hook(lambda m, i, o, name=name: seen.append((name, *batch_statistics(i[0].detach())))))
    train_locally(trained, images, labels, epochs, lr, batch_size)
    layers = len(batchnorm_layers(trained))
    return [{name: (mean, var) for name, mean, var in seen[k:k + layers]} for k in range(0, len(seen), layers)]


def test_partitions_are_disjoint_draws_of_the_given_sizes():
    labels = torch.arange(12).repeat_interleave(4)
    parts = client_partitions(labels, [4, 8, 8], "iid", seed=0)
    assert [len(p) for p in parts] == [4, 8, 8]
    assert len(torch.cat(parts).unique()) == 20
    assert [p.tolist() for p in parts] == [p.tolist() for p in client_partitions(labels, [4, 8, 8], "iid", seed=0)]
    by_class = client_partitions(labels, [4, 8, 8], "by_class", seed=0)
    assert sum(len(labels[p].unique()) for p in by_class) < sum(len(labels[p].unique()) for p in parts)
    with pytest.raises(UserError, match="more than the pool"):
        client_partitions(labels, [40, 40], "iid", seed=0)


def test_one_local_step_buffers_give_the_exact_batch_statistics(client):
    model, images, labels, info = client
    reply = trained_reply(model, images, labels, epochs=1, lr=0.05, batch_size=4)
    derived = derive_batch_statistics(model, model.state_dict(), reply.arrays, 1, info["input_shape"], 4)
    (true,) = per_step_statistics(model, images, labels, 1, 0.05, 4)
    assert derived.exact
    for name, (mean, var) in true.items():
        torch.testing.assert_close(derived.mean[name], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(derived.var[name], var, rtol=1e-4, atol=1e-5)


def test_several_local_steps_give_their_momentum_weighted_average(client):
    model, images, labels, info = client
    reply = trained_reply(model, images, labels, epochs=2, lr=0.05, batch_size=2)
    derived = derive_batch_statistics(model, model.state_dict(), reply.arrays, 4, info["input_shape"], 2)
    steps = per_step_statistics(model, images, labels, 2, 0.05, 2)
    assert len(steps) == 4 and not derived.exact
    weights = torch.tensor([0.1 * 0.9 ** (3 - s) for s in range(4)], dtype=torch.float64)
    weights /= weights.sum()
    for name in steps[0]:
        expected = sum(w * step[name][0].double() for w, step in zip(weights, steps)).float()
        torch.testing.assert_close(derived.mean[name], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(derived.mean[name], steps[-1][name][0], atol=1e-3)  # not just the last step's


def test_a_recorded_update_replays_through_gradinvs_fedavg_client_step(client):
    # float64: at 16 px the tiny victim's BN normalises 4 values per channel, where float32 rounding
    # differences between two correct implementations grow step by step.
    model, images, labels, info = client
    model, images = model.double(), images.double()
    reply = trained_reply(model, images, labels, epochs=3, lr=0.01, batch_size=4)
    artifact, record = reply_artifact(reply, model.state_dict(), model, info)
    fedavg = artifact.meta["defenses"][0]
    assert (fedavg["steps"], fedavg["lr"], fedavg["batch_size"], artifact.batch_size) == (3, 0.01, 4, 4)
    assert record["local_steps"] == 3 and record["buffers_sent"] and record["bn_statistics"].startswith("approximate")
    replayed = local_update(train_mode_copy(model), images, labels, 3, 0.01, 4)
    weights = model.state_dict()
    for name, update in replayed.items():  # the artifact holds float32: new − old rounds to float32's spacing at |w|
        spacing = torch.finfo(torch.float32).eps * weights[name].abs().max().item()
        torch.testing.assert_close(artifact.grads[name], update.float(), rtol=1e-4, atol=2 * spacing)
    assert any(update.abs().max() > 0 for update in replayed.values())


def _broken(reply: Reply, how: str) -> Reply:
    arrays, config = dict(reply.arrays), dict(reply.train_config)
    if how == "missing array":
        del arrays["fc.weight"]
    elif how == "wrong shape":
        arrays["fc.weight"] = arrays["fc.weight"][:, :3]
    elif how == "NaN":
        arrays["conv1.weight"] = arrays["conv1.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    elif how == "undeclared lr":
        del config["lr"]
    elif how == "steps that do not match the buffers":
        config["local-epochs"] = 3
    elif how == "unknown entry":
        arrays["extra.weight"] = torch.zeros(2)
    return Reply(reply.round, reply.node, arrays, config)


@pytest.mark.parametrize("how, said", [("missing array", "lacks the entry 'fc.weight'"),
                                       ("wrong shape", "'fc.weight' has shape"),
                                       ("NaN", "'conv1.weight' contains NaN"),
                                       ("undeclared lr", "does not declare 'lr'"),
                                       ("steps that do not match the buffers", "moved by 1"),
                                       ("unknown entry", "'extra.weight'")])
def test_a_malformed_reply_is_refused_in_one_sentence(client, how, said):
    model, images, labels, info = client
    reply = _broken(trained_reply(model, images, labels, epochs=1, lr=0.05, batch_size=4), how)
    with pytest.raises(UserError, match=said) as refused:
        reply_artifact(reply, model.state_dict(), model, info)
    assert "\n" not in str(refused.value) and "node 7 in round 1" in str(refused.value)


def test_the_recorder_writes_good_replies_and_keeps_a_broken_one_out_of_the_aggregation(client, tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from gradinv.client.artifacts import load_gradient
    from gradinv.client.flower.recorder import RecordingStrategy

    model, images, labels, info = client

    class TwoNodes:  # what FedAvg.configure_train asks of a Grid
        def get_node_ids(self):
            return [11, 12]

    recorder = RecordingStrategy(FedAvg(fraction_evaluate=0.0), tmp_path, info)
    sent = list(recorder.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord({"lr": 0.05}), TwoNodes()))
    good = trained_reply(model, images, labels, 1, 0.05, 4)
    bad = _broken(trained_reply(model, images[:2], labels[:2], 1, 0.05, 2), "NaN")
    replies = []
    for message, reply in zip(sent, (good, bad)):
        content = RecordDict({"arrays": ArrayRecord(reply.arrays), "metrics": MetricRecord({"num-examples": 4}),
                              "train-config": ConfigRecord(reply.train_config)})
        replies.append(Message(content=content, reply_to=message))
    arrays, _ = recorder.aggregate_train(1, replies)

    records = read_json(tmp_path / "replies.json", "records", verify=False)["replies"]
    assert [r["status"] for r in records] == ["recorded", "refused"]
    assert "contains NaN" in records[1]["reason"] and records[1]["node"] == sent[1].metadata.dst_node_id
    aggregated = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in aggregated.values() if v.is_floating_point())
    torch.testing.assert_close(aggregated["fc.weight"], good.arrays["fc.weight"])  # the good reply alone
    recorded_model, _ = load_victim(tmp_path / records[0]["folder"] / "victim")
    artifact = load_gradient(tmp_path / records[0]["folder"] / "gradient", recorded_model)
    assert artifact.meta["federation"]["bn_statistics"] == "exact: one local step"
    torch.testing.assert_close(artifact.grads["fc.weight"], good.arrays["fc.weight"] - model.state_dict()["fc.weight"])


def _simulate(root, out, **settings):
    from gradinv.client.flower.apps import DEFAULTS, run_simulation

    run_simulation({**DEFAULTS, "root": str(root), "out-dir": str(out), "rounds": 2, "client-sizes": "4,8",
                    "batch-size": 4, "lr": 0.05, **settings})


@pytest.mark.slow
def test_a_simulated_federation_trains_the_same_with_the_recorder_and_records_every_reply(tiny_project, tmp_path):
    from gradinv.client.artifacts import load_gradient
    from gradinv.client.flower.apps import FINAL_WEIGHTS
    from gradinv.io import read_tensors

    _simulate(tiny_project, tmp_path / "recorded")
    _simulate(tiny_project, tmp_path / "plain", record=False)
    recorded = read_tensors(tmp_path / "recorded" / FINAL_WEIGHTS, "weights", verify=False)
    plain = read_tensors(tmp_path / "plain" / FINAL_WEIGHTS, "weights", verify=False)
    assert recorded.keys() == plain.keys()
    for name in plain:
        assert torch.equal(recorded[name], plain[name]), name
    initial, _ = load_victim(tiny_project / VICTIM)
    assert not torch.equal(plain["fc.weight"], initial.state_dict()["fc.weight"])

    records = read_json(tmp_path / "recorded" / "replies.json", "records", verify=False)["replies"]
    assert sorted((r["round"], r["client"]) for r in records) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["status"] == "recorded" for r in records)
    pool = load_set(tiny_project / SETS, "pool")
    parts = client_partitions(pool.labels, [4, 8], "iid", 0)
    for record in records:
        folder = tmp_path / "recorded" / record["folder"]
        model, meta = load_victim(folder / "victim")
        artifact = load_gradient(folder / "gradient", model)
        index = parts[record["client"]]
        replayed = local_update(train_mode_copy(model), normalize(pool.images[index], meta.mean, meta.std),
                                pool.labels[index], 1, 0.05, 4)
        for name, update in replayed.items():  # float32 over BN layers of 4 values: whole tensors agree to 1e-4
            error = torch.linalg.vector_norm(artifact.grads[name] - update) / torch.linalg.vector_norm(update)
            assert error < 1e-4, (record, name, float(error))
    assert {r["bn_statistics"].split(":")[0] for r in records} == {"exact", "approximate"}
    shutil.rmtree(tmp_path / "plain")


def _processes_in(folder) -> list[int]:
    """Processes whose working folder lies in `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(Path(os.readlink(proc / "cwd"))).startswith(str(folder)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_deployment_engine_round_on_localhost_records_one_artifact_per_client(tiny_project, tmp_path):
    from gradinv.client.flower.apps import DEFAULTS
    from gradinv.client.flower.deployment import run_on_deployment

    out, work = tmp_path / "replies", tmp_path / "deployment"
    settings = {**DEFAULTS, "root": str(tiny_project), "out-dir": str(out), "rounds": 1, "client-sizes": "2,4",
                "batch-size": 2, "lr": 0.05}
    run_on_deployment(settings, work, timeout=600)

    records = read_json(out / "replies.json", "records", verify=False)["replies"]
    assert sorted(r["client"] for r in records) == [0, 1] and len({r["node"] for r in records}) == 2
    assert all(r["status"] == "recorded" and r["round"] == 1 for r in records)
    for record in records:
        assert (out / record["folder"] / "gradient" / "gradient.safetensors").is_file()
    assert "Starting Fleet API" in (work / "superlink.log").read_text()
    assert _processes_in(work) == []  # the SuperLink and both SuperNodes were stopped


@pytest.mark.slow
def test_the_federation_flow_attacks_the_chosen_rounds_and_reports_them(flows_project, shared_cluster):
    from mlflow.tracking import MlflowClient

    from flows.federation import federation
    from tasks.tracking import tracking_uri
    from tests.conftest import write_params

    section = {"client_sizes": [2, 4], "batch_size": 2, "lr": 0.05, "rounds": 3, "attack_rounds": [1, -1],
               "iterations": 4, "seeds": 1, "label_posterior_steps": 2}
    params = write_params(flows_project / "params.yaml",
                          {"federation": section, "batches": {"address": shared_cluster.scheduler_address}})
    result = federation(str(params), str(flows_project))

    table = pq.read_table(flows_project / "data/federation/federation.parquet").to_pydict()
    assert list(zip(table["round"], table["client"], table["examples"])) == [(1, 0, 2), (1, 1, 4), (3, 0, 2), (3, 1, 4)]
    assert table["local_steps"] == [1, 2, 1, 2] and all(table["buffers_sent"])
    assert table["bn_statistics"][0] == "exact: one local step" and table["bn_statistics"][1].startswith("approximate")
    assert all(0 <= a <= 1 for a in table["label_accuracy"]) and all(p > 0 for p in table["psnr"])
    out = flows_project / "data/federation"
    assert (out / "federation.png").read_bytes()[:4] == b"\x89PNG"
    assert "what the server of a Flower federation could reconstruct" in (out / "federation.html").read_text()
    assert sorted(p.name for p in (out / "truth").iterdir() if p.is_dir()) == ["client-0", "client-1"]
    client = MlflowClient(tracking_uri(flows_project))
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4


def test_the_findings_compare_replies_by_their_gain_over_their_own_noise():
    from gradinv.pipeline.config import build_section
    from gradinv.pipeline.federation import attacked_rounds, findings

    def row(round_, client, examples, psnr, noise, labels):
        return {"round": round_, "client": client, "examples": examples, "local_steps": examples // 4, "psnr": psnr,
                "psnr_initial_noise": noise, "psnr_gain_over_noise": psnr - noise, "ssim": 0.1, "label_accuracy": labels}

    rows = [row(1, 0, 4, 10.0, 10.5, 1.0), row(1, 1, 8, 11.0, 8.0, 0.5), row(3, 0, 4, 12.0, 10.5, 1.0),
            row(3, 1, 8, 9.0, 8.0, 0.5)]
    lines = findings(rows)
    assert lines[0].startswith("Most leaked: client 1 (8 examples, 2 local step(s)) in round 1") and "+3.00 dB" in lines[0]
    assert lines[1] == "Least: client 0 (4 examples) in round 1: -0.50 dB over its starting noise."
    assert lines[2] == "Mean PSNR gain over noise by client size: 4 examples +0.50 dB, 8 examples +2.00 dB."
    assert lines[3] == "By round: round 1 +1.25 dB, round 3 +1.25 dB."
    assert lines[4] == "Labels: 67% of all attacked examples recovered from the replies."
    assert attacked_rounds(build_section("federation", {"rounds": 5, "attack_rounds": [1, -1, 5]})) == [1, 5]
    with pytest.raises(UserError, match="attack_rounds"):
        build_section("federation", {"rounds": 3, "attack_rounds": [4]})
    with pytest.raises(UserError, match="client_sizes"):
        build_section("federation", {"client_sizes": [4, 0]})
