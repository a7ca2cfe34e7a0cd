"""Reconstruction metrics as the paper (arXiv 2510.04961) reports them, and the one evaluation loop, which
reconstructs a dataset and measures it (used by evaluate.py and by the training scripts' periodic validation):
rFID (fid.py), PSNR from the aggregate MSE and SSIM as scikit-image computes it, LPIPS v0.1 (AlexNet for the
metric, VGG16 for the training loss), MSE and MAE. Every metric is computed on uint8-quantised images.
"""
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

import fid
import weights

# What each figure of reconstruct() is, as evaluate.py prints it and writes it into its JSON. MSE and MAE are of
# the uint8-quantised images mapped to [0, 1]; the official evaluation logs MSE multiplied by 1000.
UNITS = dict(rfid="FID against the originals, TF Inception pool features", psnr="dB, data range 1, from the set's MSE",
             ssim="per image (7x7 window, data range 1), averaged", lpips="v0.1, AlexNet, per image, averaged",
             mse="mean squared error of images in [0, 1] (the official logs show 1000 x this)",
             mae="mean absolute error of images in [0, 1]", encode_img_per_s="images/s per process",
             decode_img_per_s="images/s per process")

# the LPIPS v0.1 linear heads, downloaded on first use and checked against their sha256
LPIPS_HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{}.pth"
LPIPS_HEADS_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}


# ----------------------------------------------------------------------------------------------------------
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
            sd = weights.download(enum.IMAGENET1K_V1.url, hint="pass --lpips-backbone FILE")
        else:
            sd = weights.load(backbone)
        features = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")
                    and k.split(".")[1].isdigit() and int(k.split(".")[1]) < len(self.features)}
        weights.load_into(self.features, features, backbone or enum.IMAGENET1K_V1.url,
                          f"torchvision's {net} (LPIPS backbone)")
        if heads is None:
            sha = LPIPS_HEADS_SHA256[net]
            path = LPIPS_HEADS_URL.format(net)
            heads = weights.download(path, hint="pass --lpips-heads FILE", file_name=f"lpips_v0.1_{net}-{sha[:10]}.pth")
        else:
            path, heads = heads, weights.load(heads)
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


# ----------------------------------------------------------------------------------------------------------
# The evaluation loop: reconstruct a dataset and measure it


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_precision(device):
    """bf16 on CUDA (native on A100 and later cards), fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device, precision=None):
    """The autocast of the networks' forward passes in a precision: 'bf16' (bfloat16 autocast; the float32
    islands, such as the Euler sum, the losses and the GAN critic, stay in float32) or 'fp32' (none).
    Default: default_precision."""
    precision = precision or default_precision(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def reconstruct(model, dataset, batch_size, device, steps=None, seed=0, num_images=None, inception=None,
                lpips=None, save_dir=None, workers=4, progress=False, precision=None):
    """Reconstruct the first num_images of dataset (default all; sharded over the ranks: a collective call)
    from the latent mean with `steps` Euler steps, the noise of image i from a generator seeded with seed + i,
    so the numbers repeat whatever the batch size or number of ranks. Every metric is computed on the
    uint8-quantised images. Returns ({'rfid' (None without an Inception network), 'psnr' (from the aggregate
    MSE), 'ssim' (per image, float64, averaged), 'lpips' (None without its network), 'mse' and 'mae' (of
    images in [0, 1], over every element of the set), 'encode_img_per_s',
    'decode_img_per_s' (per rank, over the full batches after the first, which warms up and compiles)},
    (originals, reconstructions) of rank 0's first batch in [-1, 1]). save_dir: write the reconstructions
    there as PNG, under their paths relative to dataset.root (recon_name). precision: autocast's."""
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
    stats = (fid.FeatureStats(device=device), fid.FeatureStats(device=device)) if inception is not None else None
    first, done = None, 0
    for k, x in enumerate(tqdm(loader, desc="reconstructing", disable=not progress, dynamic_ncols=True)):
        batch = indices[done:done + len(x)]
        done += len(x)
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                             for i in batch])
        x, noise = x.to(device), noise.to(device)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
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
        metrics["rfid"] = fid.frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov())
    return metrics, first


def recon_name(path, root):
    """Relative path of a reconstruction: the image's path under root, as PNG (lossless: the metrics' uint8)."""
    return os.path.splitext(os.path.relpath(path, root))[0] + ".png"
