"""Tests of the run directory machinery of runs.py that need no training run: default run dir names, the
torchrun restart note, and durable checkpoint writes. (test_train.py runs resume, refuse and clean run dirs.)
"""
import argparse
import datetime
import math
import os

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


def test_torchrun_restarts_resume_the_noted_run_once_it_has_a_state(tmp_path, monkeypatch):
    """Workers that torchrun restarts resume the run dir of the first attempt when it saved a training state;
    before its first checkpoint there is nothing to resume, and they start a new run (the old dir would be
    refused: it holds output but no state.pt)."""
    monkeypatch.chdir(tmp_path)
    env = dict(TORCHELASTIC_RUN_ID="job7", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    first = runs.default_run_dir("")
    open(os.path.join(first, "log.jsonl"), "w").close()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = runs.default_run_dir("")  # the first attempt failed before its first checkpoint
    assert second != first and os.listdir(second) == []
    open(os.path.join(second, "state.pt"), "w").close()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert runs.default_run_dir("") == second
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job8")  # a new launch: a new run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert runs.default_run_dir("") not in (first, second)


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
