"""Stage `evaluate`: the only stage that reads both the reconstruction and the private truth.

Reconstructions are matched to originals (Hungarian), then scored per image: PSNR, SSIM, LPIPS
(when backbone weights are given), FFT2D, registered PSNR, and image identifiability (IIP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from gradinv.attack.outputs import RECONSTRUCTION_FILE
from gradinv.client.capture import TRUTH_FILE
from gradinv.client.data import load_set, normalize, standardize
from gradinv.client.models import load_weights, penultimate_features
from gradinv.client.victim import load_victim
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.evaluation.context import Tracking, run_context
from gradinv.evaluation.figures import save_comparison
from gradinv.evaluation.metrics import fft2d_distance, iip_hits, label_accuracy, match, psnr, registered_psnr, ssim
from gradinv.evaluation.perceptual import Distance, load_lpips, pairwise
from gradinv.evaluation.report import write_html
from gradinv.io import read_json, read_table, read_tensors, write_json, write_table
from gradinv.pipeline.config import EvaluationConfig, as_dict

LPIPS_MISSING = "not computed: evaluation.lpips_weights is not set"


@dataclass
class Scorer:
    """Everything a reconstruction is measured against."""
    originals: torch.Tensor            # (B, 3, H, W) in [0, 1]
    config: EvaluationConfig
    lpips: Distance | None
    feature_model: torch.nn.Module
    mean: list[float]
    std: list[float]
    gallery_features: torch.Tensor     # (N, D)
    original_in_gallery: torch.Tensor  # (B,) row of each original in the gallery

    def score(self, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
        cost = pairwise(self.lpips, reconstruction, self.originals) if self.config.match_distance == "lpips" else None
        order = match(reconstruction, self.originals, cost)
        matched = reconstruction[order]
        features = penultimate_features(self.feature_model, standardize(matched, self.mean, self.std))
        hits, nearest = iip_hits(features, self.gallery_features, self.original_in_gallery)
        scores = {
            "order": order, "psnr": psnr(matched, self.originals), "ssim": ssim(matched, self.originals),
            "fft2d": fft2d_distance(matched, self.originals),
            "registered_psnr": registered_psnr(matched, self.originals, self.config.registration_max_shift),
            "iip_hit": hits, "iip_nearest": nearest,
        }
        if self.lpips is not None:
            scores["lpips"] = self.lpips(matched, self.originals)
        return scores


def _feature_model(config: EvaluationConfig, victim_dir: Path) -> torch.nn.Module:
    if config.iip_model == "victim":
        return load_victim(victim_dir)[0]
    try:
        model = torchvision.models.get_model(config.iip_model, weights=None)
    except ValueError:
        raise UserError(f"params: 'evaluation.iip_model' {config.iip_model!r} is not a torchvision model name.") from None
    return load_weights(model, config.iip_weights).eval()


def _gallery(config: EvaluationConfig, size: int, pool_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery rows of the pool (all, or a seeded subset that keeps the batch's own originals),
    and the position of each original within it."""
    rows = torch.arange(size)
    if config.gallery_size and config.gallery_size < size:
        others = rows[~torch.isin(rows, pool_index)]
        keep = config.gallery_size - len(pool_index)
        if keep < 0:
            raise UserError(f"params: 'evaluation.gallery_size' {config.gallery_size} is smaller than the batch ({len(pool_index)}).")
        pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(config.seed))[:keep]]
        rows = torch.cat([pool_index, pick]).sort().values
    position = {int(r): i for i, r in enumerate(rows)}
    return rows, torch.tensor([position[int(i)] for i in pool_index])


@commits("out_dir")
def evaluate(config: EvaluationConfig, invert_dir: str | Path, labels_dir: str | Path, truth_dir: str | Path,
             sets_dir: str | Path, victim_dir: str | Path, gradient_dir: str | Path, out_dir: str | Path,
             tracking: Tracking = Tracking()) -> list[Path]:
    """metrics.json, per_image.parquet, grid.png and report.html in out_dir (tracking: where the
    run that evaluates is tracked, for the report)."""
    invert_dir, out_dir = Path(invert_dir), Path(out_dir)
    truth_file = Path(truth_dir) / TRUTH_FILE
    if not truth_file.is_file():  # e.g. after `gradinv import-gradient`: an external gradient has no truth
        raise UserError(f"ground truth {truth_file} does not exist: evaluation needs the client's private batch, "
                        "which only the capture stage writes (an imported gradient has none).")
    truth = read_tensors(truth_file, "ground truth")
    recon = read_tensors(invert_dir / RECONSTRUCTION_FILE, "reconstruction")
    invert_info = read_json(invert_dir / "invert.json", "inversion summary")
    recovered = read_json(Path(labels_dir) / "labels.json", "recovered labels")["labels"]
    originals = truth["images"].float() / 255
    if recon["chosen"].shape != originals.shape:
        raise UserError(f"reconstruction shape {tuple(recon['chosen'].shape)} does not match the ground truth's {tuple(originals.shape)}.")
    lpips = load_lpips(config.lpips_net, config.lpips_weights) if config.lpips_weights else None
    victim_meta = read_json(Path(victim_dir) / "model.json", "victim metadata")
    mean, std = victim_meta["mean"], victim_meta["std"]
    feature_model = _feature_model(config, Path(victim_dir))
    pool = load_set(sets_dir, "pool")
    rows, original_rows = _gallery(config, len(pool.labels), truth["pool_index"])
    scorer = Scorer(originals, config, lpips, feature_model, mean, std,
                    penultimate_features(feature_model, normalize(pool.images[rows], mean, std)), original_rows)

    chosen, consensus = scorer.score(recon["chosen"]), scorer.score(recon["consensus"])
    unregistered = scorer.score(recon.get("consensus_unregistered", recon["seeds"].mean(0)))
    per_seed = [scorer.score(images) for images in recon["seeds"]]
    noise = [psnr(images[match(images, originals)], originals).mean().item() for images in recon["initial"]]
    true_labels = truth["labels"].tolist()
    mean_of = lambda scores, key: scores[key].double().mean().item() if key in scores else None  # noqa: E731
    summary = {
        **{key: mean_of(chosen, key) for key in ("psnr", "ssim", "lpips", "fft2d", "registered_psnr")},
        "iip": mean_of(chosen, "iip_hit"),
        "consensus": {key: mean_of(consensus, key) for key in ("psnr", "ssim", "lpips", "fft2d", "registered_psnr")}
                     | {"iip": mean_of(consensus, "iip_hit")},
        "consensus_unregistered": {key: mean_of(unregistered, key) for key in ("psnr", "ssim")},
        "per_seed": {key: [mean_of(s, key) for s in per_seed] for key in ("psnr", "ssim", "registered_psnr")}
                    | {"iip": [mean_of(s, "iip_hit") for s in per_seed]},
        "psnr_initial_noise": sum(noise) / len(noise),
        "label_accuracy": label_accuracy(recovered, true_labels),
        "lpips_status": "computed" if lpips else LPIPS_MISSING,
        "chosen_seed": invert_info["chosen_seed"], "batch_size": len(true_labels),
        "gallery_size": len(rows), "params": as_dict(config),
    }
    summary["psnr_gain_over_noise"] = summary["psnr"] - summary["psnr_initial_noise"]
    relative = invert_info.get("final_grad_relative")  # absent from inversions before it was recorded
    summary["final_grad_relative"] = relative[invert_info["chosen_seed"]] if relative else None
    per_image = {
        "original_index": list(range(len(true_labels))), "true_label": true_labels,
        "matched_reconstruction": chosen["order"].tolist(),
        "reconstruction_label": [invert_info["labels"][i] for i in chosen["order"].tolist()],
        **{key: chosen[key].tolist() for key in ("psnr", "ssim", "fft2d", "registered_psnr")},
        "lpips": chosen["lpips"].tolist() if "lpips" in chosen else [None] * len(true_labels),
        "iip_hit": chosen["iip_hit"].tolist(), "iip_nearest_gallery_row": chosen["iip_nearest"].tolist(),
        "consensus_psnr": consensus["psnr"].tolist(),
    }
    loss_rows = read_table(invert_dir / "loss.parquet").to_pylist()
    rows_images = {"original": originals, "chosen seed": recon["chosen"][chosen["order"]],
                   "consensus": recon["consensus"][consensus["order"]]}
    rows_psnr = {"chosen seed": chosen["psnr"], "consensus": consensus["psnr"]}
    grid = save_comparison(rows_images, rows_psnr, out_dir / "grid.png")
    context = run_context(Path(victim_dir), Path(gradient_dir), Path(labels_dir), invert_dir, true_labels, tracking)
    return [
        write_table(out_dir / "per_image.parquet", per_image),
        grid,
        write_html(out_dir / "report.html", summary, per_image, rows_images, loss_rows, invert_info["params"], context),
        write_json(out_dir / "metrics.json", summary),
    ]
