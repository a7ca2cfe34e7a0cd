"""SSDD.from_sd_vae against diffusers' AutoencoderKL, the reference implementation of the SD-VAE: files in the
diffusers layout (current and old attention names) and in the original LDM layout, made offline from one
seeded random VAE; and the errors for files that hold no SD-VAE encoder. Decoder-only SSDD checkpoints (the
authors' decoders for the SD-VAE latent space) with such a file as their encoder, in Python and the scripts."""
import functools
import json
import math
import os

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

import distill
import evaluate
import fid
import latent_stats
import model
import train_ae
from model import SSDD

PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos")
TINY = dict(widths=(32, 32, 64, 64), depth=2, heads=2)
SIZES = [(64, 64), (128, 128), (256, 256), (64, 128)]
OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
LDM_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# the configuration of stabilityai/sd-vae-ft-mse
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256)


def sd_vae(seed=0):
    """The SD-VAE with every tensor random: convolutions and linear layers variance-preserving, norm scales
    around 1, biases around 0."""
    vae = AutoencoderKL(**SD_VAE).eval()
    g = torch.Generator().manual_seed(seed)
    params = dict(vae.named_parameters())
    assert params.keys() == vae.state_dict().keys()  # no buffer left at its initial value
    with torch.no_grad():
        for name, p in params.items():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def to_ldm(sd):
    """diffusers' AutoencoderKL state dict -> the original LDM names (the layout of sd-vae-ft-mse-original),
    decoder included. Written here independently of model.py and checked against diffusers' own converter."""
    out = {}
    last = max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")), default=0)
    for key, t in sd.items():
        parts = key.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            # decoder up_blocks run from the coarsest level: LDM numbers its up levels from the finest
            i = int(parts[2]) if parts[1] == "down_blocks" else last - int(parts[2])
            level = f"{parts[0]}.{'down' if parts[1] == 'down_blocks' else 'up'}.{i}"
            if parts[3] == "resnets":
                key = f"{level}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # downsamplers.0.conv / upsamplers.0.conv
                key = f"{level}.{parts[3][:-2]}.conv." + ".".join(parts[6:])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            key = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":  # mid_block.attentions.0.<layer>.<weight or bias>
            key = f"{parts[0]}.mid.attn_1.{LDM_ATTENTION_NAMES['.'.join(parts[4:-1])]}.{parts[-1]}"
            if t.ndim == 2:  # Linear -> 1x1 conv
                t = t[:, :, None, None]
        elif parts[1] == "conv_norm_out":
            key = f"{parts[0]}.norm_out.{parts[2]}"
        out[key.replace("conv_shortcut", "nin_shortcut")] = t.contiguous()
    return out


def old_attention_names(sd):
    """The names older diffusers versions wrote (files on the model hub still have them)."""
    out = {}
    for key, t in sd.items():
        for new, old in OLD_ATTENTION_NAMES.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = t
    return out


@functools.cache
def reference():
    return sd_vae()


@functools.cache
def images(h, w):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w)) * 2 - 1


@functools.cache
def reference_latent(h, w):
    with torch.no_grad():
        return reference().encode(images(h, w)).latent_dist.mean


@pytest.fixture(scope="module")
def files(module_dir):
    d = module_dir
    sd = reference().state_dict()
    # the VAE's decoder is ignored: one file holds all of it, the others (smaller, faster) a few of its tensors
    few = {k: v for k, v in sd.items() if not k.startswith("decoder.") or k.startswith("decoder.conv_in.")}
    paths = dict(diffusers=d / "diffusers.safetensors", diffusers_old=d / "diffusers_old.safetensors",
                 ldm=d / "ldm.safetensors")
    save_file(sd, paths["diffusers"])
    save_file(old_attention_names(few), paths["diffusers_old"])
    save_file(to_ldm(few), paths["ldm"])
    return paths


@functools.cache
def loaded(path):
    return SSDD.from_sd_vae(path, decoder=TINY)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_ldm_layout_of_the_test_matches_diffusers_converter():
    sd = reference().state_dict()
    back = convert_ldm_vae_checkpoint(to_ldm(sd), reference().config)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("h,w", SIZES)
def test_encode_matches_autoencoderkl(files, h, w):
    m = loaded(str(files["diffusers"]))
    with torch.no_grad():
        z = m.encode(images(h, w))
    ref = reference_latent(h, w)
    assert z.shape == ref.shape == (1, 4, h // 8, w // 8)
    # measured: 2.4e-7 to 2.8e-7 (float32 rounding: the kernels sum in other orders)
    assert rel_err(z, ref) < 1e-5


@pytest.mark.parametrize("layout", ["ldm", "diffusers_old"])
def test_every_layout_loads_the_same_encoder(files, layout):
    """The LDM layout and the old attention names (query/key/value/proj_attn) give bit-identical weights, so
    test_encode_matches_autoencoderkl holds for them at every size; one size end to end all the same."""
    want = loaded(str(files["diffusers"])).encoder.state_dict()
    m = loaded(str(files[layout]))
    got = m.encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert rel_err(m.encode(images(64, 128)), reference_latent(64, 128)) < 1e-5


def test_half_precision_file(files):
    half = files["diffusers"].with_name("half.safetensors")
    save_file({k: v.half() for k, v in reference().state_dict().items() if k.startswith(("encoder.", "quant_conv."))},
              half)
    got = SSDD.from_sd_vae(half, decoder=TINY).encoder.state_dict()
    want = loaded(str(files["diffusers"])).encoder.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].half().float()) for k in want)


def test_default_is_sd_vae_ft_mse(files, monkeypatch):
    """The default downloads SD_VAE_URL (here: a stand-in) under a name of its own; the model is in eval mode
    with a freshly initialised decoder."""
    calls = []
    monkeypatch.setattr(model, "download", lambda url, sha256=None, hint=None, file_name=None:
                        calls.append((url, file_name)) or str(files["diffusers_old"]))
    m = SSDD.from_sd_vae(decoder=TINY)
    assert calls == [(model.SD_VAE_URL, "sd-vae-ft-mse.safetensors")]
    assert m.config == dict(encoder="f8c4", decoder=TINY) and not m.training
    assert all(not mod.training for mod in m.modules())
    assert torch.equal(m.encoder.conv_in.weight, reference().encoder.conv_in.weight)
    assert not m.decoder.down_blocks[0].resnets[0].conv2.weight.any()  # SSDD's initialisation
    with torch.no_grad():
        assert m.decode(m.encode(images(64, 64)), steps=1).shape == (1, 3, 64, 64)


def save(tmp_path, sd, name="vae.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_decoder_only_file_is_refused(tmp_path):
    sd = reference().state_dict()
    decoder_only = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}
    with pytest.raises(ValueError, match="holds no SD-VAE encoder"):
        SSDD.from_sd_vae(save(tmp_path, decoder_only), decoder=TINY)
    with pytest.raises(ValueError, match="holds no SD-VAE encoder"):
        SSDD.from_sd_vae(save(tmp_path, to_ldm(decoder_only), "ldm.safetensors"), decoder=TINY)


@pytest.mark.parametrize("config,what", [
    (dict(latent_channels=16), "encoder.conv_out.weight: file (32, 512, 3, 3), SD-VAE (8, 512, 3, 3)"),
    (dict(latent_channels=16, use_quant_conv=False), "missing: quant_conv.bias, quant_conv.weight"),
    (dict(block_out_channels=(64, 128, 256, 256)), "shape mismatch: encoder.conv_in.bias"),
    (dict(block_out_channels=(128, 256, 512, 512, 512), down_block_types=("DownEncoderBlock2D",) * 5,
          up_block_types=("UpDecoderBlock2D",) * 5), "unexpected: encoder.down.3.downsample.conv.bias"),
])
def test_other_vaes_are_refused(tmp_path, config, what):
    with torch.device("meta"):  # only the shapes matter
        shapes = AutoencoderKL(**SD_VAE | config).state_dict()
    sd = {k: torch.zeros(v.shape) for k, v in shapes.items() if k.startswith(("encoder.", "quant_conv."))}
    for layout, tensors in (("diffusers", sd), ("ldm", to_ldm(sd))):
        path = save(tmp_path, tensors, f"{layout}.safetensors")
        with pytest.raises(ValueError, match="does not hold the SD-VAE") as e:
            SSDD.from_sd_vae(path, decoder=TINY)
        assert what in str(e.value), str(e.value)


def test_non_vae_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no SD-VAE encoder"):
        SSDD.from_sd_vae(save(tmp_path, {"fc.weight": torch.randn(3, 4)}), decoder=TINY)
    # an SSDD checkpoint has an f8c4 encoder under LDM names, but no quant_conv: from_checkpoint reads it
    with torch.device("meta"):
        shapes = SSDD("f8c4", TINY).state_dict()
    path = save(tmp_path, {k: torch.zeros(v.shape) for k, v in shapes.items()}, "ssdd.safetensors")
    with pytest.raises(ValueError, match="missing: quant_conv.bias, quant_conv.weight") as e:
        SSDD.from_sd_vae(path, decoder=TINY)
    assert "unexpected: encoder.out_proj.bias, encoder.out_proj.weight" in str(e.value)
    with pytest.raises(ValueError, match="not a valid .safetensors file"):
        SSDD.from_sd_vae(__file__, decoder=TINY)


def test_training_on_an_sd_vae_file(files, tmp_path, monkeypatch, capsys):
    """train_ae.py --encoder-ckpt takes an SD-VAE file (here the LDM layout): a decoder trains on its latent
    space, the run resumes, and its ema.safetensors encodes exactly as the SD-VAE does."""
    def unavailable(weights=None, device="cpu", flag=None):
        raise RuntimeError("no FID weights in this test")

    monkeypatch.setattr(fid, "load_inception", unavailable)
    torch.set_num_threads(1)
    photos = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "photos")
    args = ["--data", photos, "--size", json.dumps(TINY), "--im", "64", "--batch-size", "4", "--encoder-ckpt",
            str(files["ldm"]), "--max-steps", "3", "--run-dir", str(tmp_path), "--lpips-weight", "0", "--repa-weight",
            "0", "--num-workers", "0", "--eval-images", "2", "--log-every", "1", "--ckpt-every", "3"]
    train_ae.main(args)
    args[args.index("--max-steps") + 1] = "6"
    train_ae.main(args)
    assert f"resuming {tmp_path} at step 3" in capsys.readouterr().out
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 6
    ema = SSDD.from_checkpoint(str(tmp_path / "ema.safetensors"))
    with torch.no_grad():
        z = ema.encode(images(64, 64))
        assert torch.equal(z, loaded(str(files["diffusers"])).encode(images(64, 64)))
    assert rel_err(z, reference_latent(64, 64)) < 1e-5
    torch.manual_seed(0)  # the run's initial decoder: RAdam moved it from step 5 on
    assert not torch.equal(ema.decoder.conv_in.weight, SSDD("f8c4", TINY).decoder.conv_in.weight)


# ----------------------------------------------------------------------------------------------------------
# decoder-only SSDD checkpoints: the authors' code keeps the SD-VAE outside the module's state


def decoder_only(path, z_channels=4):
    """A seeded SSDD decoder saved as the authors' code saves its SD-VAE decoders: the decoder.* tensors of
    its state dict and nothing else. Returns them."""
    torch.manual_seed(7)
    tensors = {k: v for k, v in SSDD(f"f8c{z_channels}", TINY).state_dict().items() if k.startswith("decoder.")}
    save_file(tensors, path)
    return tensors


def test_decoder_only_checkpoint_with_the_sd_vae_encoder(files, tmp_path):
    """Encodes as AutoencoderKL.encode(x).latent_dist.mean, holds the file's decoder, and saves as a complete
    checkpoint that loads without an encoder."""
    decoder = decoder_only(tmp_path / "decoder.safetensors")
    m = SSDD.from_checkpoint(tmp_path / "decoder.safetensors", encoder=str(files["diffusers"]))
    assert m.config == dict(encoder="f8c4", decoder=TINY) and not m.training
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in decoder.items())
    with torch.no_grad():
        assert rel_err(m.encode(images(64, 128)), reference_latent(64, 128)) < 1e-5  # measured: 2.7e-7
        assert m.decode(m.encode(images(64, 64)), steps=1).shape == (1, 3, 64, 64)
    m.save(tmp_path / "complete.safetensors")
    again = SSDD.from_checkpoint(tmp_path / "complete.safetensors")
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


def test_every_encoder_source(files, encoder_ckpt, tmp_path, monkeypatch):
    """encoder= takes what encoder_weights reads: the other SD-VAE layout, sd-vae-ft-mse (here: a stand-in
    download) and an SSDD checkpoint (its encoder); given for a complete checkpoint, it replaces the encoder."""
    path = tmp_path / "decoder.safetensors"
    decoder_only(path)
    sd_vae_encoder = loaded(str(files["diffusers"])).encoder.state_dict()
    monkeypatch.setattr(model, "download", lambda url, sha256=None, hint=None, file_name=None: str(files["ldm"]))
    for encoder in (str(files["ldm"]), "sd-vae-ft-mse"):
        got = SSDD.from_checkpoint(path, encoder=encoder).encoder.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd_vae_encoder.items()), encoder
    ssdd = SSDD.from_checkpoint(encoder_ckpt)
    got = SSDD.from_checkpoint(path, encoder=encoder_ckpt).encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ssdd.encoder.state_dict().items())
    replaced = SSDD.from_checkpoint(encoder_ckpt, encoder=str(files["ldm"])).state_dict()
    assert all(torch.equal(replaced["encoder." + k], v) for k, v in sd_vae_encoder.items())
    assert all(torch.equal(replaced[k], v) for k, v in ssdd.state_dict().items() if k.startswith("decoder."))


def test_decoder_only_errors(files, tmp_path):
    path = tmp_path / "decoder.safetensors"
    decoder_only(path)
    with pytest.raises(ValueError, match="holds only a decoder") as e:
        SSDD.from_checkpoint(path)
    assert "encoder=" in str(e.value) and "--encoder-ckpt" in str(e.value) and "\n" not in str(e.value)
    decoder_only(tmp_path / "c16.safetensors", z_channels=16)
    with pytest.raises(ValueError, match="c16.safetensors takes latents of 16 channels, the encoder .*ldm.safetensors "
                                         "gives 4"):
        SSDD.from_checkpoint(tmp_path / "c16.safetensors", encoder=str(files["ldm"]))
    # a VAE is no SSDD checkpoint, whether or not it has an encoder
    with pytest.raises(ValueError, match="is not an SSDD checkpoint"):
        SSDD.from_checkpoint(files["diffusers_old"])


def one_error_line(capsys, main, argv, phrase):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines


def test_scripts_take_the_encoder_of_a_decoder_only_checkpoint(files, tmp_path, evaluated, one_thread, capsys):
    """evaluate.py, latent_stats.py, distill.py and train_ae.py --init: --encoder-ckpt, or one error line."""
    path = tmp_path / "decoder.safetensors"
    decoder = decoder_only(path)
    data = ["--data", PHOTOS, "--im", "64", "--num-workers", "0"]
    results = evaluate.main(["--ckpt", str(path), "--encoder-ckpt", str(files["diffusers"]), "--limit", "2", "--steps",
                             "1", *data])
    (m,) = evaluated
    with torch.no_grad():
        assert rel_err(m.encode(images(64, 128)), reference_latent(64, 128)) < 1e-5
    assert all(torch.equal(m.state_dict()[k], v) for k, v in decoder.items())
    assert results["images"] == 2 and results["psnr"] > 0
    capsys.readouterr()
    for main, argv in ((evaluate.main, ["--ckpt", path]), (latent_stats.main, ["--ckpt", path]),
                       (distill.main, ["--teacher", path, "--batch-size", "4", "--lpips-weight", "0",
                                       "--repa-weight", "0", "--run-dir", tmp_path / "distill"])):
        one_error_line(capsys, main, argv + data, f"{path} holds only a decoder")
    assert not os.path.exists(tmp_path / "distill")

    # finetuning the published decoder: one step leaves the weights as loaded (RAdam's warm-up)
    train_ae.main([str(a) for a in ["--init", path, "--encoder-ckpt", files["ldm"], "--size", json.dumps(TINY),
                                    "--batch-size", "4", "--max-steps", "1", "--run-dir", tmp_path / "run",
                                    "--lpips-weight", "0", "--repa-weight", "0", "--eval-images", "2", *data]])
    ema = SSDD.from_checkpoint(tmp_path / "run" / "ema.safetensors")
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in decoder.items())
    with torch.no_grad():
        assert rel_err(ema.encode(images(64, 64)), reference_latent(64, 64)) < 1e-5


def test_non_finite_encoder_weights_are_refused(tmp_path):
    """Named with the file's own key; a NaN in the VAE's decoder, which is not used, is no matter."""
    sd = {k: v.clone() for k, v in reference().state_dict().items()
          if k.startswith(("encoder.", "quant_conv.", "decoder.conv_in."))}
    sd["decoder.conv_in.weight"][0, 0] = float("nan")
    path = save(tmp_path, sd)
    SSDD.from_sd_vae(path, decoder=TINY)
    sd["encoder.down_blocks.2.resnets.1.conv2.weight"][7, 1, 0, 2] = float("inf")
    path = save(tmp_path, sd)
    with pytest.raises(ValueError, match=f"^{path}: tensor 'encoder.down_blocks.2.resnets.1.conv2.weight' holds "
                                         "non-finite values"):
        SSDD.from_sd_vae(path, decoder=TINY)
    with pytest.raises(ValueError, match="holds non-finite values"):
        model.encoder_weights(path)  # train_ae.py --encoder-ckpt
