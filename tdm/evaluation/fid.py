"""Fréchet distance between two sets of features (the "F" of FID), in float64."""
from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017, eq. 6; docs/method.md §7)."""
    import scipy.linalg

    covmean, _ = scipy.linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as in pytorch-fid
        off = np.eye(cov1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + off) @ (cov2 + off))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * covmean.real))
