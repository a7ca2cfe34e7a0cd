"""TensorBoard events of the training scripts (runs.RunLog), read back with TensorBoard's own reader: every
logged number at its step, the validation grids as images equal to the PNGs, each step once after a crash
and resume, and nothing from ranks other than 0 or without the tensorboard package.

Short CPU runs: the tiny decoder at 64 px on a frozen random f8c4 encoder, without rFID.
"""
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

import distill
import fid
import runs
import train_ae


HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = '{"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_fid(monkeypatch):
    """Validation without rFID (no Inception weights here)."""
    def unavailable(weights=None, device="cpu"):
        raise RuntimeError("no FID weights in this test")
    monkeypatch.setattr(fid, "load_inception", unavailable)


def cli(run_dir, encoder_ckpt, steps, *extra):
    return ["--data", PHOTOS, "--size", TINY, "--im", "64", "--batch-size", "4", "--encoder-ckpt", encoder_ckpt,
            "--max-steps", str(steps), "--run-dir", str(run_dir), "--lpips-weight", "0", "--repa-weight", "0",
            "--num-workers", "0", "--eval-images", "4", "--log-every", "1", *extra]


def events(run_dir):
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})  # 0: keep all
    acc.Reload()
    return acc


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# train_ae.py killed (os._exit: no cleanup, no buffer flushed) when it saves the step-4 checkpoint
KILLED_AT_STEP_4 = """import os, sys
sys.path.insert(0, {here!r})
import fid, runs, train_ae

def unavailable(weights=None, device="cpu"):
    raise RuntimeError("no FID weights in this test")

def killed_at_step_4(run_dir, step, *args, **kwargs):
    if step == 4:
        os._exit(9)
    save(run_dir, step, *args, **kwargs)

fid.load_inception, save, runs.save_checkpoint = unavailable, runs.save_checkpoint, killed_at_step_4
train_ae.main()
"""


def test_train_events_once_per_step_after_crash_and_resume(tmp_path, encoder_ckpt):
    """A run killed while it saves its step-4 checkpoint (its last checkpoint at step 2; events up to step 4,
    validation at step 3, written, and on disk though the process ends without cleaning up), resumed to
    step 6: log.jsonl and the events hold each step once, with the same values, and the image at a step is
    that step's samples/ PNG."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_STEP_4.format(here=HERE))
    every = ("--ckpt-every", "2", "--eval-every", "3")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(script), *cli(run_dir, encoder_ckpt, 6, *every)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 9, out.stderr[-3000:]
    assert len(events(run_dir).Scalars("train/loss")) == 4
    train_ae.main(cli(run_dir, encoder_ckpt, 6, *every))

    acc = events(run_dir)
    log = read_log(run_dir)  # the killed attempt's records after its step-2 checkpoint dropped on resume
    train, evals = [r for r in log if "loss" in r], [r for r in log if "eval" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    assert [r["step"] for r in log if "replica_fingerprints" in r] == [2, 4, 6]
    names = set(train[0]) - {"step"}
    assert names >= {"loss", "fm", "grad_norm", "lr", "img_per_s", "epoch"}
    expected = {f"train/{k}" for k in names} | {f"eval/{k}" for k, v in evals[0]["eval"].items() if v is not None}
    assert "eval/psnr" in expected and "eval/rfid" not in expected  # None (no rFID here) is left out
    assert set(acc.Tags()["scalars"]) == expected
    for name in names:
        got = acc.Scalars(f"train/{name}")
        assert [e.step for e in got] == [1, 2, 3, 4, 5, 6], name
        assert [e.value for e in got] == pytest.approx([r[name] for r in train], rel=1e-6), name
    for name in ("psnr", "ssim"):
        got = acc.Scalars(f"eval/{name}")
        assert [e.step for e in got] == [3, 6]
        assert [e.value for e in got] == pytest.approx([r["eval"][name] for r in evals], rel=1e-6)
    images = acc.Images("eval/samples")
    assert [e.step for e in images] == [3, 6]
    png = np.asarray(Image.open(run_dir / "samples" / f"{6:08d}.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")), png)


def test_distill_events(tmp_path, encoder_ckpt):
    """distill.py logs through the same RunLog: its losses at each step and the validation grid."""
    distill.main(["--teacher", encoder_ckpt, "--teacher-steps", "1", "--data", PHOTOS, "--im", "64", "--batch-size",
                  "2", "--max-steps", "2", "--run-dir", str(tmp_path), "--lpips-weight", "0", "--repa-weight", "0",
                  "--num-workers", "0", "--eval-images", "2", "--log-every", "1"])
    acc = events(tmp_path)
    assert [e.step for e in acc.Scalars("train/fm")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/psnr")] == [2]
    assert [e.step for e in acc.Images("eval/samples")] == [2]


def test_only_rank_0_and_only_with_tensorboard(tmp_path, monkeypatch):
    record = dict(step=1, loss=0.5, eval=dict(psnr=10.0, rfid=None))
    log = runs.RunLog(str(tmp_path), rank=1)  # another rank: no file at all
    log(record)
    log.image("eval/samples", torch.rand(3, 8, 8), 1)
    log.close()
    assert os.listdir(tmp_path) == []

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    log = runs.RunLog(str(tmp_path), rank=0)  # no tensorboard package: log.jsonl only
    log(record)
    log.image("eval/samples", torch.rand(3, 8, 8), 1)
    log.close()
    assert os.listdir(tmp_path) == ["log.jsonl"] and read_log(tmp_path) == [record]
