"""model.download against a real HTTP server on 127.0.0.1: a file is fetched once into the torch hub cache,
checked for length and sha256 before it takes its name (a failed download leaves nothing behind), and every
failure is a one-line error saying what to do. SSDD.from_checkpoint loads such URLs, and the published
checkpoints by name from a server laid out as the model hub ($HF_ENDPOINT)."""
import hashlib
import http.server
import os
import re
import socket
import threading
import types

import pytest
import torch

import evaluate
from model import SSDD, download, published_url

PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos")

TINY = dict(widths=(32, 32, 64, 64), depth=2, heads=2)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The torch hub cache's checkpoints folder, in tmp_path."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def server(cache):
    """Serves files {path: bytes} at url + path (any other path: 404), announcing lengths[path] as the
    Content-Length where given (more than it sends: a body cut short), and records the requested paths."""
    s = types.SimpleNamespace(files={}, lengths={}, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            s.requests.append(self.path)
            if self.path not in s.files:
                return self.send_error(404)
            body = s.files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(s.lengths.get(self.path, len(body))))
            self.end_headers()
            self.wfile.write(body)  # then HTTP/1.0 closes the connection

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
    assert os.listdir(cache) == ["tiny.safetensors"]
    assert capsys.readouterr().err == f"downloading {server.url}/ckpt/tiny.safetensors to {cache / 'tiny.safetensors'}\n"
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
    # files are cached by name: with sha256 given, a cached file is checked again
    one_line_error(lambda: download(server.url + "/other/w.pth", sha256="0" * 64),
                   f"{re.escape(path)} has sha256 {digest}, expected 0{{64}} .* Remove it")
    assert server.requests == ["/w.pth"]


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
    assert re.fullmatch(r"w\.pth\.tmp\d+", temporary)


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
    one_line_error(lambda: download(url, hint="pass --ckpt PATH"),
                   f"could not download {re.escape(url)} .*refused.*put it at "
                   f"{re.escape(str(cache / 'ssdd-f8c4.safetensors'))}, or pass --ckpt PATH$")
    one_line_error(lambda: SSDD.from_checkpoint(url), f"put it at {re.escape(str(cache / 'ssdd-f8c4.safetensors'))}$")
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
    """In Python and as evaluate.py --ckpt, downloaded once; a name the server lacks is one line naming the URL
    and the HTTP status. (The file holds a tiny model: names say nothing of the contents.)"""
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

    url = f"{server.url}{hub}F8C4/F8C4_XL_512.safetensors"
    one_line_error(lambda: SSDD.from_checkpoint("F8C4_XL_512"), f"could not download {re.escape(url)} \\(HTTP 404 ")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", "F8C4_XL_512", "--data", PHOTOS, "--im", "64", "--num-workers", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: could not download {url} (HTTP 404 "), lines
