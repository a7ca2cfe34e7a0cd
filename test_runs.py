"""Tests of the run directory machinery of runs.py that need no training run: default run dir names, the
torchrun restart note, and durable checkpoint writes. (test_train.py runs resume, refuse and clean run dirs.)
"""
import argparse
import datetime
import math
import os

import pytest
import torch

import losses
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
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
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
