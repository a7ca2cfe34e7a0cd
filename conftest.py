"""Fixtures shared by the test files, and the threads of pytest-xdist's workers."""
import errno
import io
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib

import pytest
import torch

import metrics
import model
import weights
from model import SSDD

# Under pytest-xdist (`-n N`) the workers share this machine's cores: each gets its share of intra-op threads,
# not torch's default of all of them (two workers of two threads on two cores ran some tests 5x slower).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


class Served(io.BytesIO):
    headers = {}  # no Content-Length, as in a chunked reply


@pytest.fixture
def fake_internet(monkeypatch, tmp_path):
    """model.download fetches into tmp_path from the {url: bytes} dict returned; other URLs are unreachable.
    (test_download.py tests it against a real HTTP server.)"""
    served = {}

    def urlopen(url, timeout):
        if url not in served:
            raise urllib.error.URLError("no internet")
        return Served(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return served


@pytest.fixture
def evaluated(monkeypatch):
    """evaluate.py without its metric networks (every weight download fails, as offline: no rFID, no LPIPS),
    recording the models metrics.reconstruct, its evaluation loop, is given."""
    models = []
    reconstruct = metrics.reconstruct

    def offline(url, hint, file_name=None):
        raise RuntimeError(f"could not download {url} (offline test), or {hint}")

    def recorded(model, *args, **kwargs):
        models.append(model)
        return reconstruct(model, *args, **kwargs)

    monkeypatch.setattr(weights, "download", offline)
    monkeypatch.setattr(metrics, "reconstruct", recorded)
    return models


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(room, where): from now on the files that model.write_durably writes whose path contains
    `where` take `room` bytes, then fail as on a full disk (ENOSPC), without filling the real one."""
    def fill(room=0, where=""):
        class Full(io.FileIO):
            def write(self, b):
                if self.tell() + len(b) > room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return super().write(b)

        def opener(path, mode="r"):
            if "w" not in mode or where not in str(path):
                return open(path, mode)
            return Full(path, "w") if "b" in mode else io.TextIOWrapper(io.BufferedWriter(Full(path, "w")))

        monkeypatch.setattr(model, "open", opener, raising=False)
    return fill


@pytest.fixture
def bomb_folder(tmp_path_factory):
    """A folder of 8 readable photos and, first in sorted order, 0_bomb.png: a header-only "decompression
    bomb", a PNG that claims 20000 x 20000 pixels and holds none, which Pillow refuses to open."""
    folder = tmp_path_factory.mktemp("bomb_folder")
    photos = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos", "train")
    for name in sorted(os.listdir(photos))[:8]:
        shutil.copy(os.path.join(photos, name), folder / name)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 8-bit RGB
    (folder / "0_bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")
                                        + chunk(b"IEND", b""))
    return folder
