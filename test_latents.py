"""latent_stats.py --save-latents: the stored latents are the encoder means of the eval crops (and of their
mirror images), the labels are torchvision ImageFolder's, and a killed run resumes without recomputing its
finished shards. A tiny model at 64 px on CPU, in float32.
"""
import json
import os
import re
import shutil

import pytest
import torch
import torchvision

import data
import latent_stats
from model import SSDD, load_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "testdata", "photos")
TINY = {"widths": [32, 32, 64, 64], "depth": 2, "heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(123)
    path = str(tmp_path / "model.safetensors")
    SSDD("f8c4", TINY).save(path)
    return path


def run(ckpt, data_dir, out, *extra):
    return latent_stats.main(["--ckpt", ckpt, "--data", data_dir, "--im", "64", "--num-workers", "0",
                              "--batch-size", "3", "--save-latents", str(out), *extra])


def read_shards(out):
    """The index and the shards' tensors, concatenated in the index's order of shards."""
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert sorted(f for f in os.listdir(out) if f != "index.json") == index["shards"]  # nothing else left behind
    shards = [load_safetensors(os.path.join(out, name)) for name in index["shards"]]
    return index, {k: torch.cat([t[k] for t, _ in shards]) for k in shards[0][0]}, [m for _, m in shards]


def test_latents_are_the_encoder_means_of_the_val_crops(ckpt, tmp_path):
    """Default split val/; shards of 4 of the 6 photos, in batches of 3 that a shard boundary cuts."""
    mean, std = run(ckpt, PHOTOS, tmp_path / "out", "--shard-size", "4", "--flip")
    index, t, metadata = read_shards(tmp_path / "out")
    val = data.load_split(PHOTOS, "val", 64)
    assert index["shards"] == ["latents-00000-of-00002.safetensors", "latents-00001-of-00002.safetensors"]
    assert index["root"] == os.path.join(PHOTOS, "val")
    assert index["paths"] == sorted(os.listdir(os.path.join(PHOTOS, "val")))
    model = SSDD.from_checkpoint(ckpt)
    assert index["checkpoint"] == ckpt and index["encoder_sha256"] == latent_stats.encoder_sha256(model)
    assert all(json.loads(m[k]) == index[k] for m in metadata for k in m) and len(metadata[0]) == 7
    assert (index["latent_mean"], index["latent_std"]) == (mean, std)
    assert t["indices"].tolist() == list(range(6)) and t["labels"].tolist() == [-1] * 6  # no class folders
    assert (model.latent_mean, model.latent_std) == (mean, std)
    x = torch.stack([val[i] for i in range(len(val))])
    with torch.no_grad():
        z, z_flip = model.encode(x), model.encode(x.flip(-1))
    assert t["latents"].dtype == torch.float32 and t["latents"].shape == (6, 4, 8, 8)
    # up to rounding: a batch of 6 sums in another order than batches of 3, 1 and 2 (measured: 2e-7)
    torch.testing.assert_close(t["latents"], z, rtol=0, atol=1e-6)
    torch.testing.assert_close(t["latents_flip"], z_flip, rtol=0, atol=1e-6)
    assert mean == pytest.approx(z.double().mean().item(), rel=1e-6)


def test_labels_are_imagefolders(ckpt, tmp_path):
    """Classes are the first folder level, numbered in sorted order (capitals first), nested folders belong
    to their top folder, an image in the root gets -1."""
    photos = sorted(os.listdir(os.path.join(PHOTOS, "train")))
    layout = {"apple": photos[:2], "Zebra": photos[2:3], os.path.join("mouse", "nested"): photos[3:5], "": photos[5:6]}
    root = tmp_path / "classes"
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(os.path.join(PHOTOS, "train", name), root / folder / name)
    run(ckpt, str(root), tmp_path / "out", "--shard-size", "3")  # shards of one batch
    index, t, _ = read_shards(tmp_path / "out")
    reference = torchvision.datasets.ImageFolder(str(root))
    assert index["classes"] == reference.classes == ["Zebra", "apple", "mouse"]
    want = {os.path.relpath(p, root): label for p, label in reference.samples}
    want[photos[5]] = -1  # ImageFolder skips images outside the class folders
    assert dict(zip(index["paths"], index["labels"])) == want
    assert t["labels"].tolist() == [want[index["paths"][i]] for i in t["indices"].tolist()]


def test_killed_run_resumes_without_recomputing(ckpt, tmp_path, monkeypatch, capsys):
    """The 12 training photos in shards of 4; the first run is killed while it writes the second shard. The
    rerun encodes only the 8 images of the two unfinished shards, leaves the first shard untouched, removes
    the killed write's temporary file, and its statistics cover all 12."""
    out = tmp_path / "out"
    args = ("--split", "train", "--shard-size", "4")
    save = latent_stats.save_safetensors

    def killed_at_second_shard(tensors, path, metadata=None):
        if os.listdir(out):
            open(f"{path}.tmp12345", "wb").close()  # what a kill mid-write leaves
            raise KeyboardInterrupt
        save(tensors, path, metadata)

    with monkeypatch.context() as m:
        m.setattr(latent_stats, "save_safetensors", killed_at_second_shard)
        with pytest.raises(KeyboardInterrupt):
            run(ckpt, PHOTOS, out, *args)
    first = out / "latents-00000-of-00003.safetensors"
    assert sorted(os.listdir(out)) == [first.name, "latents-00001-of-00003.safetensors.tmp12345"]
    mtime = first.stat().st_mtime_ns

    encoded = []
    encode = SSDD.encode
    monkeypatch.setattr(SSDD, "encode", lambda self, x, *a: encoded.append(len(x)) or encode(self, x, *a))
    mean, std = run(ckpt, PHOTOS, out, *args)
    assert sum(encoded) == 8 and first.stat().st_mtime_ns == mtime
    index, t, _ = read_shards(out)
    assert len(index["shards"]) == 3 and t["indices"].tolist() == list(range(12))
    z = t["latents"].double()
    assert mean == pytest.approx(z.mean().item(), rel=1e-12) and std == pytest.approx(z.std().item(), rel=1e-12)

    with pytest.raises(SystemExit) as e:
        run(ckpt, PHOTOS, out, *args, "--flip")
    assert e.value.code == 2 and "holds latents of other settings" in capsys.readouterr().err


def encoded_images(monkeypatch):
    """The number of images each SSDD.encode call gets, from now on."""
    encoded, encode = [], SSDD.encode
    monkeypatch.setattr(SSDD, "encode", lambda self, x, *a: encoded.append(len(x)) or encode(self, x, *a))
    return encoded


def refused(capsys, *argv):
    """latent_stats.main stops with one `error:` line (the last on stderr) and exit status 2; returns it."""
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def files(out):
    return sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())


def test_shards_are_recognised_by_the_encoder_weights(ckpt, tmp_path, monkeypatch, capsys):
    """Not by the checkpoint's path: a checkpoint trained further at the same path has other latents. Its
    decoder does not count (nor the statistics written into the file), its encoder does."""
    out = tmp_path / "out"
    args = ("--limit", "4", "--shard-size", "2")
    first = run(ckpt, PHOTOS, out, *args)
    shards = files(out)[1:]  # after index.json
    encoded = encoded_images(monkeypatch)
    m = SSDD.from_checkpoint(ckpt)
    with torch.no_grad():
        m.decoder.conv_in.weight.mul_(2)  # more training of the decoder on the frozen encoder
    m.save(ckpt)
    assert run(ckpt, PHOTOS, out, *args) == first and encoded == [] and files(out)[1:] == shards
    before = files(out)
    with torch.no_grad():
        m.encoder.conv_in.weight.mul_(2)
    m.save(ckpt)
    line = refused(capsys, ckpt, PHOTOS, out, *args)
    assert re.search(r"latents-00000-of-00002.safetensors holds latents of other settings \(was, now: "
                     r"\{'encoder_sha256': \('\"[0-9a-f]{64}\"', '\"[0-9a-f]{64}\"'\)\}\); use another", line), line
    assert encoded == [] and files(out) == before


def test_latents_of_another_layout_or_settings_are_refused(ckpt, tmp_path, capsys):
    """Shards of --shard-size 2 or --limit 4 beside new ones would be read together by a loader globbing
    latents-*: another --shard-size, --limit, --im or --flip is refused before anything is encoded or written."""
    out = tmp_path / "out"
    run(ckpt, PHOTOS, out, "--limit", "4", "--shard-size", "2")
    before = files(out)
    for extra, phrase in ((("--limit", "4", "--shard-size", "1"), "holds latents-00000-of-00002.safetensors, not a "
                                                                 "shard of this run's 4"),
                          (("--limit", "4", "--shard-size", "3"), "{'shard_size': ('2', '3')}"),  # 2 shards too
                          (("--limit", "3", "--shard-size", "2"), "of other settings (was, now: {'images': ('4', '3'), "
                                                                 "'paths_sha256'"),
                          (("--limit", "6", "--shard-size", "2"), "holds latents-00000-of-00002.safetensors, not a "
                                                                 "shard of this run's 3"),
                          (("--limit", "4", "--shard-size", "2", "--im", "128"), "{'im': ('64', '128')}"),
                          (("--limit", "4", "--shard-size", "2", "--flip"), "{'flip': ('false', 'true')}")):
        assert phrase in refused(capsys, ckpt, PHOTOS, out, *extra)
        assert files(out) == before


def test_folder_problems_are_one_line_before_the_work(ckpt, tmp_path, monkeypatch, capsys, full_disk):
    """A garbage file named like a shard, a folder that cannot be written (sysfs: not even by root), and a
    full disk while a shard is written (its temporary file removed, the statistics not written)."""
    encoded = encoded_images(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "latents-00000-of-00001.safetensors").write_bytes(b"not latents")
    assert "latents-00000-of-00001.safetensors: not a valid .safetensors file" in refused(capsys, ckpt, PHOTOS, out,
                                                                                         "--limit", "2")
    assert "--save-latents: cannot write into /sys" in refused(capsys, ckpt, PHOTOS, "/sys", "--limit", "2")
    assert encoded == []
    checkpoint = open(ckpt, "rb").read()
    full_disk(1000, "latents-")
    assert refused(capsys, ckpt, PHOTOS, tmp_path / "full", "--limit", "2").endswith(
        f"error: no space left on device writing {tmp_path / 'full' / 'latents-00000-of-00001.safetensors'}")
    assert os.listdir(tmp_path / "full") == [] and open(ckpt, "rb").read() == checkpoint


@pytest.mark.parametrize("weight", [0, 3e38])
def test_statistics_that_cannot_normalise_are_refused(ckpt, tmp_path, capsys, weight):
    """Latents of one value (no spread: std 0), or too large for float32 (finite weights near its largest
    value overflow): the checkpoint would no longer load. Refused before they are written (the overflow
    before the shard that holds it)."""
    m = SSDD.from_checkpoint(ckpt)
    with torch.no_grad():
        m.encoder.out_proj.weight.fill_(weight)
        m.encoder.out_proj.bias.fill_(0.5)
    m.save(ckpt)
    checkpoint = open(ckpt, "rb").read()
    line = refused(capsys, ckpt, PHOTOS, tmp_path / "out", "--limit", "2")
    assert ("latent mean 0.5, std 0.0 over 512 elements: a NaN, an infinity or no spread; not written into" in line
            if weight == 0 else "the latents of images 0 to 1 are not finite (NaN or infinity)" in line), line
    assert open(ckpt, "rb").read() == checkpoint
    assert os.listdir(tmp_path / "out") == (["latents-00000-of-00001.safetensors"] if weight == 0 else [])
