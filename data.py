"""Data: every image the repo reads (file discovery, the one image opener, folders for evaluation and FID
statistics), generated images, the train and eval crops, the one function that picks a split, and the
resumable distributed sampler. Imports no other module of the project.

Every random choice of a training sample (its scale, crop, flip) comes from a generator seeded by (seed,
epoch, index), so a sample is augmented the same way whatever the number of ranks or workers.
"""
import math
import os
import random
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


# ----------------------------------------------------------------------------------------------------------
# Image files: found, opened and checked the same way by every script

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


def find_images(root):
    """All image files under root, recursively, sorted; an error when there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist (or is not a folder)")
    paths = image_files(root)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return paths


class UnreadableImage(ValueError):
    """An image file that cannot be read. Its message stays one line when a DataLoader worker raised it: the
    loader raises UnreadableImage("Caught UnreadableImage in DataLoader worker process ...") of the worker's
    traceback, whose last line is the original message."""

    def __init__(self, message):
        if message.startswith("Caught UnreadableImage"):
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


# what Pillow raises for a file it cannot decode (DecompressionBombError: a header claiming over twice
# Image.MAX_IMAGE_PIXELS pixels)
PILLOW_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def unreadable(path, e):
    """The UnreadableImage of a Pillow error e about the file at path, on one line."""
    return UnreadableImage(f"cannot read image {path}: {' '.join(str(e).split())}")


def open_rgb(path):
    """The image file at path as an 8-bit RGB PIL image, the one way every script reads images; a file that
    cannot be read is an UnreadableImage naming it. 16-bit grayscale (Pillow's modes I;16 and I) is scaled
    to 8 bits as round(v / 257), where Pillow's own convert("RGB") clips it, turning all but the darkest 0.4%
    of a 0..65535 ramp white; float images (mode F) are taken to hold [0, 1]. Pillow decodes 16-bit colour
    PNGs to 8 bits itself, as v >> 8 (at most 1 below round(v / 257)); palette, gray + alpha, CMYK and the
    rest convert as Pillow does, alpha dropped."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                v = np.asarray(im, dtype=np.float64) * (255 if im.mode == "F" else 1 / 257)
                return Image.fromarray(np.clip(np.round(v), 0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except PILLOW_ERRORS as e:
        raise unreadable(path, e) from None


def load_image(path):
    """uint8 tensor (3, H, W) of the image file at path, as it is (no resize)."""
    return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)


def image_size(path):
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except PILLOW_ERRORS as e:
        raise unreadable(path, e) from None


def same_size_images(root, rank=0, world_size=1):
    """This rank's share of the image files under root (at least 2 in all, as a covariance needs), after
    checking that they can be opened and have the size of the first one, so that they batch as they are:
    the folders whose FID statistics fid.py computes."""
    files = image_files(root)
    if len(files) < 2:
        raise ValueError(f"found {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)}) under {root}: FID needs "
                         f"at least 2")
    size = image_size(files[0])
    for f in files[rank::world_size]:
        if image_size(f) != size:
            raise ValueError(f"{f} is {'x'.join(map(str, image_size(f)))} but {files[0]} is "
                             f"{'x'.join(map(str, size))}: the images of a folder must all have one size")
    return files[rank::world_size]


class ImageFiles(Dataset):
    """Image files as uint8 tensors (3, H, W), unchanged (load_image)."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i])


def default_workers():
    """Data loader processes per rank: the CPUs this process may use, shared by the ranks on this machine (a
    training image's decode and Lanczos resize keep a core busy: BENCHMARKS.md). More workers than CPUs only
    compete for them (and torch warns on every run)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


# ----------------------------------------------------------------------------------------------------------
# Datasets: the crops, image folders, generated images and splits


def train_crop(img, size, aug_scale, rng):
    """Short side resized (Lanczos) to a random length in [size, aug_scale * size), or to size when aug_scale is
    1 (no scale augmentation, the official default), then a random crop and a random flip. The resize is
    torchvision's (the long side truncated to an integer)."""
    short = rng.randrange(size, math.ceil(aug_scale * size)) if aug_scale > 1 else size
    img = TF.resize(img, short, InterpolationMode.LANCZOS)
    w, h = img.size
    left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def eval_crop(img, size):
    """Short side resized (bilinear) to size, center crop: torchvision's Resize(size) and CenterCrop(size), the
    usual ImageNet evaluation transform, pixel for pixel."""
    return TF.center_crop(TF.resize(img, size, InterpolationMode.BILINEAR), size)


def to_tensor(img):
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


class ImageDataset(Dataset):
    """Base of the image datasets: subclasses provide load(i) -> PIL RGB image. train=True augments."""

    def __init__(self, size, train, aug_scale=1.0, seed=0):
        self.size, self.train, self.aug_scale, self.seed = size, train, aug_scale, seed
        self.epoch = 0  # set by the training loop; workers are re-created each epoch and see it
        self.note = ""  # how the split was made, when that needs saying (held_out): printed by the scripts

    def __getitem__(self, i):
        img = self.load(i)
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 100_000_019 + i)
            return to_tensor(train_crop(img, self.size, self.aug_scale, rng))
        return to_tensor(eval_crop(img, self.size))


class ImageFolder(ImageDataset):
    """Image files. In training (train=True) an unreadable file is logged and replaced by the next readable
    one, so one bad file never stops a run halfway through an epoch; many in a row mean the folder is broken,
    and that raises. Evaluation never substitutes (a metric would count the next image twice): there an
    unreadable file is an UnreadableImage naming it."""

    MAX_CONSECUTIVE_FAILURES = 20

    def __init__(self, paths, size, train, aug_scale=1.0, seed=0, root=None):
        super().__init__(size, train, aug_scale, seed)
        self.paths, self.root = paths, root  # root: the folder the paths were found under

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        if not self.train:
            return open_rgb(self.paths[i])
        for k in range(min(self.MAX_CONSECUTIVE_FAILURES, len(self.paths))):
            try:
                return open_rgb(self.paths[(i + k) % len(self.paths)])
            except UnreadableImage as e:
                print(f"warning: skipping unreadable image ({e})", file=sys.stderr, flush=True)
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


def held_out(paths, split, root):
    """The training scripts' split of a folder without train/ and val/: 1 image in 100 in sorted path order (1
    in n // 2 of n < 200 images: at least one) is for validation and never trained on, so that the validation
    figures are of unseen images, spread over the folder (over all classes of an ImageNet train/). Returns
    (the split's paths, a note that says so)."""
    every = min(100, max(2, len(paths) // 2))
    if len(paths) < every:
        raise FileNotFoundError(f"only {len(paths)} image under {root!r}: none to hold out for validation (a "
                                f"folder without train/ and val/ gives 1 image in {every} to validation)")
    if split == "val":
        return paths[every - 1::every], (f" (1 in {every} of the images under {root}, held out of training: "
                                         f"it has no train/ and val/)")
    return [p for i, p in enumerate(paths) if (i + 1) % every], ""


def load_split(data, split, size, train=False, aug_scale=1.0, limit=None, seed=0, holdout=False):
    """The images of one split, as every script reads them. data: a folder searched recursively, its
    `split`/ subfolder when it has both train/ and val/ (as ImageNet does; otherwise every split is the
    folder itself), or 'synthetic'. train=True augments (train_crop) and replaces an unreadable image by the
    next one, else the eval crop, and an unreadable image is an error (ImageFolder). limit: keep only
    the first that many images in sorted path order, the rule of the paper's "ImageNet-5K" (the first 5,000
    ImageNet val images: classes 0-99). holdout: a folder without train/ and val/ is split by held_out
    (the training scripts), instead of being the whole of every split (evaluate.py, latent_stats.py)."""
    if data == "synthetic":
        if split == "train":
            return SyntheticImages(limit or 100_000, size, train, aug_scale, seed)
        return SyntheticImages(limit or 1_000, size, train, aug_scale, seed, offset=10**9)
    root = data
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "val")):
        root = os.path.join(data, split)
    paths, note = find_images(root), ""
    if holdout and root == data:
        paths, note = held_out(paths, split, root)
    if limit:
        paths = paths[:limit]
    dataset = ImageFolder(paths, size, train, aug_scale, seed, root=root)
    dataset.note = note
    return dataset


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


def batches(dataset, local_batch, rank, world_size, seed, workers, step, steps_per_epoch, total_steps):
    """This rank's batches of training steps step + 1 .. total_steps, epoch after epoch: a run resumed at
    `step` gets exactly the batches the uninterrupted run got (the epoch's order, and skipping its first
    offset batches)."""
    loader, sampler = train_loader(dataset, local_batch, rank, world_size, seed, workers)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=offset * local_batch)
        dataset.epoch = epoch
        for x in loader:
            yield x
            step += 1
            if step >= total_steps:
                return


def train_loader(dataset, local_batch, rank, world_size, seed, workers):
    """Loader over this rank's share of a shuffled epoch. Incomplete batches are dropped on every rank, so
    global batch i holds the same images whatever the number of ranks."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True)
    return loader, sampler

