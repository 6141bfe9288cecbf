"""The federation audit's pieces that need no Flower: where it writes, the run config of the
embedded app, the clients' true data (for evaluation only), which recorded replies are attacked,
and the results: a table row per attacked reply, a plot of leakage against round and client, and
what the figures say."""

from __future__ import annotations

from pathlib import Path

from gradinv.client.capture import TRUTH_FILE
from gradinv.client.data import load_set
from gradinv.client.flower.partitions import client_partitions
from gradinv.commit import committed
from gradinv.errors import UserError
from gradinv.io import read_json, write_json, write_tensors
from gradinv.pipeline.config import FederationConfig
from gradinv.pipeline.folders import SETS

FEDERATION = "data/federation"
REPLIES, TRUTHS = f"{FEDERATION}/replies", f"{FEDERATION}/truth"
DEPLOYMENT = f"{FEDERATION}/deployment"  # the Deployment Engine's app folder, Flower home and process logs
LEAKAGE = ("psnr", "ssim", "iip", "label_accuracy")
PLOTTED = ("psnr_gain_over_noise", "ssim", "label_accuracy")
COLUMNS = ("round", "client", "node", "examples", "local_epochs", "local_steps", "buffers_sent", "bn_statistics",
           *LEAKAGE, "psnr_initial_noise", "psnr_gain_over_noise", "consensus_psnr", "folder")


def app_settings(config: FederationConfig, root: str | Path) -> dict:
    """The embedded Flower app's run config (gradinv.client.flower.apps.DEFAULTS' keys)."""
    root = Path(root).resolve()
    return {"root": str(root), "out-dir": str(root / REPLIES), "rounds": config.rounds,
            "client-sizes": ",".join(map(str, config.client_sizes)), "split": config.split, "seed": config.seed,
            "local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size,
            "send-buffers": config.send_buffers, "record-rounds": ",".join(map(str, attacked_rounds(config)))}


def attacked_rounds(config: FederationConfig) -> list[int]:
    return sorted({r if r > 0 else config.rounds + 1 + r for r in config.attack_rounds})


def write_truths(config: FederationConfig, root: str | Path) -> list[Path]:
    """Each client's examples, in the order it trains on them: what evaluation scores against.
    The recorder never reads these."""
    root = Path(root)
    pool = load_set(root / SETS, "pool")
    parts = client_partitions(pool.labels, config.client_sizes, config.split, config.seed)
    folders = [root / TRUTHS / f"client-{k}" for k in range(len(parts))]
    with committed(*folders) as stagings:
        for staging, index in zip(stagings, parts):
            write_tensors(staging / TRUTH_FILE, {"images": pool.images[index], "labels": pool.labels[index],
                                                 "pool_index": index})
            write_json(staging / "truth.json", {"labels": pool.labels[index].tolist(), "pool_index": index.tolist()})
    return folders


def attacked_replies(config: FederationConfig, root: str | Path) -> list[dict]:
    """The recorded replies of the attacked rounds, by round and client."""
    records = read_json(Path(root) / REPLIES / "replies.json", "the recorder's replies")["replies"]
    rounds = set(attacked_rounds(config))
    refused = [r for r in records if r["status"] != "recorded"]
    if refused:
        raise UserError(f"the recorder refused {len(refused)} repl{'y' if len(refused) == 1 else 'ies'} of the "
                        f"embedded federation: {refused[0]['reason']}")
    chosen = [{**r, "folder": str(Path(root) / REPLIES / r["folder"])} for r in records if r["round"] in rounds]
    return sorted(chosen, key=lambda r: (r["round"], r["client"]))


def reply_row(record: dict, metrics_row: dict, config: FederationConfig) -> dict:
    return {"round": record["round"], "client": record["client"], "node": str(record["node"]),
            "examples": config.client_sizes[record["client"]], "local_epochs": config.local_epochs,
            "local_steps": record["local_steps"], "buffers_sent": record["buffers_sent"],
            "bn_statistics": record["bn_statistics"] or "not sent",
            **{k: metrics_row.get(k) for k in (*LEAKAGE, "psnr_initial_noise", "psnr_gain_over_noise", "consensus_psnr")},
            "folder": record["folder"]}


def table(rows: list[dict]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in COLUMNS}


def _mean_gain(rows: list[dict], key: str) -> dict:
    groups = sorted({r[key] for r in rows})
    return {g: sum(r["psnr_gain_over_noise"] for r in rows if r[key] == g) / sum(r[key] == g for r in rows)
            for g in groups}


def findings(rows: list[dict]) -> list[str]:
    """What the figures show, in sentences with their numbers. Replies are compared by PSNR gain
    over their own starting noise: clients' images differ, and so does what noise scores on them."""
    best = max(rows, key=lambda r: r["psnr_gain_over_noise"])
    worst = min(rows, key=lambda r: r["psnr_gain_over_noise"])
    lines = [f"Most leaked: client {best['client']} ({best['examples']} examples, {best['local_steps']} local "
             f"step(s)) in round {best['round']}: PSNR {best['psnr']:.2f} dB, {best['psnr_gain_over_noise']:+.2f} dB "
             f"over its starting noise, SSIM {best['ssim']:.3f}, labels {best['label_accuracy']:.0%}.",
             f"Least: client {worst['client']} ({worst['examples']} examples) in round {worst['round']}: "
             f"{worst['psnr_gain_over_noise']:+.2f} dB over its starting noise."]
    by_size, by_round = _mean_gain(rows, "examples"), _mean_gain(rows, "round")
    if len(by_size) > 1:
        lines.append("Mean PSNR gain over noise by client size: "
                     + ", ".join(f"{s} examples {v:+.2f} dB" for s, v in by_size.items()) + ".")
    if len(by_round) > 1:
        lines.append("By round: " + ", ".join(f"round {k} {v:+.2f} dB" for k, v in by_round.items()) + ".")
    labels = sum(r["label_accuracy"] * r["examples"] for r in rows) / sum(r["examples"] for r in rows)
    lines.append(f"Labels: {labels:.0%} of all attacked examples recovered from the replies.")
    return lines


def save_plot(rows: list[dict], path: str | Path) -> Path:
    """PSNR gain over the starting noise, SSIM and label accuracy against round, a line per client
    (its size in the legend)."""
    from gradinv.evaluation.figures import pyplot, save_figure
    from gradinv.evaluation.glossary import heading

    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(12.5, 3.4))
    figure.subplots_adjust(wspace=0.35)
    for client in sorted({r["client"] for r in rows}):
        mine = sorted((r for r in rows if r["client"] == client), key=lambda r: r["round"])
        label = f"client {client} ({mine[0]['examples']} ex.)"
        for axis, key in zip(axes, PLOTTED):
            axis.plot([r["round"] for r in mine], [r[key] for r in mine], marker="o", label=label)
    axes[0].axhline(0.0, linestyle=":", color="grey", label="starting noise")
    for axis, key in zip(axes, PLOTTED):
        axis.set_xlabel("round")
        axis.set_ylabel(heading(key))
        axis.set_xticks(sorted({r["round"] for r in rows}))
    axes[0].legend(fontsize=7)
    figure.suptitle("What each Flower client's reply gave away")
    return save_figure(figure, path)


def check_truth_matches(record: dict, root: str | Path) -> Path:
    truth = Path(root) / TRUTHS / f"client-{record['client']}"
    if not (truth / TRUTH_FILE).is_file():
        raise UserError(f"no true data for client {record['client']} under {truth}; the federation flow writes it.")
    labels = read_json(truth / "truth.json", "client truth")["labels"]
    if len(labels) != read_json(Path(record["folder"]) / "gradient" / "gradient.json", "gradient metadata")["batch_size"]:
        raise UserError(f"the true data of client {record['client']} does not match its recorded reply's size.")
    return truth
