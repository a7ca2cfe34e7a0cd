"""Train an SSDD autoencoder: the official recipe (arXiv 2510.04961, SPEC sections 4-5) on raw DDP.

    python train_ae.py --data synthetic --size S --im 64 --batch-size 8 --train-encoder --max-steps 200 \
        --lpips-weight 0 --repa-weight 0    # no downloads: runs anywhere
    torchrun --nproc_per_node 8 train_ae.py --data /imagenet --size M --im 256 --init runs/m128/ema.safetensors

Stages of the recipe: 0) encoder + M decoder jointly (--train-encoder, --lr 1e-4); 1) each decoder size at
128 px on the frozen shared encoder (--encoder-ckpt), --aug-scale 2, 300 epochs; 2) finetune at 128/256/512
(--init, --lr 1e-4, 200 epochs). The loss is
    L = MSE(v_hat, x - e) + 0.5 LPIPS_vgg(x0_hat, x) + 0.25 REPA + 1e-6 KL (KL only when the encoder trains),
optimised by schedule-free RAdam with an EMA of its averaged weights; --gan adds the paper's PatchGAN
ablation. A run directory holds state.pt (the full training state; rerunning with the same --run-dir
resumes exactly), ema.safetensors (EMA weights in the official layout, for SSDD.from_checkpoint),
best.safetensors (lowest validation rFID), log.jsonl and PNG grids of reconstructions. The helpers here
(data, DDP, REPA, optimizer, checkpoints, eval) are imported by the other scripts of the repo.
"""
import argparse
import copy
import datetime
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.utils
from PIL import Image, ImageDraw, ImageFilter
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import fid
from model import SSDD

# ----------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train_ae.py` is one process.


def setup_distributed():
    """Returns (rank, world_size, device). NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def replica_fingerprints(module):
    """(sum, sum of squares) of all parameters on every rank, shape (world_size, 2): rows are equal while
    the replicas hold the same weights."""
    params = [p.double() for p in module.parameters()]
    f = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    if not dist.is_initialized():
        return f[None]
    out = [torch.zeros_like(f) for _ in range(dist.get_world_size())]
    dist.all_gather(out, f)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Data. Every random choice of a sample (its scale, crop, flip) comes from a generator seeded by
# (seed, epoch, index), so a sample is augmented the same way whatever the number of ranks or workers.


def find_images(root):
    """All image files under root, recursively, sorted; an error when there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist (or is not a folder)")
    paths = fid.image_files(root)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(fid.IMAGE_EXTENSIONS)}) found under {root!r}")
    return paths


def resize_short_side(img, short, resample):
    w, h = img.size
    return img.resize((max(short, round(w * short / min(w, h))), max(short, round(h * short / min(w, h)))), resample)


def train_crop(img, size, aug_scale, rng):
    """Short side resized (Lanczos) to a random length in [size, aug_scale * size), random crop, random flip."""
    short = rng.randrange(size, math.ceil(aug_scale * size)) if aug_scale > 1 else size
    img = resize_short_side(img, short, Image.LANCZOS)
    w, h = img.size
    left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def eval_crop(img, size):
    """Short side resized (bilinear) to size, center crop."""
    img = resize_short_side(img, size, Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img):
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


class ImageDataset(Dataset):
    """Base of the image datasets: subclasses provide load(i) -> PIL RGB image. train=True augments."""

    def __init__(self, size, train, aug_scale=1.0, seed=0):
        self.size, self.train, self.aug_scale, self.seed = size, train, aug_scale, seed
        self.epoch = 0  # set by the training loop; workers are re-created each epoch and see it

    def __getitem__(self, i):
        img = self.load(i)
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 100_000_019 + i)
            return to_tensor(train_crop(img, self.size, self.aug_scale, rng))
        return to_tensor(eval_crop(img, self.size))


class ImageFolder(ImageDataset):
    """Image files. An unreadable file is logged and replaced by the next readable one, so one bad file
    never stops a run halfway through an epoch; many in a row mean the folder is broken, and that raises."""

    MAX_CONSECUTIVE_FAILURES = 20

    def __init__(self, paths, size, train, aug_scale=1.0, seed=0):
        super().__init__(size, train, aug_scale, seed)
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        for k in range(min(self.MAX_CONSECUTIVE_FAILURES, len(self.paths))):
            path = self.paths[(i + k) % len(self.paths)]
            try:
                with Image.open(path) as img:
                    return img.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr, flush=True)
        raise RuntimeError(f"{self.MAX_CONSECUTIVE_FAILURES} consecutive images from {self.paths[i]} on could not "
                           f"be read: the data folder looks corrupt")


class SyntheticImages(ImageDataset):
    """Procedurally generated images (gradients, shapes, texture), a fixed image per index, so the
    script runs anywhere without a download. Not a benchmark: only for trying the pipeline."""

    def __init__(self, n, size, train, aug_scale=1.0, seed=0, offset=0):
        super().__init__(size, train, aug_scale, seed)
        self.n, self.offset = n, offset  # offset keeps validation images apart from training ones

    def __len__(self):
        return self.n

    def load(self, i):
        rng = np.random.default_rng(self.offset + i)
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s] / s
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        freq, phase = rng.uniform(2, 12), rng.uniform(0, 2 * np.pi)
        texture = 20 * np.sin(2 * np.pi * freq * (xx + ramp[..., 0]) + phase)[..., None]
        img = Image.fromarray(np.clip(c0 + (c1 - c0) * ramp + texture, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 8)):
            x0, y0 = rng.uniform(-0.2, 1, 2) * s
            x1, y1 = x0 + rng.uniform(0.1, 0.6) * s, y0 + rng.uniform(0.1, 0.6) * s
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def build_datasets(data, size, aug_scale=1.0, limit=None, seed=0):
    """(train, val) datasets. data: a folder searched recursively (its train/ and val/ when it has both,
    as ImageNet does; otherwise validation uses the training images) or 'synthetic'. limit: keep only a
    fixed random subset of that many images of each."""
    if data == "synthetic":
        n_train, n_val = (limit or 100_000), (limit or 1_000)
        return (SyntheticImages(n_train, size, True, aug_scale, seed),
                SyntheticImages(n_val, size, False, offset=10**9))
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "val")):
        train_paths, val_paths = find_images(os.path.join(data, "train")), find_images(os.path.join(data, "val"))
    else:
        train_paths = val_paths = find_images(data)
    if limit:
        train_paths, val_paths = [sorted(random.Random(0).sample(p, min(limit, len(p)))) for p in (train_paths, val_paths)]
    return (ImageFolder(train_paths, size, True, aug_scale, seed), ImageFolder(val_paths, size, False))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through, for exact resumption."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """skip: how many of this rank's samples of the epoch were already used."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def train_loader(dataset, local_batch, rank, world_size, seed, workers):
    """Loader over this rank's share of a shuffled epoch. Incomplete batches are dropped on every rank, so
    global batch i holds the same images whatever the number of ranks."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True)
    return loader, sampler


# ----------------------------------------------------------------------------------------------------------
# REPA: the decoder's transformer tokens are aligned with DINOv2 ViT-B/14 patch features (SPEC section 4).
# The ViT is written here with the key names of the official dinov2_vitb14 checkpoint.

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), DinoMlp(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 (pretrained at 518 px, a 37x37 grid of patch positions). forward(x) -> final-norm
    patch tokens (B, N, 768) of ImageNet-normalised images whose sides are multiples of 14."""

    def __init__(self, depth=12, dim=768, heads=12, patch=14, grid=37):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([DinoBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_embedding(self, h, w):
        """Patch position embeddings resized bicubically to an h x w grid. The +0.1 in the scale factor is
        the official code's guard against rounding the output size down; it also sets the sample points."""
        n = int(math.sqrt(self.pos_embed.shape[1] - 1))
        cls_pos, patch_pos = self.pos_embed[:, :1].float(), self.pos_embed[:, 1:].float()
        if (h, w) != (n, n):
            grid = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embedding(h, w).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def load_dinov2(path=None, device="cpu"):
    """The frozen DINOv2 ViT-B/14 from the official dinov2_vitb14 checkpoint (downloaded into the torch hub
    cache on first use, or a local path), in eval mode. The official release publishes no checksum, so the
    file is checked by loading it strictly: every one of its tensors must have its ViT-B/14 name and shape."""
    if path is None:
        state = fid.download(DINOV2_URL, hint="pass --dinov2-weights PATH")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("mask_token", None)  # only used by DINOv2's masked-image pretraining
    net = DINOv2()
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)


def dinov2_input(x, grid):
    """Images in [-1, 1] -> [0, 1], ImageNet-normalised, bicubic-resized to 14 * grid, so the ViT's patch
    grid matches the decoder's token grid."""
    x = (x.float() + 1) / 2
    mean, std = torch.tensor(IMAGENET_MEAN, device=x.device), torch.tensor(IMAGENET_STD, device=x.device)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return F.interpolate(x, size=(14 * grid, 14 * grid), mode="bicubic", align_corners=False)


class REPALoss(nn.Module):
    """1 - mean cosine similarity between MLP(decoder tokens) and DINOv2 tokens, in float32."""

    def __init__(self, width, target_dim=768):
        super().__init__()
        self.repa_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, target_dim))

    def forward(self, hidden, target):
        pred = self.repa_mlp(hidden)
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


class PatchDiscriminator(nn.Module):
    """The optional GAN critic (--gan; an ablation of the paper, off in the recipe). SPEC 5 gives a PatchGAN
    conditioned on (x_t, t) with BCE losses; the layers here are pix2pix's (4x4 convolutions, 64-128-256-512
    channels, LeakyReLU 0.2, one logit per 70x70 patch), with GroupNorm instead of BatchNorm so that a
    sample's logits depend neither on the rest of the batch nor on its split over ranks. Input: the clean or
    reconstructed image, the noisy x_t it came from and a constant map of t."""

    def __init__(self, ch=64):
        super().__init__()
        layers = [nn.Conv2d(3 + 3 + 1, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        for cin, cout, stride in ((ch, 2 * ch, 2), (2 * ch, 4 * ch, 2), (4 * ch, 8 * ch, 1)):
            layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.GroupNorm(32, cout), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(8 * ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, image, x_t, t):
        t_map = t.view(-1, 1, 1, 1).expand(-1, 1, *image.shape[-2:])
        return self.net(torch.cat([image, x_t.to(image.dtype), t_map.to(image.dtype)], dim=1))


def gan_losses(logits_fake, logits_real=None):
    """Non-saturating BCE: with only fake logits, the generator's loss (fakes labelled real); with both,
    the discriminator's (mean of the real and the fake term)."""
    def bce(logits, label):
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    if logits_real is None:
        return bce(logits_fake, 1.0)
    return 0.5 * (bce(logits_real, 1.0) + bce(logits_fake, 0.0))


# ----------------------------------------------------------------------------------------------------------
# Schedule-free RAdam (Defazio et al., "The Road Less Scheduled", 2024), written from the algorithm of the
# `schedulefree` package's RAdamScheduleFree with its defaults (the first steps, where RAdam's variance
# rectification is undefined, leave the weights untouched). The parameters hold y, the point where the
# gradient is taken; the state keeps z (the SGD-like iterate) and Adam's second moment. The averaged
# weights x, used for evaluation, the EMA and checkpoints, satisfy y = (1 - beta1) z + beta1 x.


class RAdamScheduleFree(torch.optim.Optimizer):
    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0, weight_lr_power=2.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r, weight_lr_power=weight_lr_power,
                        k=0, weight_sum=0.0, lr_max=0.0, scheduled_lr=0.0, train_mode=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _swap(self, train):
        """Move the parameters between y (train) and x (eval)."""
        for group in self.param_groups:
            if group["train_mode"] != train:
                beta1 = group["betas"][0]
                params = [p for p in group["params"] if "z" in self.state[p]]
                if params:
                    torch._foreach_lerp_(params, [self.state[p]["z"] for p in params], 1 - beta1 if train else 1 - 1 / beta1)
                group["train_mode"] = train

    def train(self):
        self._swap(True)

    def eval(self):
        self._swap(False)

    @torch.no_grad()
    def averaged(self, params):
        """The averaged weights x of params (what eval() would put in them), without touching them."""
        out = list(params)
        for group in self.param_groups:
            if group["train_mode"]:
                mine = set(group["params"])
                moved = [i for i, p in enumerate(out) if p in mine and "z" in self.state[p]]
                x = torch._foreach_lerp([out[i] for i in moved], [self.state[out[i]]["z"] for i in moved],
                                        1 - 1 / group["betas"][0]) if moved else []
                for i, xi in zip(moved, x):
                    out[i] = xi
        return out

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("call optimizer.train() before optimizer.step()")
            beta1, beta2 = group["betas"]
            step = group["k"] = group["k"] + 1
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
            adam = rho_t > 4
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) if adam else 0.0
            lr = group["scheduled_lr"] = group["lr"] * rect
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = step ** group["r"] * lr_max ** group["weight_lr_power"]
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0

            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            z = [self.state[p]["z"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            if adam:
                denom = torch._foreach_div(v, 1 - beta2**step)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, group["eps"])
                grads = torch._foreach_div(grads, denom)
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_lerp_(params, z, ckp1)
            torch._foreach_add_(params, grads, alpha=lr * (beta1 * (1 - ckp1) - 1))
            torch._foreach_sub_(z, grads, alpha=lr)


WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 1e-3, 0.1, 0.999  # the official recipe's


def param_groups(named_params, weight_decay):
    """Weight decay on conv / linear weights and norm scales (every '.weight'), none on biases and
    relative-position bias tables."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if name.endswith(".weight") else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


@torch.no_grad()
def update_ema(ema, model, optimizer, decay):
    """ema <- decay * ema + (1 - decay) * x, x the optimizer's averaged weights; decay 0 copies x."""
    ema_params = list(ema.parameters())
    x = optimizer.averaged(list(model.parameters()))
    if decay == 0:
        torch._foreach_copy_(ema_params, x)
    else:
        torch._foreach_lerp_(ema_params, x, 1 - decay)


def optimizer_step(loss, terms, params, optimizer, step, state_path):
    """Backward, clip the global gradient norm to GRAD_CLIP, then step, unless the loss or the gradient is
    not finite on some rank: then every rank stops (SystemExit) before the weights change, so the last
    checkpoint stays the last good one. Returns the gradient norm before clipping."""
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    bad = all_reduce((~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float(), dist.ReduceOp.MAX)
    if bad.item():
        raise SystemExit(f"error: non-finite loss or gradient at step {step + 1} "
                         f"({ {k: v.item() for k, v in terms.items()} }); stopping. The last good checkpoint "
                         f"{state_path} is intact: resume from it with a lower --lr.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class LogWindow:
    """Loss terms, gradient norm and time summed over the steps between two log lines; record() gives the
    log line (their means over steps and ranks: a collective call) and starts a new window."""

    def __init__(self, names, device):
        self.names = names  # the loss terms to average; each step must provide them all
        self.device = device
        self.sums = torch.zeros(len(names) + 2, device=device)
        self.steps, self.seconds = 0, 0.0

    def add(self, loss, grad_norm, terms, seconds):
        self.sums += torch.stack([loss.detach().float(), grad_norm.float()] + [terms[k].detach().float() for k in self.names])
        self.steps += 1
        self.seconds += seconds

    def record(self, step, steps_per_epoch, lr, images_per_step):
        world = dist.get_world_size() if dist.is_initialized() else 1
        avg = (all_reduce(self.sums) / (self.steps * world)).tolist()
        out = dict(step=step, epoch=step / steps_per_epoch, loss=avg[0], grad_norm=avg[1],
                   **dict(zip(self.names, avg[2:])), img_per_s=self.steps * images_per_step / self.seconds, lr=lr)
        if self.device.type == "cuda":
            out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.sums.zero_()
        self.steps, self.seconds = 0, 0.0
        return out


# ----------------------------------------------------------------------------------------------------------
# The training objective

LOSS_TERMS = ("fm", "lpips", "repa", "kl", "gan")  # flow matching, LPIPS-VGG on x0_hat, REPA, KL, GAN


class AutoencoderLoss(nn.Module):
    """SSDD plus the REPA head, one module so that DDP syncs the gradients of both. forward(x, t, noise,
    z_noise, dino_tokens) -> ({term: loss}, x0_hat). All randomness comes in as arguments (see step_noise)."""

    def __init__(self, ssdd, train_encoder, repa):
        super().__init__()
        self.ssdd, self.train_encoder = ssdd, train_encoder
        self.repa_loss = REPALoss(ssdd.decoder.width) if repa else None

    def forward(self, x, t, noise, z_noise, dino_tokens=None):
        # the posterior sample is drawn here rather than inside SSDD.forward so that its noise, like t and e,
        # is fixed per sample: results then do not depend on how the batch is split over ranks
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            mean, logvar = self.ssdd.encoder(x)
        z = mean + (0.5 * logvar).exp() * z_noise
        out = self.ssdd(x, t=t, noise=noise, z=z)
        terms = dict(fm=out["loss"])
        if self.train_encoder:  # KL to N(0, I), summed over C, H, W, averaged over the batch
            mean, logvar = mean.float(), logvar.float()
            terms["kl"] = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        if self.repa_loss is not None:
            terms["repa"] = self.repa_loss(out["hidden"], dino_tokens)
        return terms, out["x0_hat"]


def step_noise(seed, step, global_batch, image_shape, latent_shape, rank, world_size, device):
    """t ~ sigmoid(N(0, 1)), e and the posterior noise for this rank's share of global batch `step`. Drawn
    for the whole global batch from a generator seeded by (seed, step), so each sample gets the same values
    whatever the number of ranks, and a resumed run the same values as an uninterrupted one."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t = torch.sigmoid(torch.randn(global_batch, generator=g, device=device))
    noise = torch.randn((global_batch, *image_shape), generator=g, device=device)
    z_noise = torch.randn((global_batch, *latent_shape), generator=g, device=device)
    return t[rank::world_size], noise[rank::world_size], z_noise[rank::world_size]


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, dataset, batch_size, device, num_images=None, steps=None, seed=0, inception=None, workers=4):
    """Reconstruct the first num_images of dataset (sharded over the ranks: a collective call) with the
    posterior mean and `steps` Euler steps from noise seeded per image. Returns the metrics of SPEC section 7
    on uint8-quantised images: {'psnr' (from the aggregate MSE), 'ssim' (per-image mean), 'rfid' (None
    without an Inception network)}, and (originals, reconstructions) of rank 0's first batch in [-1, 1]."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = min(num_images or len(dataset), len(dataset))
    if n < world:
        raise ValueError(f"evaluating {n} images on {world} ranks: give every rank at least one")
    indices = list(range(rank, n, world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # squared error, elements, SSIM, images
    stats = (fid.FeatureStats(device=device), fid.FeatureStats(device=device)) if inception is not None else None
    first, done = None, 0
    for x in loader:
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                             for i in indices[done:done + len(x)]])
        done += len(x)
        x, noise = x.to(device), noise.to(device)
        with autocast(device):
            rec = model.decode(model.encode(x), steps=steps, noise=noise).float()
        real, fake = fid.to_uint8(x), fid.to_uint8(rec)
        sums += torch.stack([fid.squared_error(real, fake), torch.tensor(float(real.numel()), device=device).double(),
                             fid.ssim(real / 255, fake / 255).sum(), torch.tensor(float(len(x)), device=device).double()])
        if stats is not None:
            stats[0].update(inception(real))
            stats[1].update(inception(fake))
        if first is None:
            first = (x.cpu(), rec.clamp(-1, 1).cpu())
    all_reduce(sums)
    metrics = dict(psnr=fid.psnr(sums[0] / sums[1]), ssim=(sums[2] / sums[3]).item(), rfid=None)
    if stats is not None:
        for s in stats:
            s.all_reduce()
        metrics["rfid"] = fid.frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov())
    return metrics, first


# ----------------------------------------------------------------------------------------------------------
# Checkpoints. state.pt holds everything needed to continue (tensors and plain Python values only, so it
# loads with weights_only=True); the released weights go through model.save (safetensors).


def save_training_state(path, state):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path, device="cpu"):
    return torch.load(path, map_location=device, weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Throughput accounting

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def train_flops_per_image(loss_model, lpips, dino, image_shape, latent_shape, grid, device):
    """FLOPs of one training step on one image (forward and backward), counted on an eager batch of 1."""
    x = torch.zeros(1, *image_shape, device=device)
    with FlopCounterMode(display=False) as counter, autocast(device):
        target = dino(dinov2_input(x, grid)) if dino is not None else None
        terms, x0_hat = loss_model(x, torch.full((1,), 0.5, device=device), torch.randn_like(x),
                                   torch.zeros(1, *latent_shape, device=device), target)
        loss = sum(terms.values()) + (lpips(x0_hat, x).mean() if lpips is not None else 0)
        loss.backward()
    loss_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# Training


def add_shared_args(p):
    """The options of train_ae.py and distill.py that the shared helpers here read (data, loss networks,
    validation, checkpoints, logging)."""
    p.add_argument("--data", required=True, help="image folder (searched recursively; uses train/ and val/ when "
                   "both exist), or 'synthetic' for generated images")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--aug-scale", type=float, default=2.0, help="short side resized to [im, aug_scale * im)")
    p.add_argument("--lpips-weight", type=float, default=0.5)
    p.add_argument("--repa-weight", type=float, default=0.25)
    p.add_argument("--ema-start", type=int, default=50_000, help="EMA 0.999 from this step, a copy before")
    p.add_argument("--eval-every", type=int, default=10_000)
    p.add_argument("--eval-images", type=int, default=5_000, help="validation subset used by the periodic eval")
    p.add_argument("--ckpt-every", type=int, default=1_000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only N training and N validation images")
    p.add_argument("--num-workers", type=int, default=8, help="data loader processes per rank")
    p.add_argument("--dinov2-weights", default=None, help="local dinov2_vitb14_pretrain.pth (default: download)")
    p.add_argument("--fid-weights", default=None, help="local FID Inception weights (default: download)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="M", help="decoder size S|B|M|L|XL|H, or a JSON dict of widths/depth/heads "
                   "for a custom (e.g. tiny test) decoder")
    p.add_argument("--encoder", default="f8c4")
    p.add_argument("--im", type=int, default=128, help="training resolution")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--train-encoder", action="store_true", help="train the encoder too (KL term on)")
    p.add_argument("--encoder-ckpt", default=None, help="SSDD .safetensors whose encoder is used (frozen unless "
                   "--train-encoder)")
    p.add_argument("--init", default=None, help="SSDD .safetensors to start from (stage 2, finetuning)")
    p.add_argument("--run-dir", default=None, help="default runs/<date-time> (kept across torchrun's restarts); "
                   "an existing run dir resumes")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--gan", action="store_true", help="add the PatchGAN loss (an ablation, off in the recipe)")
    p.add_argument("--gan-weight", type=float, default=0.5, help="weight of the generator's GAN loss")
    p.add_argument("--gan-start", type=int, default=50_000, help="GAN losses from this step on")
    add_shared_args(p)
    return p.parse_args(argv)


def decoder_spec(size):
    return json.loads(size) if size.lstrip().startswith("{") else size


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        train(args, rank, world, device)
    finally:
        cleanup_distributed()


def default_run_dir(prefix):
    """runs/<prefix><date-time>. Under torchrun with --max-restarts the name is noted in
    runs/.torchrun-<prefix><rendezvous id>, and the workers torchrun restarts after a failure read it back, so
    that they resume the run instead of starting a new one; a fresh launch always starts a new run."""
    run_dir = os.path.join("runs", prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # "none" also for torchrun's static rendezvous
    if job == "none" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return run_dir
    note = os.path.join("runs", f".torchrun-{prefix}{job}")
    if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) > 0 and os.path.exists(note):
        with open(note) as f:
            return f.read()
    os.makedirs("runs", exist_ok=True)
    with open(note, "w") as f:
        f.write(run_dir)
    return run_dir


def open_run_dir(run_dir, prefix, rank):
    """Rank 0 names the run directory (default: default_run_dir), every rank uses it. Returns
    (run_dir, path of state.pt, the saved training state or None): an existing state.pt means resume."""
    run_dir = [run_dir or (default_run_dir(prefix) if rank == 0 else None)]
    if dist.is_initialized():
        dist.broadcast_object_list(run_dir, src=0)
    run_dir = run_dir[0]
    state_path = os.path.join(run_dir, "state.pt")
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    barrier()
    state = load_training_state(state_path) if os.path.exists(state_path) else None
    if dist.is_initialized():  # a node that cannot see rank 0's files would train from another step
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, state and state["step"])
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks see different training states in {run_dir} (step per rank, None for "
                               f"none: {steps}); on several nodes the run dir must be on a shared filesystem")
    return run_dir, state_path, state


def restore_training_state(state, loss_model, ema, optimizer, args, run_dir, rank):
    """Load a saved state into the loss module (model and REPA head), the EMA and the optimizer; returns
    (step, best rFID) and says which arguments changed since the state was saved."""
    loss_model.ssdd.load_state_dict(state["model"])
    if loss_model.repa_loss is not None:
        loss_model.repa_loss.load_state_dict(state["repa_loss"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    changed = {k: (state["args"].get(k), v) for k, v in vars(args).items() if state["args"].get(k) != v}
    if rank == 0:
        print(f"resuming {run_dir} at step {state['step']}" + (f"; arguments changed (was, now): {changed}" if changed else ""))
    return state["step"], state["best_rfid"]


def save_checkpoint(run_dir, step, best_rfid, args, loss_model, ema, optimizer, rank, log, extra_state=None, **metadata):
    """The counterpart of restore_training_state (a collective call): check that every rank holds the same
    weights, then rank 0 writes state.pt (with extra_state, a dict of state dicts, merged in) and the EMA
    weights as ema.safetensors (with metadata), atomically."""
    fingerprints = replica_fingerprints(loss_model)
    log(dict(step=step, replica_fingerprints=fingerprints.tolist()))
    if not (fingerprints == fingerprints[0]).all():
        raise SystemExit(f"error: the ranks' weights differ at step {step}: {fingerprints.tolist()}")
    if rank == 0:
        repa = {"repa_loss": loss_model.repa_loss.state_dict()} if loss_model.repa_loss else {}
        save_training_state(os.path.join(run_dir, "state.pt"), dict(
            step=step, best_rfid=best_rfid, args=vars(args), model=loss_model.ssdd.state_dict(), ema=ema.state_dict(),
            optimizer=optimizer.state_dict(), **repa, **(extra_state or {})))
        ema.save(os.path.join(run_dir, "ema.safetensors"), step=step, **metadata)
    barrier()


class RunLog:
    """The run's log.jsonl, one JSON record per line, written by rank 0 (on other ranks a call does nothing)."""

    def __init__(self, run_dir, rank):
        self.file = open(os.path.join(run_dir, "log.jsonl"), "a") if rank == 0 else None

    def __call__(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def validate(ema, val_set, args, local_batch, device, inception, run_dir, step, best_rfid, rank, log, **metadata):
    """The periodic validation of the EMA model (a collective call): log its metrics, save a grid of
    originals above reconstructions, keep its weights as best.safetensors (with metadata) when its rFID is
    the lowest so far. Returns the best rFID."""
    metrics, (orig, rec) = evaluate(ema, val_set, local_batch, device, args.eval_images, seed=args.seed,
                                    inception=inception, workers=args.num_workers)
    log(dict(step=step, eval=metrics))
    rfid = metrics["rfid"]
    if rank == 0:
        torchvision.utils.save_image(torch.cat([orig[:8], rec[:8]]) * 0.5 + 0.5,
                                     os.path.join(run_dir, "samples", f"{step:08d}.png"), nrow=min(8, len(orig)))
        if rfid is not None and rfid < best_rfid:
            ema.save(os.path.join(run_dir, "best.safetensors"), step=step, rfid=rfid, **metadata)
    barrier()
    return best_rfid if rfid is None else min(best_rfid, rfid)


def loss_networks(args, device, rank):
    """The frozen networks of the losses, loaded only when their weight is nonzero (else None), and the FID
    Inception: weights given explicitly must load; the default download may fail offline, and rFID is then
    skipped (None)."""
    lpips = fid.LPIPS(net="vgg").to(device).eval().requires_grad_(False) if args.lpips_weight > 0 else None
    dino = load_dinov2(args.dinov2_weights, device) if args.repa_weight > 0 else None
    try:
        inception = fid.load_inception(args.fid_weights, device=device)
    except RuntimeError as e:
        if args.fid_weights:
            raise
        inception = None
        if rank == 0:
            print(f"rFID unavailable ({e}); evaluating PSNR and SSIM only", file=sys.stderr)
    return lpips, dino, inception


def train(args, rank, world, device):
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if not (args.train_encoder or args.encoder_ckpt or args.init):
        raise SystemExit("error: give --encoder-ckpt (a trained encoder to freeze), --init, or --train-encoder")
    local_batch = args.batch_size // world
    cuda = device.type == "cuda"
    compile_model = cuda if args.compile is None else args.compile
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # Inductor keeps training graphs NCHW when a 3x3 conv has out_channels * 2 <= in_channels (the up
        # blocks' conv1 on concatenated skips), so cuDNN converts to NHWC and back around every convolution;
        # forcing its channels-last layout makes the M step 7% faster (H200, BENCHMARKS.md)
        torch._inductor.config.force_layout_optimization = True

    run_dir, state_path, state = open_run_dir(args.run_dir, "", rank)

    train_set, val_set = build_datasets(args.data, args.im, args.aug_scale, args.limit, args.seed)
    if len(train_set) < args.batch_size:
        raise SystemExit(f"error: {len(train_set)} training images, fewer than one batch of {args.batch_size}")
    loader, sampler = train_loader(train_set, local_batch, rank, world, args.seed, args.num_workers)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)

    # model, EMA, optimizer; the same seed on every rank gives the same initial weights
    torch.manual_seed(args.seed)
    ssdd = SSDD(args.encoder, decoder_spec(args.size))
    if state is None and args.init:
        ssdd.load_state_dict(SSDD.from_checkpoint(args.init).state_dict())
    if state is None and args.encoder_ckpt:
        ssdd.encoder.load_state_dict(SSDD.from_checkpoint(args.encoder_ckpt).encoder.state_dict())
    ssdd.encoder.requires_grad_(args.train_encoder)
    raw = AutoencoderLoss(ssdd, args.train_encoder, repa=args.repa_weight > 0).to(device)
    ema = copy.deepcopy(ssdd).eval().requires_grad_(False)
    optimizer = RAdamScheduleFree(param_groups(raw.named_parameters(), WEIGHT_DECAY), lr=args.lr)
    disc = disc_optimizer = None
    if args.gan:  # Adam with betas (0.5, 0.9), the usual choice for such critics (the SPEC names none)
        disc = PatchDiscriminator().to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    step, best_rfid = 0, math.inf
    if state is not None:
        step, best_rfid = restore_training_state(state, raw, ema, optimizer, args, run_dir, rank)
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        del state
    optimizer.train()
    weights = dict(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight, kl=args.kl_weight,
                   gan=args.gan_weight if args.gan else 0.0)

    lpips, dino, inception = loss_networks(args, device, rank)

    image_shape = (3, args.im, args.im)
    latent_shape = (ssdd.decoder.z_channels, args.im // ssdd.factor, args.im // ssdd.factor)
    grid = args.im // 8  # the decoder's transformer works at 1/8 resolution
    flops = peak = None
    if cuda:
        flops = train_flops_per_image(raw, lpips, dino, image_shape, latent_shape, grid, device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    model = raw
    if compile_model:
        model = torch.compile(model)
        lpips = torch.compile(lpips) if lpips is not None else None
        dino = torch.compile(dino) if dino is not None else None
    disc_model = disc  # not compiled: its parameters are frozen and unfrozen every step (see the loop)
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
        disc_model = DDP(disc, device_ids=[device.index] if cuda else None) if disc is not None else None
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        n_params = sum(p.numel() for p in ssdd.parameters())
        print(f"{n_params / 2**20:.1f}M parameters, {len(train_set)} training / {len(val_set)} validation images, "
              f"{steps_per_epoch} steps per epoch, {total_steps} steps, run dir {run_dir}")
    log = RunLog(run_dir, rank)

    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    window = LogWindow([k for k in LOSS_TERMS if weights[k] > 0 and (k != "kl" or args.train_encoder)]
                       + (["disc"] if args.gan else []), device)
    t0 = time.time()
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=offset * local_batch)
        train_set.epoch = epoch
        for x in loader:
            x = x.to(device, non_blocking=True)
            t, noise, z_noise = step_noise(args.seed, step, args.batch_size, image_shape, latent_shape, rank, world, device)
            with autocast(device):
                with torch.no_grad():
                    target = dino(dinov2_input(x, grid)) if dino is not None else None
                terms, x0_hat = model(x, t, noise, z_noise, target)
                if lpips is not None:
                    terms["lpips"] = lpips(x0_hat, x).float().mean()
                gan_on = disc is not None and step >= args.gan_start
                if gan_on:  # the generator's term: gradients reach x0_hat through the critic, not its weights
                    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
                    disc.requires_grad_(False)
                    terms["gan"] = gan_losses(disc(x0_hat, x_t, t))
                    disc.requires_grad_(True)
                elif disc is not None:
                    terms["gan"] = torch.zeros((), device=device)
            loss = sum(weights[k] * v for k, v in terms.items())
            grad_norm = optimizer_step(loss, terms, trainable, optimizer, step, state_path)
            if gan_on:  # the critic's step, real and reconstructed images in one batch (one DDP forward)
                with autocast(device):
                    logits = disc_model(torch.cat([x, x0_hat.detach()]), x_t.repeat(2, 1, 1, 1), t.repeat(2))
                    real, fake = logits.chunk(2)
                    terms["disc"] = gan_losses(fake, real)
                optimizer_step(terms["disc"], dict(disc=terms["disc"]), list(disc.parameters()), disc_optimizer, step, state_path)
            elif disc is not None:
                terms["disc"] = torch.zeros((), device=device)
            step += 1
            update_ema(ema, raw.ssdd, optimizer, EMA_DECAY if step > args.ema_start else 0.0)
            window.add(loss, grad_norm, terms, time.time() - t0)  # optimizer_step synchronised with the GPU
            pbar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                record = window.record(step, steps_per_epoch, optimizer.param_groups[0]["scheduled_lr"], args.batch_size)
                if peak:
                    record["mfu"] = flops * record["img_per_s"] / (world * peak)
                log(record)
                pbar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
            if step % args.eval_every == 0 or step == total_steps:
                best_rfid = validate(ema, val_set, args, local_batch, device, inception, run_dir, step, best_rfid, rank, log)
            if step % args.ckpt_every == 0 or step == total_steps:
                extra = dict(disc=disc.state_dict(), disc_optimizer=disc_optimizer.state_dict()) if disc is not None else None
                save_checkpoint(run_dir, step, best_rfid, args, raw, ema, optimizer, rank, log, extra_state=extra)
            t0 = time.time()  # throughput counts training steps (data loading included), not eval or checkpoints
            if step >= total_steps:
                break
    pbar.close()
    log.close()
    if rank == 0:
        print(f"done: {step} steps, weights in {os.path.join(run_dir, 'ema.safetensors')}")


if __name__ == "__main__":
    main()
