"""The FID / KID math (sd/eval/fid.py) against closed forms, scipy and a direct computation; its numerical care;
the statistics file; the FID Inception-v3's layout (sd/eval/inception.py) and the weight converter
(scripts/convert_inception_weights.py) on a tiny network of the same structure."""
import importlib.util
import os
import sys

import numpy as np
import paddle
import pytest
from scipy import linalg

from helpers import ROOT
from sd.eval import fid
from sd.eval.inception import (FIDInceptionV3, WEIGHTS_FORMAT, expected_shapes, inception_features, load_inception,
                               save_weights)

pytestmark = pytest.mark.unit


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)
    # Same distribution: 0; a pure shift: the squared distance of the means; 1-d: (m1-m2)^2 + (sd1-sd2)^2.
    assert fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s1)) == pytest.approx(((mu1 - mu2) ** 2).sum())
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_distance_matches_scipy_sqrtm_and_the_eigenvalue_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_spd(rng, d), random_spd(rng, d, 2.0)
    scipy_form = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    # tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), a symmetric form with no complex detour.
    r = linalg.sqrtm(s1).real
    eig_form = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(scipy_form, rel=1e-9) and got == pytest.approx(eig_form, rel=1e-7)


def test_near_singular_covariances_and_complex_roots():
    rng = np.random.default_rng(2)
    # Fewer samples (8) than dimensions (12): rank-deficient covariances, a product whose root rounding makes
    # complex with a tiny imaginary part; the real part is taken and the result agrees with the symmetric form.
    x, y = rng.standard_normal((8, 12)), rng.standard_normal((8, 12)) + 0.5
    (m1, s1), (m2, s2) = fid.feature_statistics(x), fid.feature_statistics(y)
    root, offset = fid.sqrt_product(s1, s2)
    assert not offset and np.iscomplexobj(root) and 0 < np.abs(root.imag).max() < 1e-3
    r = linalg.sqrtm(s1).real
    eig = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(eig).sum()
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-4)  # sqrtm of a singular product
    # A product whose root is not finite (scipy returns inf for this singular product): eps * I is added to both,
    # as pytorch-fid does, and the result is finite and close to the exact trace (here tr sqrt = 0).
    nilpotent, ident = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    assert not np.isfinite(linalg.sqrtm(nilpotent @ ident)).all()
    root, offset = fid.sqrt_product(nilpotent, ident)
    assert offset and np.isfinite(root).all()
    assert np.isfinite(fid.frechet_distance(np.zeros(2), nilpotent, np.zeros(2), ident))
    # A large imaginary part means the inputs were not covariances: an error, never a silent real part.
    assert fid.real_part(np.array([[1 + 1e-6j, 0], [0, 2]])).dtype.kind == "f"
    with pytest.raises(ValueError, match="imaginary diagonal component 1 .*not covariances"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 4.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="statistics do not match"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(3)
    d = 5
    x, y = rng.standard_normal((20, d)), rng.standard_normal((20, d)) + 0.3

    def k(a, b):  # degree 3, gamma 1/d, coef 1, one pair at a time
        return (a @ b / d + 1) ** 3

    m = len(x)
    direct = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert fid.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    # Subsets as large as the sets: every subset is a permutation of all, so every estimate equals the direct one.
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, max_subset_size=1000)
    assert mean == pytest.approx(direct, rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # Smaller subsets: the mean of the per-subset estimates over the same draws (seeded).
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=4, max_subset_size=10, seed=7)
    draw = np.random.default_rng(7)
    per = [fid.mmd2_unbiased(x[draw.choice(20, 10, replace=False)], y[draw.choice(20, 10, replace=False)])
           for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(per), np.std(per)))
    # Unbiased: near 0 for one distribution (can be negative), clearly positive for a shifted one.
    same = fid.kernel_inception_distance(rng.standard_normal((400, d)), rng.standard_normal((400, d)), 10, 200)[0]
    moved = fid.kernel_inception_distance(rng.standard_normal((400, d)), rng.standard_normal((400, d)) + 1, 10, 200)[0]
    assert abs(same) < 0.02 < moved


def test_moments_merge_exactly_and_stats_files_are_checked(tmp_path):
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((30, 6))
    parts = [fid.Moments.empty(6) for _ in range(3)]
    for r, part in enumerate(parts):  # three "ranks", strided as sd/eval/distributed.share splits work
        part.add(feats[r::3])
    merged = fid.Moments(sum(p.count for p in parts), sum(p.total for p in parts), sum(p.outer for p in parts))
    mu, sigma = merged.statistics()
    want_mu, want_sigma = fid.feature_statistics(feats)
    assert np.allclose(mu, want_mu) and np.allclose(sigma, want_sigma)

    path = str(tmp_path / "ref.npz")
    fid.save_stats(path, feats)
    loaded = fid.load_stats(path, dim=6)
    assert np.allclose(loaded["mu"], want_mu) and loaded["features"].shape == (30, 6) and loaded["num_images"] == 30
    assert "features" not in fid.load_stats(path, with_features=False)
    with pytest.raises(ValueError, match="statistics of 6-d features, but the Inception network gives 2048-d"):
        fid.load_stats(path, dim=2048)
    np.savez(tmp_path / "objects.npz", mu=np.array([{"x": 1}], dtype=object), sigma=np.eye(1), num_images=1)
    with pytest.raises(ValueError, match="objects.npz: not a statistics file of plain arrays"):
        fid.load_stats(str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "partial.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"partial.npz: no \['sigma', 'num_images'\]"):
        fid.load_stats(str(tmp_path / "partial.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="text.npz: not a readable .npz"):
        fid.load_stats(str(tmp_path / "text.npz"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        fid.load_stats(str(tmp_path / "missing.npz"))


def test_the_fid_inception_has_pytorch_fids_tensor_names_and_shapes():
    """The names and shapes pt_inception-2015-12-05's state dict has (torchvision's names), in paddle layout."""
    shapes = expected_shapes(1)
    assert len(shapes) == 94 * 5 + 2  # 94 conv+bn units (weight, bn weight/bias/mean/var) and the classifier
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3) and shapes["Conv2d_4a_3x3.bn._variance"] == (192,)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_1.conv.weight"] == (448, 2048, 1, 1)
    assert shapes["fc.weight"] == (2048, 1008) and shapes["fc.bias"] == (1008,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_inception_weights",
                                                  os.path.join(ROOT, "scripts", "convert_inception_weights.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_converter_turns_a_torch_state_dict_export_into_the_same_network(tmp_path, capsys):
    """A tiny network of the same structure, exported under torch's names and layout (running_mean, running_var,
    num_batches_tracked, fc.weight [out, in]) as the docstring's .npz export writes it, converted back: same
    features. Weights files that do not fit are refused naming what is wrong."""
    paddle.seed(5)
    net = FIDInceptionV3(16)
    net.eval()
    torch_named = {}
    for k, v in net.state_dict().items():
        v = v.numpy()
        k = k.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        torch_named[k] = v.T if k == "fc.weight" else v
        if k.endswith(".running_var"):
            torch_named[k.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    np.savez(tmp_path / "export.npz", **torch_named)
    convert = _load_converter()
    out = str(tmp_path / "tiny.safetensors")
    assert convert.main(["--source", str(tmp_path / "export.npz"), "--output", out]) == 0
    assert "(channel divisor 16)" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    for mode in ("bilinear", "clean"):
        assert np.allclose(inception_features(load_inception(out), images, mode),
                           inception_features(net, images, mode), atol=1e-5)
    assert inception_features(net, images, "bilinear").shape == (3, 128)

    del torch_named["Mixed_7c.branch_pool.conv.weight"]
    np.savez(tmp_path / "short.npz", **torch_named)
    assert convert.main(["--source", str(tmp_path / "short.npz"), "--output", out]) == 1
    assert "missing ['Mixed_7c.branch_pool.conv.weight']" in capsys.readouterr().err
    (tmp_path / "x.pth").write_bytes(b"\x80\x02not torch")
    if importlib.util.find_spec("torch") is None:
        assert convert.main(["--source", str(tmp_path / "x.pth"), "--output", out]) == 1
        assert "torch is not installed here: export it to .npz" in capsys.readouterr().err
    save_weights(net, str(tmp_path / "other.safetensors"), {"format": "something-else"})
    with pytest.raises(ValueError, match=f"not written by scripts/convert_inception_weights.py .*{WEIGHTS_FORMAT}"):
        load_inception(str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="--inception_weights: no such file"):
        load_inception(str(tmp_path / "none.safetensors"))
