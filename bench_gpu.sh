#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run: full-recipe training of M at 256 px, batch 32, and at
# 128 px, batch 64 (LPIPS-VGG and REPA on, compiled, bf16, torchrun), then one-step decode/encode throughput of the M decoder at 256 px,
# compiled (with a kernel profile) and eager. Needs no download: the networks of the losses and of
# FID get random stand-in weights in the torch hub cache, under the names the code looks for. Their compute
# is the real one; the losses they give mean nothing.
#   usage: bash bench_gpu.sh [LOGDIR]
set -u
log=${1:-bench_logs}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

python3 - <<'PY' || exit 1
import os, torch, torchvision
import fid, losses
from model import SSDD
d = os.path.join(torch.hub.get_dir(), "checkpoints")
os.makedirs(d, exist_ok=True)
torch.save(torchvision.models.vgg16().state_dict(), os.path.join(d, os.path.basename(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url)))
torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
           os.path.join(d, f"lpips_v0.1_vgg-{fid.LPIPS_HEADS_SHA256['vgg'][:10]}.pth"))
torch.save(losses.DINOv2().state_dict(), os.path.join(d, os.path.basename(losses.DINOV2_URL)))
torch.save(fid.InceptionV3().state_dict(), os.path.join(d, os.path.basename(fid.INCEPTION_URL)))
SSDD("f8c4", "S").save("/tmp/encoder.safetensors")  # stand-in for the frozen shared encoder of stage 1
PY

for run in "256 32" "128 64"; do  # resolution, batch
    read -r im batch <<< "$run"
    torchrun --standalone --nproc_per_node 1 train_ae.py --data synthetic --limit 4000 --num-workers 14 --size M \
        --encoder-ckpt /tmp/encoder.safetensors --im "$im" --batch-size "$batch" --max-steps 60 --log-every 20 \
        --eval-every 1000000 --eval-images 64 --ckpt-every 1000000 --run-dir "/tmp/bench_m$im" > "$log/train_m$im.out" 2>&1
    cp "/tmp/bench_m$im/log.jsonl" "$log/train_m$im.jsonl" && cut -c1-300 "$log/train_m$im.jsonl"
done
python3 model.py --size M --im 256 --batch 64 --steps 1 --iters 20 --compile --profile | tee "$log/decode_compiled.txt" | tail -1
python3 model.py --size M --im 256 --batch 64 --steps 1 --iters 10 | tee "$log/decode_eager.txt"
