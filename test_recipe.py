"""Tests of the training recipe of the authors' update of 2025-11-12 (the official code of arXiv 2510.04961),
each claim checked against a plain re-implementation written here: the defaults and the README's commands,
the train transform without scale augmentation, the first-N subset, per-module gradient clipping, the EMA
warm-up, the REPA head carried across stages, the GAN critic and its losses, MSE and MAE, and the sampler's
time power in evaluate.py and distill.py.

Runs use test_train.py's tiny decoder at 64 px on a frozen random f8c4 encoder, and, where REPA is on, a
one-block DINOv2 with random weights in place of the downloaded ViT-B/14.
"""
import argparse
import copy
import functools
import json
import math
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import distill
import evaluate
import fid
import losses
import metrics
import optim
import runs
import train_ae
import weights
from model import SSDD, load_safetensors
from test_train import PHOTOS, TINY, cli, read_log, state

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(monkeypatch):
    """No rFID, and REPA's DINOv2 is one block with random weights (nothing is downloaded)."""
    def unavailable(weights=None, device="cpu"):
        raise RuntimeError("no FID weights in this test")

    def tiny_dinov2(path=None, device="cpu"):
        return losses.DINOv2(depth=1).to(device).eval().requires_grad_(False)

    monkeypatch.setattr(fid, "load_inception", unavailable)
    monkeypatch.setattr(weights, "download", lambda url, hint, file_name=None: unavailable())
    monkeypatch.setattr(losses, "load_dinov2", tiny_dinov2)


# ----------------------------------------------------------------------------------------------------------
# defaults, and the README's commands are the recipe's


def test_defaults_are_the_updates():
    args = train_ae.parse_args(["--data", "x"])
    assert (args.lr, args.weight_decay, args.aug_scale, args.epochs) == (8e-4, 1e-2, 1.0, 300)
    assert (args.gan, args.gan_weight, args.gan_start, args.ema_start) == (False, 0.5, 50_000, 50_000)
    args = distill.parse_args(["--data", "x", "--teacher", "t"])
    assert (args.teacher_steps, args.teacher_time_power, args.lr, args.epochs) == (12, None, 1e-4, 10)
    assert args.weight_decay == 1e-2 and args.aug_scale == 1
    assert evaluate.parse_args(["--ckpt", "c", "--data", "x"]).time_power is None  # the checkpoint's


def test_readme_commands_are_the_recipe():
    """The README's reproduction commands parse, and their flags are the stages of the update (SSDD's
    section 5-6 recipe): scale augmentation in stages 0 and 1 only, lr 1e-4 except in stage 1, finetuning 100
    epochs from stage 1's last EMA weights, distillation and evaluation from the best ones."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    block = readme[readme.index("## Reproducing the paper"):]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 7)]
    commands = [line.split(" ", 1)[1] for line in block.splitlines() if line.startswith(("torchrun", "python"))]
    parsed = {}
    for command in commands:
        words = command.replace("$IMAGENET", "/imagenet").split()
        script = next(w for w in words if w.endswith(".py"))
        argv = words[words.index(script) + 1:]
        parser = dict(train_ae=train_ae, distill=distill, evaluate=evaluate).get(script[:-3])
        if parser is not None:
            parsed.setdefault(script[:-3], []).append(parser.parse_args(argv))
    stage0, stage1, stage2 = parsed["train_ae"]
    assert stage0.train_encoder and stage0.lr == 1e-4 and stage0.aug_scale == 2 and stage0.im == 128
    assert stage1.encoder_ckpt == "runs/enc/ema.safetensors" and stage1.lr == 8e-4 and stage1.aug_scale == 2
    assert stage1.epochs == 300 and stage1.im == 128 and not stage1.train_encoder
    assert stage2.init == f"{stage1.run_dir}/ema.safetensors" and stage2.lr == 1e-4 and stage2.epochs == 100
    assert stage2.aug_scale == 1 and stage2.im == 256
    (dist,) = parsed["distill"]
    assert dist.teacher == f"{stage2.run_dir}/best.safetensors" and dist.teacher_steps == 12 and dist.lr == 1e-4
    assert dist.epochs == 10 and dist.aug_scale == 1 and dist.im == 256
    (ev,) = parsed["evaluate"]
    assert ev.ckpt == f"{dist.run_dir}/best.safetensors" and ev.limit == 5000 and ev.im == 256
    for run in (stage0, stage1, stage2, dist):
        assert run.weight_decay == 1e-2 and run.batch_size == 256 and not run.gan


# ----------------------------------------------------------------------------------------------------------
# data: the transform without scale augmentation, the first N images


def plain_train_crop(img, size, rng):
    """The official default: the short side resized to size with Lanczos (the long side truncated, as
    torchvision's Resize does), a random crop, a random flip."""
    w, h = img.size
    img = img.resize((int(w * size / min(w, h)), int(h * size / min(w, h))), Image.LANCZOS)
    left, top = rng.randint(0, img.size[0] - size), rng.randint(0, img.size[1] - size)
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def test_train_transform_without_scale_augmentation(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((90, 120, 3), (131, 70, 3), (70, 131, 3), (64, 64, 3)):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        for seed in range(10):
            got = data.train_crop(img, 64, 1.0, random.Random(seed))
            assert np.array_equal(np.asarray(got), np.asarray(plain_train_crop(img, 64, random.Random(seed))))
    # the training set with the scripts' default --aug-scale: every sample a 64 px window of the resized image
    # or of its mirror image, whatever the sampling order
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    default = train_ae.parse_args(["--data", "x"]).aug_scale
    train = data.load_split(str(tmp_path), "train", 64, train=True, aug_scale=default)
    resized = np.asarray(img.resize((85, 64), Image.LANCZOS))
    windows = {}
    for left in range(22):
        for flip in (0, 1):
            w = resized[:, left:left + 64, :][:, ::-1 if flip else 1]
            windows[left, flip] = torch.from_numpy(w.copy()).permute(2, 0, 1).float() / 127.5 - 1
    seen = set()
    for epoch in range(12):
        train.epoch = epoch
        x = train[0]
        seen |= {k for k, w in windows.items() if torch.equal(w, x)}
        assert any(torch.equal(w, x) for w in windows.values())
    assert len(seen) > 4 and {flip for _, flip in seen} == {0, 1}


def test_limit_takes_the_first_images_in_sorted_order(tmp_path):
    """--limit N in every script, and --eval-images N in the periodic validation: the first N images in sorted
    path order (the official ImageNet-5K: the first 5,000 val images, classes 0-99)."""
    for cls in ("n02", "n01", "n10"):  # created out of order
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in (3, 1, 2):
            Image.new("RGB", (64, 64), (i * 40, 0, int(cls[1:]) * 20)).save(tmp_path / "val" / cls / f"{i}.png")
    (tmp_path / "train").mkdir()
    every = sorted(os.path.join(d, f) for d, _, names in os.walk(tmp_path / "val") for f in names)
    for n in (1, 4, 9, 20):
        assert data.load_split(str(tmp_path), "val", 64, limit=n).paths == every[:n]
    assert data.load_split(PHOTOS, "train", 64, limit=5).paths == sorted(data.load_split(PHOTOS, "train", 64).paths)[:5]

    class Record(torch.nn.Module):  # "reconstructs" perfectly, noting which images it saw
        seen = []

        def encode(self, x):
            self.seen.append(x)
            return x

        def decode(self, z, steps=None, noise=None):
            return z

    val = data.load_split(str(tmp_path), "val", 64)
    metrics.reconstruct(Record(), val, 2, torch.device("cpu"), num_images=5, workers=0)
    torch.testing.assert_close(torch.cat(Record.seen), torch.stack([val[i] for i in range(5)]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# optimisation: per-module clipping, EMA warm-up, weight decay groups


def test_ssdd_and_repa_head_are_clipped_separately():
    torch.manual_seed(0)
    loss = losses.TrainingLoss(SSDD("f8c4", json.loads(TINY)), train_encoder=True, repa=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    t, noise, z_noise = losses.step_noise(0, 0, 2, (3, 64, 64), (4, 8, 8), 0, 1, torch.device("cpu"))
    terms, _ = loss(x, t, noise, z_noise, dino_tokens=torch.randn(2, 64, 768))
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in loss.named_parameters() if p.grad is not None}

    def clip(prefix):  # plain: the norm of one module's gradient, and that gradient scaled down to norm 0.1
        g = [grads[n] for n in grads if n.startswith(prefix)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        return [t * min(1.0, 0.1 / (norm.item() + 1e-6)) for t in g], norm

    (ssdd_want, ssdd_norm), (repa_want, repa_norm) = clip("ssdd."), clip("repa_loss.")
    norms = loss.clip_grad_norms()
    assert set(norms) == {"grad_norm", "repa_grad_norm"}
    assert norms["grad_norm"].item() == pytest.approx(ssdd_norm.item(), rel=1e-6)
    assert norms["repa_grad_norm"].item() == pytest.approx(repa_norm.item(), rel=1e-6)
    got_ssdd = [p.grad for n, p in loss.named_parameters() if n.startswith("ssdd.") and p.grad is not None]
    got_repa = [p.grad for n, p in loss.named_parameters() if n.startswith("repa_loss.")]
    for got, want in zip(got_ssdd + got_repa, ssdd_want + repa_want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # one joint norm would have scaled the head's gradient differently: the test tells the two apart
    joint = torch.linalg.vector_norm(torch.stack([ssdd_norm, repa_norm]))
    assert abs(min(1, 0.1 / joint.item()) - min(1, 0.1 / repa_norm.item())) > 1e-3
    assert any(n.startswith("ssdd.encoder.") for n in grads)  # the encoder, when trained, is part of the model


def plain_ema_decay(step, start):
    if step <= start:
        return 0.0
    n = step - start
    return min(0.999, (1 + n) / (10 + n))


def test_ema_warmup_schedule():
    start = 5
    steps = range(1, 30_000, 7)
    assert [optim.ema_decay(s, start) for s in steps] == [plain_ema_decay(s, start) for s in steps]
    assert optim.ema_decay(5, 5) == 0 and optim.ema_decay(6, 5) == 2 / 11 and optim.ema_decay(10**6, 5) == 0.999
    # update_ema with that schedule == a plain running average of the weights x_1, x_2, ...
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = optim.RAdamScheduleFree(net.parameters())  # no step yet: its averaged weights are the parameters
    xs = [torch.randn(2, 3) for _ in range(40)]
    want = None
    for step, x in enumerate(xs, 1):
        with torch.no_grad():
            net.weight.copy_(x)
        optim.update_ema(ema, net, opt, optim.ema_decay(step, start))
        d = plain_ema_decay(step, start)
        want = x if want is None else d * want + (1 - d) * x
    torch.testing.assert_close(ema.weight, want, rtol=1e-6, atol=1e-7)


def test_weight_decay_groups_of_spectral_normalised_weights():
    critic, opt = losses.new_critic(1e-3, 0.05, "cpu")
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in critic.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n in names.values() if n.endswith(".bias"))
    assert sum(n.endswith(".weight.original") for n in map(names.get, map(id, decay["params"]))) == 5


# ----------------------------------------------------------------------------------------------------------
# the REPA head: official init, saved beside the weights, carried across stages


def test_fresh_repa_head_is_kaiming_normal_with_zero_biases():
    torch.manual_seed(0)
    head = losses.REPALoss(width=256).repa_mlp
    for layer in (head[0], head[2]):
        w = layer.weight
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert w.std().item() == pytest.approx(math.sqrt(2 / w.shape[1]), rel=0.03)  # gain sqrt(2), fan in
        assert abs(w.mean().item()) < 0.05 * w.std().item()
        assert w.abs().max() > 3.5 * w.std()  # normal tails (uniform stops at sqrt(3) std)


def test_repa_head_carries_across_stages(tmp_path, encoder_ckpt, offline, monkeypatch, capsys):
    """A run with REPA saves its head beside ema.safetensors; --init and --teacher start from it (a fresh head
    when there is none); the EMA follows the warm-up schedule; both gradient norms are logged."""
    decays = []
    update_ema = optim.update_ema

    def recorded(ema, model, optimizer, decay):
        decays.append(decay)
        update_ema(ema, model, optimizer, decay)

    monkeypatch.setattr(optim, "update_ema", recorded)
    repa = ("--repa-weight", "0.25")
    train_ae.main(cli(tmp_path / "a", encoder_ckpt, 6, PHOTOS, *repa, "--ema-start", "3"))
    assert decays == [plain_ema_decay(s, 3) for s in range(1, 7)]
    log = [r for r in read_log(tmp_path / "a") if "loss" in r]
    assert all(r["grad_norm"] > 0 and r["repa_grad_norm"] > 0 and r["repa"] > 0 for r in log)
    s = state(tmp_path / "a")
    assert s["optimizer"]["param_groups"][0]["weight_decay"] == 1e-2 and s["args"]["lr"] == 8e-4

    # the saved head: the official key names, the optimizer's averaged weights x = (y - (1 - beta1) z) / beta1
    head, _ = load_safetensors(str(tmp_path / "a" / "ema.repa.safetensors"))
    names = [f"repa_loss.repa_mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    assert sorted(head) == sorted(names)
    decay_ids, no_decay_ids = (g["params"] for g in s["optimizer"]["param_groups"])
    ids = dict(zip(names, [decay_ids[-2], no_decay_ids[-2], decay_ids[-1], no_decay_ids[-1]]))
    for name in names:
        y, z = s["repa_loss"][name.removeprefix("repa_loss.")], s["optimizer"]["state"][ids[name]]["z"]
        torch.testing.assert_close(head[name], (y - 0.1 * z) / 0.9, rtol=1e-5, atol=1e-7)
        assert not torch.equal(head[name], y) or name.endswith("bias")  # the head moved: x differs from y
    # --init with a head beside it: the head is loaded (another seed would give another fresh head)
    ckpt = str(tmp_path / "a" / "ema.safetensors")
    capsys.readouterr()
    train_ae.main(cli(tmp_path / "b", encoder_ckpt, 1, PHOTOS, *repa, "--init", ckpt, "--seed", "1"))
    assert f"REPA head from {tmp_path / 'a' / 'ema.repa.safetensors'}" in capsys.readouterr().out
    loaded = state(tmp_path / "b")["repa_loss"]  # one step in RAdam's warm-up leaves it as loaded
    for name in names:
        torch.testing.assert_close(loaded[name.removeprefix("repa_loss.")], head[name], rtol=0, atol=0)
    # distillation's student starts from it too
    distill.main(["--teacher", ckpt, "--teacher-steps", "2", "--data", PHOTOS, "--im", "64", "--batch-size", "2",
                  "--max-steps", "1", "--run-dir", str(tmp_path / "d"), "--lpips-weight", "0", *repa,
                  "--num-workers", "0", "--eval-images", "2"])
    assert f"REPA head from {tmp_path / 'a' / 'ema.repa.safetensors'}" in capsys.readouterr().out
    student_head = state(tmp_path / "d")["repa_loss"]
    for name in names:
        torch.testing.assert_close(student_head[name.removeprefix("repa_loss.")], head[name], rtol=0, atol=0)
    assert os.path.exists(tmp_path / "d" / "ema.repa.safetensors")
    # no head beside the checkpoint: a fresh one
    (tmp_path / "alone").mkdir()
    alone = str(tmp_path / "alone" / "init.safetensors")
    shutil.copy(ckpt, alone)
    train_ae.main(cli(tmp_path / "c", encoder_ckpt, 1, PHOTOS, *repa, "--init", alone))
    assert f"a fresh REPA head (no {tmp_path / 'alone' / 'init.repa.safetensors'})" in capsys.readouterr().out
    fresh = state(tmp_path / "c")["repa_loss"]
    assert not torch.equal(fresh["repa_mlp.0.weight"], head["repa_loss.repa_mlp.0.weight"])
    assert not fresh["repa_mlp.0.bias"].any() and not fresh["repa_mlp.2.bias"].any()
    assert fresh["repa_mlp.2.weight"].std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)


def test_best_weights_get_their_repa_head(tmp_path, monkeypatch):
    """validate() writes best.repa.safetensors beside best.safetensors when the rFID improves."""
    rfids = iter([2.0, 3.0])
    x = torch.zeros(2, 3, 64, 64)
    monkeypatch.setattr(metrics, "reconstruct", lambda *a, **k: (dict(rfid=next(rfids), psnr=20.0, ssim=0.5), (x, x)))
    (tmp_path / "samples").mkdir()
    log = runs.RunLog(str(tmp_path), 0)
    args = argparse.Namespace(eval_images=2, seed=0, num_workers=0, precision="fp32")
    ema = SSDD("f8c4", json.loads(TINY))
    heads = [{"repa_loss.repa_mlp.0.weight": torch.full((2, 2), v)} for v in (1.0, 2.0)]
    best = runs.validate(ema, None, args, 2, torch.device("cpu"), None, str(tmp_path), 1, math.inf, 0, log, 1, heads[0])
    best = runs.validate(ema, None, args, 2, torch.device("cpu"), None, str(tmp_path), 2, best, 0, log, 1, heads[1])
    log.close()
    assert best == 2.0
    saved, _ = load_safetensors(str(tmp_path / "best.repa.safetensors"))
    assert torch.equal(saved["repa_loss.repa_mlp.0.weight"], heads[0]["repa_loss.repa_mlp.0.weight"])  # the best one's
    assert os.path.exists(tmp_path / "best.safetensors")


# ----------------------------------------------------------------------------------------------------------
# the GAN critic and its losses: the official design


def plain_timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    return torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)


def plain_critic(critic, x, x_t, t):
    """The critic's forward in plain ops on its (effective) weights."""
    return plain_critic_on(critic, [conv.weight for conv in critic.convs], x, x_t, t)


def plain_critic_on(critic, conv_weights, x, x_t, t):
    """The same with the given (spectral-normalised) convolution weights."""
    temb = critic.time_mlp[2](F.silu(critic.time_mlp[0](plain_timestep_embedding(t, 128))))
    h = torch.cat([x, x_t], dim=1).clamp(-1, 1)  # x_t too
    for i, (conv, weight) in enumerate(zip(critic.convs, conv_weights)):
        h = F.conv2d(h, weight, conv.bias, stride=2 if i < 4 else 1, padding=1)
        if i > 0:  # GroupNorm, then x * (1 + scale) + shift, shift first
            norm = critic.norms[i - 1]
            shift, scale = F.linear(F.silu(temb), norm.proj.weight, norm.proj.bias)[:, :, None, None].chunk(2, dim=1)
            h = F.group_norm(h, norm.norm.num_groups, norm.norm.weight, norm.norm.bias, eps=1e-5) * (1 + scale) + shift
        h = F.leaky_relu(h, 0.2)
    return torch.sigmoid(F.linear(h.mean((2, 3)), critic.head.weight, critic.head.bias))[:, 0]


def test_critic_architecture():
    torch.manual_seed(0)
    critic = losses.Critic()
    # parameters by hand: 5 convs 4x4 with bias (6-64-128-256-512-512), 4 time-conditioned GroupNorms (affine,
    # Linear(128, 2C) each), the time MLP (two Linear(128, 128)), the head Linear(512, 1)
    widths = [6, 64, 128, 256, 512, 512]
    convs = sum(cin * cout * 16 + cout for cin, cout in zip(widths, widths[1:]))
    norms = sum(2 * c + 128 * 2 * c + 2 * c for c in widths[2:])
    assert sum(p.numel() for p in critic.parameters()) == convs + norms + 2 * (128 * 128 + 128) + 513 == 7_354_049
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in critic.convs] == \
        [(a, b, (4, 4), (2, 2) if i < 4 else (1, 1), (1, 1)) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    for conv in critic.convs:  # N(0, 0.02) weights, spectral-normalised with one power iteration per call
        assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
        assert conv.parametrizations.weight[0].n_power_iterations == 1
        assert conv.parametrizations.weight.original.std().item() == pytest.approx(0.02, rel=0.05)
    assert [(n.norm.num_groups, n.norm.eps, n.norm.affine) for n in critic.norms] == [(32, 1e-5, True)] * 4

    real = torch.rand(4, 3, 64, 64) * 2 - 1
    x_t, t = torch.randn(4, 3, 64, 64), torch.tensor([0.1, 0.4, 0.7, 1.0])
    seen = []
    critic.time_mlp.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        for norm in critic.norms:  # not the init's ones and zeros, to see the scale and shift
            norm.norm.weight.normal_(), norm.norm.bias.normal_()
    p = critic.eval()(real, x_t, t)
    assert p.shape == (4,) and ((0 < p) & (p < 1)).all()  # one probability per image
    torch.testing.assert_close(p, plain_critic(critic, real, x_t, t))
    torch.testing.assert_close(seen[0], plain_timestep_embedding(t, 128))  # of t itself, cos first
    torch.testing.assert_close(critic(real[:2], x_t[:2], t[:2]), p[:2])  # per sample
    assert (critic(real, x_t, t.flip(0)) - p).abs().max() > 0  # t enters
    torch.testing.assert_close(critic(3 * real, x_t, t), critic((3 * real).clamp(-1, 1), x_t, t))  # x clamped,
    torch.testing.assert_close(critic(real, 3 * x_t, t), critic(real, (3 * x_t).clamp(-1, 1), t))  # and x_t
    # spectral normalisation, one power iteration per call in train mode: u <- W v / |W v|, v <- W^T u / |W^T u|,
    # then weight = W / (u . W v), of spectral norm ~1 (slightly above: the power iteration's estimate of the
    # largest singular value comes from below; without the normalisation these norms are 0.4 to 2.3)
    before = [(conv.parametrizations.weight.original.detach().flatten(1), conv.parametrizations.weight[0]._v.clone())
              for conv in critic.convs]
    critic.train()(real, x_t, t)
    critic.eval()
    for conv, (W, v) in zip(critic.convs, before):
        u = F.normalize(W @ v, dim=0)
        v = F.normalize(W.T @ u, dim=0)
        torch.testing.assert_close(conv.parametrizations.weight[0]._u, u)
        torch.testing.assert_close(conv.parametrizations.weight[0]._v, v)
        torch.testing.assert_close(conv.weight.flatten(1), W / (u @ W @ v))
        assert 1 - 1e-5 < torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() < 1.05
    assert set(critic.state_dict()) >= {f"convs.{i}.parametrizations.weight.0._u" for i in range(5)}  # checkpointed


def test_gan_losses_equal_hand_computed_bce():
    torch.manual_seed(0)
    critic = losses.Critic().eval()  # no power iteration: every call sees the same weights
    real, fake = torch.rand(4, 3, 64, 64) * 2 - 1, (torch.rand(4, 3, 64, 64) * 2 - 1).requires_grad_()
    x_t, t = torch.randn(4, 3, 64, 64), torch.rand(4)
    with torch.no_grad():
        p_real, p_fake = critic(real, x_t, t).double(), critic(fake, x_t, t).double()
    gen = losses.generator_gan_loss(critic, fake, x_t, t)
    assert gen.item() == pytest.approx(-p_fake.log().mean().item(), rel=1e-5)
    gen.backward()  # into the fakes, and into the critic's weights too (the official loop)
    assert fake.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in critic.parameters())
    crit = losses.critic_gan_loss(critic, real, fake, x_t, t)
    assert crit.item() == pytest.approx(((-p_real.log().mean() - (1 - p_fake).log().mean()) / 2).item(), rel=1e-5)
    fake.grad = None
    crit.backward()
    assert fake.grad is None  # detached
    # float32 with autocast off: the same numbers inside a bf16 autocast region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.generator_gan_loss(critic, fake, x_t, t).dtype == torch.float32
        torch.testing.assert_close(losses.generator_gan_loss(critic, fake, x_t, t), gen.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(losses.critic_gan_loss(critic, real, fake, x_t, t), crit.detach(), rtol=1e-6, atol=0)


class PlainCritic:
    """The critic's training by hand, as the official loop runs it: at every step from step 0, one call of the
    critic on the fakes for the generator term and one on the real and fake images for its own term (each
    one power iteration of every spectral norm, u <- W v / |W v|, v <- W^T u / |W^T u|, weight W / (u . W v)),
    at weights 0 before the GAN starts; the critic's gradient is the sum of both terms' (the generator's at
    its weight), clipped to norm 0.1, then schedule-free RAdam steps."""

    def __init__(self, critic, lr, weight_decay, gan_weight):
        self.net = copy.deepcopy(critic)
        self.uv = [(conv.parametrizations.weight[0]._u.clone(), conv.parametrizations.weight[0]._v.clone())
                   for conv in critic.convs]
        self.optimizer = optim.RAdamScheduleFree(optim.param_groups(self.net.named_parameters(), weight_decay), lr=lr)
        self.optimizer.train()
        self.gan_weight = gan_weight

    def __call__(self, x, x_t, t):
        weights = []
        for i, conv in enumerate(self.net.convs):
            W = conv.parametrizations.weight.original
            with torch.no_grad():
                u = F.normalize(W.flatten(1) @ self.uv[i][1], dim=0)
                v = F.normalize(W.flatten(1).T @ u, dim=0)
            self.uv[i] = (u, v)
            weights.append(W / (u @ W.flatten(1) @ v))
        return plain_critic_on(self.net, weights, x, x_t, t)

    def step(self, real, fake, x_t, t, on):
        """Returns (the generator term, the critic's term, the gradient norm before clipping)."""
        gen = -self(fake, x_t, t).log().mean()
        p_real, p_fake = self(torch.cat([real, fake]), x_t.repeat(2, 1, 1, 1), t.repeat(2)).chunk(2)
        crit = (-p_real.log().mean() - (1 - p_fake).log().mean()) / 2
        params = list(self.net.parameters())
        grads = torch.autograd.grad(on * (self.gan_weight * gen + crit), params)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        for p, g in zip(params, grads):
            p.grad = g * min(1.0, 0.1 / (norm.item() + 1e-6))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gen.item(), crit.item(), norm.item()


def gan_run(monkeypatch, main, argv, real_images):
    """Runs main(argv) with --gan, a narrower critic (ndf 32) and the validation recorded; returns the initial
    critic, for each step the critic's inputs (real, fake, x_t, t) and the dataset images of that step
    (real_images: the function whose first argument is them, wrapped), and the Euler steps of each
    validation."""
    new_critic, critic_gan_loss, reconstruct = losses.new_critic, losses.critic_gan_loss, metrics.reconstruct
    calls, seen, initial, validations = [], [], [], []
    owner, name = real_images
    original = getattr(owner, name)

    def recorded_images(self, x, *args, **kwargs):
        seen.append(x.clone())
        return original(self, x, *args, **kwargs)

    def recorded_critic(*args, **kwargs):
        critic, optimizer = new_critic(*args, **kwargs)
        initial.append(copy.deepcopy(critic))
        return critic, optimizer

    def recorded_loss(critic, real, fake, x_t, t):
        calls.append((real.clone(), fake.detach().clone(), x_t.clone(), t.clone(), seen[-1]))
        return critic_gan_loss(critic, real, fake, x_t, t)

    def recorded_validation(*args, steps=None, **kwargs):
        validations.append(steps)
        return reconstruct(*args, steps=steps, **kwargs)

    monkeypatch.setattr(losses, "Critic", functools.partial(losses.Critic, ndf=32))
    monkeypatch.setattr(losses, "new_critic", recorded_critic)
    monkeypatch.setattr(losses, "critic_gan_loss", recorded_loss)
    monkeypatch.setattr(metrics, "reconstruct", recorded_validation)
    monkeypatch.setattr(owner, name, recorded_images)
    main(argv)
    return initial[0], calls, validations


GAN_STEPS, GAN_START = 8, 6  # the critic's weights move from step 5 on (RAdam's warm-up): 2 steps before the GAN


def check_critic_run(run_dir, critic, calls, lr):
    """The run's critic (state.pt) and its logged losses are those of the critic trained by hand (PlainCritic)
    on the same inputs, the dataset's images as the real ones."""
    plain = PlainCritic(critic, lr, 1e-2, 0.5)
    log = [r for r in read_log(run_dir) if "loss" in r]
    assert len(calls) == len(log) == GAN_STEPS
    for step, ((real, fake, x_t, t, images), r) in enumerate(zip(calls, log)):
        assert torch.equal(real, images) and (x_t.abs() > 1).any()  # the clamp of x_t matters
        gen, crit, norm = plain.step(images, fake, x_t, t, float(step >= GAN_START))
        assert (r["gan"], r["critic"], r["critic_grad_norm"]) == pytest.approx((gen, crit, norm), rel=1e-6)
        assert (r["critic_grad_norm"] > 0) == (step >= GAN_START)
    saved = state(run_dir)
    want = plain.net.state_dict()
    for i, (u, v) in enumerate(plain.uv):
        want[f"convs.{i}.parametrizations.weight.0._u"], want[f"convs.{i}.parametrizations.weight.0._v"] = u, v
    torch.testing.assert_close(saved["disc"], want, rtol=1e-5, atol=1e-6)  # measured: 3e-7 at most
    optimizer = plain.optimizer.state_dict()
    torch.testing.assert_close(saved["disc_optimizer"]["param_groups"], optimizer["param_groups"])
    for i, want in optimizer["state"].items():  # RAdam's z (~0.1), and its second moments (1e-8 to 1e-7)
        torch.testing.assert_close(saved["disc_optimizer"]["state"][i]["z"], want["z"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["disc_optimizer"]["state"][i]["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-3,
                                   atol=1e-12)
    moved = max((saved["disc"][k] - v).abs().max().item() for k, v in critic.state_dict().items() if "_u" not in k
                and "_v" not in k)
    assert moved > 1e-5  # before the GAN too: weight decay and the schedule-free averaging act on a zero loss


def test_gan_in_training_is_the_official_loops(tmp_path, encoder_ckpt, offline, monkeypatch):
    """train_ae.py --gan, two steps (past RAdam's warm-up) before and two after --gan-start, equals the critic
    trained by hand: its gradient holds the generator term's, it steps from step 0 on a zero loss until the
    GAN starts, its real images are the dataset's and its input clamp covers x_t. The periodic validation uses
    12 Euler steps."""
    argv = cli(tmp_path, encoder_ckpt, GAN_STEPS, PHOTOS, "--batch-size", "2", "--gan", "--gan-start", str(GAN_START))
    del argv[argv.index("--eval-every"):argv.index("--eval-every") + 2]
    critic, calls, validations = gan_run(monkeypatch, train_ae.main, argv, (losses.TrainingLoss, "forward"))
    assert validations == [12]  # the default: every 4 epochs, here only at the end of the run
    assert json.load(open(tmp_path / "args.json"))["eval_every"] == 4 * 6
    check_critic_run(tmp_path, critic, calls, 8e-4)


def test_gan_in_distillation_is_the_official_loops(tmp_path, encoder_ckpt, offline, monkeypatch):
    """distill.py --gan: the same, with the dataset's images (not the teacher's samples) as the critic's real
    ones. Validation every epoch (6 steps of batch 2), in one step."""
    argv = ["--teacher", encoder_ckpt, "--teacher-steps", "2", "--data", PHOTOS, "--im", "64", "--batch-size", "2",
            "--max-steps", str(GAN_STEPS), "--run-dir", str(tmp_path), "--lpips-weight", "0", "--repa-weight", "0",
            "--num-workers", "0", "--eval-images", "2", "--log-every", "1", "--gan", "--gan-start", str(GAN_START)]
    critic, calls, validations = gan_run(monkeypatch, distill.main, argv, (SSDD, "encode"))
    assert validations == [1, 1]  # at the end of the first epoch, and at the end of the run
    check_critic_run(tmp_path, critic, calls, 1e-4)


# ----------------------------------------------------------------------------------------------------------
# evaluation: the sampler's time power


def test_evaluate_time_power(tmp_path, offline, capsys):
    """evaluate.py --time-power samples on that grid (default: the checkpoint's) and reports MSE and MAE, labelled
    with their unit (images in [0, 1]) and MSE also as the official logs show it (x 1000)."""
    torch.manual_seed(0)
    model = SSDD("f8c4", json.loads(TINY))
    model.time_power = 3.0
    ckpt = str(tmp_path / "m.safetensors")
    model.save(ckpt)
    common = ["--ckpt", ckpt, "--data", PHOTOS, "--im", "64", "--limit", "2", "--steps", "3", "--batch-size", "2",
              "--num-workers", "0"]
    results = evaluate.main(common + ["--save-recons", str(tmp_path / "rec")])
    assert results["time_power"] == 3.0 and results["images"] == 2
    out = capsys.readouterr().out
    assert "time power 3" in out and re.search(r"MSE +0\.\d+", out) and re.search(r"MAE +0\.\d+", out)
    assert f"{results['mse']:.6f} (images in [0, 1]; 1000 x MSE, as the official logs show it: " \
           f"{1000 * results['mse']:.3f})" in out
    assert "images in [0, 1]" in results["units"]["mse"] and "1000" in results["units"]["mse"]
    results = evaluate.main(common + ["--time-power", "4", "--save-recons", str(tmp_path / "rec4")])
    assert results["time_power"] == 4.0 and isinstance(results["mse"], float) and isinstance(results["mae"], float)
    val = data.load_split(PHOTOS, "val", 64, limit=2)
    x = torch.stack([val[0], val[1]])
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        z = model.encode(x)
        for power, folder in ((3.0, "rec"), (4.0, "rec4")):
            want = metrics.to_uint8(model.decode(z, steps=3, noise=noise, time_power=power))
            got = torch.stack([data.load_image(str(tmp_path / folder / metrics.recon_name(p, val.root)))
                               for p in val.paths])
            assert (got.int() - want.int()).abs().max() <= 1  # float rounding may move a value by one level
            assert (got.int() - want.int()).abs().float().mean() < 1e-3
