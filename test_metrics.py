"""metrics.py against the reference packages: scikit-image (PSNR, SSIM) and lpips (LPIPS v0.1, with the heads
its wheel ships), numpy for MSE and MAE; the evaluation loop on stand-in models. Offline: no weights are
downloaded."""
import math
import os

import lpips
import numpy as np
import pytest
import skimage.metrics
import torch

import data
import metrics
import model
import weights
from test_fid import assert_rel_close, photos

LPIPS_HEADS = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "{}.pth")
PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos")


def test_to_uint8():
    x = torch.tensor([-2, -1, -0.999, 0, 0.5, 1, 1.5])
    assert metrics.to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(metrics.to_uint8(u.float() / 127.5 - 1), u)
    assert torch.equal(metrics.to_uint8((u.float() / 127.5 - 1).bfloat16()), u)


def distorted(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + torch.randn(x.shape, generator=g) * 12).round().clamp(0, 255).to(torch.uint8)


def test_psnr_and_ssim_equal_skimage():
    a = photos(4)
    b = distorted(a)
    b[3] = a[3]  # one perfect reconstruction
    to_np = lambda x: x.permute(0, 2, 3, 1).numpy() / 255
    expected_psnr = skimage.metrics.peak_signal_noise_ratio(to_np(a), to_np(b), data_range=1)
    assert metrics.psnr(metrics.squared_error(a, b) / a.numel()) == pytest.approx(expected_psnr, rel=1e-12)
    assert metrics.psnr(metrics.squared_error(a, a) / a.numel()) == float("inf")
    expected_ssim = [skimage.metrics.structural_similarity(p, q, data_range=1, channel_axis=2)
                     for p, q in zip(to_np(a), to_np(b))]
    ours = metrics.ssim(a.double() / 255, b.double() / 255)
    assert ours.shape == (4,) and ours[3] == pytest.approx(1)
    np.testing.assert_allclose(ours.numpy(), expected_ssim, rtol=1e-10)
    np.testing.assert_allclose(metrics.ssim(a / 255, b / 255).numpy(), expected_ssim, rtol=1e-6)  # float32 images


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_lpips_package(net, tmp_path):
    torch.manual_seed(0)
    ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # random backbone, real v0.1 heads from the wheel
    # the same backbone weights under torchvision's names (lpips keeps torchvision's layer indices)
    torch.save({"features." + k.split(".", 1)[1]: v for k, v in ref.net.state_dict().items()},
               tmp_path / "backbone.pth")
    ours = metrics.LPIPS(net, heads=LPIPS_HEADS.format(net), backbone=str(tmp_path / "backbone.pth"))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())

    x = (photos(3).float() / 127.5 - 1).requires_grad_()
    y = distorted(photos(3), seed=1).float() / 127.5 - 1
    d = ours(x, y)
    expected = ref(x, y).flatten()
    assert d.shape == (3,) and (expected > 1e-3).all()
    assert_rel_close(d, expected, 1e-5)
    (grad,) = torch.autograd.grad(d.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert_rel_close(grad, expected_grad, 1e-4)


# -----------------------------------------------------------------------------
# LPIPS weights, offline


def test_offline_error_says_where_to_put_the_weights(fake_internet):
    with pytest.raises(RuntimeError, match=r"alexnet-owt-.*\.pth.*--lpips-backbone"):
        metrics.LPIPS("alex", heads=LPIPS_HEADS.format("alex"))


def test_downloads_are_hash_checked(fake_internet, tmp_path):
    torch.manual_seed(0)
    backbone = tmp_path / "alex_backbone.pth"
    torch.save({f"features.{k}": v for k, v in metrics.alexnet_features().state_dict().items()}, backbone)
    for net in ("alex", "vgg"):
        with open(LPIPS_HEADS.format(net), "rb") as f:  # the heads published in the lpips wheel pass the check
            fake_internet[metrics.LPIPS_HEADS_URL.format(net)] = f.read()
    m = metrics.LPIPS("alex", backbone=str(backbone))
    heads = torch.load(LPIPS_HEADS.format("alex"), map_location="cpu")
    assert torch.equal(m.heads[0], heads["lin0.model.1.weight"].flatten())
    assert weights.download(metrics.LPIPS_HEADS_URL.format("vgg"), "",
                            f"lpips_v0.1_vgg-{metrics.LPIPS_HEADS_SHA256['vgg'][:10]}.pth")
    fake_internet[metrics.LPIPS_HEADS_URL.format("alex")] = b"corrupted"
    os.remove(model.cache_path(metrics.LPIPS_HEADS_URL.format("alex"), "lpips_v0.1_alex-df73285e35.pth"))
    with pytest.raises(RuntimeError, match="sha256 .*, expected df73285e35"):
        metrics.LPIPS("alex", backbone=str(backbone))
    assert os.listdir(tmp_path / "hub" / "checkpoints") == [
        os.path.basename(model.cache_path(metrics.LPIPS_HEADS_URL.format("vgg"), "lpips_v0.1_vgg-a78928a0af.pth"))]


# -----------------------------------------------------------------------------
# the evaluation loop


def test_reconstruct_psnr_ssim():
    """PSNR from the aggregate MSE, SSIM per image, rFID ~0 for a perfect reconstruction."""
    class Shift(torch.nn.Module):  # "reconstructs" image i as image i + delta
        def __init__(self, delta):
            super().__init__()
            self.delta = delta

        def encode(self, x):
            return x

        def decode(self, z, steps=None, noise=None):
            return z + self.delta

    val = data.load_split(PHOTOS, "val", 64)
    cpu = torch.device("cpu")
    scores, (orig, rec) = metrics.reconstruct(Shift(0.21), val, 4, cpu, num_images=5, workers=0)
    x = torch.stack([val[i] for i in range(5)]).double()
    a = (255 * (x + 1) / 2).round().clamp(0, 255) / 255  # 0.21 * 127.5 is no half-integer: no rounding ties
    b = (255 * (x + 1.21) / 2).round().clamp(0, 255) / 255
    assert scores["psnr"] == pytest.approx(-10 * math.log10((a - b).square().mean().item()), rel=1e-9)
    assert 0 < scores["ssim"] < 1 and scores["rfid"] is None
    assert orig.shape == (4, 3, 64, 64) and torch.equal(rec, (orig + 0.21).clamp(-1, 1))
    scores, _ = metrics.reconstruct(Shift(0.0), val, 4, cpu, workers=0)
    assert scores["psnr"] == math.inf and scores["ssim"] == pytest.approx(1.0)


def test_reconstruct_mse_and_mae_equal_numpy():
    class Shift(torch.nn.Module):
        def encode(self, x):
            return x

        def decode(self, z, steps=None, noise=None):
            return z + 0.3 * torch.sin(7 * z)

    val = data.load_split(PHOTOS, "val", 64)
    scores, _ = metrics.reconstruct(Shift(), val, 4, torch.device("cpu"), num_images=5, workers=0)
    x = torch.stack([val[i] for i in range(5)]).double().numpy()
    a = np.clip(np.round(255 * (x + 1) / 2), 0, 255) / 255  # uint8-quantised, then in [0, 1]
    b = np.clip(np.round(255 * (x + 0.3 * np.sin(7 * x) + 1) / 2), 0, 255) / 255
    assert scores["mse"] == pytest.approx(np.mean((a - b) ** 2), rel=1e-9)
    assert scores["mae"] == pytest.approx(np.mean(np.abs(a - b)), rel=1e-9)
    assert scores["psnr"] == pytest.approx(-10 * math.log10(scores["mse"]), rel=1e-12)
