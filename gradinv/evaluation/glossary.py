"""What every reported figure is called, its unit and what it measures, and the one-line verdict
the report opens with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str         # "" where the figure has none
    definition: str

    def heading(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name


METRICS: dict[str, Metric] = {
    "psnr": Metric("PSNR", "dB", "peak signal-to-noise ratio of a reconstruction against the original it was "
                   "matched to; higher is closer"),
    "psnr_initial_noise": Metric("PSNR of the starting noise", "dB", "the same figure for the random images the "
                                 "attack starts from: the level that means nothing was recovered"),
    "psnr_gain_over_noise": Metric("PSNR gain over noise", "dB", "PSNR minus the starting noise's PSNR"),
    "ssim": Metric("SSIM", "0 to 1", "structural similarity of local luminance, contrast and structure; 1 is identical"),
    "lpips": Metric("LPIPS", "0 to 1", "learned perceptual distance; 0 is identical (needs backbone weights)"),
    "fft2d": Metric("FFT distance", "", "mean distance of the images' 2-D Fourier magnitudes; 0 is identical"),
    "registered_psnr": Metric("registered PSNR", "dB", "the best PSNR over small shifts of the reconstruction, "
                              "which forgives a misplaced but otherwise right image"),
    "iip": Metric("IIP", "share of images", "image identifiability: a reconstruction counts when, among the gallery "
                  "of pool images, its nearest neighbour in the model's feature space is its own original"),
    "iip_hit": Metric("recognisable (IIP)", "", "whether this reconstruction's nearest gallery image is its original"),
    "label_accuracy": Metric("label accuracy", "share", "recovered labels that are in the batch, counted as a multiset"),
    "consensus_psnr": Metric("consensus PSNR", "dB", "PSNR of the seeds' registered consensus image"),
    "final_grad_relative": Metric("final gradient distance, relative", "share", "the chosen seed's gradient "
                                  "distance at the end over an all-zero gradient's: below 1, the reconstruction's "
                                  "gradient is closer to the shared one than no gradient at all"),
    "gradient_only_psnr": Metric("PSNR, gradient alone", "dB", "PSNR of the same attack on the same gradient "
                                 "without the leaked BatchNorm statistics (bn_prior none): what the gradient alone "
                                 "gives away"),
    "gradient_only_ssim": Metric("SSIM, gradient alone", "0 to 1", "SSIM of the attack without the leaked BatchNorm "
                                 "statistics"),
    "gradient_only_iip": Metric("IIP, gradient alone", "share of images", "IIP of the attack without the leaked "
                                "BatchNorm statistics"),
    "utility_cosine": Metric("gradient cosine", "-1 to 1", "cosine of the defended gradient with the clean one: "
                             "how much of the training signal the defense keeps"),
    "utility_relative_error": Metric("gradient relative error", "", "norm of the defense's change over the clean "
                                     "gradient's norm"),
}


def heading(key: str) -> str:
    return METRICS[key].heading() if key in METRICS else key.replace("_", " ")


def verdict(label_accuracy: float, iip: float | None, gain_db: float) -> str:
    """What leaked, in words: recognisable images (IIP) first, then a PSNR gain of at least
    COARSE_GAIN_DB over the starting noise, then the labels."""
    labels = ("all its labels" if label_accuracy >= 1 else "most of its labels" if label_accuracy >= 0.5
              else "few of its labels")
    if iip is not None and iip >= 0.5:
        images = "images most of which can be recognised"
    elif iip:
        images = "images some of which can be recognised"
    elif gain_db >= COARSE_GAIN_DB:
        images = "its images' coarse content (none recognisable)"
    else:
        images = "no recognisable image content"
    return f"The shared gradient gives away {labels} and {images}."


COARSE_GAIN_DB = 3.0
