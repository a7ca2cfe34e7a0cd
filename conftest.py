"""Fixtures shared by the test files that run short trainings on the CPU."""
import shutil

import pytest
import torch

from model import SSDD


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared machine two threads fighting other processes for two cores
    ran the training tests 4x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """A folder for the files a test module's fixtures share, removed when the module is done: they include
    checkpoints of a few hundred MB, which would otherwise pile up to several GB before the suite ends."""
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def encoder_ckpt(module_dir):
    """A seeded random f8c4 encoder (with a tiny decoder) for the runs to freeze."""
    torch.manual_seed(123)
    path = str(module_dir / "encoder.safetensors")
    SSDD("f8c4", dict(widths=(32, 32, 64, 64), depth=2, heads=2)).save(path)
    return path
