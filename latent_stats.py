"""Latent statistics of a dataset, for training a latent diffusion model on SSDD latents (arXiv 2510.04961).

    python latent_stats.py --ckpt runs/m256/ema.safetensors --data /imagenet --im 256
    torchrun --nproc_per_node 8 latent_stats.py --ckpt runs/m256/ema.safetensors --data /imagenet --im 256

One scalar mean and one scalar (unbiased) standard deviation over every element of the encoder means of the
images (train/ of a folder that has train/ and val/; eval transform: short side resized bilinearly, center
crop), accumulated in float64 and combined across processes. They are printed and written into the
checkpoint's metadata (atomically, every tensor and other field kept as it was), where SSDD.from_checkpoint
reads them: model.normalize_latent(z) = (z - mean) / std, model.denormalize_latent undoes it before decoding.
"""
import argparse
import json

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import runs
from model import SSDD, check_image_size, load_safetensors, save_safetensors


def merge(a, b):
    """Merge two (count, mean, sum of squared deviations) summaries, float64 (Chan et al.): exact up to
    rounding, without the cancellation of sum(z^2) - n mean^2 when the mean is large against the std."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta**2 * na * nb / n


@torch.no_grad()
def latent_stats(model, dataset, batch_size, device, workers=4, progress=False):
    """(mean, unbiased std, number of elements) of the encoder means of the dataset, sharded over the ranks
    (a collective call)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size, num_workers=workers)
    summary = (0, 0.0, 0.0)
    for x in tqdm(loader, desc="encoding", disable=not progress, dynamic_ncols=True):
        with runs.autocast(device):
            z = model.encode(x.to(device)).double()
        mean = z.mean()
        summary = merge(summary, (z.numel(), mean.item(), (z - mean).square().sum().item()))
    summaries = [summary]
    if dist.is_initialized():
        summaries = [None] * world
        dist.all_gather_object(summaries, summary)
    total = (0, 0.0, 0.0)
    for s in summaries:
        total = merge(total, s)
    n, mean, m2 = total
    return mean, (m2 / (n - 1)) ** 0.5, n


def write_stats(path, mean, std):
    """Set latent_mean and latent_std in the checkpoint's metadata, leaving everything else as it was."""
    tensors, metadata = load_safetensors(path)
    metadata.update(latent_mean=json.dumps(mean), latent_std=json.dumps(std))
    save_safetensors(tensors, path, metadata)  # a temporary file renamed over the old one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SSDD .safetensors; its metadata gets the statistics")
    p.add_argument("--data", required=True, help="image folder, searched recursively (its train/ when it has "
                   "train/ and val/)")
    p.add_argument("--im", type=int, default=256, help="resolution of the images the latents will encode")
    p.add_argument("--limit", type=int, default=None, help="use a fixed random subset of this many images")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per rank")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = runs.setup_distributed()
    try:
        try:
            model = SSDD.from_checkpoint(args.ckpt, device)
            check_image_size(args.im, args.im, model.factor)
            dataset = data.load_split(args.data, "train", args.im, limit=args.limit)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        mean, std, n = latent_stats(model, dataset, args.batch_size, device, args.num_workers, progress=rank == 0)
        if rank == 0:
            write_stats(args.ckpt, mean, std)
            print(f"latent mean {mean:.6g}, std {std:.6g} over {n} elements of {len(dataset)} images; "
                  f"written into {args.ckpt}")
        runs.barrier()
    finally:
        runs.cleanup_distributed()
    return mean, std


if __name__ == "__main__":
    main()
