"""Stage `evaluate`: the only stage that reads both the reconstruction and the private truth."""

from __future__ import annotations

from pathlib import Path

import torch

from gradinv.capture import TRUTH_FILE
from gradinv.config import EvaluationConfig
from gradinv.errors import UserError
from gradinv.inversion import RECONSTRUCTION_FILE
from gradinv.io import read_json, read_tensors, write_json, write_table
from gradinv.metrics import label_accuracy, match, psnr, ssim
from gradinv.report import save_grid


def matched_scores(reconstruction: torch.Tensor, originals: torch.Tensor) -> dict[str, torch.Tensor]:
    order = torch.from_numpy(match(reconstruction, originals))
    matched = reconstruction[order]
    return {"order": order, "psnr": psnr(matched, originals), "ssim": ssim(matched, originals)}


def evaluate(config: EvaluationConfig, invert_dir: str | Path, labels_dir: str | Path,
             truth_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """metrics.json (summary), per_image.parquet, grid.png (originals above the chosen seed)."""
    truth = read_tensors(Path(truth_dir) / TRUTH_FILE, "ground truth")
    recon = read_tensors(Path(invert_dir) / RECONSTRUCTION_FILE, "reconstruction")
    invert_info = read_json(Path(invert_dir) / "invert.json", "inversion summary")
    recovered = read_json(Path(labels_dir) / "labels.json", "recovered labels")["labels"]
    originals = truth["images"].float() / 255
    if recon["chosen"].shape != originals.shape:
        raise UserError(f"reconstruction shape {tuple(recon['chosen'].shape)} does not match the ground truth's {tuple(originals.shape)}.")
    true_labels = truth["labels"].tolist()

    chosen = matched_scores(recon["chosen"], originals)
    per_seed = [matched_scores(images, originals) for images in recon["seeds"]]
    noise = [matched_scores(images, originals)["psnr"].mean().item() for images in recon["initial"]]
    summary = {
        "psnr": chosen["psnr"].mean().item(),
        "ssim": chosen["ssim"].mean().item(),
        "psnr_initial_noise": sum(noise) / len(noise),
        "psnr_gain_over_noise": chosen["psnr"].mean().item() - sum(noise) / len(noise),
        "psnr_per_seed": [s["psnr"].mean().item() for s in per_seed],
        "ssim_per_seed": [s["ssim"].mean().item() for s in per_seed],
        "label_accuracy": label_accuracy(recovered, true_labels),
        "chosen_seed": invert_info["chosen_seed"],
        "batch_size": len(true_labels),
        "match_distance": config.match_distance,
    }
    out_dir = Path(out_dir)
    per_image = {
        "original_index": list(range(len(true_labels))),
        "true_label": true_labels,
        "matched_reconstruction": chosen["order"].tolist(),
        "reconstruction_label": [invert_info["labels"][i] for i in chosen["order"].tolist()],
        "psnr": chosen["psnr"].tolist(),
        "ssim": chosen["ssim"].tolist(),
    }
    return [
        write_table(out_dir / "per_image.parquet", per_image),
        save_grid([originals, recon["chosen"][chosen["order"]]], out_dir / "grid.png"),
        write_json(out_dir / "metrics.json", summary),
    ]
