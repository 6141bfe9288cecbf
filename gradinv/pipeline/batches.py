"""Many batches: the paper's figures are averages over random client batches (256 in Yin et al.).

One batch's attack (capture → labels → invert with all its seeds → evaluate) runs in a folder of
its own; batch i is drawn with `capture.seed + i`. `aggregate` turns the batches' metrics into
mean ± std, and IIP and label accuracy over every image of every batch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from gradinv.attack import inversion, labels
from gradinv.client import capture, victim
from gradinv.client.artifacts import load_gradient
from gradinv.client.data import normalize
from gradinv.client.defenses import as_gradient
from gradinv.evaluation import evaluate
from gradinv.io import read_json, read_tensors, write_json, write_table
from gradinv.pipeline.audit import utility

SETS, VICTIM = "data/sets", "data/victim"
BATCHES, SWEEP = "data/batches", "data/sweep"
# Per-batch figures that are averaged; the consensus ones are read from metrics.json["consensus"].
METRICS = ("psnr", "ssim", "lpips", "fft2d", "registered_psnr", "iip", "label_accuracy",
           "psnr_initial_noise", "psnr_gain_over_noise")
CONSENSUS_METRICS = ("psnr", "ssim", "iip")
# The same attack without the leaked BN statistics, on the same gradient: what the gradient alone gives away.
GRADIENT_ONLY = "gradient_only"
GRADIENT_ONLY_METRICS = ("psnr", "ssim", "iip", "label_accuracy", "psnr_gain_over_noise")
# Fractions over images: their overall value weighs each batch by its size.
PER_IMAGE_FRACTIONS = ("iip", "label_accuracy", "consensus_iip")


def batch_folder(root: Path, out: str, index: int) -> Path:
    return Path(root) / out / f"batch-{index:03d}"


def run_batch(configs: dict, root: str | Path, out: str, index: int, on_log=None) -> dict:
    """Attack batch `index` end to end under root/out/batch-NNN; returns its row of metrics.
    `configs` maps the sections capture, labels, inversion, engine and evaluation to config objects."""
    root = Path(root)
    folder = batch_folder(root, out, index)
    gradient, truth, recovered = folder / "gradient", folder / "truth", folder / "labels"
    capture_config = dataclasses.replace(configs["capture"], seed=configs["capture"].seed + index)
    capture.capture(capture_config, root / SETS, root / VICTIM, gradient, truth)
    labels.run_labels(configs["labels"], root / VICTIM, gradient, recovered)
    inversion.run_inversion(configs["inversion"], root / VICTIM, gradient, recovered, folder / "invert", on_log,
                            checkpoint_dir=folder / ".checkpoints", engine=configs["engine"])
    flow = Path(out).parts[1]  # data/<flow>/...: the flow that writes these batches
    tracking = evaluate.Tracking(command=f"python -m flows.{flow}")
    evaluate.evaluate(configs["evaluation"], folder / "invert", recovered, truth, root / SETS, root / VICTIM,
                      gradient, folder / "eval", tracking)
    row = {**batch_row(folder, index, capture_config.seed), **shared_utility(root, folder)}
    if attacks_without_bn_too(configs, capture_config):
        alone = folder / "gradient-only"
        alone_labels = recovered
        if configs["labels"].strategy == "counts":  # its posterior came from the BN statistics: from noise now
            alone_labels = alone / "labels"
            labels.run_labels(dataclasses.replace(configs["labels"], posterior_steps=0), root / VICTIM, gradient,
                              alone_labels)
        inversion.run_inversion(dataclasses.replace(configs["inversion"], bn_prior="none"), root / VICTIM, gradient,
                                alone_labels, alone / "invert", on_log, checkpoint_dir=folder / ".checkpoints",
                                engine=configs["engine"])
        evaluate.evaluate(configs["evaluation"], alone / "invert", alone_labels, truth, root / SETS, root / VICTIM,
                          gradient, alone / "eval", tracking)
        row |= gradient_only_row(alone)
    elif configs["evaluation"].gradient_only and capture_config.bn_leak == "none":  # the attack had the gradient alone
        row |= gradient_only_row(folder)
    return row


def attacks_without_bn_too(configs: dict, capture_config) -> bool:
    """Where the batch's BN statistics leaked and the attack used them, it runs a second time
    without them (evaluation.gradient_only), so that the two leaks are reported apart; where none
    leaked, the attack's own figures are the gradient's alone."""
    return (configs["evaluation"].gradient_only and capture_config.bn_leak == "exact"
            and configs["inversion"].bn_prior != "none")


def gradient_only_row(folder: Path) -> dict:
    metrics = read_json(folder / "eval" / "metrics.json", "batch metrics")
    return {**{f"{GRADIENT_ONLY}_{key}": metrics.get(key) for key in GRADIENT_ONLY_METRICS},
            f"{GRADIENT_ONLY}_consensus_psnr": metrics["consensus"].get("psnr")}


def run_recorded(configs: dict, root: str | Path, folder: str | Path, truth: str | Path, command: str) -> dict:
    """Attack a reply recorded by the Flower recorder (folder/victim: the round's global model,
    folder/gradient: the client's update) and score it against the client's data in `truth`:
    labels, inversion and evaluation write beside it. Returns its row of metrics."""
    root, folder = Path(root), Path(folder)
    victim_dir, gradient, recovered = folder / "victim", folder / "gradient", folder / "labels"
    labels.run_labels(configs["labels"], victim_dir, gradient, recovered)
    inversion.run_inversion(configs["inversion"], victim_dir, gradient, recovered, folder / "invert",
                            checkpoint_dir=folder / ".checkpoints", engine=configs["engine"])
    evaluate.evaluate(configs["evaluation"], folder / "invert", recovered, Path(truth), root / SETS, victim_dir,
                      gradient, folder / "eval", evaluate.Tracking(command=command))
    return batch_row(folder, 0, configs["capture"].seed)


def shared_utility(root: Path, folder: Path) -> dict[str, float]:
    """How close the shared (possibly defended) gradient is to the victim batch's clean one."""
    model, meta = victim.load_victim(root / VICTIM)
    shared = load_gradient(folder / "gradient", model)
    truth = read_tensors(folder / "truth" / capture.TRUTH_FILE, "ground truth")
    clean = capture.client_update(model, normalize(truth["images"], meta.mean, meta.std), truth["labels"], "none",
                                  dataclasses.asdict(meta))
    defenses = shared.meta.get("defenses", [])
    return utility({n: as_gradient(g, defenses, shared.batch_size) for n, g in shared.grads.items()}, clean.grads)


def batch_row(folder: Path, index: int, capture_seed: int) -> dict:
    metrics = read_json(folder / "eval" / "metrics.json", "batch metrics")
    invert_info = read_json(folder / "invert" / "invert.json", "inversion summary")
    return {"batch": index, "capture_seed": capture_seed, "batch_size": metrics["batch_size"],
            **{key: metrics.get(key) for key in METRICS},
            **{f"consensus_{key}": metrics["consensus"].get(key) for key in CONSENSUS_METRICS},
            "invert_seconds": invert_info["seconds"], "folder": str(folder)}


def aggregate(rows: list[dict]) -> dict:
    """{metric: {"mean", "std", "n"}} over batches (sample std; 0 for one batch), plus
    `overall_<fraction>`: IIP and label accuracy over all images of all batches."""
    summary: dict = {"batches": len(rows), "images": sum(r["batch_size"] for r in rows)}
    gradient_only = [f"{GRADIENT_ONLY}_{k}" for k in (*GRADIENT_ONLY_METRICS, "consensus_psnr")]
    for key in (*METRICS, *(f"consensus_{k}" for k in CONSENSUS_METRICS), *gradient_only, "invert_seconds"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        if not values:
            summary[key] = None
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        summary[key] = {"mean": mean, "std": std, "n": len(values)}
    for key in PER_IMAGE_FRACTIONS:
        hits = sum(r[key] * r["batch_size"] for r in rows if r.get(key) is not None)
        summary[f"overall_{key}"] = hits / summary["images"] if summary["images"] else None
    return summary


def write_batches(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """per_batch.parquet and summary.json in out_dir."""
    rows = sorted(rows, key=lambda r: (r["batch_size"], r["batch"]))
    columns = {key: [r.get(key) for r in rows] for key in rows[0]}
    return [write_table(Path(out_dir) / "per_batch.parquet", columns),
            write_json(Path(out_dir) / "summary.json", aggregate(rows))]


def sweep_table(rows: list[dict]) -> dict[str, list]:
    """One row per batch size: the mean and std of each figure over that size's batches."""
    table: dict[str, list] = {"batch_size": [], "batches": []}
    for size in sorted({r["batch_size"] for r in rows}):
        summary = aggregate([r for r in rows if r["batch_size"] == size])
        table["batch_size"].append(size)
        table["batches"].append(summary["batches"])
        for key in ("psnr", "ssim", "iip", "label_accuracy", "consensus_psnr", f"{GRADIENT_ONLY}_psnr"):
            stats = summary[key] or {}
            table.setdefault(f"{key}_mean", []).append(stats.get("mean"))
            table.setdefault(f"{key}_std", []).append(stats.get("std"))
        table.setdefault("overall_iip", []).append(summary["overall_iip"])
    return table
