"""Distill a trained SSDD into a single-step decoder (arXiv 2510.04961), on raw DDP.

    python distill.py --teacher runs/tiny/ema.safetensors --data synthetic --im 64 --batch-size 8 --max-steps 100 \
        --lpips-weight 0 --repa-weight 0    # no downloads: runs anywhere
    torchrun --nproc_per_node 8 distill.py --teacher runs/m256/ema.safetensors --data /imagenet --im 256

The teacher (the trained model's EMA weights, frozen) encodes each batch to its latent mean z, draws noise e
and integrates its N-step Euler sampler from e to x_T. The student starts as a copy of the teacher and is
trained at t = 1 on the same e and z, so its one-step output e + D(e, 1, z) regresses onto x_T:
    L = MSE(v_hat, x_T - e) + 0.5 LPIPS_vgg(e + v_hat, x_T) + 0.25 REPA(real image).
Only the decoder (and the REPA head) learns: the student keeps the teacher's encoder, so its latents are the
teacher's and it can replace the teacher's decoder as it is. Data, optimizer, EMA, validation and the run
directory are train_ae.py's (data.py, optim.py, runs.py). The saved models decode in one step by default.
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
    p.add_argument("--teacher", required=True, help="SSDD .safetensors to distill (train_ae.py's ema.safetensors)")
    p.add_argument("--teacher-steps", type=int, default=7, help="Euler steps of the teacher's samples")
    p.add_argument("--im", type=int, default=256, help="resolution, that of the teacher's last training stage")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--run-dir", default=None, help="default runs/distill-<date-time> (kept across torchrun's "
                   "restarts); an existing run dir resumes")
    runs.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = runs.setup_distributed()
    try:
        distill(args, rank, world, device)
    finally:
        runs.cleanup_distributed()


def distill(args, rank, world, device):
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if not os.path.isfile(args.teacher):
        raise SystemExit(f"error: teacher checkpoint {args.teacher!r} does not exist")
    if args.teacher_steps < 1:
        raise SystemExit(f"error: --teacher-steps must be at least 1, got {args.teacher_steps}")
    local_batch = args.batch_size // world
    cuda = device.type == "cuda"
    if cuda:
        torch._inductor.config.force_layout_optimization = True  # see train_ae.py
    run_dir, state_path, state = runs.open_run_dir(args.run_dir, "distill-", rank)

    # data
    train_set = data.load_split(args.data, "train", args.im, train=True, aug_scale=args.aug_scale, limit=args.limit,
                                seed=args.seed)
    val_set = data.load_split(args.data, "val", args.im, limit=args.limit)
    if len(train_set) < args.batch_size:
        raise SystemExit(f"error: {len(train_set)} training images, fewer than one batch of {args.batch_size}")
    loader, sampler = data.train_loader(train_set, local_batch, rank, world, args.seed, args.num_workers)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)

    # teacher, student (a copy of the teacher), EMA, optimizer; the seed makes the REPA head equal on every rank
    try:
        teacher = SSDD.from_checkpoint(args.teacher, device).requires_grad_(False)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(args.seed)
    student = SSDD.from_checkpoint(args.teacher)
    student.default_steps = 1
    raw = losses.TrainingLoss(student, train_encoder=False, repa=args.repa_weight > 0).to(device)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = optim.RAdamScheduleFree(optim.param_groups(raw.named_parameters(), optim.WEIGHT_DECAY), lr=args.lr)
    step, best_rfid = 0, math.inf
    if state is not None:
        step, best_rfid = runs.restore_training_state(state, raw, ema, optimizer, args, run_dir, rank)
        del state
    optimizer.train()
    weights = dict(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight)

    # the frozen networks of the losses, and the FID Inception for validation
    lpips, dino = losses.loss_networks(args.lpips_weight, args.repa_weight, args.dinov2_weights, device)
    inception = runs.load_inception_or_none(args.fid_weights, device, rank)

    image_shape = (3, args.im, args.im)
    latent_shape = (student.decoder.z_channels, args.im // student.factor, args.im // student.factor)
    grid = args.im // 8  # the decoder's transformer works at 1/8 resolution
    model = raw
    if cuda if args.compile is None else args.compile:
        model = torch.compile(model)
        lpips = torch.compile(lpips) if lpips is not None else None
        dino = torch.compile(dino) if dino is not None else None
        teacher.encoder, teacher.decoder = torch.compile(teacher.encoder), torch.compile(teacher.decoder)
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        print(f"distilling {args.teacher} ({args.teacher_steps} steps) into one step: {len(train_set)} training / "
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
            # train_ae's per-sample noise (independent of the number of ranks, repeated on resume); t and the
            # posterior noise are unused: t is 1 and z the teacher's mean
            _, noise, _ = losses.step_noise(args.seed, step, args.batch_size, image_shape, latent_shape, rank, world, device)
            with runs.autocast(device):
                with torch.no_grad():
                    z = teacher.encode(x)
                    x_T = teacher.decode(z, steps=args.teacher_steps, noise=noise)
                    target = dino(losses.dinov2_input(x, grid)) if dino is not None else None
                # at t = 1 the decoder input is exactly the noise, the target velocity x_T - e, x0_hat = e + v_hat
                terms, out = model(x_T, torch.ones(len(x), device=device), noise, z=z, dino_tokens=target)
                if lpips is not None:
                    terms["lpips"] = lpips(out["x0_hat"], x_T).float().mean()
            loss = sum(weights[k] * v for k, v in terms.items())
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.GRAD_CLIP)
            runs.stop_unless_finite(loss, grad_norm, terms, step, state_path)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            optim.update_ema(ema, student, optimizer, optim.EMA_DECAY if step > args.ema_start else 0.0)
            window.add(dict(loss=loss, grad_norm=grad_norm, **terms), time.time() - t0)  # .item() above synchronised
            pbar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                record = window.record(step, steps_per_epoch, optimizer.param_groups[0]["scheduled_lr"], args.batch_size)
                log(record)
                pbar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
            if step % args.eval_every == 0 or step == total_steps:  # the EMA student, in one step (its default)
                best_rfid = runs.validate(ema, val_set, args, local_batch, device, inception, run_dir, step, best_rfid,
                                          rank, log, teacher=args.teacher)
            if step % args.ckpt_every == 0 or step == total_steps:
                runs.save_checkpoint(run_dir, step, best_rfid, args, raw, ema, optimizer, rank, log, teacher=args.teacher)
            t0 = time.time()  # throughput counts distillation steps (teacher sampling included), not eval or checkpoints
            if step >= total_steps:
                break
    pbar.close()
    log.close()
    if rank == 0:
        print(f"done: {step} steps, one-step weights in {os.path.join(run_dir, 'ema.safetensors')}")


if __name__ == "__main__":
    main()
