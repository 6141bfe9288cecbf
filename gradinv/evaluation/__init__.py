"""Evaluation: matching, metrics (PSNR, SSIM, FFT2D, LPIPS, IIP), the evaluate stage and its report."""
