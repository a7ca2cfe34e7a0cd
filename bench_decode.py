"""Decode throughput of SSDD against the SD-VAE decoder, on random weights (speed does not depend on them).

    python bench_decode.py --size S M --im 256 --batch 64 --compile

For each SSDD size: one-step (or --steps) decoding of a batch of latents, then the SD-VAE ("kl-f8") decoder
of diffusers' AutoencoderKL on the same latents, batch, resolution, dtype and compile setting, and the ratio
of their images/s. Compare ratios measured in one run on one machine, not absolute numbers across machines.
diffusers is needed here only (requirements-test.txt).
"""
import argparse
import time

import torch
from diffusers import AutoencoderKL

from model import DECODER_SIZES, SSDD

p = argparse.ArgumentParser(description="SSDD vs SD-VAE decode throughput")
p.add_argument("--size", nargs="+", default=["S", "M"], choices=list(DECODER_SIZES))
p.add_argument("--im", type=int, default=256)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--steps", type=int, default=1)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation happens there)")
p.add_argument("--compile", action="store_true")
p.add_argument("--channels-last", action="store_true")
p.add_argument("--profile", action="store_true", help="print the kernels that take SSDD's decode time")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
dev = torch.device(args.device)
autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
x = torch.rand(args.batch, 3, args.im, args.im, device=dev) * 2 - 1
if args.channels_last:
    x = x.contiguous(memory_format=torch.channels_last)


def prepare(net):
    net = net.to(dev).eval()
    return net.to(memory_format=torch.channels_last) if args.channels_last else net


def timed(fn):
    """(output, images/s) of fn over args.iters calls after the warm-up calls; peak memory counts from there."""
    with torch.no_grad(), torch.autocast(**autocast):
        for _ in range(args.warmup):
            out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.iters):
            out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return out, args.batch * args.iters / (time.perf_counter() - start)


# the SD-VAE configuration (stabilityai/sd-vae-ft-mse); its decoder alone is timed
vae = prepare(AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256))
if args.compile:
    vae.decoder = torch.compile(vae.decoder)
where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
setting = (f"{args.im}px batch {args.batch} {'bf16 autocast' if autocast['enabled'] else 'float32'} "
           f"{'compiled' if args.compile else 'eager'}{' channels-last' if args.channels_last else ''} on {where}")
print(f"torch {torch.__version__}, {setting}, {args.iters} timed calls after {args.warmup} warm-up calls")

z = None
for size in args.size:
    m = prepare(SSDD("f8c4", size))
    if args.compile:
        m.encoder, m.decoder = torch.compile(m.encoder), torch.compile(m.decoder)
    if z is None:  # the encoder is the same for every decoder size
        z, enc_speed = timed(lambda: m.encode(x))
        print(f"SSDD f8c4 encode {enc_speed:.2f} img/s")
    _, speed = timed(lambda: m.decode(z, steps=args.steps))
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""
    if args.profile:
        with torch.profiler.profile() as prof, torch.no_grad(), torch.autocast(**autocast):
            m.decode(z, steps=args.steps)
        sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    _, vae_speed = timed(lambda: vae.decode(z).sample)
    print(f"SSDD-{size} decode ({args.steps} step(s)) {speed:.2f} img/s{mem}; SD-VAE decode {vae_speed:.2f} img/s; "
          f"SSDD-{size} / SD-VAE = {speed / vae_speed:.2f}")
