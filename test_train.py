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
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import train_ae
from model import SSDD

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = '{"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}'


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
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    opt = train_ae.RAdamScheduleFree(train_ae.param_groups(ours.named_parameters(), 1e-3), lr=1e-2)
    groups = train_ae.param_groups(ref.named_parameters(), 1e-3)
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
    opt = train_ae.RAdamScheduleFree(net.parameters(), lr=1e-2)
    opt.train()
    for _ in range(8):
        opt.zero_grad()
        net(torch.randn(2, 3, 6, 6)).backward()
        opt.step()
    train_ae.update_ema(ema, net, opt, 0.0)  # before --ema-start: a copy of the averaged weights
    before = [p.clone() for p in ema.parameters()]
    opt.eval()
    for p, e in zip(net.parameters(), ema.parameters()):
        torch.testing.assert_close(e, p)
    opt.train()
    train_ae.update_ema(ema, net, opt, 0.999)
    x = opt.averaged(list(net.parameters()))
    for e, b, xi in zip(ema.parameters(), before, x):
        torch.testing.assert_close(e, 0.999 * b + 0.001 * xi)


# ----------------------------------------------------------------------------------------------------------
# DINOv2 ViT-B/14 == the dinov2 package's model with the same weights


def test_dinov2_matches_package():
    vt = pytest.importorskip("dinov2.models.vision_transformer")
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    # the full ViT-B/14: the official checkpoint's key names and shapes (mask_token is dropped on load)
    ref_keys = {k: v.shape for k, v in vt.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).state_dict().items()}
    ours = {k: v.shape for k, v in train_ae.DINOv2().state_dict().items()}
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
    ours = train_ae.DINOv2(depth=2).eval()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dinov2_test_{os.getpid()}.pth")
    torch.save(ref.state_dict(), path)  # through load_dinov2, as a checkpoint file would be
    try:
        with pytest.raises(RuntimeError):  # the full-depth model refuses a depth-2 checkpoint
            train_ae.load_dinov2(path)
        ours.load_state_dict({k: v for k, v in torch.load(path, weights_only=True).items() if k != "mask_token"})
    finally:
        os.remove(path)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    for grid in (8, 37):  # 8: interpolated position embeddings (64 px SSDD); 37: the pretraining grid
        x = train_ae.dinov2_input(images, grid)
        assert x.shape[-1] == 14 * grid
        with torch.no_grad():
            want = ref.forward_features(x)["x_norm_patchtokens"]
            got = ours(x)
        assert got.shape == (2, grid * grid, 768)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_repa_loss():
    loss = train_ae.REPALoss(width=64)
    assert sorted(loss.state_dict()) == ["repa_mlp.0.bias", "repa_mlp.0.weight", "repa_mlp.2.bias", "repa_mlp.2.weight"]
    hidden, target = torch.randn(2, 16, 64), torch.randn(2, 16, 768)
    pred = loss.repa_mlp(hidden)
    torch.testing.assert_close(loss(hidden, target), 1 - torch.cosine_similarity(pred, target, dim=-1).mean())
    torch.testing.assert_close(loss(hidden, 3 * pred.detach()), torch.tensor(0.0), atol=1e-6, rtol=0)
