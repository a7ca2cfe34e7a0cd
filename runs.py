"""Run machinery shared by train_ae.py and distill.py (and the process setup of every script): torchrun / DDP
setup, the run directory with its atomic checkpoints and exact resume, the log, periodic validation.

A run directory holds state.pt (the full training state: tensors and plain Python values only, so it loads
with weights_only=True; rerunning with the same --run-dir resumes exactly), ema.safetensors (the EMA
weights in the official layout, for SSDD.from_checkpoint), best.safetensors (lowest validation rFID), the
REPA head beside each as ema.repa.safetensors and best.repa.safetensors (when REPA is on),
args.json, log.jsonl, PNG grids of originals above reconstructions in samples/, and TensorBoard events
when the tensorboard package is installed (`tensorboard --logdir runs`).
"""
import argparse
import contextlib
import datetime
import glob
import importlib.util
import itertools
import json
import os
import re
import sys
import tempfile

import torch
import torch.distributed as dist
import torchvision.utils
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

import data
import fid
import losses
import metrics
import optim
from model import (SSDD, ResBlock, TransformerBlock, check_image_size, checkpoint_url, load_safetensors,
                   save_safetensors, url_file_name, write_durably)

# ----------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python script.py` is one process.


def setup_distributed():
    """Returns (rank, world_size, device). NCCL on GPUs, gloo on CPUs; TF32 on for CUDA matmuls and convs."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    # torchrun keeps one store for every attempt of a launch (--max-restarts): an attempt's process group must
    # not read the keys a killed attempt left there, the addresses of processes that are gone (a restarted
    # worker that starts after the other then hangs or fails in gloo's connect, and NCCL's id exchange alike)
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, store=store, rank=rank, world_size=world)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return rank, world, device


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


def compile_enabled(flag, device):
    """Whether to torch.compile: --compile or --no-compile as given, by default on CUDA only."""
    return device.type == "cuda" if flag is None else flag


def compile_and_wrap(loss_model, lpips, dino, critic, compile_flag, device):
    """(model, lpips, dino, critic_model) as the training loop calls them: the loss module and the frozen
    networks compiled (--compile; default on CUDA), the loss module and the critic in DDP under torchrun.
    The critic is not compiled: the generator's term freezes and unfreezes it every step."""
    cuda = device.type == "cuda"
    model, critic_model = loss_model, critic
    if compile_enabled(compile_flag, device):
        model = torch.compile(model)
        lpips = torch.compile(lpips) if lpips is not None else None
        dino = torch.compile(dino) if dino is not None else None
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
        if critic is not None:  # DDP's default: its buffers, the spectral norms' vectors, synced from rank 0 every call
            critic_model = DDP(critic, device_ids=[device.index] if cuda else None)
    return model, lpips, dino, critic_model


def gradient_sync(module, sync):
    """The context of one micro-batch's forward and backward passes: a DDP module all-reduces the gradients
    only when sync (the last micro-batch of an optimizer step); before that they accumulate on each rank
    (DDP's no_sync), so a step communicates once whatever --grad-accum."""
    return module.no_sync() if isinstance(module, DDP) and not sync else contextlib.nullcontext()


def stop_unless_finite(values, step, state_path):
    """Every rank stops (SystemExit) before the model's weights change when one of the step's losses or
    gradient norms (values: {name: scalar tensor}) is not finite on some rank; nothing is saved after it, so
    the last checkpoint stays the last good one."""
    bad = torch.stack([~torch.isfinite(v.detach()) for v in values.values()]).any().float()
    if all_reduce(bad, dist.ReduceOp.MAX).item():
        advice = (f"The last good checkpoint {state_path} is intact: resume from it with a lower --lr."
                  if os.path.exists(state_path) else
                  f"No checkpoint was written yet ({state_path}): the weights the run started from (--init, "
                  f"--encoder-ckpt, --teacher) are the likely cause, or a too high --lr.")
        raise SystemExit(f"error: non-finite loss or gradient at step {step + 1} "
                         f"({ {k: v.item() for k, v in values.items()} }); stopping. {advice}")


# ----------------------------------------------------------------------------------------------------------
# Arguments shared by the training scripts


def add_run_args(p):
    """The options of train_ae.py and distill.py read by the shared machinery here (data, loss networks,
    validation, checkpoints, logging)."""
    p.add_argument("--data", required=True, help="image folder (searched recursively; uses train/ and val/ when "
                   "both exist), or 'synthetic' for generated images")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the processes (and "
                   "their micro-batches)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: each process runs "
                   "batch-size / (processes x K) images at a time, K times, then one step on the accumulated "
                   "gradients: the same global batch and the same training, in less memory. Steps count "
                   "optimizer steps")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute the decoder's ResNet and "
                   "transformer blocks in the backward pass instead of keeping their activations: the same "
                   "gradients in less memory, for one more decoder forward pass per step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="bf16: bfloat16 autocast (native "
                   "on A100 and later GPUs; the default on CUDA), fp32: none (the default on CPU; for older GPUs, "
                   "which emulate bf16)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--aug-scale", type=float, default=1.0, help="scale augmentation: the short side resized to a "
                   "random length in [im, aug_scale * im) before the crop; 1 (the official default): to im. The "
                   "recipe's stages 0 and 1 use 2")
    p.add_argument("--weight-decay", type=float, default=optim.WEIGHT_DECAY, help="on weights, not on biases")
    p.add_argument("--lpips-weight", type=float, default=0.5)
    p.add_argument("--repa-weight", type=float, default=0.25)
    p.add_argument("--ema-start", type=int, default=50_000, help="the EMA is a copy up to this step, then decays "
                   "by min(0.999, (1 + n) / (10 + n)), n the steps since")
    p.add_argument("--gan", action="store_true", help="add the GAN losses (an ablation, off in the recipe)")
    p.add_argument("--gan-weight", type=float, default=0.5, help="weight of the generator's GAN loss")
    p.add_argument("--gan-start", type=int, default=50_000, help="GAN losses from this step on")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N optimizer steps (default: the "
                   "official loop's, every 4 epochs in train_ae.py and every epoch in distill.py)")
    p.add_argument("--eval-images", type=int, default=None, help="validate on the first N validation images in "
                   "sorted path order (5000 on ImageNet: the paper's ImageNet-5K, classes 0-99); default: all of "
                   "them, as the official loop, but in a short run only as many as keep validation at about a "
                   "tenth of the compute (at least 16)")
    p.add_argument("--ckpt-every", type=int, default=1_000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training and N validation images "
                   "in sorted path order")
    p.add_argument("--num-workers", type=int, default=data.default_workers(), help="data loader processes per rank "
                   "(default: this machine's CPUs shared by its ranks)")
    p.add_argument("--dinov2-weights", default=None, help="local dinov2_vitb14_pretrain.pth (default: download)")
    p.add_argument("--fid-weights", default=None, help="local FID Inception weights (default: download)")
    p.add_argument("--lpips-backbone", default=None, help="local torchvision VGG16 state dict for the LPIPS loss "
                   "(vgg16-397923af.pth; default: download)")
    p.add_argument("--lpips-heads", default=None, help="local LPIPS v0.1 vgg.pth (default: download)")


def training_data(args, eval_epochs, eval_cost):
    """(training set, validation set, steps per epoch, total steps) of a training script, checked before the
    run directory is made; the defaults of --eval-every (every eval_epochs epochs) and --eval-images
    (eval_images_default, eval_cost: the compute of a validated image in trained images) are resolved."""
    with input_errors():
        train_set = data.load_split(args.data, "train", args.im, train=True, aug_scale=args.aug_scale,
                                    limit=args.limit, seed=args.seed, holdout=True)
        val_set = data.load_split(args.data, "val", args.im, limit=args.limit, holdout=True)
    if len(train_set) < args.batch_size:
        error(f"{len(train_set)} training images, fewer than one batch of {args.batch_size}")
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(args.max_steps, total_steps)
    args.eval_every = args.eval_every or eval_epochs * steps_per_epoch
    args.eval_images = eval_images_default(args, total_steps, len(val_set), eval_cost)
    return train_set, val_set, steps_per_epoch, total_steps


def eval_images_default(args, total_steps, val_images, eval_cost):
    """--eval-images when given, else all val_images (the official loop's whole validation split), but no more
    than keep validation at about a tenth of the compute of the steps between two validations (at least 16):
    a short run stays quick. eval_cost: the compute of a validated image in trained images."""
    if args.eval_images is not None:
        return args.eval_images
    trained = args.batch_size * min(args.eval_every, total_steps)
    return min(val_images, max(16, int(trained / (10 * eval_cost))))


# ----------------------------------------------------------------------------------------------------------
# Checking what the user gave. Every script checks its arguments first thing, before it builds or writes
# anything, and loads the files they name inside input_errors(): a mistake is one line, never a traceback.


def error(message):
    """Stop on a mistake in what the user gave: one `error: ...` line on stderr and exit status 2, as argparse
    does for its own errors (under torchrun every rank prints it)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextlib.contextmanager
def input_errors():
    """Around the loading of what the user named (checkpoints, weights, the data folder): the one-line errors
    of a bad file or folder, ValueError (not a checkpoint, not weights of the network, no images), OSError
    (missing, a folder, no permission) and RuntimeError (a download that failed), become error()."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:
        error(e)


@contextlib.contextmanager
def io_errors():
    """Around a script's work: what the data or the disk make fail becomes error(), ValueError (an image that
    cannot be read: data.UnreadableImage) and OSError (a full disk: write_durably's "no space left on device
    writing PATH"; no permission). A RuntimeError there is no mistake of the user's, and keeps its traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        error(e)


def check_writable(folder, option):
    """Files can be created in folder (not read-only, not another user's), or error(): checked before the work
    whose results go there."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        error(f"{option}: cannot write into {folder} ({e.strerror or e})")


def check_files(args, *names, url=False):
    """Each of these options (None: not given) must name an existing file; url: an http(s):// URL of a file or
    the name of a published checkpoint (model.checkpoint_url) is taken too (model.py downloads it)."""
    for name in names:
        path = getattr(args, name)
        if path is None:
            continue
        if url and (address := checkpoint_url(path)):
            try:
                url_file_name(address)
            except ValueError as e:
                error(f"--{name.replace('_', '-')} {e}")
        elif not os.path.isfile(path):
            error(f"--{name.replace('_', '-')} {path!r} " + ("is a folder, not a file" if os.path.isdir(path)
                                                            else "does not exist"))


def add_encoder_ckpt_arg(p, ckpt):
    """--encoder-ckpt of the scripts that read a trained model, whose option is ckpt (e.g. "--teacher")."""
    p.add_argument("--encoder-ckpt", default=None, help=f"the encoder for a {ckpt} that holds only a decoder (the "
                   f"authors' SD-VAE decoders): an SD-VAE .safetensors (either layout; 'sd-vae-ft-mse' downloads the "
                   f"public one) or an SSDD checkpoint, as a path, URL or name; with a complete {ckpt}, it "
                   f"replaces its encoder")


def check_encoder_ckpt(args):
    """--encoder-ckpt: what model.encoder_weights reads (a file, a URL, a published name or sd-vae-ft-mse)."""
    if args.encoder_ckpt != "sd-vae-ft-mse":
        check_files(args, "encoder_ckpt", url=True)


def check_min(args, minimum, *names, strict=False):
    """Each of these options (None: not given) must be at least minimum, or above it when strict; NaN is
    neither."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value > minimum if strict else value >= minimum):
            error(f"--{name.replace('_', '-')} must be {'above' if strict else 'at least'} {minimum}, got {value}")


def check_im(im, factor=1):
    """--im: sides the encoder (factor) and the decoder's 8x8-token windows can take."""
    try:
        check_image_size(im, im, factor)
    except ValueError as e:
        error(f"--im {im}: {e}")


def check_run_args(args):
    """The options of add_run_args, and --lr, --epochs and --im, which both training scripts define with their
    own defaults (--im against the encoder's factor: the script's own check). The data folder is checked when
    loaded, before the run directory is made."""
    check_min(args, 1, "batch_size", "grad_accum", "epochs", "max_steps", "eval_every", "eval_images", "ckpt_every",
              "log_every", "limit", "aug_scale")
    check_min(args, 0, "num_workers", "lpips_weight", "repa_weight", "gan_weight", "weight_decay", "ema_start",
              "gan_start")
    check_min(args, 0, "lr", strict=True)
    check_im(args.im)
    check_files(args, "dinov2_weights", "fid_weights", "lpips_backbone", "lpips_heads")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % (world * args.grad_accum):
        error(f"--batch-size {args.batch_size} is not divisible by the {world} processes"
              + (f" x --grad-accum {args.grad_accum}" if args.grad_accum > 1 else ""))


# ----------------------------------------------------------------------------------------------------------
# The run directory, checkpoints and resume


def torchrun_job():
    """(rendezvous id, restarted): the id of a torchrun launch that may restart its workers (--max-restarts
    above 0; None otherwise) and whether these workers are such a restart."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # "none" also for torchrun's static rendezvous
    if job == "none" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None, False
    return job, int(os.environ["TORCHELASTIC_RESTART_COUNT"]) > 0


def default_run_dir(prefix):
    """runs/<prefix><date-time>, created here (with a suffix -1, -2, ... when a run launched in the same second
    took the name). Under torchrun with --max-restarts the name is noted in runs/.torchrun-<prefix><rendezvous
    id>, and the workers torchrun restarts after a failure read it back, so that they go on with the same run
    (the note is removed when the run ends: RunLog.close); a fresh launch always starts a new run."""
    job, restarted = torchrun_job()
    note = os.path.join("runs", f".torchrun-{prefix}{job}")
    if restarted and os.path.exists(note):
        with open(note) as f:
            return f.read()
    name = os.path.join("runs", prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs("runs", exist_ok=True)
    for n in itertools.count():
        run_dir = name + (f"-{n}" if n else "")
        try:
            os.mkdir(run_dir)  # atomic: of two launches, one gets the name
            break
        except FileExistsError:
            pass
    if job:
        with open(note, "w") as f:
            f.write(run_dir)
    return run_dir


def open_run_dir(run_dir, prefix, rank):
    """Rank 0 names the run directory (default: default_run_dir), every rank uses it. Returns
    (run_dir, path of state.pt, the saved training state or None): an existing state.pt means resume, and
    rank 0 then removes the temporary files of writes that a crash interrupted. A directory that holds other
    files but no state.pt stops every rank before anything is written: a run from step 0 would overwrite
    them. Two exceptions: an empty one is used, and so is one that an earlier attempt of this torchrun launch
    (marked in run_dir/.torchrun) left before its first checkpoint: its restarted workers start it again."""
    chosen = [None, None]  # the run dir, or why every rank stops
    if rank == 0:
        run_dir = run_dir or default_run_dir(prefix)
        job, restarted = torchrun_job()
        marker = os.path.join(run_dir, ".torchrun")
        found = sorted(f for f in os.listdir(run_dir) if f != ".torchrun") if os.path.isdir(run_dir) else []
        ours = restarted and os.path.exists(marker) and open(marker).read() == job
        unresumable = found and "state.pt" not in found  # output of a run that saved no training state
        if unresumable and not ours:
            chosen[1] = (f"{run_dir} holds earlier output ({', '.join(found)}) but no training state (state.pt) "
                         f"to resume; start a new run with another --run-dir, or remove this one")
        else:
            leftovers = [f for f in found if re.fullmatch(r".+\.tmp\d+", f)]  # name.tmp<pid>: an unfinished write
            for f in leftovers:
                os.remove(os.path.join(run_dir, f))
            if leftovers:
                print(f"removed the unfinished writes {leftovers} of an earlier attempt from {run_dir}")
            if unresumable:
                print(f"starting {run_dir} again from step 0: the earlier attempt of this torchrun launch stopped "
                      f"before its first checkpoint")
            os.makedirs(run_dir, exist_ok=True)
            if job:
                with open(marker, "w") as f:
                    f.write(job)
            chosen[0] = run_dir
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    run_dir, refused = chosen
    if refused:
        error(refused)
    state_path = os.path.join(run_dir, "state.pt")
    state = torch.load(state_path, map_location="cpu", weights_only=True) if os.path.exists(state_path) else None
    if dist.is_initialized():  # a node that cannot see rank 0's files would train from another step
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, state and state["step"])
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks see different training states in {run_dir} (step per rank, None for "
                               f"none: {steps}); on several nodes the run dir must be on a shared filesystem")
    return run_dir, state_path, state


def restore_training_state(state, loss_model, ema, optimizer, args, run_dir, rank, critic=None, critic_optimizer=None):
    """Load a saved state into the loss module (model and REPA head), the EMA, the optimizer and the GAN
    critic with its optimizer when given (and saved); returns (step, best rFID) and says which arguments
    changed since the state was saved."""
    changed = {k: (state["args"].get(k), v) for k, v in vars(args).items() if state["args"].get(k) != v}
    try:
        loss_model.ssdd.load_state_dict(state["model"])
        if loss_model.repa_loss is not None:
            loss_model.repa_loss.load_state_dict(state["repa_loss"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if critic is not None and "disc" in state:
            critic.load_state_dict(state["disc"])  # with its spectral norms' power-iteration vectors
            critic_optimizer.load_state_dict(state["disc_optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # another model, or other trained parameters (--train-encoder)
        error(f"cannot resume {run_dir}: its state.pt holds another model or optimizer than these arguments make "
              f"({type(e).__name__}: {' '.join(str(e).split())[:200]}; arguments changed (was, now): {changed}); "
              f"resume with the arguments it was saved with, or give another --run-dir")
    if rank == 0:
        print(f"resuming {run_dir} at step {state['step']}"
              + (f"; arguments changed (was, now): {changed}" if changed else ""))
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


def save_checkpoint(run_dir, step, best_rfid, args, loss_model, ema, optimizer, rank, log, critic=None,
                    critic_optimizer=None, **metadata):
    """The counterpart of restore_training_state (a collective call): check that every rank holds the same
    weights, then rank 0 writes state.pt (the critic and its optimizer as 'disc' and 'disc_optimizer'), the
    EMA weights as ema.safetensors (with metadata) and the REPA head beside them (repa_head_path), each to a
    temporary file renamed over the old one, so a crash never leaves a half-written checkpoint."""
    fingerprints = replica_fingerprints(loss_model)
    log(dict(step=step, replica_fingerprints=fingerprints.tolist()))
    if not (fingerprints == fingerprints[0]).all():
        raise SystemExit(f"error: the ranks' weights differ at step {step}: {fingerprints.tolist()}")
    if rank == 0:
        repa = {"repa_loss": loss_model.repa_loss.state_dict()} if loss_model.repa_loss else {}
        gan = dict(disc=critic.state_dict(), disc_optimizer=critic_optimizer.state_dict()) if critic else {}
        state = dict(step=step, best_rfid=best_rfid, args=vars(args), model=loss_model.ssdd.state_dict(),
                     ema=ema.state_dict(), optimizer=optimizer.state_dict(), **repa, **gan)
        with io_errors():  # a full disk: one line, the previous checkpoint intact
            write_durably(os.path.join(run_dir, "state.pt"), lambda f: torch.save(state, f))
            save_weights(ema, os.path.join(run_dir, "ema.safetensors"), repa_head_weights(loss_model, optimizer),
                         step=step, **metadata)
    barrier()


# The REPA head carries across the stages of the recipe (the official code restores it for finetuning and
# distillation). The SSDD .safetensors keeps exactly the official layout, so the head has its own file beside
# it, X.repa.safetensors, under the official key names repa_loss.repa_mlp.{0,2}.{weight,bias}.


def repa_head_path(ckpt):
    """runs/m128/ema.safetensors -> runs/m128/ema.repa.safetensors."""
    return os.path.splitext(ckpt)[0] + ".repa.safetensors"


def save_weights(ema, path, repa_head, **metadata):
    """The EMA model at path (the official layout, with metadata) and repa_head (repa_head_weights; None
    without REPA) beside it, the files that --init, --teacher and evaluate.py take."""
    ema.save(path, **metadata)
    if repa_head is not None:
        save_safetensors(repa_head, repa_head_path(path))


def repa_head_weights(loss_model, optimizer):
    """The REPA head's weights to save beside the model: the optimizer's averaged weights, as for the model
    (None without REPA)."""
    if loss_model.repa_loss is None:
        return None
    names, params = zip(*loss_model.repa_loss.named_parameters(prefix="repa_loss"))
    return dict(zip(names, optimizer.averaged(params)))


def load_repa_head(loss_model, ckpt, rank):
    """Start the REPA head from the one saved beside the SSDD checkpoint ckpt when there is one, else keep the
    fresh one; says which."""
    if loss_model.repa_loss is None:
        return
    path = repa_head_path(ckpt)
    found = os.path.exists(path)
    if found:
        tensors, _ = load_safetensors(path)
        loss_model.repa_loss.load_state_dict({k.removeprefix("repa_loss."): v for k, v in tensors.items()})
    if rank == 0:
        print(f"REPA head from {path}" if found else f"a fresh REPA head (no {path})")


# ----------------------------------------------------------------------------------------------------------
# The log and periodic validation


class RunLog:
    """The run's log, written by rank 0 (on other ranks a call does nothing): log.jsonl, one JSON record per
    line, and, when the tensorboard package is installed, TensorBoard events in the run directory: every
    number of a record as the scalar train/<name> (those of a dict field, the validation metrics, as
    eval/<name>) at the record's step, and the sample grids (image()). step: the step the run starts from;
    what a crashed attempt logged after it is dropped from log.jsonl and purged from the events (hidden from
    TensorBoard), so a resumed run logs each step once. close() at the end of the run also removes the
    torchrun note that names it (default_run_dir): no restarted worker will need it."""

    def __init__(self, run_dir, rank, step=0):
        self.file = self.writer = None
        self.run_dir = run_dir
        if rank == 0:
            path = os.path.join(run_dir, "log.jsonl")
            if os.path.exists(path):  # a resumed or restarted run
                with open(path) as f:
                    kept = [line for line in f if logged_step(line) <= step]
                with io_errors():
                    write_durably(path, lambda f: f.writelines(kept), "w")
            self.file = open(path, "a")
            if importlib.util.find_spec("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(run_dir, purge_step=step + 1)

    def __call__(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in record.items():
                group, values = (name, value) if isinstance(value, dict) else ("train", {name: value})
                for k, v in values.items():  # lists (replica fingerprints) and None (metrics not computed) left out
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{group}/{k}", v, record["step"])
            self.writer.flush()  # waits for the writer's thread: on disk like log.jsonl, which a kill keeps

    def image(self, tag, image, step):
        """A (3, H, W) image in [0, 1], quantised as torchvision's save_image does, so it equals the PNG."""
        if self.writer is not None:
            self.writer.add_image(tag, image.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8), step)
            self.writer.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            for note in glob.glob(os.path.join("runs", ".torchrun-*")):
                with open(note) as f:
                    named = f.read() == self.run_dir
                if named:
                    os.remove(note)
        if self.writer is not None:
            self.writer.close()


def logged_step(line):
    """The step of a log.jsonl line; infinite for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return float("inf")


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
        means = {k: s / (self.counts[k] * world) for k, s in zip(names, sums)}
        out = dict(step=step, epoch=step / steps_per_epoch, **means,
                   img_per_s=self.steps * images_per_step / self.seconds, lr=lr)
        if self.device.type == "cuda":
            out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.sums, self.counts = {}, {}
        self.steps, self.seconds = 0, 0.0
        return out


def load_inception_or_none(weights, device, rank):
    """The FID Inception for validation, or None when it could not be downloaded: rFID is then skipped."""
    inception, why = fid.load_inception_unless_offline(weights, device)
    if why and rank == 0:
        print(f"rFID unavailable ({why}); evaluating PSNR and SSIM only", file=sys.stderr)
    return inception


def validate(ema, val_set, args, batch_size, device, inception, run_dir, step, best_rfid, rank, log, steps,
             repa_head=None, **metadata):
    """The periodic validation of the EMA model with `steps` Euler steps, batch_size images per rank at a time
    (a collective call): log its metrics, save a grid of originals above reconstructions, keep its weights as
    best.safetensors (with metadata), and repa_head (repa_head_weights, None without REPA) beside them, when
    its rFID is the lowest so far. Returns the best rFID. An unreadable validation image, or a failed write,
    stops the run with one line."""
    with io_errors():
        scores, (orig, rec) = metrics.reconstruct(ema, val_set, batch_size, device, steps=steps,
                                                  num_images=args.eval_images, seed=args.seed, inception=inception,
                                                  workers=args.num_workers, precision=args.precision)
    log(dict(step=step, eval=scores))
    rfid = scores["rfid"]
    if rank == 0:
        print(f"step {step}: validation PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}"
              + (f", rFID {rfid:.2f}" if rfid is not None else ""), flush=True)
        grid = torchvision.utils.make_grid(torch.cat([orig[:8], rec[:8]]) * 0.5 + 0.5, nrow=min(8, len(orig)))
        with io_errors():
            # made here, not in open_run_dir: a run that fails during its setup leaves its run dir empty, reusable
            os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
            torchvision.utils.save_image(grid, os.path.join(run_dir, "samples", f"{step:08d}.png"))
            if rfid is not None and rfid < best_rfid:
                save_weights(ema, os.path.join(run_dir, "best.safetensors"), repa_head, step=step, rfid=rfid,
                             **metadata)
        log.image("eval/samples", grid, step)
    barrier()
    return best_rfid if rfid is None else min(best_rfid, rfid)


# ----------------------------------------------------------------------------------------------------------
# Throughput accounting

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def train_flops_per_image(loss_model, lpips, dino, image_shape, latent_shape, device):
    """FLOPs of one training step on one image (forward and backward), counted on an eager batch of 1."""
    x = torch.zeros(1, *image_shape, device=device)
    with FlopCounterMode(display=False) as counter, metrics.autocast(device):
        target = dino(losses.dinov2_input(x, image_shape[-1] // 8)) if dino is not None else None
        terms, out = loss_model(x, torch.full((1,), 0.5, device=device), torch.randn_like(x),
                                torch.zeros(1, *latent_shape, device=device), dino_tokens=target)
        loss = sum(terms.values()) + (lpips(out["x0_hat"], x).mean() if lpips is not None else 0)
        loss.backward()
    loss_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# Will a training step fit? Checked before the run starts, so that a run too big for the machine stops at once
# with a line saying what to lower, instead of being killed by the kernel's OOM killer without a message.

# On CUDA the activations are stored in bfloat16 under autocast and fused by torch.compile: counted as a quarter
# of the float32 eager count, below the 0.30-0.31 of the H200 peaks in BENCHMARKS.md (M, full recipe,
# compiled: 16.1 GiB at 128 px and batch 64, 13.1 GiB estimated; 30.4 GiB at 256 px and batch 32, 25.7 GiB
# estimated), so that the check does not refuse a run that fits.
CUDA_ACTIVATION_SCALE = 0.25


def saved_bytes(fn, modules, blocks=()):
    """(bytes of the tensors that autograd saves for the backward pass while fn() runs, each storage once, but
    for the parameters of modules (a layer saves its weight: no memory of its own); the largest part of them
    that a single call of one of the modules in blocks saves)."""
    saved, within, calls = {}, [], []
    params = {p.untyped_storage()._cdata for m in modules if m is not None for p in m.parameters()}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            if calls:
                within[calls[-1]] += saved[key]
        return t

    def enter(module, args):
        calls.append(len(within))
        within.append(0)

    def leave(module, args, out):
        calls.pop()

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for h in hooks:
        h.remove()
    return sum(saved.values()), max(within, default=0)


def training_step_bytes(config, args, train_encoder, teacher=False):
    """(bytes that do not depend on the batch, bytes per image) of one rank's training step in float32 eager
    mode: the weights of the model, of its EMA and of the teacher (distillation) and the frozen networks
    (FID Inception, the LPIPS VGG, DINOv2); the gradients and the optimizer's two copies (schedule-free
    RAdam's z and exp_avg_sq) of what trains; per image, the tensors autograd keeps for the backward pass,
    counted on a batch of 1 built on the meta device: shapes only, nothing computed or allocated. With
    --checkpoint-activations the decoder's blocks keep only their inputs, and the backward pass recomputes
    them one at a time: the most that one block keeps is counted on top."""
    with torch.device("meta"):
        ssdd = SSDD(**config)
        loss_model = losses.TrainingLoss(ssdd, train_encoder, repa=args.repa_weight > 0)
        vgg = metrics.vgg16_features() if args.lpips_weight > 0 else None
        critic = losses.Critic() if args.gan else None
        frozen = [fid.InceptionV3(), vgg, losses.DINOv2() if args.repa_weight > 0 else None, ssdd if teacher else None]
        x = torch.zeros(1, 3, args.im, args.im)
        z_noise = torch.zeros(1, ssdd.decoder.z_channels, args.im // ssdd.factor, args.im // ssdd.factor)
        dino_tokens = torch.zeros(1, (args.im // 8) ** 2, 768)

        def step():
            t = torch.full((1,), 0.5)
            _, out = loss_model(x, t, torch.zeros_like(x), z_noise, dino_tokens=dino_tokens)
            if vgg is not None:
                vgg(out["x0_hat"])
            if critic is not None:
                critic(out["x0_hat"], out["x_t"], t)

        modules = [loss_model, vgg, critic]
        blocks = [m for m in ssdd.decoder.modules() if isinstance(m, (ResBlock, TransformerBlock))]
        per_image, largest_block = saved_bytes(step, modules, blocks)
        if args.checkpoint_activations:
            ssdd.decoder.checkpoint_activations = True
            per_image = saved_bytes(step, modules)[0] + largest_block
    count = lambda modules: sum(p.numel() for m in modules if m is not None for p in m.parameters())
    trained = sum(p.numel() for p in loss_model.parameters() if p.requires_grad) + count([critic])
    weights = count([loss_model, ssdd, critic, *frozen])  # ssdd a second time: the EMA
    return 4 * (weights + 3 * trained), per_image


def available_memory(device):
    """Bytes this rank may still use: the GPU's free memory, or the machine's available RAM shared by the
    ranks on it; None where unknown (no /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return kib * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_memory(config, args, local_batch, device, train_encoder, teacher=False):
    """Stop (error) before the run starts when the training step of a micro-batch (local_batch / --grad-accum
    images) cannot fit in this rank's memory. The line names the smallest --grad-accum that fits, and says
    whether --checkpoint-activations alone would."""
    free = available_memory(device)
    if free is None:
        return
    scale = CUDA_ACTIVATION_SCALE if device.type == "cuda" else 1
    fixed, per_image = training_step_bytes(config, args, train_encoder, teacher)
    need = lambda accum, per_image: fixed + local_batch // accum * per_image * scale
    if need(args.grad_accum, per_image) <= free:
        return

    def smallest_accum(per_image):  # None when not even one image per micro-batch fits
        return next((k for k in range(1, local_batch + 1) if local_batch % k == 0 and need(k, per_image) <= free),
                    None)

    accum = smallest_accum(per_image)
    nothing = "not even one image per micro-batch fits: lower --im or --size"
    if args.checkpoint_activations:
        advice = f"--grad-accum {accum} fits" if accum else nothing
    else:
        recomputed = training_step_bytes(config, argparse.Namespace(**dict(vars(args), checkpoint_activations=True)),
                                         train_encoder, teacher)[1]
        alone, with_accum = need(args.grad_accum, recomputed) <= free, smallest_accum(recomputed)
        if accum:
            advice = f"--grad-accum {accum} fits" + (", and so does --checkpoint-activations alone" if alone else
                                                     "; --checkpoint-activations alone does not")
        elif with_accum:
            advice = "no --grad-accum fits without --checkpoint-activations, " + (
                "which alone does" if alone else f"and with it --grad-accum {with_accum} does")
        else:
            advice = "even with --checkpoint-activations, " + nothing
    error(f"a training step needs about {need(args.grad_accum, per_image) / 2**30:.1f} GiB ({fixed / 2**30:.1f} GiB "
          f"of weights, gradients and optimizer state, {per_image * scale / 2**20:.0f} MiB per image for "
          f"{local_batch // args.grad_accum} images per micro-batch and process) but {free / 2**30:.1f} GiB is "
          f"available on {device.type}: {advice}")
