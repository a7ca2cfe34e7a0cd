#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run: full-recipe training of M at 256 px, batch 32, and at
# 128 px, batch 64 (LPIPS-VGG and REPA on, compiled, bf16, torchrun), then encoding and one-step decoding of
# the S and M decoders against the SD-VAE decoder at 256 px, compiled (with a kernel profile) and eager.
# Needs no download: the networks of the losses and of FID get random stand-in weights, passed as local files.
# Their compute is the real one; the losses they give mean nothing. The decode benchmark needs diffusers
# (requirements-test.txt) for the SD-VAE decoder.
#   usage: bash bench_gpu.sh [LOGDIR]
set -u
log=${1:-bench_logs}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

w=/tmp/bench_weights
mkdir -p "$w"
python3 - "$w" <<'PY' || exit 1
import os, sys, torch, torchvision
import fid, losses
from model import SSDD
w = sys.argv[1]
torch.save(torchvision.models.vgg16().state_dict(), f"{w}/vgg16.pth")
torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}, f"{w}/vgg.pth")
torch.save(losses.DINOv2().state_dict(), f"{w}/dinov2_vitb14.pth")
torch.save(fid.InceptionV3().state_dict(), f"{w}/inception.pth")
SSDD("f8c4", "S").save(f"{w}/encoder.safetensors")  # stand-in for the frozen shared encoder of stage 1
PY

for run in "256 32" "128 64"; do  # resolution, batch
    read -r im batch <<< "$run"
    rm -rf "/tmp/bench_m$im"
    torchrun --standalone --nproc_per_node 1 train_ae.py --data synthetic --limit 4000 --num-workers 14 --size M \
        --encoder-ckpt "$w/encoder.safetensors" --lpips-backbone "$w/vgg16.pth" --lpips-heads "$w/vgg.pth" \
        --dinov2-weights "$w/dinov2_vitb14.pth" --fid-weights "$w/inception.pth" --im "$im" --batch-size "$batch" --max-steps 60 --log-every 20 \
        --eval-every 1000000 --eval-images 64 --ckpt-every 1000000 --run-dir "/tmp/bench_m$im" > "$log/train_m$im.out" 2>&1
    cp "/tmp/bench_m$im/log.jsonl" "$log/train_m$im.jsonl" && cut -c1-300 "$log/train_m$im.jsonl"
done
python3 bench_decode.py --size S M --im 256 --batch 64 --steps 1 --iters 20 --compile --profile | tee "$log/decode_compiled.txt" | grep -E "^(torch|SSDD)"
python3 bench_decode.py --size S M --im 256 --batch 64 --steps 1 --iters 10 | tee "$log/decode_eager.txt"
