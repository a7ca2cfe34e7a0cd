"""Distill a trained SSDD into a single-step decoder (arXiv 2510.04961), on raw DDP.

    python distill.py --teacher runs/tiny/ema.safetensors --data synthetic --im 64 --batch-size 8 --max-steps 100 \
        --lpips-weight 0 --repa-weight 0    # no downloads: runs anywhere
    torchrun --standalone --nproc_per_node 8 distill.py --teacher runs/m256/best.safetensors --data /imagenet --im 256

The teacher (the trained model's best EMA weights, frozen) encodes each batch to its latent mean z, draws
noise e and integrates its N-step Euler sampler (12 steps on its checkpoint's time grid, as the authors'
update of 2025-11-12 does) from e to x_T. The student starts as a copy of the teacher, with the REPA head
saved beside it (*.repa.safetensors) when there is one, and is trained at t = 1 on the same e and z, so its
one-step output e + D(e, 1, z) regresses onto x_T:
    L = MSE(v_hat, x_T - e) + 0.5 LPIPS_vgg(e + v_hat, x_T) + 0.25 REPA(real image),
plus, with --gan, the GAN losses (the critic's real images are the dataset's, as in the official loop). Only
the decoder (and the REPA head) learns: the student keeps the teacher's encoder, so its latents are the
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
from tqdm import tqdm

import data
import losses
import metrics
import optim
import runs
from model import SSDD

# Periodic validation as the official loop runs it for distillation: every epoch, in the student's one step. A
# validated image (one decoder evaluation and the encoder) costs about a tenth of a trained one (the teacher's
# 12 steps, the student's forward and backward passes, the encoder, DINOv2 and LPIPS).
EVAL_EPOCHS, EVAL_STEPS, EVAL_COST = 1, 1, 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="SSDD .safetensors to distill (train_ae.py's best.safetensors): "
                   "a path, an https:// URL or a published name such as F8C4_M_256")
    runs.add_encoder_ckpt_arg(p, "--teacher")
    p.add_argument("--teacher-steps", type=int, default=12, help="Euler steps of the teacher's samples (the first "
                   "release: 7)")
    p.add_argument("--teacher-time-power", type=float, default=None, help="time grid of the teacher's sampler "
                   "(default: the teacher checkpoint's, 2 in the authors' update; their first release used 4)")
    p.add_argument("--im", type=int, default=256, help="resolution, that of the teacher's last training stage")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--run-dir", default=None, help="default runs/distill-<date-time> (kept across torchrun's "
                   "restarts); one holding state.pt resumes; one with other files but no state.pt is refused")
    runs.add_run_args(p)
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before anything is built or written: a bad one is one `error:` line, exit status 2."""
    runs.check_run_args(args)
    runs.check_files(args, "teacher", url=True)
    runs.check_encoder_ckpt(args)
    runs.check_min(args, 1, "teacher_steps")
    runs.check_min(args, 0, "teacher_time_power", strict=True)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    distill(args, *runs.setup_distributed())
    runs.cleanup_distributed()


def distill(args, rank, world, device):
    local_batch, accum = args.batch_size // world, args.grad_accum  # each step: accum micro-batches per rank
    cuda = device.type == "cuda"
    args.precision = args.precision or metrics.default_precision(device)
    if cuda:
        torch._inductor.config.force_layout_optimization = True  # see train_ae.py

    # data, the teacher, and whether a step fits in memory: checked before the run directory is made
    train_set, val_set, steps_per_epoch, total_steps = runs.training_data(args, EVAL_EPOCHS, EVAL_COST)
    with runs.input_errors():
        teacher = SSDD.from_checkpoint(args.teacher, encoder=args.encoder_ckpt).requires_grad_(False)
    runs.check_im(args.im, teacher.factor)
    runs.check_memory(teacher.config, args, local_batch, device, train_encoder=False, teacher=True)
    run_dir, state_path, state = runs.open_run_dir(args.run_dir, "distill-", rank)

    # teacher, student (a copy of the teacher: the checkpoint is read once), EMA, optimizer; the seed makes the
    # REPA head equal on every rank
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.default_steps = 1
    student.decoder.checkpoint_activations = args.checkpoint_activations
    teacher.to(device)
    teacher.time_power = args.teacher_time_power or teacher.time_power
    torch.manual_seed(args.seed)
    raw = losses.TrainingLoss(student, train_encoder=False, repa=args.repa_weight > 0).to(device)
    if state is None:
        with runs.input_errors():
            runs.load_repa_head(raw, args.teacher, rank)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = optim.RAdamScheduleFree(optim.param_groups(raw.named_parameters(), args.weight_decay), lr=args.lr)
    critic = critic_optimizer = None
    if args.gan:
        critic, critic_optimizer = losses.new_critic(args.lr, args.weight_decay, device)
    step, best_rfid = 0, math.inf
    if state is not None:
        step, best_rfid = runs.restore_training_state(state, raw, ema, optimizer, args, run_dir, rank, critic,
                                                      critic_optimizer)
        del state
    optimizer.train()
    loss_weights = dict(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight)

    # the frozen networks of the losses, and the FID Inception for validation
    with runs.input_errors():
        lpips, dino = losses.loss_networks(args.lpips_weight, args.repa_weight, args.dinov2_weights, device,
                                           args.lpips_backbone, args.lpips_heads)
        inception = runs.load_inception_or_none(args.fid_weights, device, rank)

    image_shape = (3, args.im, args.im)
    latent_shape = (student.decoder.z_channels, args.im // student.factor, args.im // student.factor)
    grid = args.im // 8  # the decoder's transformer works at 1/8 resolution
    model, lpips, dino, critic_model = runs.compile_and_wrap(raw, lpips, dino, critic, args.compile, device)
    if runs.compile_enabled(args.compile, device):
        teacher.encoder, teacher.decoder = torch.compile(teacher.encoder), torch.compile(teacher.decoder)

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        print(f"distilling {args.teacher} ({args.teacher_steps} steps, time power {teacher.time_power:g}) into "
              f"one step: {len(train_set)} training / {len(val_set)} validation images{val_set.note}, "
              f"{steps_per_epoch} steps per epoch, {total_steps} steps, run dir {run_dir}")
    log = runs.RunLog(run_dir, rank, step)
    window = runs.LogWindow(device)
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    model.train()
    for batch in data.batches(train_set, local_batch, rank, world, args.seed, args.num_workers, step, steps_per_epoch,
                              total_steps):
        # train_ae's per-image noise (independent of the number of ranks and micro-batches, repeated on resume);
        # t and the posterior noise are unused: t is 1 and z the teacher's mean
        _, noise, _ = losses.step_noise(args.seed, step, args.batch_size, image_shape, latent_shape, rank, world,
                                        device)
        gan_on = step >= args.gan_start  # before it the GAN's losses weigh 0: the critic steps on a zero loss
        step_weights = dict(loss_weights, gan=args.gan_weight * gan_on)
        logged, fakes = {}, []
        for i, (x, noise_i) in enumerate(zip(batch.chunk(accum), noise.chunk(accum))):
            x = x.to(device, non_blocking=True)
            t = torch.ones(len(x), device=device)
            with runs.gradient_sync(model, i == accum - 1):
                with metrics.autocast(device, args.precision):
                    with torch.no_grad():
                        z = teacher.encode(x)
                        x_T = teacher.decode(z, steps=args.teacher_steps, noise=noise_i)
                        target = dino(losses.dinov2_input(x, grid)) if dino is not None else None
                    # at t = 1 the decoder input is exactly the noise, the target velocity x_T - e, and
                    # x0_hat = e + v_hat
                    terms, out = model(x_T, t, noise_i, z=z, dino_tokens=target)
                    if lpips is not None:
                        terms["lpips"] = lpips(out["x0_hat"], x_T).float().mean()
                    if critic is not None:
                        critic.train(i == 0)  # its spectral norms' power iteration once per step, whatever accum
                        terms["gan"] = losses.generator_gan_loss(critic, out["x0_hat"], out["x_t"], t)
                        fakes.append((x, out["x0_hat"].detach(), out["x_t"].detach(), t))
                loss = sum(step_weights[k] * v for k, v in terms.items())
                (loss / accum).backward()  # equal micro-batches: the gradient of the global batch's mean
            for k, v in dict(loss=loss, **terms).items():
                logged[k] = logged.get(k, 0) + v.detach() / accum
        norms = raw.clip_grad_norms()  # the student's and the REPA head's, each clipped on its own
        for i, (x, fake, x_t, t) in enumerate(fakes):  # the critic's own term, against the dataset's images
            with runs.gradient_sync(critic_model, i == accum - 1):
                critic.train(i == 0)
                term = losses.critic_gan_loss(critic_model, x, fake, x_t, t)
                (gan_on * term / accum).backward()  # added to the generator term's gradient
            logged["critic"] = logged.get("critic", 0) + term.detach() / accum
        if critic is not None:
            norms["critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic.parameters(), optim.GRAD_CLIP)
        logged.update(norms)
        runs.stop_unless_finite(logged, step, state_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if critic is not None:
            critic_optimizer.step()
            critic_optimizer.zero_grad(set_to_none=True)
        step += 1
        optim.update_ema(ema, student, optimizer, optim.ema_decay(step, args.ema_start))
        window.add(logged, time.time() - t0)  # .item() above synchronised
        pbar.update(1)

        if step % args.log_every == 0 or step == total_steps:
            record = window.record(step, steps_per_epoch, optimizer.param_groups[0]["scheduled_lr"], args.batch_size)
            log(record)
            pbar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
        if step % args.eval_every == 0 or step == total_steps:  # the EMA student
            best_rfid = runs.validate(ema, val_set, args, local_batch // accum, device, inception, run_dir, step,
                                      best_rfid, rank, log, EVAL_STEPS, runs.repa_head_weights(raw, optimizer),
                                      teacher=args.teacher)
        if step % args.ckpt_every == 0 or step == total_steps:
            runs.save_checkpoint(run_dir, step, best_rfid, args, raw, ema, optimizer, rank, log, critic,
                                 critic_optimizer, teacher=args.teacher)
        t0 = time.time()  # throughput counts distillation steps (teacher sampling included), not eval or checkpoints
    pbar.close()
    log.close()
    if rank == 0:
        print(f"done: {step} steps, one-step weights in {os.path.join(run_dir, 'ema.safetensors')}")


if __name__ == "__main__":
    main()
