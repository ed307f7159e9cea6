"""FID and KID from feature vectors, as pure numpy functions, and the reference-statistics file (.npz) they use.

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians fitted to Inception
pool3 features. The matrix square root follows pytorch-fid's numerical rules, so numbers agree with it:
- sqrt(S1 S2) by scipy.linalg.sqrtm; when it is not finite (a singular product, e.g. fewer images than feature
  dimensions), both covariances get eps * I added and the root is taken again;
- rounding can leave a complex root of a PSD product: its real part is taken when every diagonal imaginary part
  is below `imag_atol` (1e-3, as pytorch-fid); a larger one means the inputs are not covariances: an error.

KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over `num_subsets` random subsets of min(n1, n2, max_subset_size) features from each side (100 subsets of
at most 1000, as clean-fid and torchmetrics), reported as mean and standard deviation over the subsets.

Moments (count, sum, sum of outer products) are what ranks exchange: adding them is exact, so statistics merged
over ranks equal those of one process holding every feature (up to float summation order).

Statistics file (written by `eval.py score --save_stats`, read with allow_pickle=False): float64 `mu` [d],
`sigma` [d, d], int `num_images`, and optionally float32 `features` [n, d] (KID needs the features themselves).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

STATS_KEYS = ("mu", "sigma", "num_images")
IMAG_ATOL = 1e-3  # pytorch-fid's bound on the imaginary diagonal of sqrt(S1 S2)
SINGULAR_EPS = 1e-6  # pytorch-fid's offset when the product is singular


@dataclass
class Moments:
    """Running sums of feature vectors: what one rank contributes to the FID statistics."""

    count: int
    total: np.ndarray  # [d] float64
    outer: np.ndarray  # [d, d] float64: sum of x x^T

    @classmethod
    def empty(cls, dim: int) -> "Moments":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"features of shape {f.shape}, expected [n, {self.total.shape[0]}]")
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance (n - 1), as np.cov(rowvar=False) gives."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of [n, d] features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs [n >= 2, d] features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def real_part(root: np.ndarray, imag_atol: float = IMAG_ATOL) -> np.ndarray:
    """The real part of a matrix square root whose imaginary part is rounding noise; an error otherwise."""
    if not np.iscomplexobj(root):
        return root
    worst = float(np.max(np.abs(np.diagonal(root).imag)))
    if worst > imag_atol:
        raise ValueError(f"sqrt(S1 S2) has an imaginary diagonal component {worst:.3g} (> {imag_atol}): the "
                         "statistics are not covariances (negative eigenvalues)")
    return root.real


def sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = SINGULAR_EPS) -> Tuple[np.ndarray, bool]:
    """(sqrt(sigma1 sigma2), whether eps * I had to be added because the product is singular)."""
    from scipy import linalg  # scipy comes with paddlenlp; imported here so that importing this module is free

    with warnings.catch_warnings():  # "Matrix is singular": handled below, as pytorch-fid does
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(sigma1 @ sigma2)
        if np.isfinite(root).all():
            return root, False
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(root).all():
        raise ValueError(f"sqrt(S1 S2) is not finite even with {eps} * I added to both covariances")
    return root, True


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = SINGULAR_EPS, imag_atol: float = IMAG_ATOL) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    root, _ = sqrt_product(sigma1, sigma2, eps)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(real_part(root, imag_atol)))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3: degree 3, gamma 1/d, coef 1 (KID's kernel)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equal-size samples: the off-diagonal means of k(x, x') and k(y, y') minus twice
    the mean of k(x, y)."""
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"KID needs two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diagonal - 2.0 * kxy.mean())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """(mean, std) of mmd2_unbiased over `num_subsets` subsets drawn without replacement from each side."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs [n, d] features of the same d, got {f1.shape} and {f2.shape}")
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(f1.shape[0], m, replace=False)],
                            f2[rng.choice(f2.shape[0], m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def save_stats(path: str, features: np.ndarray, keep_features: bool = True) -> Dict[str, object]:
    """Write the statistics of [n, d] features (and the features, for KID) to a .npz; returns what was written."""
    if not path.endswith(".npz"):
        raise ValueError(f"--save_stats {path}: the statistics file must end in .npz")
    mu, sigma = feature_statistics(features)
    arrays = {"mu": mu, "sigma": sigma, "num_images": np.int64(len(features))}
    if keep_features:
        arrays["features"] = np.asarray(features, np.float32)
    from data_tools.fileio import atomic_writer

    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return arrays


def load_stats(path: str, dim: Optional[int] = None, with_features: bool = True) -> Dict[str, np.ndarray]:
    """A statistics file's arrays, checked: the keys, finite values, shapes agreeing with each other (and with the
    feature size `dim` of the network in use). Never unpickles (allow_pickle=False). with_features=False leaves
    the (large) feature array unread: FID needs mu and sigma only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics: no such file: {path}")
    if not zipfile.is_zipfile(path):  # numpy would take any other file for a pickle
        raise ValueError(f"{path}: not a readable .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if with_features or k != "features"}
    except ValueError as e:  # object arrays need pickle: refused
        raise ValueError(f"{path}: not a statistics file of plain arrays ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    missing = [k for k in STATS_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: no {missing} (has {sorted(arrays)}): write it with eval.py score --save_stats")
    mu, sigma = arrays["mu"], arrays["sigma"]
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a finite [d] and [d, d]")
    if dim is not None and d != dim:
        raise ValueError(f"{path}: statistics of {d}-d features, but the Inception network gives {dim}-d")
    feats = arrays.get("features")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
        raise ValueError(f"{path}: features of shape {feats.shape} do not match mu's {d} dimensions")
    return arrays

