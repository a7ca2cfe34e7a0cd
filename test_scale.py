"""Tests of the levers that fit the recipe on any GPU, on CPU: gradient accumulation (--grad-accum) trains the
model that the whole batch at once trains, on one process and on two (gloo DDP), and resumes exactly;
activation checkpointing (--checkpoint-activations) gives the same gradients and keeps fewer activations;
--precision is recorded; the memory check names a --grad-accum that fits.

Runs are test_train.py's tiny decoder at 64 px on a frozen random f8c4 encoder, with every loss on: LPIPS-VGG
(random backbone, the real v0.1 heads of the lpips wheel), REPA (a one-block DINOv2 with random weights) and
the GAN (a critic of ndf 32), from step 3, the EMA decaying from step 3. 6 steps of batch 4 (RAdam's warm-up
leaves the weights as they are for 4 steps).
"""
import argparse
import functools
import json
import os
import re

import lpips
import pytest
import torch

import fid
import losses
import metrics
import runs
import train_ae
from model import SSDD
from test_train import PHOTOS, TINY, cli, read_log, state, torchrun

STEPS = 6
HEADS = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
# in this process (monkeypatch) and in the torchrun workers (their prelude): no rFID, a one-block DINOv2 and the
# narrower critic
SMALL_NETWORKS = """
import functools
losses.load_dinov2 = lambda path=None, device="cpu": losses.DINOv2(depth=1).to(device).eval().requires_grad_(False)
losses.Critic = functools.partial(losses.Critic, ndf=32)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def use_small_networks(monkeypatch):
    def unavailable(weights=None, device="cpu"):
        raise RuntimeError("no FID weights in this test")

    monkeypatch.setattr(fid, "load_inception", unavailable)
    monkeypatch.setattr(losses, "load_dinov2",
                        lambda path=None, device="cpu": losses.DINOv2(depth=1).to(device).eval().requires_grad_(False))
    monkeypatch.setattr(losses, "Critic", functools.partial(losses.Critic, ndf=32))


@pytest.fixture
def small_networks(monkeypatch):
    use_small_networks(monkeypatch)


@pytest.fixture(scope="module")
def vgg16(module_dir):
    torch.manual_seed(0)
    path = module_dir / "vgg16.pth"
    torch.save({"features." + k: v for k, v in metrics.vgg16_features().state_dict().items()}, path)
    return str(path)


def every_loss(run_dir, encoder_ckpt, vgg16, *extra):
    args = cli(run_dir, encoder_ckpt, STEPS, PHOTOS, "--lpips-backbone", vgg16, "--lpips-heads", HEADS, "--gan",
               "--gan-start", "3", "--ema-start", "3", *extra)
    for flag in ("--lpips-weight", "--repa-weight"):  # cli() switches them off
        del args[args.index(flag):args.index(flag) + 2]
    return args


@pytest.fixture(scope="module")
def whole_batch(module_dir, encoder_ckpt, vgg16):
    """The run without accumulation, every loss on."""
    run_dir = module_dir / "whole"
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_small_networks(monkeypatch)
        train_ae.main(every_loss(run_dir, encoder_ckpt, vgg16))
    return run_dir


def compare_runs(run_dir, reference):
    """Every logged loss term and gradient norm of every step within 1e-5, and the final weights (model, EMA,
    REPA head, critic) within float rounding: the same updates."""
    logged = lambda d: [{k: v for k, v in r.items() if k not in ("img_per_s", "epoch", "lr")}
                        for r in read_log(d) if "loss" in r]
    got, want = logged(run_dir), logged(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and len(want) == STEPS
    assert {"lpips", "repa", "gan", "critic", "grad_norm", "repa_grad_norm", "critic_grad_norm"} <= set(got[0])
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-5, abs=1e-9), (a, b)
    one, other = state(run_dir), state(reference)
    for key in ("model", "ema", "repa_loss", "disc"):
        names = [k for k in one[key] if not k.startswith("encoder.")]
        d1 = torch.cat([one[key][k].flatten() for k in names])
        d2 = torch.cat([other[key][k].flatten() for k in names])
        # Adam divides by the root of the squared gradient, so a parameter whose gradient is ~0 can step by
        # +-lr on rounding noise alone: a few such elements are allowed, not a different update (measured: at
        # most 2e-6, and 3e-5 of the elements above 1e-7; an EMA updated per micro-batch moves 16% of them)
        diff = (d1 - d2).abs()
        assert diff.max() < 1e-5 and (diff > 1e-7).float().mean() < 1e-3, key


def test_accumulation_trains_the_whole_batch(tmp_path, encoder_ckpt, vgg16, whole_batch, small_networks):
    """4 micro-batches of 1 image: the same losses, gradient norms and weights as batches of 4 at once."""
    train_ae.main(every_loss(tmp_path, encoder_ckpt, vgg16, "--grad-accum", "4"))
    compare_runs(tmp_path, whole_batch)
    s, reference = state(tmp_path), state(whole_batch)
    # the weights moved (the optimizer's y is no longer the EMA of its x): not a comparison of untrained models
    assert max((s["ema"][k] - reference["model"][k]).abs().max() for k in s["ema"]) > 1e-5


SYNCS = """
import atexit, json
import runs
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
syncs = {}
compile_and_wrap = runs.compile_and_wrap

def counted(*args):  # counts the backward passes that all-reduce the gradients of each DDP module
    wrapped = compile_and_wrap(*args)
    for name, module in (("model", wrapped[0]), ("critic", wrapped[3])):
        def hook(state, bucket, name=name):
            syncs[name] = syncs.get(name, 0) + (bucket.index() == 0)
            return default_hooks.allreduce_hook(None, bucket)
        module.register_comm_hook(None, hook)
    return wrapped

runs.compile_and_wrap = counted
atexit.register(lambda: json.dump(syncs, open(os.environ["SYNCS"] + os.environ["RANK"], "w")))
"""


def test_accumulation_on_two_processes(tmp_path, encoder_ckpt, vgg16, whole_batch, monkeypatch):
    """2 processes x 2 micro-batches of 1 image, with --checkpoint-activations: the same run as 4 images at once
    on one process; the gradients of the model and of the critic are all-reduced once per step."""
    monkeypatch.setenv("SYNCS", str(tmp_path / "syncs"))
    out = torchrun(2, every_loss(tmp_path / "run", encoder_ckpt, vgg16, "--grad-accum", "2",
                                 "--checkpoint-activations"), tmp_path, prelude=SMALL_NETWORKS + SYNCS)
    assert out.returncode == 0, out.stderr[-3000:]
    compare_runs(tmp_path / "run", whole_batch)
    for rank in (0, 1):
        assert json.load(open(tmp_path / f"syncs{rank}")) == {"model": STEPS, "critic": STEPS}
    assert json.load(open(tmp_path / "run" / "args.json"))["checkpoint_activations"]


def test_accumulation_resumes_exactly(tmp_path, encoder_ckpt, small_networks):
    """A run of 2 micro-batches stopped at step 5 (the weights have moved) and resumed ends with the weights,
    EMA, critic, optimizers and losses of the uninterrupted run. LPIPS and REPA off: nothing they keep resumes."""
    gan = ("--grad-accum", "2", "--gan", "--gan-start", "3", "--ema-start", "3")
    train_ae.main(cli(tmp_path / "full", encoder_ckpt, STEPS, PHOTOS, *gan))
    train_ae.main(cli(tmp_path / "resumed", encoder_ckpt, STEPS - 1, PHOTOS, *gan))
    train_ae.main(cli(tmp_path / "resumed", encoder_ckpt, STEPS, PHOTOS, *gan))
    resumed, full = state(tmp_path / "resumed"), state(tmp_path / "full")
    assert resumed["step"] == STEPS and resumed["args"]["precision"] == "fp32"  # the default on CPU
    for key in ("model", "ema", "optimizer", "disc", "disc_optimizer"):
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    logged = lambda d: [(r["step"], r["loss"], r["critic"]) for r in read_log(d) if "loss" in r]
    assert logged(tmp_path / "resumed") == logged(tmp_path / "full")


# ----------------------------------------------------------------------------------------------------------
# activation checkpointing


def test_checkpointing_gives_the_same_gradients():
    """With REPA, whose tokens come out of a checkpointed transformer block: every gradient equal, bit for bit
    (the recomputation repeats the same operations)."""
    torch.manual_seed(0)
    loss = losses.TrainingLoss(SSDD("f8c4", json.loads(TINY)), train_encoder=True, repa=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    t, noise, z_noise = losses.step_noise(0, 0, 2, (3, 64, 64), (4, 8, 8), 0, 1, torch.device("cpu"))
    tokens = torch.randn(2, 64, 768)

    def gradients(recompute):
        loss.ssdd.decoder.checkpoint_activations = recompute
        loss.zero_grad(set_to_none=True)
        terms, _ = loss(x, t, noise, z_noise, dino_tokens=tokens)
        sum(terms.values()).backward()
        return {n: p.grad for n, p in loss.named_parameters()}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and all(g is not None for g in plain.values())
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name


def test_checkpointing_keeps_fewer_activations():
    """The saved-tensor count of the memory estimate: the ResNet and transformer blocks keep their inputs only
    (one block's own tensors come back during the backward pass). For M at 256 px with LPIPS and REPA, 2.95x
    fewer bytes per image (README); the encoder, LPIPS and DINOv2 are not checkpointed."""
    args = argparse.Namespace(im=256, lpips_weight=0.5, repa_weight=0.25, gan=False, checkpoint_activations=False)
    config = dict(encoder="f8c4", decoder="M")
    fixed, plain = runs.training_step_bytes(config, args, train_encoder=False)
    args.checkpoint_activations = True
    same_fixed, recomputed = runs.training_step_bytes(config, args, train_encoder=False)
    assert same_fixed == fixed
    assert plain / recomputed == pytest.approx(2.95, abs=0.01)


# ----------------------------------------------------------------------------------------------------------
# precision, and the memory check


def test_precision_is_recorded(tmp_path, encoder_ckpt, small_networks, monkeypatch):
    """--precision: by default bf16 on CUDA, fp32 on CPU (recorded in args.json: the resume test checks it);
    bf16 runs the steps and the validation under bfloat16 autocast."""
    assert metrics.default_precision(torch.device("cuda")) == "bf16"
    assert metrics.default_precision(torch.device("cpu")) == "fp32"
    dtypes = []

    def recorded(method):
        def call(self, x, *args, **kwargs):
            if x.device.type == "cpu":  # not the memory estimate's, on the meta device
                dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return method(self, x, *args, **kwargs)
        return call

    monkeypatch.setattr(losses.TrainingLoss, "forward", recorded(losses.TrainingLoss.forward))  # the step
    monkeypatch.setattr(SSDD, "encode", recorded(SSDD.encode))  # the validation
    train_ae.main(cli(tmp_path / "b", encoder_ckpt, 1, PHOTOS, "--precision", "bf16"))
    assert json.load(open(tmp_path / "b" / "args.json"))["precision"] == "bf16"
    assert dtypes == [torch.bfloat16] * 2
    assert all(r["loss"] > 0 for r in read_log(tmp_path / "b") if "loss" in r)


def test_memory_error_names_a_grad_accum_that_fits(monkeypatch, capsys):
    """32 images per process: the line names the smallest --grad-accum that fits (the memory of 8 images per
    micro-batch: 4), with --checkpoint-activations when nothing fits without it, and says whether
    --checkpoint-activations alone fits."""
    args = train_ae.parse_args(["--data", "x", "--size", TINY, "--im", "64", "--encoder-ckpt", "e", "--lpips-weight",
                                "0", "--repa-weight", "0"])
    config = dict(encoder="f8c4", decoder=json.loads(TINY))
    fixed, per_image = runs.training_step_bytes(config, args, train_encoder=False)
    args.checkpoint_activations = True
    recomputed = runs.training_step_bytes(config, args, train_encoder=False)[1]
    args.checkpoint_activations = False
    cpu = torch.device("cpu")
    for free, advice in ((fixed + 8 * per_image, "--grad-accum 4 fits; --checkpoint-activations alone does not"),
                         (fixed + 32 * recomputed, "--grad-accum 4 fits, and so does --checkpoint-activations alone"),
                         (fixed + 2 * recomputed, "no --grad-accum fits without --checkpoint-activations, and with it "
                                                  "--grad-accum 16 does"),
                         (fixed / 2, "even with --checkpoint-activations, not even one image per micro-batch fits")):
        monkeypatch.setattr(runs, "available_memory", lambda device: free)
        with pytest.raises(SystemExit) as e:
            runs.check_memory(config, args, 32, cpu, train_encoder=False)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and advice in err, err
        accum = re.search(r"--grad-accum (\d+)", err)
        if accum:  # the named --grad-accum fits, and the next smaller divisor of 32 does not
            k = int(accum[1])
            per = recomputed if "with it" in err else per_image
            assert fixed + 32 // k * per <= free < fixed + 32 // (k // 2) * per
            runs.check_memory(config, argparse.Namespace(**dict(vars(args), grad_accum=k, checkpoint_activations=
                                                                  "with it" in err)), 32, cpu, train_encoder=False)


def test_readme_commands_fit_80_gb_cards():
    """The README's 512 px finetuning commands for 80 GB cards, one per decoder size: by the memory estimate,
    the --grad-accum each gives fits on 8 processes with 79 GiB free each, and half of it would not."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        readme = f.read()
    block = readme[readme.index("### Fitting the recipe on your GPUs"):]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 7)]
    commands = [line.split("train_ae.py ", 1)[1].replace("$IMAGENET", "/imagenet").split()
                for line in block.splitlines() if line.startswith("torchrun --standalone --nproc_per_node 8")]
    sizes = [train_ae.parse_args(argv).size for argv in commands]
    assert sizes == ["XS", "S", "B", "M", "L", "XL", "H", "XH", "G"]
    for argv in commands:
        args = train_ae.parse_args(argv)
        assert args.im == 512 and args.init and args.lr == 1e-4 and args.batch_size == 256
        fixed, per_image = runs.training_step_bytes(dict(encoder=args.encoder, decoder=args.size), args, False)
        need = lambda accum: fixed + 32 // accum * per_image * runs.CUDA_ACTIVATION_SCALE
        assert need(args.grad_accum) <= 79 * 2**30, args.size
        assert args.grad_accum == 1 or need(args.grad_accum // 2) > 79 * 2**30, args.size
