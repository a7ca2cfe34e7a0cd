"""Tests of model.py's checkpoint files: the .safetensors writer and reader (a security boundary: checkpoints
come from the internet), the configuration read off the tensor shapes, and the metadata from_checkpoint reads.
Crafted files must be refused with a ValueError naming the file, quickly and in bounded memory."""
import json
import struct
import time
import tracemalloc

import pytest
import torch

import model
from model import SSDD, load_safetensors, save_safetensors

TINY = dict(widths=(32, 32, 64, 64), depth=2, heads=2)


def framed(header, data=b""):
    """A .safetensors byte string around a header given as bytes or as a JSON-able object."""
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head + data


def f32(shape, start, stop):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, stop]}


def meta_state_dict(encoder="f8c4", decoder=TINY):
    """The tensors of a checkpoint, as shapes only (infer_config reads nothing else)."""
    with torch.device("meta"):
        return dict(SSDD(encoder, decoder).state_dict())


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    m.default_steps, m.time_power, m.latent_mean, m.latent_std = 1, 4.0, 0.25, 2.0
    m.save(tmp_path / "m.safetensors", note="hello")
    loaded = SSDD.from_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config == m.config and loaded.default_steps == 1 and loaded.time_power == 4.0
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded.denormalize_latent(loaded.normalize_latent(z)), z)
    torch.testing.assert_close(loaded.normalize_latent(z), (z - 0.25) / 2.0)
    _, meta = load_safetensors(tmp_path / "m.safetensors")
    assert json.loads(meta["note"]) == "hello"


def test_named_size_is_recognised(tmp_path):
    """A file without our metadata (as the official ones): its named size, 8 steps on the power-2 grid."""
    sd = {k: torch.zeros(v.shape) for k, v in meta_state_dict("f8c4", "S").items()}
    save_safetensors(sd, tmp_path / "s.safetensors")
    m = SSDD.from_checkpoint(tmp_path / "s.safetensors")
    assert m.config == dict(encoder="f8c4", decoder="S") and m.latent_mean is None
    assert m.default_steps == 8 and m.time_power == 2


@pytest.mark.parametrize("size", model.DECODER_SIZES)
def test_every_named_size_is_inferred(size):
    assert model.infer_config(meta_state_dict("f8c4", size), "x") == ("f8c4", size)


def test_safetensors_package_interop(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    official = tmp_path / "official.safetensors"
    save_file(m.state_dict(), official, metadata={"format": "pt"})
    loaded = SSDD.from_checkpoint(official)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # views of a larger storage, non-contiguous and 0-d tensors are written as their own elements only
    mixed = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
             "c": torch.tensor([True, False]), "d": torch.randn(2, 2, dtype=torch.float16), "e": torch.zeros(0, 3),
             "f": torch.arange(10.0)[3:7], "g": torch.arange(12.0).view(3, 4).t(),
             "h": torch.tensor(2.5, dtype=torch.float64)}
    save_safetensors(mixed, tmp_path / "ours.safetensors", {"k": "v"})
    theirs = load_file(tmp_path / "ours.safetensors")
    ours, meta = load_safetensors(tmp_path / "ours.safetensors")
    assert meta == {"k": "v"}
    for k, v in mixed.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours[k], v) and ours[k].dtype == v.dtype


def test_mismatched_checkpoint_is_explained(tmp_path):
    m = SSDD("f8c4", TINY)
    sd = dict(m.state_dict())
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra"] = torch.zeros(1)
    sd["decoder.conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as e:
        SSDD.from_checkpoint(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "1 missing: decoder.conv_out.bias" in msg and "1 unexpected: decoder.extra" in msg
    assert "decoder.conv_in.weight: checkpoint (32, 5, 3, 3), model (32, 7, 3, 3)" in msg
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an SSDD checkpoint"):
        SSDD.from_checkpoint(tmp_path / "other.safetensors")


DATA = bytes(32)
ONE = f32([4], 0, 16)
MALFORMED = {
    "short": (b"abc", "shorter than"),
    "huge_header": (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    "header_over_limit": (struct.pack("<Q", model.MAX_HEADER + 8) + b" " * (model.MAX_HEADER + 8), "header length"),
    "not_json": (framed(b"\xff\xfe{not json"), "unreadable JSON header"),
    "nested": (framed(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "unreadable JSON header"),
    "long_integer": (framed(b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,16]}}', DATA[:16]),
                     "an integer of 5000 digits"),
    "size_past_uint64": (framed({"a": f32([2 ** 70, 0], 0, 0)}), "an integer of 22 digits"),
    "empty_past_int64": (framed({"a": f32([2 ** 40, 2 ** 40, 0], 0, 0)}), "invalid shape"),
    "duplicate_key": (framed(b'{"a":' + json.dumps(ONE).encode() + b',"a":' + json.dumps(ONE).encode() + b"}",
                             DATA[:16]), "duplicate key 'a'"),
    "duplicate_metadata": (framed(b'{"__metadata__":{},"__metadata__":{"x":"y"},"a":' + json.dumps(ONE).encode() + b"}",
                                  DATA[:16]), "duplicate key '__metadata__'"),
    "duplicate_field": (framed(b'{"a":{"dtype":"F32","dtype":"F64","shape":[4],"data_offsets":[0,16]}}', DATA[:16]),
                        "duplicate key 'dtype'"),
    "too_many_tensors": (framed({f"t{i}": f32([0], 0, 0) for i in range(model.MAX_ENTRIES + 1)}), "10001 entries"),
    "not_object": (framed([1, 2]), "not a JSON object"),
    "bad_dtype": (framed({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, DATA), "no supported dtype"),
    "dtype_list": (framed({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, DATA[:16]),
                   "no supported dtype"),
    "bad_shape": (framed({"a": f32("4", 0, 16)}, DATA), "invalid shape"),
    "negative_shape": (framed({"a": f32([-4], 0, 16)}, DATA), "invalid shape"),
    "bool_shape": (framed({"a": f32([True, 4], 0, 16)}, DATA[:16]), "invalid shape"),
    "out_of_file": (framed({"a": f32([4], 0, 1 << 50)}, DATA), "outside"),
    "wrong_size": (framed({"a": f32([4], 0, 32)}, DATA), "needs 16 bytes"),
    "overlap": (framed({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, DATA[:24]), "expected 16"),
    "trailing": (framed({"a": f32([4], 0, 16)}, DATA), "trailing bytes"),
    "metadata_values": (framed({"__metadata__": {"a": 1}, "b": ONE}, DATA[:16]), "__metadata__"),
    "metadata_list": (framed({"__metadata__": [], "b": ONE}, DATA[:16]), "__metadata__"),
    "metadata_string": (framed({"__metadata__": "a", "b": ONE}, DATA[:16]), "__metadata__"),
    "metadata_false": (framed({"__metadata__": False, "b": ONE}, DATA[:16]), "__metadata__"),
    "truncated": (framed({"a": f32([8], 0, 32)}, DATA[:20]), "outside"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_rejected(tmp_path, case):
    blob, match = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=match) as e:
        load_safetensors(path)
    assert str(e.value).startswith(f"{path}: not a valid .safetensors file")


def test_null_metadata_is_no_metadata(tmp_path):
    """As the safetensors package reads it."""
    (tmp_path / "m.safetensors").write_bytes(framed({"__metadata__": None, "a": ONE}, DATA[:16]))
    tensors, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta == {} and tensors["a"].shape == (4,)


def cost(fn):
    """(CPU seconds, peak MB of Python allocations, message) of fn(), which must raise a ValueError. CPU time,
    not wall time, so that other processes on the machine do not count; timed untraced."""
    start = time.process_time()
    with pytest.raises(ValueError) as e:
        fn()
    seconds = time.process_time() - start
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            fn()
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    return seconds, peak, str(e.value)


def crafted(tables, heads):
    """A file of `tables` relative_bias_table tensors of shape (15, 15, heads), one byte an element, after empty
    tensors under the other names infer_config reads (2 encoder levels, z channels 4, widths 64)."""
    empty = lambda *shape: dict(dtype="U8", shape=list(shape), data_offsets=[0, 0])
    header = {"encoder.down.0.x": empty(0), "encoder.down.1.x": empty(0), "encoder.conv_out.weight": empty(8, 0, 3, 3)}
    header.update({f"decoder.down_blocks.{i}.resnets.0.conv1.weight": empty(64, 0, 3, 3) for i in range(4)})
    n = 15 * 15 * heads
    header.update({f"{i}.relative_bias_table": dict(dtype="U8", shape=[15, 15, heads],
                                                     data_offsets=[i * n, (i + 1) * n]) for i in range(tables)})
    return framed(header, bytes(tables * n))


def test_crafted_files_are_refused_quickly(tmp_path):
    """Refused in bounded CPU time and Python memory: 50,000 empty relative_bias_table tensors in 4 MB (with
    inference unbounded, from_checkpoint built 50,000 transformer blocks before its key check: 65 s, 2.8 GB);
    20,000 of them in 1.6 MB; 5,000 tables of one head (unbounded: 5,000 blocks, 7 s, 210 MB); a shape of
    95,000 20-digit sizes (math.prod of them: a minute); 2 MiB of empty JSON arrays, the slowest (0.2 s, 0.7 s
    on 2 cores shared with other jobs)."""
    files = {"header length": crafted(50_000, 0), "20007 entries": crafted(20_000, 0),
             "5000 relative_bias_table": crafted(5_000, 1),
             "invalid shape": framed(b'{"a":{"dtype":"F32","data_offsets":[0,0],"shape":['
                                     + b"99999999999999999999," * 95_000 + b"0]}}"),
             "__metadata__": framed(b'{"__metadata__":{"a":[' + b"[]," * ((model.MAX_HEADER - 40) // 3) + b"[]]}}")}
    for i, (match, blob) in enumerate(files.items()):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(blob)
        seconds, peak, msg = cost(lambda: SSDD.from_checkpoint(path))
        assert str(path) in msg and match in msg
        assert seconds < (2 if match == "__metadata__" else 1) and peak < 100, (match, seconds, peak)


def test_config_inference_is_bounded():
    """Every value read off the shapes is checked before a model of that configuration is built."""
    def refused(tensors, match):
        with pytest.raises(ValueError, match=match) as e:
            model.infer_config(tensors, "ckpt.safetensors")
        assert str(e.value).startswith("ckpt.safetensors is not an SSDD checkpoint")

    sd = meta_state_dict()
    table = torch.empty(15, 15, 2, device="meta")
    refused({**sd, **{f"x{i}.relative_bias_table": table for i in range(model.MAX_DEPTH)}}, "66 relative_bias_table")
    refused({k: v for k, v in sd.items() if not k.endswith("relative_bias_table")}, "0 relative_bias_table")
    refused({**sd, **{f"encoder.down.{i}.x": table for i in range(1000)}}, "1000 encoder levels")
    refused({k: v for k, v in sd.items() if not k.startswith("encoder.down.") or k.startswith("encoder.down.0.")},
            "1 encoder levels")
    for z2, match in ((7, "7 output channels"), (2 * 1025, "2050 output channels"), (0, "0 output channels")):
        refused({**sd, "encoder.conv_out.weight": torch.empty(z2, 512, 3, 3, device="meta")}, match)
    conv1 = "decoder.down_blocks.3.resnets.0.conv1.weight"
    for width in (48, 8192, 0):
        refused({**sd, conv1: torch.empty(width, 64, 3, 3, device="meta")}, "multiples of 32")
    refused({**sd, conv1: torch.empty((), device="meta")}, "expected 4 dimensions")
    refused({k: v for k, v in sd.items() if k != conv1}, f"no tensor '{conv1}'")
    tables = [k for k in sd if k.endswith("relative_bias_table")]
    refused({**sd, tables[0]: torch.empty(15, 15, 3, device="meta")}, "3 attention heads")
    refused({**sd, tables[0]: torch.empty(15, 15, 0, device="meta")}, "0 attention heads")
    refused({**sd, tables[0]: torch.empty(15, 2, device="meta")}, "expected 3 dimensions")
    assert model.infer_config(sd, "x") == ("f8c4", dict(TINY, depth=2))


def test_bounded_config_is_checked_before_loading(tmp_path):
    """A file at every bound (64 blocks of width 4096, f64c1024) but without the weights: the key check
    refuses it from the shapes, building the model on the meta device only."""
    u8 = lambda shape: dict(dtype="U8", shape=shape, data_offsets=[0, 0])
    header = {f"encoder.down.{i}.x": u8([0]) for i in range(7)}
    header["encoder.conv_out.weight"] = u8([2048, 512, 3, 0])
    header.update({f"decoder.down_blocks.{i}.resnets.0.conv1.weight": u8([4096, 0, 3, 3]) for i in range(4)})
    offset = 0
    for i in range(model.MAX_DEPTH):
        header[f"decoder.mid_block.transformer_blocks.{i}.relative_position_bias.relative_bias_table"] = dict(
            dtype="U8", shape=[15, 15, 16], data_offsets=[offset, offset + 15 * 15 * 16])
        offset += 15 * 15 * 16
    (tmp_path / "big.safetensors").write_bytes(framed(header, bytes(offset)))
    seconds, peak, msg = cost(lambda: SSDD.from_checkpoint(tmp_path / "big.safetensors"))
    assert "does not match SSDD(encoder='f64c1024', decoder={'widths': (4096, 4096, 4096, 4096), 'depth': 64" in msg
    assert seconds < 5 and peak < 200, (seconds, peak)


def metadata_file(tmp_path, **meta):
    """A file holding only metadata: from_checkpoint reads the metadata before the tensors."""
    path = tmp_path / "meta.safetensors"
    save_safetensors({}, path, meta)
    return path


BAD_METADATA = [
    ("default_steps", v) for v in ("0", "1001", "1000000", "1e12", "-3", "null", "abc", "2.7", "8.0", "true", '"8"',
                                   "[8]", "1" * 5000, "[" * 10_000)
] + [
    ("time_power", v) for v in ("0", "-2", "10.5", "1e400", "NaN", "Infinity", "null", "true", '"2"', "")
] + [
    ("latent_mean", v) for v in ("NaN", "-Infinity", "abc", "null", "1" * 400)
] + [
    ("latent_std", v) for v in ("0", "-1", "Infinity", "NaN", "false")
]


@pytest.mark.parametrize("field,value", BAD_METADATA)
def test_bad_metadata_is_refused(tmp_path, field, value):
    path = metadata_file(tmp_path, **{"latent_mean": "0", "latent_std": "1", field: value})
    with pytest.raises(ValueError) as e:
        SSDD.from_checkpoint(path)
    assert str(e.value).startswith(f"{path}: metadata field '{field}' must be")


@pytest.mark.parametrize("field", ["latent_mean", "latent_std"])
def test_latent_statistics_come_in_pairs(tmp_path, field):
    path = metadata_file(tmp_path, **{field: "1"})
    with pytest.raises(ValueError, match="only one of latent_mean and latent_std") as e:
        SSDD.from_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("meta", [dict(default_steps="1"), dict(default_steps="1000"), dict(time_power="0.5"),
                                  dict(time_power="10"), dict(time_power="3"),
                                  dict(latent_mean="-1e3", latent_std="1e-8")])
def test_good_metadata_is_accepted(tmp_path, meta):
    """The metadata passes: the error is the next check's, about the missing tensors."""
    with pytest.raises(ValueError, match="is not an SSDD checkpoint"):
        SSDD.from_checkpoint(metadata_file(tmp_path, **meta))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    """They would decode NaN images, and latent_stats.py would write NaN statistics into the file; bfloat16
    files are checked too."""
    torch.manual_seed(0)
    tensors = {k: v.bfloat16() for k, v in SSDD("f8c4", TINY).state_dict().items()}
    tensors["decoder.mid_block.transformer_blocks.1.ff.proj_out.weight"][3, 5] = value
    save_safetensors(tensors, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'm.safetensors'}: tensor 'decoder.mid_block"
                                         r"\.transformer_blocks\.1\.ff\.proj_out\.weight' holds non-finite values"):
        SSDD.from_checkpoint(tmp_path / "m.safetensors")

