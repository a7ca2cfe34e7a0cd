"""Run machinery shared by train_ae.py and distill.py (and the process setup of every script): torchrun / DDP
setup, the run directory with its atomic checkpoints and exact resume, the log, periodic validation.

A run directory holds state.pt (the full training state: tensors and plain Python values only, so it loads
with weights_only=True; rerunning with the same --run-dir resumes exactly), ema.safetensors (the EMA
weights in the official layout, for SSDD.from_checkpoint), best.safetensors (lowest validation rFID),
args.json, log.jsonl and PNG grids of originals above reconstructions in samples/.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torchvision.utils
from torch.utils.flop_counter import FlopCounterMode

import fid
import losses

# ----------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python script.py` is one process.


def setup_distributed():
    """Returns (rank, world_size, device). NCCL on GPUs, gloo on CPUs; TF32 on for CUDA matmuls and convs."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def stop_unless_finite(loss, grad_norm, terms, step, state_path):
    """Every rank stops (SystemExit) before the weights change when the loss or the gradient norm is not
    finite on some rank, so the last checkpoint stays the last good one."""
    bad = all_reduce((~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float(), dist.ReduceOp.MAX)
    if bad.item():
        raise SystemExit(f"error: non-finite loss or gradient at step {step + 1} "
                         f"({ {k: v.item() for k, v in terms.items()} }); stopping. The last good checkpoint "
                         f"{state_path} is intact: resume from it with a lower --lr.")


# ----------------------------------------------------------------------------------------------------------
# Arguments shared by the training scripts


def add_run_args(p):
    """The options of train_ae.py and distill.py read by the shared machinery here (data, loss networks,
    validation, checkpoints, logging)."""
    p.add_argument("--data", required=True, help="image folder (searched recursively; uses train/ and val/ when "
                   "both exist), or 'synthetic' for generated images")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--aug-scale", type=float, default=2.0, help="short side resized to [im, aug_scale * im)")
    p.add_argument("--lpips-weight", type=float, default=0.5)
    p.add_argument("--repa-weight", type=float, default=0.25)
    p.add_argument("--ema-start", type=int, default=50_000, help="EMA 0.999 from this step, a copy before")
    p.add_argument("--eval-every", type=int, default=10_000)
    p.add_argument("--eval-images", type=int, default=5_000, help="validation subset used by the periodic eval")
    p.add_argument("--ckpt-every", type=int, default=1_000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only N training and N validation images")
    p.add_argument("--num-workers", type=int, default=8, help="data loader processes per rank")
    p.add_argument("--dinov2-weights", default=None, help="local dinov2_vitb14_pretrain.pth (default: download)")
    p.add_argument("--fid-weights", default=None, help="local FID Inception weights (default: download)")


# ----------------------------------------------------------------------------------------------------------
# The run directory, checkpoints and resume


def default_run_dir(prefix):
    """runs/<prefix><date-time>. Under torchrun with --max-restarts the name is noted in
    runs/.torchrun-<prefix><rendezvous id>, and the workers torchrun restarts after a failure read it back, so
    that they resume the run instead of starting a new one; a fresh launch always starts a new run."""
    run_dir = os.path.join("runs", prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # "none" also for torchrun's static rendezvous
    if job == "none" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return run_dir
    note = os.path.join("runs", f".torchrun-{prefix}{job}")
    if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) > 0 and os.path.exists(note):
        with open(note) as f:
            return f.read()
    os.makedirs("runs", exist_ok=True)
    with open(note, "w") as f:
        f.write(run_dir)
    return run_dir


def open_run_dir(run_dir, prefix, rank):
    """Rank 0 names the run directory (default: default_run_dir), every rank uses it. Returns
    (run_dir, path of state.pt, the saved training state or None): an existing state.pt means resume."""
    run_dir = [run_dir or (default_run_dir(prefix) if rank == 0 else None)]
    if dist.is_initialized():
        dist.broadcast_object_list(run_dir, src=0)
    run_dir = run_dir[0]
    state_path = os.path.join(run_dir, "state.pt")
    if rank == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    barrier()
    state = torch.load(state_path, map_location="cpu", weights_only=True) if os.path.exists(state_path) else None
    if dist.is_initialized():  # a node that cannot see rank 0's files would train from another step
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, state and state["step"])
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks see different training states in {run_dir} (step per rank, None for "
                               f"none: {steps}); on several nodes the run dir must be on a shared filesystem")
    return run_dir, state_path, state


def restore_training_state(state, loss_model, ema, optimizer, args, run_dir, rank):
    """Load a saved state into the loss module (model and REPA head), the EMA and the optimizer; returns
    (step, best rFID) and says which arguments changed since the state was saved."""
    loss_model.ssdd.load_state_dict(state["model"])
    if loss_model.repa_loss is not None:
        loss_model.repa_loss.load_state_dict(state["repa_loss"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    changed = {k: (state["args"].get(k), v) for k, v in vars(args).items() if state["args"].get(k) != v}
    if rank == 0:
        print(f"resuming {run_dir} at step {state['step']}" + (f"; arguments changed (was, now): {changed}" if changed else ""))
    return state["step"], state["best_rfid"]


@torch.no_grad()
def replica_fingerprints(module):
    """(sum, sum of squares) of all parameters on every rank, shape (world_size, 2): rows are equal while
    the replicas hold the same weights."""
    params = [p.double() for p in module.parameters()]
    f = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    if not dist.is_initialized():
        return f[None]
    out = [torch.zeros_like(f) for _ in range(dist.get_world_size())]
    dist.all_gather(out, f)
    return torch.stack(out)


def save_checkpoint(run_dir, step, best_rfid, args, loss_model, ema, optimizer, rank, log, extra_state=None, **metadata):
    """The counterpart of restore_training_state (a collective call): check that every rank holds the same
    weights, then rank 0 writes state.pt (with extra_state, a dict of state dicts, merged in) and the EMA
    weights as ema.safetensors (with metadata), each to a temporary file renamed over the old one, so a
    crash never leaves a half-written checkpoint."""
    fingerprints = replica_fingerprints(loss_model)
    log(dict(step=step, replica_fingerprints=fingerprints.tolist()))
    if not (fingerprints == fingerprints[0]).all():
        raise SystemExit(f"error: the ranks' weights differ at step {step}: {fingerprints.tolist()}")
    if rank == 0:
        repa = {"repa_loss": loss_model.repa_loss.state_dict()} if loss_model.repa_loss else {}
        path = os.path.join(run_dir, "state.pt")
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(dict(step=step, best_rfid=best_rfid, args=vars(args), model=loss_model.ssdd.state_dict(),
                        ema=ema.state_dict(), optimizer=optimizer.state_dict(), **repa, **(extra_state or {})), tmp)
        os.replace(tmp, path)
        ema.save(os.path.join(run_dir, "ema.safetensors"), step=step, **metadata)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# The log and periodic validation


class RunLog:
    """The run's log.jsonl, one JSON record per line, written by rank 0 (on other ranks a call does nothing)."""

    def __init__(self, run_dir, rank):
        self.file = open(os.path.join(run_dir, "log.jsonl"), "a") if rank == 0 else None

    def __call__(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


class LogWindow:
    """Whatever loss terms and gradient norms the steps report, summed over the steps between two log lines,
    and the time; record() gives the log line (each value's mean over the steps that reported it and over
    the ranks: a collective call, so every rank must report the same names) and starts a new window."""

    def __init__(self, device):
        self.device = device
        self.sums, self.counts = {}, {}
        self.steps, self.seconds = 0, 0.0

    def add(self, values, seconds):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.seconds += seconds

    def record(self, step, steps_per_epoch, lr, images_per_step):
        world = dist.get_world_size() if dist.is_initialized() else 1
        names = sorted(self.sums)
        sums = all_reduce(torch.stack([self.sums[k] for k in names])).tolist()
        out = dict(step=step, epoch=step / steps_per_epoch, **{k: s / (self.counts[k] * world) for k, s in zip(names, sums)},
                   img_per_s=self.steps * images_per_step / self.seconds, lr=lr)
        if self.device.type == "cuda":
            out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.sums, self.counts = {}, {}
        self.steps, self.seconds = 0, 0.0
        return out


def load_inception_or_none(weights, device, rank):
    """The FID Inception for validation: weights given explicitly must load; the default download may fail
    offline, and rFID is then skipped (None)."""
    try:
        return fid.load_inception(weights, device=device)
    except RuntimeError as e:
        if weights:
            raise
        if rank == 0:
            print(f"rFID unavailable ({e}); evaluating PSNR and SSIM only", file=sys.stderr)
        return None


def validate(ema, val_set, args, local_batch, device, inception, run_dir, step, best_rfid, rank, log, **metadata):
    """The periodic validation of the EMA model (a collective call): log its metrics, save a grid of
    originals above reconstructions, keep its weights as best.safetensors (with metadata) when its rFID is
    the lowest so far. Returns the best rFID."""
    metrics, (orig, rec) = fid.reconstruct(ema, val_set, local_batch, device, num_images=args.eval_images,
                                           seed=args.seed, inception=inception, workers=args.num_workers)
    log(dict(step=step, eval=metrics))
    rfid = metrics["rfid"]
    if rank == 0:
        torchvision.utils.save_image(torch.cat([orig[:8], rec[:8]]) * 0.5 + 0.5,
                                     os.path.join(run_dir, "samples", f"{step:08d}.png"), nrow=min(8, len(orig)))
        if rfid is not None and rfid < best_rfid:
            ema.save(os.path.join(run_dir, "best.safetensors"), step=step, rfid=rfid, **metadata)
    barrier()
    return best_rfid if rfid is None else min(best_rfid, rfid)


# ----------------------------------------------------------------------------------------------------------
# Throughput accounting

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def train_flops_per_image(loss_model, lpips, dino, image_shape, latent_shape, device):
    """FLOPs of one training step on one image (forward and backward), counted on an eager batch of 1."""
    x = torch.zeros(1, *image_shape, device=device)
    with FlopCounterMode(display=False) as counter, autocast(device):
        target = dino(losses.dinov2_input(x, image_shape[-1] // 8)) if dino is not None else None
        terms, out = loss_model(x, torch.full((1,), 0.5, device=device), torch.randn_like(x),
                                torch.zeros(1, *latent_shape, device=device), dino_tokens=target)
        loss = sum(terms.values()) + (lpips(out["x0_hat"], x).mean() if lpips is not None else 0)
        loss.backward()
    loss_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
