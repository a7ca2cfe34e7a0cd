"""Tests of the run directory machinery of runs.py that need no training run: default run dir names, the
torchrun restart note, and durable checkpoint writes. (test_train.py runs resume, refuse and clean run dirs.)
"""
import argparse
import datetime
import json
import math
import os

import pytest
import torch

import losses
import model
import optim
import runs
from model import SSDD

TINY = {"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}


class FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 10, 6, 12, 0, 0)


def test_launches_in_the_same_second_get_their_own_run_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datetime, "datetime", FrozenClock)
    dirs = [runs.default_run_dir("distill-") for _ in range(3)]
    assert dirs == [os.path.join("runs", "distill-20251006-120000" + s) for s in ("", "-1", "-2")]
    assert all(os.path.isdir(d) for d in dirs)


def test_torchrun_restarts_go_on_with_the_run_of_their_launch(tmp_path, monkeypatch, capsys):
    """Workers that torchrun restarts take the run dir of their launch's first attempt; one that attempt left
    before its first checkpoint is started again, in a launch of its own it is refused (the same for an
    explicit --run-dir); without --max-restarts nothing is noted or marked."""
    monkeypatch.chdir(tmp_path)
    env = dict(TORCHELASTIC_RUN_ID="job7", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    first, _, state = runs.open_run_dir(None, "", 0)
    assert state is None and os.listdir(first) == [".torchrun"]
    open(os.path.join(first, "log.jsonl"), "w").close()  # the first attempt fails before its first checkpoint
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert runs.open_run_dir(None, "", 0)[0] == first
    assert runs.open_run_dir(first, "", 0)[0] == first
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job8")  # another launch
    with pytest.raises(SystemExit):
        runs.open_run_dir(first, "", 0)
    assert f"error: {first} holds earlier output (log.jsonl) but no training state" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert runs.open_run_dir(None, "", 0)[0] != first  # a new launch: a new run
    notes = sorted(f for f in os.listdir("runs") if f.startswith("."))
    assert notes == [".torchrun-job7", ".torchrun-job8"]
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job9")
    assert os.listdir(runs.open_run_dir(None, "", 0)[0]) == []
    assert sorted(f for f in os.listdir("runs") if f.startswith(".")) == notes


def test_checkpoint_files_are_fsynced_before_and_after_their_rename(tmp_path, monkeypatch):
    """state.pt, ema.safetensors and the REPA head beside it: each temporary file is flushed to disk before it
    is renamed over the old file, and the directory after, so a power loss leaves the old or the new file,
    never an empty one or a lost rename."""
    torch.manual_seed(0)
    loss_model = losses.TrainingLoss(SSDD("f8c4", TINY), train_encoder=False, repa=True)
    optimizer = optim.RAdamScheduleFree(loss_model.parameters(), lr=1e-3)
    optimizer.train()
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync",
                        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", a, b)) or replace(a, b))
    run_dir = os.path.realpath(tmp_path)
    runs.save_checkpoint(run_dir, 3, math.inf, argparse.Namespace(lr=1e-3), loss_model, loss_model.ssdd, optimizer,
                         0, lambda record: None)
    for name in ("state.pt", "ema.safetensors", "ema.repa.safetensors"):
        path = os.path.join(run_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        i = events.index(("replace", tmp, path))
        assert events[i - 1] == ("fsync", tmp) and events[i + 1] == ("fsync", run_dir), (name, events)
    assert sorted(os.listdir(run_dir)) == ["ema.repa.safetensors", "ema.safetensors", "state.pt"]
    assert torch.load(os.path.join(run_dir, "state.pt"), weights_only=True)["step"] == 3


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, capsys, full_disk):
    """torch.save says "enforce fail at inline_container.cc" of a full disk: the run stops with one line that
    says it, the temporary file removed (it would keep the disk full), the previous checkpoint intact. The
    same for the weights files beside it."""
    torch.manual_seed(0)
    loss_model = losses.TrainingLoss(SSDD("f8c4", TINY), train_encoder=False, repa=False)
    optimizer = optim.RAdamScheduleFree(loss_model.parameters(), lr=1e-3)
    optimizer.train()
    save = lambda step: runs.save_checkpoint(str(tmp_path), step, math.inf, argparse.Namespace(lr=1e-3), loss_model,
                                             loss_model.ssdd, optimizer, 0, lambda record: None)
    save(3)
    for name in ("state.pt", "ema.safetensors"):
        full_disk(100_000, name)
        with pytest.raises(SystemExit) as e:
            save(4)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: no space left on device writing {tmp_path / name}\n"
        assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "state.pt"]
        assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == (3 if name == "state.pt" else 4)
        assert json.loads(model.load_safetensors(tmp_path / "ema.safetensors")[1]["step"]) == 3


def test_the_non_finite_stop_says_what_is_true(tmp_path):
    """Before the first checkpoint there is no checkpoint to resume from: the weights the run started from
    are the likely cause (or the learning rate)."""
    values = dict(loss=torch.tensor(float("nan")), grad_norm=torch.tensor(2.0))
    state_path = str(tmp_path / "state.pt")
    with pytest.raises(SystemExit, match=r"^error: non-finite loss or gradient at step 1 \({'loss': nan, 'grad_norm': "
                                         rf"2.0}}\); stopping. No checkpoint was written yet \({state_path}\): the "
                                         r"weights the run started from \(--init, --encoder-ckpt, --teacher\) are the "
                                         r"likely cause, or a too high --lr.$"):
        runs.stop_unless_finite(values, 0, state_path)
    open(state_path, "w").close()
    with pytest.raises(SystemExit, match=f"step 6 .* The last good checkpoint {state_path} is intact: resume from it "
                                         f"with a lower --lr.$"):
        runs.stop_unless_finite(values, 5, state_path)
    runs.stop_unless_finite(dict(loss=torch.tensor(1.0)), 5, state_path)  # finite: nothing happens


def test_the_torchrun_note_goes_when_its_run_ends(tmp_path, monkeypatch):
    """runs/.torchrun-<id> is needed only while torchrun may restart the launch's workers."""
    monkeypatch.chdir(tmp_path)
    for k, v in dict(TORCHELASTIC_RUN_ID="job7", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="0").items():
        monkeypatch.setenv(k, v)
    run_dir, _, _ = runs.open_run_dir(None, "", 0)
    other = runs.default_run_dir("distill-")  # another launch's, still running
    assert sorted(os.listdir("runs")) == sorted([".torchrun-distill-job7", ".torchrun-job7",
                                                 os.path.basename(run_dir), os.path.basename(other)])
    log = runs.RunLog(run_dir, 0)
    log({"step": 1, "loss": 0.5})
    log.close()
    assert sorted(os.listdir("runs")) == sorted([".torchrun-distill-job7", os.path.basename(run_dir),
                                                 os.path.basename(other)])
