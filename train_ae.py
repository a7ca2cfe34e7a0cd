"""Train an SSDD autoencoder with the official recipe (arXiv 2510.04961), on raw DDP.

    python train_ae.py --data synthetic --size S --im 64 --batch-size 8 --train-encoder --max-steps 200 \
        --lpips-weight 0 --repa-weight 0    # no downloads: runs anywhere
    torchrun --nproc_per_node 8 train_ae.py --data /imagenet --size M --im 256 --init runs/m128/ema.safetensors

Stages of the recipe: 0) encoder + M decoder jointly (--train-encoder, --lr 1e-4); 1) each decoder size at
128 px on the frozen shared encoder (--encoder-ckpt), --aug-scale 2, 300 epochs; 2) finetune at 128/256/512
(--init, --lr 1e-4, 200 epochs). The loss (losses.py) is
    L = MSE(v_hat, x - e) + 0.5 LPIPS_vgg(x0_hat, x) + 0.25 REPA + 1e-6 KL (KL only when the encoder trains),
optimised by schedule-free RAdam with an EMA of its averaged weights (optim.py); --gan adds the paper's
PatchGAN ablation. The run directory (runs.py) holds state.pt (rerunning with the same --run-dir resumes
exactly), ema.safetensors, best.safetensors, args.json, log.jsonl and sample grids.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import losses
import optim
import runs
from model import SSDD


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
    runs.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = runs.setup_distributed()
    try:
        train(args, rank, world, device)
    finally:
        runs.cleanup_distributed()


def train(args, rank, world, device):
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if not (args.train_encoder or args.encoder_ckpt or args.init):
        raise SystemExit("error: give --encoder-ckpt (a trained encoder to freeze), --init, or --train-encoder")
    local_batch = args.batch_size // world
    cuda = device.type == "cuda"
    if cuda:
        # Inductor keeps training graphs NCHW when a 3x3 conv has out_channels * 2 <= in_channels (the up
        # blocks' conv1 on concatenated skips), so cuDNN converts to NHWC and back around every convolution;
        # forcing its channels-last layout makes the M step 7% faster (H200, BENCHMARKS.md)
        torch._inductor.config.force_layout_optimization = True
    run_dir, state_path, state = runs.open_run_dir(args.run_dir, "", rank)

    # data
    train_set = data.load_split(args.data, "train", args.im, train=True, aug_scale=args.aug_scale, limit=args.limit,
                                seed=args.seed)
    val_set = data.load_split(args.data, "val", args.im, limit=args.limit)
    if len(train_set) < args.batch_size:
        raise SystemExit(f"error: {len(train_set)} training images, fewer than one batch of {args.batch_size}")
    loader, sampler = data.train_loader(train_set, local_batch, rank, world, args.seed, args.num_workers)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)

    # model, EMA, optimizer; the same seed on every rank gives the same initial weights
    torch.manual_seed(args.seed)
    ssdd = SSDD(args.encoder, json.loads(args.size) if args.size.lstrip().startswith("{") else args.size)
    if state is None and args.init:
        ssdd.load_state_dict(SSDD.from_checkpoint(args.init).state_dict())
    if state is None and args.encoder_ckpt:
        ssdd.encoder.load_state_dict(SSDD.from_checkpoint(args.encoder_ckpt).encoder.state_dict())
    raw = losses.TrainingLoss(ssdd, args.train_encoder, repa=args.repa_weight > 0).to(device)
    ema = copy.deepcopy(ssdd).eval().requires_grad_(False)
    optimizer = optim.RAdamScheduleFree(optim.param_groups(raw.named_parameters(), optim.WEIGHT_DECAY), lr=args.lr)
    critic = critic_optimizer = None
    if args.gan:  # Adam with betas (0.5, 0.9), the usual choice for such critics (the paper names none)
        critic = losses.PatchDiscriminator().to(device)
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=(0.5, 0.9))
    step, best_rfid = 0, math.inf
    if state is not None:
        step, best_rfid = runs.restore_training_state(state, raw, ema, optimizer, args, run_dir, rank)
        if critic is not None and "disc" in state:
            critic.load_state_dict(state["disc"])
            critic_optimizer.load_state_dict(state["disc_optimizer"])
        del state
    optimizer.train()
    weights = dict(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight, kl=args.kl_weight, gan=args.gan_weight)

    # the frozen networks of the losses, and the FID Inception for validation
    lpips, dino = losses.loss_networks(args.lpips_weight, args.repa_weight, args.dinov2_weights, device)
    inception = runs.load_inception_or_none(args.fid_weights, device, rank)

    image_shape = (3, args.im, args.im)
    latent_shape = (ssdd.decoder.z_channels, args.im // ssdd.factor, args.im // ssdd.factor)
    grid = args.im // 8  # the decoder's transformer works at 1/8 resolution
    flops = peak = None
    if cuda:
        flops = runs.train_flops_per_image(raw, lpips, dino, image_shape, latent_shape, device)
        peak = next((v for k, v in runs.PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    model, critic_model = raw, critic  # the critic is not compiled: it is frozen and unfrozen every step
    if cuda if args.compile is None else args.compile:
        model = torch.compile(model)
        lpips = torch.compile(lpips) if lpips is not None else None
        dino = torch.compile(dino) if dino is not None else None
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
        critic_model = DDP(critic, device_ids=[device.index] if cuda else None) if critic is not None else None
    params = [p for g in optimizer.param_groups for p in g["params"]]

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        print(f"{sum(p.numel() for p in ssdd.parameters()) / 2**20:.1f}M parameters, {len(train_set)} training / "
              f"{len(val_set)} validation images, {steps_per_epoch} steps per epoch, {total_steps} steps, run dir {run_dir}")
    log = runs.RunLog(run_dir, rank)
    window = runs.LogWindow(device)
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=offset * local_batch)
        train_set.epoch = epoch
        for x in loader:
            x = x.to(device, non_blocking=True)
            t, noise, z_noise = losses.step_noise(args.seed, step, args.batch_size, image_shape, latent_shape, rank,
                                                  world, device)
            gan_on = critic is not None and step >= args.gan_start
            with runs.autocast(device):
                with torch.no_grad():
                    target = dino(losses.dinov2_input(x, grid)) if dino is not None else None
                terms, out = model(x, t, noise, z_noise, dino_tokens=target)
                if lpips is not None:
                    terms["lpips"] = lpips(out["x0_hat"], x).float().mean()
                if gan_on:
                    terms["gan"] = losses.generator_gan_loss(critic, out["x0_hat"], out["x_t"], t)
            loss = sum(weights[k] * v for k, v in terms.items())
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.GRAD_CLIP)
            runs.stop_unless_finite(loss, grad_norm, terms, step, state_path)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if gan_on:  # the critic's step, after the model's
                with runs.autocast(device):
                    terms["critic"] = losses.critic_gan_loss(critic_model, x, out["x0_hat"], out["x_t"], t)
                terms["critic"].backward()
                critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), optim.GRAD_CLIP)
                runs.stop_unless_finite(terms["critic"], critic_grad_norm, terms, step, state_path)
                critic_optimizer.step()
                critic_optimizer.zero_grad(set_to_none=True)
            step += 1
            optim.update_ema(ema, ssdd, optimizer, optim.EMA_DECAY if step > args.ema_start else 0.0)
            window.add(dict(loss=loss, grad_norm=grad_norm, **terms), time.time() - t0)  # .item() above synchronised
            pbar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                record = window.record(step, steps_per_epoch, optimizer.param_groups[0]["scheduled_lr"], args.batch_size)
                if peak:
                    record["mfu"] = flops * record["img_per_s"] / (world * peak)
                log(record)
                pbar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
            if step % args.eval_every == 0 or step == total_steps:
                best_rfid = runs.validate(ema, val_set, args, local_batch, device, inception, run_dir, step, best_rfid,
                                          rank, log)
            if step % args.ckpt_every == 0 or step == total_steps:
                extra = dict(disc=critic.state_dict(), disc_optimizer=critic_optimizer.state_dict()) if critic else None
                runs.save_checkpoint(run_dir, step, best_rfid, args, raw, ema, optimizer, rank, log, extra_state=extra)
            t0 = time.time()  # throughput counts training steps (data loading included), not eval or checkpoints
            if step >= total_steps:
                break
    pbar.close()
    log.close()
    if rank == 0:
        print(f"done: {step} steps, weights in {os.path.join(run_dir, 'ema.safetensors')}")


if __name__ == "__main__":
    main()
