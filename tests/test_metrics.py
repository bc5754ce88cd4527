"""Evaluation metrics: PSNR/SSIM against scikit-image, LPIPS against the lpips package, I3D against a PyTorch
pytorch_i3d-architecture reference, the Fréchet distance against scipy, and bad input."""

import jax
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from conftest import VIDEOS
from torch_reference import TorchI3D
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.convert.sources import CheckpointReadError
from m3ddm_jax.metrics import (FeatureStats, clip_indices, frechet_distance, i3d_inputs, load_i3d, load_lpips, psnr,
                               ssim, video_features)
from m3ddm_jax.video.io import read_video

TOL = 1e-5


def assert_close(got, want, what, tol=TOL):
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.0e}"


@pytest.fixture(scope="module")
def frame_pairs():
    """(pred, target) in [0, 1], float64: random frames, and real frames with real and synthetic distortions."""
    rng = np.random.default_rng(0)
    real = read_video(VIDEOS / "stream_of_water.mp4", max_frames=3).frames[:, :160, :200] / 255.0
    noisy = np.clip(real + 0.05 * rng.standard_normal(real.shape), 0, 1)
    dimmed = 0.8 * real + 0.1
    return {"random": (rng.random((3, 48, 64, 3)), rng.random((3, 48, 64, 3))),
            "next frame": (real[1:], real[:-1]), "noise": (noisy, real), "contrast": (dimmed, real)}


def skimage_ssim(pred, target):
    return structural_similarity(target, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1, channel_axis=-1)


@pytest.mark.parametrize("case", ["random", "next frame", "noise", "contrast"])
def test_psnr_ssim_match_skimage(frame_pairs, case):
    pred, target = frame_pairs[case]
    f32 = lambda x: x.astype(np.float32)
    assert_close(ssim(f32(pred), f32(target)), [skimage_ssim(p, t) for p, t in zip(pred, target)], f"SSIM {case}")
    want = [peak_signal_noise_ratio(t, p, data_range=1) for p, t in zip(pred, target)]
    assert_close(psnr(f32(pred), f32(target)), want, f"PSNR {case} (dB)")


def test_masked_psnr_ssim_match_numpy(frame_pairs):
    """Region scores: PSNR's MSE over the mask, SSIM's full map (scikit-image's full=True) averaged over the
    mask inside the valid crop; a per-frame (N, H, W) mask and a shared (H, W) one."""
    pred, target = frame_pairs["noise"]
    n, h, w, _ = pred.shape
    shared = np.zeros((h, w), bool)
    shared[:, : w // 4] = shared[:, -w // 4:] = True  # left/right bands, as a horizontal outpainting mask
    per_frame = np.random.default_rng(1).random((n, h, w)) < 0.3
    for mask in (shared, per_frame):
        m = np.broadcast_to(mask, (n, h, w))
        want_psnr = [10 * np.log10(1 / np.mean(((p - t) ** 2)[mi])) for p, t, mi in zip(pred, target, m)]
        want_ssim = []
        for p, t, mi in zip(pred, target, m):
            _, full = structural_similarity(t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1, channel_axis=-1, full=True)
            want_ssim.append(full.mean(-1)[5:-5, 5:-5][mi[5:-5, 5:-5]].mean())
        got = psnr(pred.astype(np.float32), target.astype(np.float32), mask)
        assert_close(got, want_psnr, "masked PSNR (dB)")
        assert_close(ssim(pred.astype(np.float32), target.astype(np.float32), mask), want_ssim, "masked SSIM")


def test_psnr_ssim_leading_axes_and_jit():
    """(B, F, H, W, 3) videos score per frame; the functions trace once under an outer jit."""
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 2, 3, 24, 24, 3), dtype=np.float32)
    assert psnr(a, b).shape == ssim(a, b).shape == (2, 3)
    both = jax.jit(lambda x, y: (psnr(x, y), ssim(x, y)))(a, b)
    assert_close(both[1], ssim(a.reshape(6, 24, 24, 3), b.reshape(6, 24, 24, 3)).reshape(2, 3), "SSIM (B, F)")


def test_psnr_ssim_bad_input():
    a = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"`pred` has shape \(2, 32, 32, 3\) but `target` has \(2, 32, 40, 3\)"):
        psnr(a, np.zeros((2, 32, 40, 3), np.float32))
    with pytest.raises(ValueError, match="`mask` has shape"):
        ssim(a, a, np.ones((32, 40), bool))
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(a[:, :8], a[:, :8])


# ---------------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_pytorch_reference(lpips_pair):
    ref, lin_path, alex_path = lpips_pair
    model = load_lpips(lin_path, alex_path)
    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = ref(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))).flatten().numpy()
    got = model(a, b)
    assert got.shape == (2,)
    assert_close(got / want, 1.0, "LPIPS (relative)")


def test_lpips_bad_files(lpips_pair, tmp_path):
    _, lin_path, alex_path = lpips_pair
    with pytest.raises(FileNotFoundError, match="LPIPS linear heads .*nope.pth does not exist"):
        load_lpips(str(tmp_path / "nope.pth"), alex_path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)LPIPS AlexNet trunk .*missing keys: .*features\.0\.weight"):
        load_lpips(lin_path, lin_path)  # the head file given as the trunk
    truncated = tmp_path / "alex_truncated.pth"
    data = open(alex_path, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=f"{truncated}: .*truncated or corrupt: check the path"):
        load_lpips(lin_path, str(truncated))
    model = load_lpips(lin_path, alex_path)
    with pytest.raises(ValueError, match=r"`pred` \(1, 32, 32, 3\) and `target` \(1, 32, 48, 3\)"):
        model(np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 32, 48, 3), np.float32))


# ---------------------------------------------------------------------------------------------- FVD / I3D


@pytest.fixture(scope="module")
def i3d_pair(tmp_path_factory):
    """A random-weight PyTorch I3D with BatchNorm statistics calibrated on a clip, its state-dict file, a
    (1, 10, 120, 160, 3) clip in [0, 1] and the reference's input: that clip resized to 224x224 (the ports'
    F.interpolate) in [-1, 1]. 10 frames: the fewest that leave the head its full 2-frame window."""
    torch.manual_seed(0)
    ref = TorchI3D()
    clip = torch.rand(1, 10, 120, 160, 3)
    frames = clip.flatten(0, 1).permute(0, 3, 1, 2)
    frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False) * 2 - 1
    ref_input = frames.reshape(1, 10, 3, 224, 224).transpose(1, 2)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        ref.train()(ref_input)  # momentum 1: running statistics = this clip's, so activations stay O(1) throughout
    ref.eval()
    path = tmp_path_factory.mktemp("i3d") / "i3d.pt"
    torch.save(ref.state_dict(), path)
    return ref, str(path), clip.numpy(), ref_input


def test_i3d_matches_pytorch_reference(i3d_pair):
    """Preprocessing and both feature layers, through one compiled call."""
    ref, path, clip, ref_input = i3d_pair
    model = load_i3d(path)
    with torch.no_grad():
        want_logits, want_pool = (t.numpy() for t in ref(ref_input))
    got = jax.jit(lambda x: model(i3d_inputs(x)))(clip)
    assert got["logits"].shape == (1, 400) and got["pool"].shape == (1, 1024)
    for name, want in (("logits", want_logits), ("pool", want_pool)):
        scale = float(np.max(np.abs(want)))
        assert_close(got[name] / scale, want / scale, f"I3D {name} (relative to the largest)", tol=1e-4)


def test_i3d_bad_input(i3d_pair, tmp_path):
    ref, path, *_ = i3d_pair
    sd = ref.state_dict()
    sd["Mixed_5c.b0.conv3d.weight"] = sd["Mixed_5c.b0.conv3d.weight"][:, :8]
    del sd["logits.conv3d.bias"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)I3D .*missing keys: logits\.conv3d\.bias"
                                                      r".*Mixed_5c\.b0\.conv3d\.weight \(checkpoint"):
        load_i3d(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="I3D .*missing.pt does not exist"):
        load_i3d(str(tmp_path / "missing.pt"))
    model = load_i3d(path)
    with pytest.raises(ValueError, match=r"a 16x64x64 clip shrinks to \(2, 2, 2\) positions"):
        model(np.zeros((1, 16, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"`clips` must be RGB clips \(B, T, H, W, 3\)"):
        video_features(model, np.zeros((16, 64, 64, 3), np.float32))


def scipy_frechet(x, y):
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((32, 32))
    real = rng.standard_normal((300, 32)) @ mix
    fake = 0.3 + rng.standard_normal((250, 32)) @ (mix + 0.2 * rng.standard_normal((32, 32)))
    want = scipy_frechet(real, fake)
    stats = FeatureStats()
    for batch in np.array_split(real, 7):  # streamed batch by batch, as a runner feeds it
        stats.add(batch)
    for got in (frechet_distance(real, fake), frechet_distance(stats, fake)):
        assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    assert abs(frechet_distance(real, real)) < 1e-8 * want
    with pytest.raises(ValueError, match="`real` features have 32 dimensions but `fake` have 16"):
        frechet_distance(real, fake[:, :16])


def test_clip_indices():
    assert clip_indices(16).tolist() == list(range(16))
    idx = clip_indices(61)
    assert idx[0] == 0 and idx[-1] == 60 and len(idx) == 16 and np.all(np.diff(idx) == 4)
    with pytest.raises(ValueError, match="shorter than a 16-frame clip"):
        clip_indices(12)
