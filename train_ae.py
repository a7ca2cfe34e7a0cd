"""Train an SSDD autoencoder with the official recipe (arXiv 2510.04961), on raw DDP.

    python train_ae.py --data synthetic --size S --im 64 --batch-size 8 --train-encoder --max-steps 200 \
        --lpips-weight 0 --repa-weight 0    # no downloads: runs anywhere
    torchrun --standalone --nproc_per_node 8 train_ae.py --data /imagenet --size M --im 256 \
        --init runs/m128/ema.safetensors --lr 1e-4 --epochs 100

Stages of the recipe (the authors' update of 2025-11-12): 0) encoder + M decoder jointly (--train-encoder,
--lr 1e-4, --aug-scale 2); 1) each decoder size at 128 px on the frozen shared encoder (--encoder-ckpt),
--aug-scale 2, lr 8e-4 (3e-4 for H, XH and G), 300 epochs; 2) finetune at 128/256/512 from stage 1's last
EMA weights (--init .../ema.safetensors, --lr 1e-4, 100 epochs, no scale augmentation). The loss (losses.py) is
    L = MSE(v_hat, x - e) + 0.5 LPIPS_vgg(x0_hat, x) + 0.25 REPA + 1e-6 KL (KL only when the encoder trains),
optimised by schedule-free RAdam with an EMA of its averaged weights (optim.py), the gradients of the model
and of the REPA head clipped separately; --gan adds the paper's GAN ablation. --grad-accum (micro-batches)
and --checkpoint-activations fit a step in less GPU memory without changing the training. The run directory
(runs.py) holds state.pt (rerunning with the same --run-dir resumes exactly), ema.safetensors,
best.safetensors, the REPA head beside each (*.repa.safetensors, which --init picks up), args.json,
log.jsonl and sample grids.
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
import weights
from model import SSDD, decoder_spec, encoder_weights, parse_encoder_name

# Periodic validation as the official loop runs it: every 4 epochs, with its sampler's default of 12 Euler steps.
# A validated image (12 decoder evaluations and the encoder) costs about 3 trained ones (the decoder's forward
# and backward passes, the encoder, DINOv2 and LPIPS: about 4 decoder evaluations).
EVAL_EPOCHS, EVAL_STEPS, EVAL_COST = 4, 12, 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="M", help="decoder size XS|S|B|M|L|XL|H|XH|G, or a JSON dict of "
                   "widths/depth/heads for a custom (e.g. tiny test) decoder")
    p.add_argument("--encoder", default="f8c4")
    p.add_argument("--im", type=int, default=128, help="training resolution")
    p.add_argument("--lr", type=float, default=8e-4, help="8e-4 in stage 1 (3e-4 for H, XH and G), 1e-4 when "
                   "training the encoder and in finetuning")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--train-encoder", action="store_true", help="train the encoder too (KL term on)")
    p.add_argument("--encoder-ckpt", default=None, help="SSDD .safetensors whose encoder is used (frozen unless "
                   "--train-encoder), or an SD-VAE .safetensors (either layout; 'sd-vae-ft-mse' downloads the public "
                   "one) for a decoder on the SD-VAE latent space; a path, an https:// URL or a published name. With "
                   "--init, the encoder put in front of its decoder (needed when the file holds only a decoder)")
    p.add_argument("--init", default=None, help="SSDD .safetensors to start from (stage 2, finetuning: stage 1's "
                   "ema.safetensors), with the REPA head saved beside it when there is one; a path, an https:// "
                   "URL or a published name such as F8C4_M_256")
    p.add_argument("--run-dir", default=None, help="default runs/<date-time> (kept across torchrun's restarts); "
                   "one holding state.pt resumes; one with other files but no state.pt is refused")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    runs.add_run_args(p)
    return p.parse_args(argv)


def decoder_size(size):
    """--size: a name, or a JSON dict for a custom decoder."""
    return json.loads(size) if size.lstrip().startswith("{") else size


def check_args(args):
    """Every argument, before anything is built or written: a bad one is one `error:` line, exit status 2."""
    runs.check_run_args(args)
    try:
        factor, _ = parse_encoder_name(args.encoder)
    except ValueError as e:
        runs.error(f"--encoder: {e}")
    try:
        decoder_spec(decoder_size(args.size))
    except ValueError as e:  # json.JSONDecodeError too
        runs.error(f"--size: {e}")
    runs.check_im(args.im, factor)
    runs.check_files(args, "init", url=True)
    runs.check_encoder_ckpt(args)
    if not (args.train_encoder or args.encoder_ckpt or args.init):
        runs.error("give --encoder-ckpt (a trained encoder to freeze), --init, or --train-encoder")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    train(args, *runs.setup_distributed())
    runs.cleanup_distributed()


def train(args, rank, world, device):
    local_batch, accum = args.batch_size // world, args.grad_accum  # each step: accum micro-batches per rank
    cuda = device.type == "cuda"
    args.precision = args.precision or metrics.default_precision(device)
    if cuda:
        # Inductor keeps training graphs NCHW when a 3x3 conv has out_channels * 2 <= in_channels (the up
        # blocks' conv1 on concatenated skips), so cuDNN converts to NHWC and back around every convolution;
        # forcing its channels-last layout makes the M step 7% faster (H200, BENCHMARKS.md)
        torch._inductor.config.force_layout_optimization = True

    # data, and whether a step fits in memory: checked before the run directory is made
    train_set, val_set, steps_per_epoch, total_steps = runs.training_data(args, EVAL_EPOCHS, EVAL_COST)
    runs.check_memory(dict(encoder=args.encoder, decoder=decoder_size(args.size)), args, local_batch, device,
                      args.train_encoder)
    run_dir, state_path, state = runs.open_run_dir(args.run_dir, "", rank)

    # model, EMA, optimizer; the same seed on every rank gives the same initial weights
    torch.manual_seed(args.seed)
    ssdd = SSDD(args.encoder, decoder_size(args.size))
    ssdd.decoder.checkpoint_activations = args.checkpoint_activations
    raw = losses.TrainingLoss(ssdd, args.train_encoder, repa=args.repa_weight > 0).to(device)
    with runs.input_errors():
        if state is None and args.init:  # an earlier stage's weights and REPA head; --encoder-ckpt's encoder if given
            weights.load_into(ssdd, SSDD.from_checkpoint(args.init, encoder=args.encoder_ckpt).state_dict(), args.init)
            runs.load_repa_head(raw, args.init, rank)
        elif state is None and args.encoder_ckpt:
            # an SSDD checkpoint's encoder, or an SD-VAE file's: the same architecture as f8c4
            weights.load_into(ssdd.encoder, encoder_weights(args.encoder_ckpt), args.encoder_ckpt)
    ema = copy.deepcopy(ssdd).eval().requires_grad_(False)
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
    loss_weights = dict(fm=1.0, lpips=args.lpips_weight, repa=args.repa_weight, kl=args.kl_weight)

    # the frozen networks of the losses, and the FID Inception for validation
    with runs.input_errors():
        lpips, dino = losses.loss_networks(args.lpips_weight, args.repa_weight, args.dinov2_weights, device,
                                           args.lpips_backbone, args.lpips_heads)
        inception = runs.load_inception_or_none(args.fid_weights, device, rank)

    image_shape = (3, args.im, args.im)
    latent_shape = (ssdd.decoder.z_channels, args.im // ssdd.factor, args.im // ssdd.factor)
    grid = args.im // 8  # the decoder's transformer works at 1/8 resolution
    flops = peak = None
    if cuda:
        flops = runs.train_flops_per_image(raw, lpips, dino, image_shape, latent_shape, device)
        peak = next((v for k, v in runs.PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    model, lpips, dino, critic_model = runs.compile_and_wrap(raw, lpips, dino, critic, args.compile, device)

    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        print(f"{sum(p.numel() for p in ssdd.parameters()) / 2**20:.1f}M parameters, {len(train_set)} training / "
              f"{len(val_set)} validation images{val_set.note}, {steps_per_epoch} steps per epoch, "
              f"{total_steps} steps, run dir {run_dir}")
    log = runs.RunLog(run_dir, rank, step)
    window = runs.LogWindow(device)
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    model.train()
    for batch in data.batches(train_set, local_batch, rank, world, args.seed, args.num_workers, step, steps_per_epoch,
                              total_steps):
        # this rank's share of global batch `step` and its noise, drawn per image; then run in accum micro-batches
        t, noise, z_noise = losses.step_noise(args.seed, step, args.batch_size, image_shape, latent_shape, rank,
                                              world, device)
        gan_on = step >= args.gan_start  # before it the GAN's losses weigh 0: the critic steps on a zero loss
        step_weights = dict(loss_weights, gan=args.gan_weight * gan_on)
        logged, fakes = {}, []
        for i, micro in enumerate(zip(*(v.chunk(accum) for v in (batch, t, noise, z_noise)))):
            x, t_i, noise_i, z_noise_i = micro
            x = x.to(device, non_blocking=True)
            with runs.gradient_sync(model, i == accum - 1):
                with metrics.autocast(device, args.precision):
                    with torch.no_grad():
                        target = dino(losses.dinov2_input(x, grid)) if dino is not None else None
                    terms, out = model(x, t_i, noise_i, z_noise_i, dino_tokens=target)
                    if lpips is not None:
                        terms["lpips"] = lpips(out["x0_hat"], x).float().mean()
                    if critic is not None:
                        critic.train(i == 0)  # its spectral norms' power iteration once per step, whatever accum
                        terms["gan"] = losses.generator_gan_loss(critic, out["x0_hat"], out["x_t"], t_i)
                        fakes.append((x, out["x0_hat"].detach(), out["x_t"].detach(), t_i))
                loss = sum(step_weights[k] * v for k, v in terms.items())
                (loss / accum).backward()  # equal micro-batches: the gradient of the global batch's mean
            for k, v in dict(loss=loss, **terms).items():
                logged[k] = logged.get(k, 0) + v.detach() / accum
        norms = raw.clip_grad_norms()  # the SSDD model's and the REPA head's, each clipped on its own
        for i, (x, fake, x_t, t_i) in enumerate(fakes):  # the critic's own term, against the dataset's images
            with runs.gradient_sync(critic_model, i == accum - 1):
                critic.train(i == 0)
                term = losses.critic_gan_loss(critic_model, x, fake, x_t, t_i)
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
        optim.update_ema(ema, ssdd, optimizer, optim.ema_decay(step, args.ema_start))
        window.add(logged, time.time() - t0)  # .item() above synchronised
        pbar.update(1)

        if step % args.log_every == 0 or step == total_steps:
            record = window.record(step, steps_per_epoch, optimizer.param_groups[0]["scheduled_lr"], args.batch_size)
            if peak:
                record["mfu"] = flops * record["img_per_s"] / (world * peak)
            log(record)
            pbar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
        if step % args.eval_every == 0 or step == total_steps:
            best_rfid = runs.validate(ema, val_set, args, local_batch // accum, device, inception, run_dir, step,
                                      best_rfid, rank, log, EVAL_STEPS, runs.repa_head_weights(raw, optimizer))
        if step % args.ckpt_every == 0 or step == total_steps:
            runs.save_checkpoint(run_dir, step, best_rfid, args, raw, ema, optimizer, rank, log, critic,
                                 critic_optimizer)
        t0 = time.time()  # throughput counts training steps (data loading included), not eval or checkpoints
    pbar.close()
    log.close()
    if rank == 0:
        print(f"done: {step} steps, weights in {os.path.join(run_dir, 'ema.safetensors')}")


if __name__ == "__main__":
    main()
