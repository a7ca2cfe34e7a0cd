"""model.download against a real HTTP server on 127.0.0.1: a file is fetched once into the torch hub cache,
keyed by its whole URL, checked for length, sha256 and (.safetensors) its header before it takes its name (a
failed download leaves nothing behind), bounded in time and size, and every failure is a one-line error
saying what to do. SSDD.from_checkpoint loads such URLs, and the published checkpoints by name from a server
laid out as the model hub ($HF_ENDPOINT)."""
import errno
import hashlib
import http.server
import io
import os
import re
import socket
import stat
import threading
import time
import types

import pytest
import torch

import evaluate
import latent_stats
import model
from model import SSDD, download, published_url

PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos")

TINY = dict(widths=(32, 32, 64, 64), depth=2, heads=2)


def cached(cache, url, name):
    """The cache's file for url, written out here: <16 hex digits of the URL's sha256>-<name>."""
    return cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The torch hub cache's checkpoints folder, in tmp_path."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def server(cache):
    """Serves files {path: bytes} at url + path (any other path: 404), announcing lengths[path] as the
    Content-Length where given (more than it sends: a body cut short; None: no Content-Length), sending a
    byte every drip[path] seconds where given, and records the requested paths."""
    s = types.SimpleNamespace(files={}, lengths={}, drip={}, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            s.requests.append(self.path)
            if self.path not in s.files:
                return self.send_error(404)
            body = s.files[self.path]
            self.send_response(200)
            if s.lengths.get(self.path, len(body)) is not None:
                self.send_header("Content-Length", str(s.lengths.get(self.path, len(body))))
            self.end_headers()
            try:
                if self.path in s.drip:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(s.drip[self.path])
                else:
                    self.wfile.write(body)  # then HTTP/1.0 closes the connection
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.01), daemon=True).start()
    s.url = f"http://127.0.0.1:{httpd.server_port}"
    yield s
    httpd.shutdown()
    httpd.server_close()


def one_line_error(fn, match):
    with pytest.raises(RuntimeError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_checkpoint_loads_from_url(server, cache, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    m.default_steps = 3
    m.save(tmp_path / "tiny.safetensors")
    server.files["/ckpt/tiny.safetensors"] = data = (tmp_path / "tiny.safetensors").read_bytes()
    monkeypatch.setattr(torch, "load", None)  # a downloaded checkpoint is parsed, never unpickled
    loaded = SSDD.from_checkpoint(server.url + "/ckpt/tiny.safetensors", sha256=hashlib.sha256(data).hexdigest())
    assert loaded.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.default_steps == 3
    path = cached(cache, server.url + "/ckpt/tiny.safetensors", "tiny.safetensors")
    assert os.listdir(cache) == [path.name]
    assert capsys.readouterr().err == f"downloading {server.url}/ckpt/tiny.safetensors to {path}\n"
    one_line_error(lambda: SSDD.from_checkpoint(server.url + "/ckpt/tiny.safetensors", sha256="0" * 64),
                   "expected 0{64}")


def test_second_call_is_served_from_the_cache(server, cache, capsys):
    server.files["/w.pth"] = b"weights"
    digest = hashlib.sha256(b"weights").hexdigest()
    path = download(server.url + "/w.pth")
    assert download(server.url + "/w.pth", sha256=digest) == download(server.url + "/w.pth", sha256=digest[:8]) == path
    assert server.requests == ["/w.pth"]
    assert capsys.readouterr().err.count("downloading") == 1
    with open(path, "rb") as f:
        assert f.read() == b"weights"
    # with sha256 given, the cached file is checked whenever it is used
    with open(path, "wb") as f:
        f.write(b"damaged")
    one_line_error(lambda: download(server.url + "/w.pth", sha256=digest),
                   f"{re.escape(path)} has sha256 {hashlib.sha256(b'damaged').hexdigest()}, expected {digest} .*"
                   f"remove it to download again")
    assert server.requests == ["/w.pth"]


def test_two_urls_of_one_file_name_never_share_a_file(server, cache, tmp_path):
    """Hub files share a few names (model.safetensors): each URL has its own file, named readably."""
    for i, folder in enumerate(("a", "b")):
        model.save_safetensors({"w": torch.full((3,), float(i))}, tmp_path / f"{folder}.safetensors")
        server.files[f"/{folder}/model.safetensors"] = (tmp_path / f"{folder}.safetensors").read_bytes()
    urls = [f"{server.url}/{folder}/model.safetensors" for folder in ("a", "b")]
    paths = [download(url) for url in urls]
    assert [model.load_safetensors(p)[0]["w"].tolist() for p in paths] == [[0.0] * 3, [1.0] * 3]
    assert paths == [str(cached(cache, url, "model.safetensors")) for url in urls]
    # a name given for the file (weights.download's torch.hub names, sd-vae-ft-mse.safetensors) is kept
    server.files["/x/diffusion_pytorch_model.safetensors"] = server.files["/a/model.safetensors"]
    url = server.url + "/x/diffusion_pytorch_model.safetensors"
    assert download(url, file_name="sd-vae-ft-mse.safetensors") == str(cached(cache, url, "sd-vae-ft-mse.safetensors"))


def test_http_errors_name_the_status(server, cache):
    one_line_error(lambda: download(server.url + "/missing.pth", hint="pass --weights FILE"),
                   r"could not download .*/missing.pth \(HTTP 404 Not Found\).*, or pass --weights FILE$")
    assert os.listdir(cache) == []


def test_truncated_body_leaves_nothing(server, cache):
    server.files["/w.pth"] = b"x" * 5000
    server.lengths["/w.pth"] = 6000
    one_line_error(lambda: download(server.url + "/w.pth"), r"closed after 5000 of its 6000 bytes")
    assert os.listdir(cache) == []  # neither w.pth nor a temporary file


def test_killed_download_never_takes_the_final_name(server, cache, monkeypatch):
    """As when the process is killed mid-download: its cleanup never runs, and only a temporary file stays."""
    server.files["/w.pth"] = b"x" * 5000
    server.lengths["/w.pth"] = 6000
    monkeypatch.setattr(os, "remove", lambda path: None)
    with pytest.raises(RuntimeError):
        download(server.url + "/w.pth")
    (temporary,) = os.listdir(cache)
    assert temporary.startswith(cached(cache, server.url + "/w.pth", "w.pth").name + ".tmp")


def test_hash_mismatch_leaves_nothing(server, cache):
    server.files["/w.pth"] = b"weights"
    one_line_error(lambda: download(server.url + "/w.pth", sha256="ab" * 32),
                   f"sha256 {hashlib.sha256(b'weights').hexdigest()}, expected {'ab' * 32}: corrupt")
    assert os.listdir(cache) == []


def test_offline_error_says_where_to_put_the_file(cache):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ssdd-f8c4.safetensors"
    path = re.escape(str(cached(cache, url, "ssdd-f8c4.safetensors")))
    one_line_error(lambda: download(url, hint="pass --ckpt PATH"),
                   f"could not download {re.escape(url)} .*refused.*put it at {path}, or pass --ckpt PATH$")
    one_line_error(lambda: SSDD.from_checkpoint(url), f"put it at {path}$")
    assert os.listdir(cache) == []



@pytest.fixture
def weights_file(tmp_path):
    """The bytes of a small valid .safetensors file."""
    model.save_safetensors({"w": torch.arange(1000.0)}, tmp_path / "w.safetensors", {"note": "x"})
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.mark.parametrize("body", ["cut short", "not safetensors"])
def test_a_download_that_does_not_parse_is_not_kept(server, cache, weights_file, body):
    """Without a Content-Length urllib takes a body cut short for a whole one, and a server can answer 200
    with an HTML page: a .safetensors download must parse before it takes its name."""
    server.files["/w.safetensors"] = weights_file[:-100] if body == "cut short" else b"<html>try again</html>"
    server.lengths["/w.safetensors"] = None
    one_line_error(lambda: download(server.url + "/w.safetensors"),
                   f"^{re.escape(server.url)}/w.safetensors: not a valid .safetensors file: .*; not kept$")
    assert os.listdir(cache) == []
    server.files["/w.safetensors"] = weights_file
    path = download(server.url + "/w.safetensors")
    assert model.load_safetensors(path)[1] == {"note": "x"}


def test_a_cached_file_that_does_not_parse_says_to_remove_it(server, cache, weights_file):
    server.files["/w.safetensors"] = weights_file
    url = server.url + "/w.safetensors"
    path = cached(cache, url, "w.safetensors")
    cache.mkdir(parents=True)
    path.write_bytes(weights_file[:-100])  # put there by hand, or damaged on disk
    one_line_error(lambda: download(url), f"^{re.escape(str(path))}: not a valid .safetensors file: .*; remove it "
                                          f"to download again$")
    assert server.requests == []
    path.unlink()
    assert download(url) == str(path) and path.read_bytes() == weights_file


def test_a_stalled_download_fails(server, cache, monkeypatch):
    """A byte every 20 ms never trips the read timeout: the rate does (here below 1000 bytes/s over 0.3 s)."""
    monkeypatch.setattr(model, "MIN_RATE", 1000)
    monkeypatch.setattr(model, "RATE_WINDOW", 0.3)
    server.files["/w.pth"] = b"x" * 200  # 4 s at this pace
    server.drip["/w.pth"] = 0.02
    start = time.monotonic()
    one_line_error(lambda: download(server.url + "/w.pth"), r"\(stalled: \d+ bytes in 0 s, below 1000 bytes/s\)")
    assert time.monotonic() - start < 1.5
    assert os.listdir(cache) == []


def test_an_endless_body_fails(server, cache, monkeypatch):
    """Without a Content-Length a download stops at MAX_DOWNLOAD (here 50 kB of a 1 MB body)."""
    monkeypatch.setattr(model, "MAX_DOWNLOAD", 50_000)
    server.files["/w.pth"] = b"x" * 1_000_000
    server.lengths["/w.pth"] = None
    one_line_error(lambda: download(server.url + "/w.pth"), r"\(more than 50000 bytes\)")
    assert os.listdir(cache) == []
    server.lengths["/w.pth"] = 1_000_000  # a Content-Length is the bound where given
    assert os.path.getsize(download(server.url + "/w.pth")) == 1_000_000


def test_killed_downloads_are_cleaned_up_and_files_are_readable_by_all(server, cache):
    """The temporary files of killed downloads of the file (unchanged for over STALE_AGE) are removed when it
    is downloaded; a recent one may be another process's download and stays. The cached file has the usual
    mode (0644 under the usual umask 022), readable by the other users of a shared cache."""
    server.files["/w.pth"] = b"weights"
    path = cached(cache, server.url + "/w.pth", "w.pth")
    cache.mkdir(parents=True)
    old, recent = (path.with_name(path.name + f".tmp{pid}") for pid in (4001, 4002))
    for tmp in (old, recent):
        tmp.write_bytes(b"half")
    os.utime(old, (time.time() - model.STALE_AGE - 10,) * 2)
    umask = os.umask(0o022)
    try:
        assert download(server.url + "/w.pth") == str(path)
    finally:
        os.umask(umask)
    assert sorted(os.listdir(cache)) == sorted([path.name, recent.name])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


@pytest.mark.parametrize("end", ["/", "/.."])
def test_a_url_that_names_no_file_is_refused(server, cache, end):
    with pytest.raises(ValueError, match=f"names no file \\(its path ends in '{re.escape(end)}'\\)") as e:
        download(server.url + "/folder" + end)
    assert "\n" not in str(e.value) and server.requests == [] and not cache.exists()


def test_a_full_disk_is_said_as_such(server, cache, monkeypatch):
    """Not "could not download ... fetch it on a machine with internet access": the disk is full, and the
    temporary file is removed."""
    server.files["/w.pth"] = b"x" * 5000

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model, "open", lambda path, mode: Full(path, mode), raising=False)
    path = cached(cache, server.url + "/w.pth", "w.pth")
    with pytest.raises(OSError, match=f"^no space left on device writing {re.escape(str(path))}$"):
        download(server.url + "/w.pth")
    assert os.listdir(cache) == []


# ----------------------------------------------------------------------------------------------------------
# the published checkpoints, by name


def test_published_names(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    hub = "https://huggingface.co/facebook/SSDD/resolve/main/"
    assert published_url("F8C4_M_256") == hub + "F8C4/F8C4_M_256.safetensors"
    assert published_url("F16C4_M_256") == hub + "F16C4/F16C4_M_256.safetensors"
    assert published_url("F32C64_XL_512") == hub + "F32C64/F32C64_XL_512.safetensors"
    assert published_url("demo_f8c4_M_128") == hub + "demo_f8c4_M_128.safetensors"
    for path in ("F8C4_M_256.safetensors", "runs/F8C4_M_256", "F8C4_Q_256", "f8c4_M_256", "F8C4_M", "sd-vae-ft-mse",
                 "demo_f8c4_M_256", "https://huggingface.co/facebook/SSDD/resolve/main/demo_f8c4_M_128.safetensors"):
        assert published_url(path) is None, path
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")  # a mirror, as every Hugging Face client reads it
    mirror = "https://mirror.example/facebook/SSDD/resolve/main/"
    assert published_url("F8C4_M_256") == mirror + "F8C4/F8C4_M_256.safetensors"


def test_a_name_loads_from_the_hub(server, cache, tmp_path, monkeypatch, evaluated, capsys):
    """In Python, as evaluate.py --ckpt and as latent_stats.py --ckpt (the statistics in a local copy),
    downloaded once; a name the server lacks is one line naming the URL and the HTTP status. (The file holds a
    tiny model: names say nothing of the contents.)"""
    torch.manual_seed(0)
    m = SSDD("f16c4", TINY)
    m.save(tmp_path / "tiny.safetensors")
    hub = "/facebook/SSDD/resolve/main/"
    server.files[hub + "F16C4/F16C4_M_256.safetensors"] = (tmp_path / "tiny.safetensors").read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    loaded = SSDD.from_checkpoint("F16C4_M_256")
    assert loaded.config == m.config
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
    results = evaluate.main(["--ckpt", "F16C4_M_256", "--data", PHOTOS, "--im", "64", "--limit", "2", "--steps", "1",
                             "--num-workers", "0"])
    assert results["ckpt"] == "F16C4_M_256" and results["images"] == 2
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in evaluated[0].state_dict().items())
    assert server.requests == [hub + "F16C4/F16C4_M_256.safetensors"]  # downloaded once

    # latent_stats.py writes the statistics into a copy in the current folder; the cached file stays the server's
    monkeypatch.chdir(tmp_path)
    mean, std = latent_stats.main(["--ckpt", "F16C4_M_256", "--data", PHOTOS, "--im", "64", "--limit", "2",
                                   "--num-workers", "0"])
    copy = SSDD.from_checkpoint(tmp_path / "F16C4_M_256.safetensors")
    assert (copy.latent_mean, copy.latent_std) == (mean, std)
    assert SSDD.from_checkpoint("F16C4_M_256").latent_mean is None
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in copy.state_dict().items())
    assert server.requests == [hub + "F16C4/F16C4_M_256.safetensors"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a second run would overwrite the copy
        latent_stats.main(["--ckpt", "F16C4_M_256", "--data", PHOTOS, "--im", "64", "--num-workers", "0"])
    assert e.value.code == 2 and "F16C4_M_256.safetensors, which exists already" in capsys.readouterr().err

    url = f"{server.url}{hub}F8C4/F8C4_XL_512.safetensors"
    one_line_error(lambda: SSDD.from_checkpoint("F8C4_XL_512"), f"could not download {re.escape(url)} \\(HTTP 404 ")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", "F8C4_XL_512", "--data", PHOTOS, "--im", "64", "--num-workers", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: could not download {url} (HTTP 404 "), lines
