"""Latent statistics of a dataset, and optionally its latents, for training a latent diffusion model on SSDD
latents (arXiv 2510.04961).

    python latent_stats.py --ckpt runs/m256/ema.safetensors --data /imagenet --im 256
    torchrun --standalone --nproc_per_node 8 latent_stats.py --ckpt runs/m256/ema.safetensors --data /imagenet \
        --im 256 --split train --save-latents latents/m256 --flip

Statistics: one scalar mean and one scalar (unbiased) standard deviation over every element of the encoder
means of the images of a split (val/ of a folder that has train/ and val/, as in the official code; --split
train for the other; a folder without them is used whole), eval transform (short side resized bilinearly,
center crop), accumulated in float64 and combined across processes. They are printed and written into the
checkpoint's metadata (atomically, every tensor and other field kept as it was), where SSDD.from_checkpoint
reads them: model.normalize_latent(z) = (z - mean) / std, model.denormalize_latent undoes it before decoding.
A --ckpt given as a URL or a published name (F8C4_M_256) is downloaded as every script downloads it, and the
statistics go into a copy of it in the current folder, named after its file (F8C4_M_256.safetensors), which
must not exist yet: the download cache keeps the server's file as it is.
A checkpoint that holds only a decoder (the authors' decoders for the SD-VAE latent space) takes its encoder from
--encoder-ckpt, and the statistics are those of that encoder's latents.
Statistics that are not finite, or a zero std, are refused and not written.

Latents (--save-latents OUT), the features a latent diffusion model trains on (DiT-style training code
extracts them first): shards of --shard-size consecutive images, OUT/latents-<k>-of-<n>.safetensors
(model.save_safetensors; the safetensors package reads them too), holding
    latents       float32 (N, C, h, w): the encoder means, not normalised (model.normalize_latent does it)
    latents_flip  the same for the horizontally flipped crops (with --flip)
    labels        int64 (N,): the class of each image, its first folder under the split root, numbered in
                  sorted order as torchvision's ImageFolder numbers classes; -1 for an image directly in the
                  root (ImageNet's val/ needs its class folders for labels) and for generated images
    indices       int64 (N,): the images' rows in the index
with the settings in their metadata (the sha256 of the encoder's weights and of the image paths, the split
root, the resolution, the number of images, --shard-size, --flip), and OUT/index.json, written when every
shard is done: the checkpoint, the settings, the statistics, the class names, the shard files, and the paths
(relative to the split root) and labels of the images. The shards are split over the processes, each
written atomically, so a killed run leaves only finished shards: rerunning it computes the others. A rerun
keeps only shards of the same encoder weights and settings: a folder holding any other latents-* file
(another layout or other settings, or the latents of a checkpoint whose encoder trained further at the same
path) is refused. An image that cannot be read is an error, never replaced by another.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import metrics
import runs
from model import (SSDD, check_image_size, checkpoint_file, checkpoint_url, load_safetensors, safetensors_header,
                   save_safetensors, url_file_name, write_durably)


def merge(a, b):
    """Merge two (count, mean, sum of squared deviations) summaries, float64 (Chan et al.): exact up to
    rounding, without the cancellation of sum(z^2) - n mean^2 when the mean is large against the std."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta**2 * na * nb / n


def summarize(z):
    z = z.double()
    mean = z.mean()
    return z.numel(), mean.item(), (z - mean).square().sum().item()


def combine(summary):
    """(mean, unbiased std, number of elements) of the summaries of every rank (a collective call)."""
    summaries = [summary]
    if dist.is_initialized():
        summaries = [None] * dist.get_world_size()
        dist.all_gather_object(summaries, summary)
    total = (0, 0.0, 0.0)
    for s in summaries:
        total = merge(total, s)
    n, mean, m2 = total
    return mean, (m2 / (n - 1)) ** 0.5, n


def image_labels(dataset):
    """(class names, image paths relative to the split root, int64 labels) of the dataset's images: the classes
    are the root's subfolders, sorted (torchvision's ImageFolder numbering); -1 labels an image outside them."""
    if not isinstance(dataset, data.ImageFolder):  # generated images
        return [], [f"synthetic/{i}" for i in range(len(dataset))], torch.full((len(dataset),), -1)
    classes = sorted(entry.name for entry in os.scandir(dataset.root) if entry.is_dir())
    number = {c: i for i, c in enumerate(classes)}
    paths = [os.path.relpath(p, dataset.root) for p in dataset.paths]
    labels = [number[p.split(os.sep)[0]] if os.sep in p else -1 for p in paths]
    return classes, paths, torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def encode_shards(model, dataset, shards, batch_size, device, workers, flip, progress):
    """For each shard (number: list of dataset indices), in order: (number, {"latents": float32 encoder means
    on the CPU, and "latents_flip" with flip}), finite (else a ValueError). One data loader for all, its
    batches within a shard."""
    batches = [(k, idx[i:i + batch_size], i + batch_size >= len(idx))
               for k, idx in shards.items() for i in range(0, len(idx), batch_size)]
    loader = DataLoader(dataset, batch_sampler=[b for _, b, _ in batches], num_workers=workers)
    parts = {"latents": [], "latents_flip": []} if flip else {"latents": []}
    # closed on an error too, so that the error's line is a line of its own
    with tqdm(total=sum(map(len, shards.values())), desc="encoding", disable=not progress, dynamic_ncols=True) as pbar:
        for (k, idx, last), x in zip(batches, loader):
            x = x.to(device)
            with metrics.autocast(device):
                parts["latents"].append(model.encode(x).float().cpu())
                if flip:
                    parts["latents_flip"].append(model.encode(x.flip(-1)).float().cpu())
            pbar.update(len(idx))
            if last:
                latents = {name: torch.cat(p) for name, p in parts.items()}
                if not all(z.isfinite().all() for z in latents.values()):  # finite weights can overflow
                    raise ValueError(f"the latents of images {shards[k][0]} to {shards[k][-1]} are not finite (NaN "
                                     f"or infinity)")
                yield k, latents
                parts = {name: [] for name in parts}


def encoder_sha256(model):
    """sha256 of the encoder's weights (names, shapes, float32 values; the model on the CPU): the latents
    depend on nothing else in the checkpoint, whose file changes with write_stats."""
    h = hashlib.sha256()
    for key, t in model.encoder.state_dict().items():
        h.update(f"{key} {tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy())
    return h.hexdigest()


def finished_shards(out, names, metadata):
    """The shards (numbers k of names[k]) that an earlier run with these settings (metadata) finished in out.
    Any other latents-* file there, of another layout (--shard-size, --limit) or other settings, or not a
    shard at all, is a ValueError: a loader reading latents-* would mix them with this run's."""
    own = {name: k for k, name in enumerate(names)}
    found = []
    for name in sorted(f for f in os.listdir(out) if f.startswith("latents-")):
        if re.fullmatch(r".+\.tmp\d+", name) and name.rsplit(".tmp", 1)[0] in own:
            continue  # an unfinished write of this layout: its rank removes it
        if name not in own:
            raise ValueError(f"{out} holds {name}, not a shard of this run's {len(names)}: latents of another "
                             f"--shard-size or --limit; use another --save-latents folder, or remove them")
        with open(os.path.join(out, name), "rb") as f:
            _, theirs, _ = safetensors_header(f, os.path.join(out, name))
        if theirs != metadata:
            changed = {k: (theirs.get(k), v) for k, v in metadata.items() if theirs.get(k) != v}
            raise ValueError(f"{os.path.join(out, name)} holds latents of other settings (was, now: {changed}); use "
                             f"another --save-latents folder")
        found.append(own[name])
    return found


def check_stats(mean, std, n, path):
    """Statistics that normalize_latent can use, or error(): a NaN, an infinity or a zero std is not written."""
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        runs.error(f"latent mean {mean}, std {std} over {n} elements: a NaN, an infinity or no spread; not written "
                   f"into {path}")


def stats_file(ckpt):
    """The file the statistics are written into: --ckpt itself, or for a URL or a published name, the copy in
    the current folder named after the URL's file."""
    url = checkpoint_url(ckpt)
    return url_file_name(url) if url else ckpt


def write_stats(source, target, mean, std):
    """The checkpoint at source, written to target (the same file, or a copy) with latent_mean and latent_std
    set in its metadata, everything else as it was."""
    tensors, metadata = load_safetensors(source)
    metadata.update(latent_mean=json.dumps(mean), latent_std=json.dumps(std))
    save_safetensors(tensors, target, metadata)  # a temporary file renamed over the old one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SSDD .safetensors, whose metadata gets the statistics; a URL or a "
                   "published name: they go into a copy in the current folder")
    runs.add_encoder_ckpt_arg(p, "--ckpt")
    p.add_argument("--data", required=True, help="image folder, searched recursively (its --split subfolder when it "
                   "has train/ and val/), or 'synthetic'")
    p.add_argument("--split", default="val", help="val (as the official code) or train")
    p.add_argument("--im", type=int, default=256, help="resolution of the images the latents will encode")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images in sorted path order")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process")
    p.add_argument("--num-workers", type=int, default=data.default_workers(), help="data loader processes per "
                   "rank (default: this machine's CPUs shared by its ranks)")
    p.add_argument("--save-latents", default=None, metavar="OUT", help="also write the latents into this folder "
                   "(a rerun keeps its finished shards; a folder holding latents of another encoder, other images "
                   "or settings is refused)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per latents file")
    p.add_argument("--flip", action="store_true", help="also save the latents of the horizontally flipped images")
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before anything is built or written: a bad one is one `error:` line, exit status 2."""
    runs.check_files(args, "ckpt", url=True)
    target = stats_file(args.ckpt)
    if target != args.ckpt and os.path.exists(target):
        runs.error(f"--ckpt {args.ckpt}: its statistics would go into a copy, {target}, which exists already; give "
                   f"that file as --ckpt, or run elsewhere")
    runs.check_encoder_ckpt(args)
    runs.check_min(args, 1, "limit", "batch_size", "shard_size")
    runs.check_min(args, 0, "num_workers")
    runs.check_im(args.im)
    if args.save_latents and os.path.exists(args.save_latents) and not os.path.isdir(args.save_latents):
        runs.error(f"--save-latents {args.save_latents!r} is a file, not a folder")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = runs.setup_distributed()
    try:
        with runs.input_errors():  # the data first: a wrong folder is found before the checkpoint is read
            dataset = data.load_split(args.data, args.split, args.im, limit=args.limit)
            model = SSDD.from_checkpoint(args.ckpt, encoder=args.encoder_ckpt)
            check_image_size(args.im, args.im, model.factor)
        target = stats_file(args.ckpt)
        runs.check_writable(os.path.dirname(os.path.abspath(target)), "--ckpt")  # the statistics go there
        out = args.save_latents
        # shard k: images [k * shard_size, (k + 1) * shard_size), computed by rank k % world
        num_shards = math.ceil(len(dataset) / args.shard_size)
        shards = {k: list(range(k * args.shard_size, min((k + 1) * args.shard_size, len(dataset))))
                  for k in range(rank, num_shards, world)}
        names = [f"latents-{k:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
        path = lambda k: os.path.join(out, names[k])
        summary = (0, 0.0, 0.0)
        if out:
            classes, paths, labels = image_labels(dataset)
            root = os.path.abspath(dataset.root) if isinstance(dataset, data.ImageFolder) else "synthetic"
            settings = dict(encoder_sha256=encoder_sha256(model), root=root, im=args.im, images=len(dataset),
                            paths_sha256=hashlib.sha256("\n".join(paths).encode()).hexdigest(),
                            shard_size=args.shard_size, flip=args.flip)
            metadata_now = {k: json.dumps(v) for k, v in settings.items()}  # safetensors metadata holds strings
            with runs.input_errors():
                os.makedirs(out, exist_ok=True)
                runs.check_writable(out, "--save-latents")
                for k in [k for k in finished_shards(out, names, metadata_now) if k in shards]:
                    summary = merge(summary, summarize(load_safetensors(path(k))[0]["latents"]))
                    del shards[k]
            for k in shards:  # what a killed run was writing
                for tmp in glob.glob(glob.escape(path(k)) + ".tmp*"):
                    os.remove(tmp)
        model.to(device)
        with runs.io_errors():  # an unreadable image (never replaced by another), latents not finite, a failed write
            for k, latents in encode_shards(model, dataset, shards, args.batch_size, device, args.num_workers,
                                            args.flip, progress=rank == 0):
                summary = merge(summary, summarize(latents["latents"]))
                if out:
                    idx = torch.tensor(shards[k])
                    save_safetensors(dict(latents, labels=labels[idx], indices=idx), path(k), metadata_now)
        mean, std, n = combine(summary)
        check_stats(mean, std, n, target)
        if rank == 0:
            with runs.io_errors():
                write_stats(checkpoint_file(args.ckpt), target, mean, std)  # the download is cached: no second one
            print(f"latent mean {mean:.6g}, std {std:.6g} over {n} elements of {len(dataset)} images; "
                  f"written into {target}")
            if out:
                index = dict(checkpoint=os.path.abspath(target), **settings, latent_mean=mean, latent_std=std,
                             classes=classes, shards=names, paths=paths, labels=labels.tolist())
                with runs.io_errors():
                    write_durably(os.path.join(out, "index.json"), lambda f: json.dump(index, f), "w")
                print(f"latents of {len(dataset)} images in {num_shards} shards and index.json in {out}")
        runs.barrier()
    finally:
        runs.cleanup_distributed()
    return mean, std


if __name__ == "__main__":
    main()
