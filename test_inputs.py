"""What the user gives the scripts: every bad argument, path or file is one `error:` line on stderr with exit
status 2, found before anything is built or written; a training step too big for the machine's memory is
refused at once; images of every mode load as the same 8-bit RGB; folders are listed once whatever their
links; offline hints name the script's own flag; a folder without train/ and val/ holds out its validation
images."""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib

import lpips
import numpy as np
import pytest
import torch
from PIL import Image

import data
import distill
import evaluate
import fid
import latent_stats
import losses
import metrics
import runs
import train_ae
from model import SSDD

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = {"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path):
    """Every test runs in its own empty folder, so a default run dir (runs/...) would show up there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ckpt(module_dir):
    torch.manual_seed(0)
    path = str(module_dir / "tiny.safetensors")
    SSDD("f8c4", TINY).save(path)
    return path


@pytest.fixture
def files(tmp_path_factory):
    """A folder for a test's input files, apart from the current folder, which must stay empty."""
    return tmp_path_factory.mktemp("files")


@pytest.fixture
def offline(monkeypatch, files):
    """Every download fails, as on a machine without internet, and nothing is cached."""
    def urlopen(url, timeout):
        raise urllib.error.URLError("no internet in this test")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(files / "hub"))


def stops(capsys, main, argv, phrase, seconds=1.0):
    """main(argv) stops with exit status 2 within `seconds`, after one `error: ...` line on stderr that
    contains phrase; nothing is written to the current folder. Returns the line."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    elapsed = time.perf_counter() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, (e.value.code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert os.listdir(".") == [], os.listdir(".")  # no run dir, no samples/
    assert elapsed < seconds, elapsed
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# bad arguments: one line, exit status 2, nothing built or written


def train_argv(*extra):
    return ["--data", PHOTOS, "--size", json.dumps(TINY), "--im", "64", "--batch-size", "4", "--train-encoder",
            "--lpips-weight", "0", "--repa-weight", "0", "--num-workers", "0", *extra]


@pytest.mark.parametrize("extra, phrase", [
    (["--size", "Q"], "--size: decoder size must be one of"),
    (["--size", "{widths: 1}"], "--size: Expecting property name"),
    (["--size", '{"widths": [32, 32, 64, 64]}'], "dict of exactly widths, depth and heads"),
    (["--size", '{"widths": [32, 32, 64], "depth": 2, "heads": 2}'], "4 positive multiples of 32"),
    (["--size", '{"widths": [32, 32, 64, 48], "depth": 2, "heads": 2}'], "4 positive multiples of 32"),
    (["--size", '{"widths": [32, 32, 64, 64], "depth": 0, "heads": 2}'], "depth must be an integer of at least 1"),
    (["--size", '{"widths": [32, 32, 64, 64], "depth": 2, "heads": 3}'], "dividing the last width 64"),
    (["--encoder", "f7c4"], "--encoder: encoder must be named"),
    (["--im", "0"], "--im 0: images must be at least 64 px"),
    (["--im", "-64"], "--im -64: images must be at least 64 px"),
    (["--im", "60"], "--im 60: image sides must be divisible by 8"),
    (["--im", "56"], "--im 56: images must be at least 64 px"),
    (["--encoder", "f16c4", "--im", "72"], "--im 72: image sides must be divisible by 16"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--grad-accum", "3"], "--batch-size 4 is not divisible by the 1 processes x --grad-accum 3"),
    (["--lr", "0"], "--lr must be above 0, got 0.0"),
    (["--lr", "nan"], "--lr must be above 0, got nan"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--max-steps", "-1"], "--max-steps must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--eval-images", "0"], "--eval-images must be at least 1"),
    (["--num-workers", "-1"], "--num-workers must be at least 0"),
    (["--aug-scale", "0.5"], "--aug-scale must be at least 1"),
    (["--init", "missing.safetensors"], "--init 'missing.safetensors' does not exist"),
    (["--encoder-ckpt", HERE], "is a folder, not a file"),
    (["--dinov2-weights", "missing.pth"], "--dinov2-weights 'missing.pth' does not exist"),
    (["--fid-weights", "missing.pth"], "--fid-weights 'missing.pth' does not exist"),
    (["--lpips-backbone", "missing.pth"], "--lpips-backbone 'missing.pth' does not exist"),
    (["--lpips-heads", "missing.pth"], "--lpips-heads 'missing.pth' does not exist"),
    (["--data", "missing"], "data folder 'missing' does not exist"),
    (["--data", HERE + "/testdata/photos/train/Aqua_s1024_0_0.png"], "is not a folder"),
    (["--batch-size", "16"], "12 training images, fewer than one batch of 16"),
])
def test_train_ae_bad_arguments(capsys, extra, phrase):
    stops(capsys, train_ae.main, train_argv(*extra), phrase)


def test_train_ae_bad_data_and_flags(capsys, monkeypatch, files):
    os.makedirs(files / "empty_data" / "sub", exist_ok=True)
    stops(capsys, train_ae.main, train_argv("--data", files / "empty_data"), "no images")
    argv = [a for a in train_argv() if a != "--train-encoder"]
    stops(capsys, train_ae.main, argv, "give --encoder-ckpt (a trained encoder to freeze), --init, or --train-encoder")
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before torchrun's process group is joined
    stops(capsys, train_ae.main, train_argv(), "--batch-size 4 is not divisible by the 3 processes")


def distill_argv(teacher, *extra):
    return ["--teacher", teacher, "--data", PHOTOS, "--im", "64", "--batch-size", "4", "--lpips-weight", "0",
            "--repa-weight", "0", "--num-workers", "0", *extra]


def test_distill_bad_arguments(capsys, ckpt, files):
    stops(capsys, distill.main, distill_argv("missing.safetensors"), "--teacher 'missing.safetensors' does not exist")
    stops(capsys, distill.main, distill_argv(HERE), "is a folder, not a file")
    stops(capsys, distill.main, distill_argv(ckpt, "--teacher-steps", "0"), "--teacher-steps must be at least 1")
    stops(capsys, distill.main, distill_argv(ckpt, "--teacher-time-power", "0"),
          "--teacher-time-power must be above 0")
    stops(capsys, distill.main, distill_argv(ckpt, "--im", "100"), "--im 100: image sides must be divisible by 8")
    stops(capsys, distill.main, distill_argv(ckpt, "--lr", "-1"), "--lr must be above 0")
    stops(capsys, distill.main, distill_argv(ckpt, "--data", "missing"), "data folder 'missing' does not exist")
    crafted = files / "crafted.safetensors"
    crafted.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    stops(capsys, distill.main, distill_argv(crafted), str(crafted))  # loaded before the run dir is made


def eval_argv(ckpt, *extra):
    return ["--ckpt", ckpt, "--data", PHOTOS, "--im", "64", "--num-workers", "0", *extra]


def test_evaluate_and_latent_stats_bad_arguments(capsys, ckpt, files):
    for main in (evaluate.main, latent_stats.main):
        stops(capsys, main, eval_argv("missing.safetensors"), "--ckpt 'missing.safetensors' does not exist")
        stops(capsys, main, eval_argv(HERE), "is a folder, not a file")
        stops(capsys, main, eval_argv(ckpt, "--im", "60"), "--im 60: image sides must be divisible by 8")
        stops(capsys, main, eval_argv(ckpt, "--batch-size", "0"), "--batch-size must be at least 1")
        stops(capsys, main, eval_argv(ckpt, "--limit", "0"), "--limit must be at least 1")
        stops(capsys, main, eval_argv(ckpt, "--num-workers", "-2"), "--num-workers must be at least 0")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--steps", "0"), "--steps must be at least 1")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--time-power", "-2"), "--time-power must be above 0")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--fid-weights", "missing.pth"),
          "--fid-weights 'missing.pth' does not exist")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--json", "nowhere/r.json"),
          "--json 'nowhere/r.json': its folder does not exist")
    stops(capsys, latent_stats.main, eval_argv(ckpt, "--shard-size", "0"), "--shard-size must be at least 1")
    for main in (evaluate.main, latent_stats.main):
        stops(capsys, main, eval_argv(ckpt, "--encoder-ckpt", "missing.safetensors"),
              "--encoder-ckpt 'missing.safetensors' does not exist")
    stops(capsys, distill.main, distill_argv(ckpt, "--encoder-ckpt", HERE), "--encoder-ckpt")
    # the checkpoint is loaded: its factor (16) does not divide 72 px
    f16 = str(files / "f16.safetensors")
    SSDD("f16c4", TINY).save(f16)
    stops(capsys, evaluate.main, eval_argv(f16, "--im", "72"), "image sides must be divisible by 16", seconds=5)


def test_url_checkpoints_pass_the_checks(capsys):
    """SSDD.from_checkpoint downloads https:// checkpoints and published names, and encoder_weights also
    sd-vae-ft-mse: the checks take them (the downloads are tested in test_download.py), but not a URL that names
    no file."""
    for url in ("https://example.com/ssdd.safetensors", "F8C4_M_256"):
        for encoder in (url, "sd-vae-ft-mse"):
            train_ae.check_args(train_ae.parse_args(train_argv("--init", url, "--encoder-ckpt", encoder)))
            distill.check_args(distill.parse_args(distill_argv(url, "--encoder-ckpt", encoder)))
            evaluate.check_args(evaluate.parse_args(eval_argv(url, "--encoder-ckpt", encoder)))
            latent_stats.check_args(latent_stats.parse_args(eval_argv(url, "--encoder-ckpt", encoder)))
    for end in ("/", "/.."):
        bad = "https://example.com/ssdd" + end
        phrase = f"{bad} names no file (its path ends in '{end}')"
        stops(capsys, train_ae.main, train_argv("--init", bad), f"--init {phrase}")
        stops(capsys, train_ae.main, train_argv("--encoder-ckpt", bad), f"--encoder-ckpt {phrase}")
        stops(capsys, distill.main, distill_argv(bad), f"--teacher {phrase}")
        stops(capsys, evaluate.main, eval_argv(bad), f"--ckpt {phrase}")


# ----------------------------------------------------------------------------------------------------------
# files that are not what they should be: one line, exit status 2


def test_bad_files_are_one_line(offline, capsys, ckpt, monkeypatch, files):
    garbage = files / "garbage.bin"
    garbage.write_bytes(b"hello, I am not a checkpoint")
    a_list = files / "list.pth"
    torch.save([1, 2, 3], a_list)
    alex = files / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in metrics.alexnet_features().state_dict().items()}, alex)
    lpips_dir = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1")  # the real LPIPS heads
    heads = dict(alex=os.path.join(lpips_dir, "alex.pth"), vgg=os.path.join(lpips_dir, "vgg.pth"))
    slow = 10  # these load the checkpoint and the data first
    stops(capsys, evaluate.main, eval_argv(str(garbage)), "garbage.bin", slow)
    stops(capsys, latent_stats.main, eval_argv(str(garbage)), "garbage.bin", slow)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--fid-weights", garbage), "garbage.bin is not a PyTorch weights file",
          slow)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--fid-weights", a_list), "list.pth holds a list, not a state dict",
          slow)
    broken = files / "broken.pt"  # a zip that looks like TorchScript (it has a code/ folder) but is not one
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("archive/code/x.py", "garbage")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--fid-weights", broken), "broken.pt is not a readable TorchScript "
          "file", slow)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--fid-weights", alex), "alexnet.pth does not hold the weights of "
          "InceptionV3: Missing key(s)", slow)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--lpips-backbone", ckpt, "--lpips-heads", heads["alex"]),
          "tiny.safetensors does not hold the weights of torchvision's alex (LPIPS backbone): Missing key(s)", slow)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--lpips-backbone", alex, "--lpips-heads", heads["vgg"]),
          "vgg.pth is not an LPIPS v0.1 alex heads file", slow)

    with pytest.raises(ValueError, match="alexnet.pth does not hold the weights of DINOv2: Missing key"):
        losses.load_dinov2(str(alex))  # --dinov2-weights (loaded after the run dir is made)

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(alex))
    monkeypatch.setattr(torch, "load", no_permission)
    stops(capsys, evaluate.main, eval_argv(ckpt, "--lpips-backbone", alex, "--lpips-heads", heads["alex"]),
          "Permission denied", slow)


def test_init_of_another_size_is_one_line(capsys, ckpt, files):
    """The weights are loaded after the run dir is made (a resumed run does not load them): the error is still
    one line, not the hundreds of size mismatches of load_state_dict."""
    other = str(files / "other.safetensors")
    SSDD("f8c4", dict(TINY, widths=[32, 64, 64, 64])).save(other)
    with pytest.raises(SystemExit) as e:
        train_ae.main(train_argv("--init", other, "--run-dir", "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {other} does not hold the weights of SSDD: Missing key(s)")
    assert len(lines[0].replace(other, "")) < 400  # the first keys, not all of them


# ----------------------------------------------------------------------------------------------------------
# evaluation and latent export: an unreadable image is an error, outputs are checked before the work

# A folder in which no process can create a file, root included (sysfs), so that a read-only path is tested
# whoever runs the tests.
UNWRITABLE = "/sys"


def fails(capsys, main, argv, phrase):
    """main(argv) stops with exit status 2 and one `error: ...` line on stderr, its last one, that contains
    phrase (a progress bar may come before it). Returns the line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    assert lines[-1].startswith("error: ") and phrase in lines[-1], lines[-1]
    return lines[-1]


def test_evaluation_never_substitutes_an_unreadable_image(capsys, ckpt, files, bomb_folder):
    """Among 8 readable photos, a file Pillow refuses: a substitute would count the next image twice (9
    images reported) and save its reconstruction under the bad file's name. Evaluation, its periodic form in
    training and latent export stop on it with one line naming it, also through a data loader worker, before
    any result is written."""
    bomb = bomb_folder / "0_bomb.png"
    phrase = f"cannot read image {bomb}: Image size (400000000 pixels) exceeds limit"
    recons = files / "recons"
    fails(capsys, evaluate.main, ["--ckpt", ckpt, "--data", bomb_folder, "--im", "64", "--num-workers", "1",
                                  "--steps", "1", "--json", files / "r.json", "--save-recons", recons], phrase)
    assert not os.path.exists(files / "r.json") and os.listdir(recons) == []
    copy = files / "copy.safetensors"
    copy.write_bytes(open(ckpt, "rb").read())
    fails(capsys, latent_stats.main, ["--ckpt", copy, "--data", bomb_folder, "--im", "64", "--num-workers", "1",
                                      "--save-latents", files / "latents"], phrase)
    assert copy.read_bytes() == open(ckpt, "rb").read() and os.listdir(files / "latents") == []
    val = data.load_split(str(bomb_folder), "val", 64)
    with pytest.raises(SystemExit) as e:
        runs.validate(SSDD.from_checkpoint(ckpt), val, argparse.Namespace(eval_images=9, seed=0, num_workers=0,
                                                                          precision="fp32"), 4,
                      torch.device("cpu"), None, str(files / "run"), 10, math.inf, 0, lambda record: None, 1)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {phrase}") and err.count("\n") == 1, err


def test_evaluate_outputs_are_checked_before_the_work(capsys, ckpt, files):
    stops(capsys, evaluate.main, eval_argv(ckpt, "--json", files), f"--json {str(files)!r} is a folder, not a file")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--json", f"{UNWRITABLE}/r.json"),
          f"--json: cannot write into {UNWRITABLE}")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--save-recons", UNWRITABLE),
          f"--save-recons: cannot write into {UNWRITABLE}")
    # --save-recons overwrites no file
    recons = files / "recons"
    (recons / "Kite_s512_1_1.png").parent.mkdir()
    (recons / "Kite_s512_1_1.png").write_bytes(b"an earlier reconstruction, or a photo")
    stops(capsys, evaluate.main, eval_argv(ckpt, "--save-recons", recons),
          f"--save-recons {str(recons)!r} already holds 1 of the 6 reconstructions (Kite_s512_1_1.png): give a new "
          f"or empty folder")
    assert os.listdir(recons) == ["Kite_s512_1_1.png"]


def test_a_full_disk_is_one_line(capsys, offline, ckpt, files, full_disk):
    """evaluate.py's --json is written atomically: on a full disk neither it nor a temporary file is left."""
    full_disk(100, "r.json")
    out = files / "r.json"
    fails(capsys, evaluate.main, eval_argv(ckpt, "--limit", "2", "--steps", "1", "--json", out),
          f"error: no space left on device writing {out}")
    assert not [f for f in os.listdir(files) if f.startswith("r.json")]


# ----------------------------------------------------------------------------------------------------------
# memory: a training step that cannot fit stops at once


def test_default_command_stops_on_memory(capsys, monkeypatch):
    """The issue's command (M decoder trained with its encoder, 128 px, batch 256: 227 GiB in float32, OOM-killed
    without a word at 21 GB) stops before anything is written, on a machine with 16 GiB available, naming the
    --grad-accum that fits."""
    monkeypatch.setattr(runs, "available_memory", lambda device: 16 * 2**30)
    line = stops(capsys, train_ae.main, ["--data", "synthetic", "--train-encoder", "--lpips-weight", "0",
                                         "--repa-weight", "0"], "a training step needs about 226.8 GiB", seconds=60)
    assert line.endswith("but 16.0 GiB is available on cpu: --grad-accum 16 fits; --checkpoint-activations alone "
                         "does not")


def test_tiny_run_passes_the_memory_check(monkeypatch):
    args = train_ae.parse_args(train_argv())
    config = dict(encoder="f8c4", decoder=TINY)
    fixed, per_image = runs.training_step_bytes(config, args, train_encoder=True)
    monkeypatch.setattr(runs, "available_memory", lambda device: fixed + 4 * per_image + 1)
    runs.check_memory(config, args, 4, torch.device("cpu"), train_encoder=True)
    with pytest.raises(SystemExit):
        runs.check_memory(config, args, 5, torch.device("cpu"), train_encoder=True)


# The peak resident memory is the kernel's VmHWM, reset by exec: ru_maxrss is not, so a process started by a
# big pytest process would report pytest's own peak.
MEASURE = r"""
import copy, json, sys
import torch
import losses, optim
from model import SSDD
torch.set_num_threads(1)
size, im, batch = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
peak = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = peak()
ssdd = SSDD("f8c4", size)
loss_model = losses.TrainingLoss(ssdd, train_encoder=True, repa=False)
ema = copy.deepcopy(ssdd).eval().requires_grad_(False)
optimizer = optim.RAdamScheduleFree(optim.param_groups(loss_model.named_parameters(), 0.0), lr=1e-4)
optimizer.train()
for step in range(2):  # the second step has the optimizer's state
    x = torch.rand(batch, 3, im, im) * 2 - 1
    t, noise, z_noise = losses.step_noise(0, step, batch, (3, im, im), (4, im // 8, im // 8), 0, 1, "cpu")
    terms, out = loss_model(x, t, noise, z_noise)
    sum(terms.values()).backward()
    loss_model.clip_grad_norms()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optim.update_ema(ema, ssdd, optimizer, 0.0)
print(peak() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from /proc (Linux)")
def test_memory_estimate_is_near_the_measured_peak():
    """The estimate against the peak resident memory of two real training steps (tiny decoder trained with
    its encoder, 64 px, batch 8) in a fresh process, above what the process held before building the model.
    Measured: 1606 MiB against 1483 MiB estimated, 1.08x (1.04-1.29x for tiny, S and M models at 64 and 128
    px, batches 2 to 32, the encoder trained or frozen)."""
    im, batch = 64, 8
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(TINY), str(im), str(batch)], cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    args = train_ae.parse_args(train_argv("--im", str(im)))
    fixed, per_image = runs.training_step_bytes(dict(encoder="f8c4", decoder=TINY), args, train_encoder=True)
    estimate = fixed + batch * per_image
    assert 0.9 < measured / estimate < 1.4, (measured / 2**20, estimate / 2**20)


# ----------------------------------------------------------------------------------------------------------
# image modes


def png16(pixels):
    """PNG bytes of a 16-bit (H, W, C) array, C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA): Pillow
    cannot write 16-bit colour PNGs."""
    h, w, c = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))  # filter 0 on every row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def loaded(path):
    """The image as both loaders give it, (H, W, 3) uint8: data.load_image and data.ImageFolder.load."""
    a = data.load_image(path).permute(1, 2, 0).numpy()
    b = np.asarray(data.ImageFolder([path], 64, train=False).load(0))
    np.testing.assert_array_equal(a, b)
    return a.astype(int)


def test_16_bit_images_scale_to_8_bits(tmp_path):
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    want = np.round(v / 257).astype(int)
    Image.fromarray(v).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    got = loaded(str(tmp_path / "gray16.png"))
    np.testing.assert_array_equal(got, np.stack([want] * 3, -1))  # Pillow's convert: 99.6% white
    Image.fromarray(v.astype(np.int32)).save(tmp_path / "gray32.tif")  # mode I, as older Pillow reads 16-bit PNGs
    assert Image.open(tmp_path / "gray32.tif").mode == "I"
    np.testing.assert_array_equal(loaded(str(tmp_path / "gray32.tif")), np.stack([want] * 3, -1))
    # 16-bit colour: Pillow decodes it to 8 bits itself, by v >> 8: within 1 of round(v / 257)
    rgb = np.stack([v, 65535 - v, v[::-1]], -1)
    for channels, name in ((rgb, "rgb16.png"), (np.concatenate([rgb, v[..., None]], -1), "rgba16.png"),
                           (np.stack([v, v], -1), "la16.png")):
        (tmp_path / name).write_bytes(png16(channels))
        got = loaded(str(tmp_path / name))
        expect = np.round(channels[..., :3] / 257) if channels.shape[-1] > 2 else np.stack([want] * 3, -1)
        assert np.abs(got - expect).max() <= 1, name
        assert np.abs(got - expect).mean() < 0.6, name


def test_other_modes_convert_sensibly(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.stack([gray, 255 - gray], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(loaded(str(tmp_path / "la.png")), np.stack([gray] * 3, -1))  # alpha dropped
    palette = Image.new("P", (4, 4))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2, 1] * 4)
    palette.save(tmp_path / "p.png")
    got = loaded(str(tmp_path / "p.png"))
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [0, 255, 0] and got[0, 2].tolist() == [0, 0, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    cmyk.save(tmp_path / "cmyk.tif")
    assert loaded(str(tmp_path / "cmyk.tif"))[0, 0].tolist() == [255, 0, 0]
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)  # float images hold [0, 1]
    Image.fromarray(ramp, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(loaded(str(tmp_path / "f.tif")), np.stack([np.round(ramp * 255)] * 3, -1))
    Image.fromarray(gray > 127).save(tmp_path / "1.png")
    assert set(np.unique(loaded(str(tmp_path / "1.png")))) == {0, 255}


# ----------------------------------------------------------------------------------------------------------
# folders


def test_linked_folders_are_listed_once(tmp_path):
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for name in ("x.png", "a/y.png", "a/b/z.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    os.symlink("..", root / "a" / "b" / "loop")  # a loop: b/loop/b/loop/... was listed 41 times
    os.symlink(root / "a", root / "again")  # a second link to a folder listed already
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "w.png")
    os.symlink(other, root / "linked")  # a link to a folder outside: followed
    start = time.perf_counter()
    files = data.image_files(str(root))
    assert time.perf_counter() - start < 1
    assert [os.path.relpath(f, root) for f in files] == ["a/b/z.png", "a/y.png", "linked/w.png", "x.png"]


def test_a_folder_without_val_holds_out_its_validation_images(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(folder / f"{i:02d}.png")
    every = data.find_images(str(folder))
    train = data.load_split(str(folder), "train", 64, holdout=True)
    val = data.load_split(str(folder), "val", 64, holdout=True)
    assert val.paths == [every[5], every[11]] and train.paths == every[:5] + every[6:11]  # 1 in 6 of 12
    assert "held out of training" in val.note and train.note == ""
    assert data.load_split(str(folder), "val", 64).paths == every  # evaluate.py's: the whole folder
    assert data.load_split(PHOTOS, "val", 64, holdout=True).paths == data.load_split(PHOTOS, "val", 64).paths
    (folder / "many").mkdir()
    for i in range(1000):
        os.symlink(folder / "00.png", folder / "many" / f"{i:04d}.png")
    assert len(data.load_split(str(folder), "val", 64, holdout=True)) == 1012 // 100
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (64, 64)).save(one / "a.png")
    with pytest.raises(FileNotFoundError, match="none to hold out for validation"):
        data.load_split(str(one), "train", 64, holdout=True)


def test_short_run_on_a_flat_folder(offline, capsys, ckpt, tmp_path):
    """A run on a folder without train/ and val/ says that it validates on held-out images, prints the
    validation metrics, and validates on fewer images in a short run."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for name in sorted(os.listdir(os.path.join(PHOTOS, "train")))[:6]:
        os.symlink(os.path.join(PHOTOS, "train", name), folder / name)
    train_ae.main(["--data", str(folder), "--size", json.dumps(TINY), "--im", "64", "--batch-size", "2",
                   "--encoder-ckpt", ckpt, "--max-steps", "1", "--run-dir", "run", "--lpips-weight", "0",
                   "--repa-weight", "0", "--num-workers", "0"])
    out = capsys.readouterr().out
    assert "4 training / 2 validation images (1 in 3 of the images under" in out and "held out of training" in out
    assert "step 1: validation PSNR " in out and " dB, SSIM " in out and "rFID" not in out
    saved = json.load(open("run/args.json"))
    assert saved["eval_images"] == 2  # at least 16 images in a short run, of the 2 there are


def test_defaults_fit_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert data.default_workers() == 2  # not 8 on a 2-core machine
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert data.default_workers() == 64  # every core: a rank's data loading keeps several busy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.default_workers() == 8
    args = train_ae.parse_args(["--data", "x"])
    assert args.num_workers == 8 and args.eval_images is None and args.eval_every is None
    # ImageNet, 256 images a step, 5004 steps an epoch: the official loop's whole validation split of 50k images,
    # every 4 epochs in training (a validated image costs about 3 trained ones) and every epoch in distillation
    args.eval_every = 4 * 5004
    assert runs.eval_images_default(args, 300 * 5004, 50_000, train_ae.EVAL_COST) == 50_000
    args.eval_every = 5004
    assert runs.eval_images_default(args, 10 * 5004, 50_000, distill.EVAL_COST) == 50_000
    # a short run: validation at about a tenth of its compute, at least 16 images
    args.batch_size, args.eval_every = 8, 25
    assert runs.eval_images_default(args, 50, 1000, train_ae.EVAL_COST) == 16  # 200 images trained, 6 validated
    args.batch_size = 256
    assert runs.eval_images_default(args, 50, 1000, train_ae.EVAL_COST) == 213
    assert runs.eval_images_default(args, 50, 100, train_ae.EVAL_COST) == 100
    args.eval_images = 3
    assert runs.eval_images_default(args, 50, 1000, train_ae.EVAL_COST) == 3


# ----------------------------------------------------------------------------------------------------------
# offline: the hints name the flag of the script being run, once, on stderr


def test_offline_hints_name_the_flag(offline, capsys, ckpt):
    with pytest.raises(RuntimeError, match=r"pt_inception.*, or pass --fid-weights FILE$"):
        fid.load_inception()
    with pytest.raises(SystemExit) as e:
        fid.main([PHOTOS + "/train", PHOTOS + "/val", "--device", "cpu"])  # fid.py's own flag is --weights
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("or pass --weights FILE")
    base = ["--data", PHOTOS, "--size", json.dumps(TINY), "--im", "64", "--batch-size", "4", "--encoder-ckpt", ckpt,
            "--max-steps", "1", "--num-workers", "0"]
    for main, argv, flag in ((train_ae.main, base + ["--repa-weight", "0", "--run-dir", "a"], "--lpips-backbone"),
                             (train_ae.main, base + ["--lpips-weight", "0", "--run-dir", "b"], "--dinov2-weights"),
                             (distill.main, distill_argv(ckpt, "--lpips-weight", "0.5", "--run-dir", "c"),
                              "--lpips-backbone")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("could not download") == 1, err
        assert err.strip().splitlines()[-1].endswith(f"or pass {flag} FILE"), err
