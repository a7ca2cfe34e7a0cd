"""Tests of model.py: numerics against the official code's golden vectors, the sizes and the official
state-dict layout, the attention window, the sampler, input checks, and that a small model learns. The
checkpoint files are tested in test_checkpoint.py."""
import ast
import glob
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model
from model import SSDD

TINY = dict(widths=(32, 32, 64, 64), depth=2, heads=2)


def golden_weights(m):
    """The seeded weights the golden vectors were made with (testdata/GOLDEN.md)."""
    sd = {}
    for k, v in m.state_dict().items():
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(zlib.crc32(k.encode())))
        if k.endswith("relative_bias_table"):
            w = 0.5 * w
        elif w.ndim >= 2:
            w = 0.05 * w
        elif k.endswith(".weight"):
            w = 1 + 0.02 * w
        else:
            w = 0.02 * w
        sd[k] = w
    m.load_state_dict(sd)
    return m.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def official_layout(size):
    with open(f"testdata/ssdd_f8c4_{size}_state_dict.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return {k: ast.literal_eval(shape) for k, shape in rows}


def photos(n, size=64):
    files = sorted(glob.glob("testdata/photos/train/*.png"))[:n]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("encoder,size,im", [("f8c4", "S", 64), ("f8c4", "S", 128), ("f8c4", "M", 128),
                                             ("f16c4", "S", 128), ("f16c16", "S", 128), ("f32c64", "S", 128)])
def test_golden_vectors(tmp_path, encoder, size, im):
    """Each published compression, through a file of the official layout (tensors only, no metadata): the
    configuration is read off its shapes. Errors measured: at most 4e-6 (float32 rounding). 1e-4 would miss an
    eps of 1e-6 instead of 1e-5 in the decoder's AdaGroupNorm (errors 2.7e-5 to 4.3e-5) or of 1e-5 instead of
    1e-6 in the encoder (8.7e-5)."""
    g = torch.load(f"testdata/golden_{encoder}_{size}_{im}.pt", weights_only=True)
    model.save_safetensors(golden_weights(SSDD(encoder, size)).state_dict(), tmp_path / "official.safetensors")
    m = SSDD.from_checkpoint(tmp_path / "official.safetensors")
    assert m.config == dict(encoder=encoder, decoder=size)
    with torch.no_grad():
        assert rel_err(m.encode(g["x"]), g["z"]) < 2e-5
        assert rel_err(m.decoder(g["x_t"], g["t"], g["z"]), g["v"]) < 2e-5
        assert rel_err(m.decode(g["z"], steps=1, noise=g["noise"]), g["sample_1"]) < 2e-5
        if size == "S":  # 8 steps of M cost 30 s on 2 cores; its velocity above already pins it down
            # the official release's time grid, (1 - i/8)^4
            assert rel_err(m.decode(g["z"], steps=8, noise=g["noise"], time_power=4), g["sample_8"]) < 2e-5


@pytest.mark.parametrize("size,count", [("XS", 4_996_611), ("S", 14_057_059), ("B", 21_140_459), ("M", 50_280_147),
                                        ("L", 90_759_939), ("XL", 161_272_835), ("H", 362_688_003),
                                        ("XH", 644_622_339), ("G", 1_450_019_715)])
def test_parameter_counts(size, count):
    """Decoder parameters with an f8c4 latent, as counted on the official code."""
    with torch.device("meta"):
        m = SSDD("f8c4", size)
    assert sum(p.numel() for p in m.decoder.parameters()) == count
    assert sum(p.numel() for p in m.encoder.parameters()) == 34_163_664


@pytest.mark.parametrize("size", ["S", "M", "H"])
def test_official_state_dict_layout(size):
    with torch.device("meta"):
        m = SSDD("f8c4", size)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official_layout(size)


def dense_window_attention(attn, table, x, h, w):
    """Straightforward reference: a dense (heads, N, N) bias filled offset by offset, -inf elsewhere,
    softmax attention in float64, on an h x w token grid."""
    B, N, D = x.shape
    heads = table.shape[-1]
    row, col = torch.arange(N) // w, torch.arange(N) % w
    d_row, d_col = row[:, None] - row[None, :], col[:, None] - col[None, :]  # query minus key
    bias = torch.full((heads, N, N), float("-inf"), dtype=torch.float64)
    for di in range(-7, 8):
        for dj in range(-7, 8):
            pairs = (d_row == di) & (d_col == dj)
            bias[:, pairs] = table[di + 7, dj + 7].double()[:, None]
    q, k, v = (p(x).double().view(B, N, heads, D // heads).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5 + bias, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, attn.out_proj.weight.double(), attn.out_proj.bias.double())


@pytest.mark.parametrize("h, w", [(8, 8), (16, 16), (32, 32), (8, 20), (24, 12)])
def test_window_attention_matches_dense_mask(h, w):
    """Output and gradients (of the input and of the bias table) against the float64 dense reference."""
    torch.manual_seed(h * w)
    block = model.TransformerBlock(64, 4, 16)
    torch.nn.init.normal_(block.relative_position_bias.relative_bias_table)
    x = torch.randn(2, h * w, 64, requires_grad=True)
    index = model.window_index(h, w, x.device)
    ours = block.attn1(x, block.relative_position_bias(index, h, w))
    ref = dense_window_attention(block.attn1, block.relative_position_bias.relative_bias_table, x, h, w)
    assert rel_err(ours.double(), ref) < 1e-5
    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, [x, block.relative_position_bias.relative_bias_table], grad.float())
    g_ref = torch.autograd.grad(ref, [x, block.relative_position_bias.relative_bias_table], grad)
    for a, b in zip(g_ours, g_ref):
        assert rel_err(a.double(), b) < 1e-5


def test_attention_bias_is_contiguous():
    """A permuted bias view sends SDPA to its float32 math path (measured on an H200: 3x the attention time,
    N x N probabilities kept for backward); the bias must be contiguous."""
    block = model.TransformerBlock(64, 4, 16)
    bias = block.relative_position_bias(model.window_index(8, 8, "cpu"), 8, 8)
    assert bias.shape == (4, 64, 64) and bias.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SDPA kernels need CUDA")
def test_attention_bias_suits_fused_sdpa_kernels():
    """The memory-efficient kernel accepts the bias, forward and backward, and agrees with the math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    block = model.TransformerBlock(64, 4, 16).cuda()
    torch.nn.init.normal_(block.relative_position_bias.relative_bias_table)
    x = torch.randn(2, 256, 64, device="cuda")
    outs = []
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend), torch.autocast("cuda", torch.bfloat16):
            out = block.attn1(x, block.relative_position_bias(model.window_index(16, 16, "cuda"), 16, 16))
        out.float().square().sum().backward()
        outs.append((out.float(), block.relative_position_bias.relative_bias_table.grad.clone()))
        block.zero_grad()
    (a, ga), (b, gb) = outs
    assert rel_err(a, b) < 2e-2 and rel_err(ga, gb) < 5e-2


def test_relative_bias_is_read_on_every_call():
    block = model.TransformerBlock(64, 4, 16)
    x = torch.randn(1, 64, 64)
    index = model.window_index(8, 8, x.device)
    before = block.attn1(x, block.relative_position_bias(index, 8, 8))
    with torch.no_grad():
        block.relative_position_bias.relative_bias_table.normal_()
    assert not torch.allclose(before, block.attn1(x, block.relative_position_bias(index, 8, 8)))


def test_window_bias_gradient_compiled_matches_gather():
    """The banded-sum backward of WindowBias, compiled as training compiles it, against autograd's own
    backward of the plain gather."""
    torch.manual_seed(0)
    h, w, heads = 16, 12, 3
    table = torch.randn(heads, 15, 15, requires_grad=True)
    index = model.window_index(h, w, "cpu")
    grad = torch.randn(heads, h * w, h * w)
    plain = torch.cat([table.flatten(1), torch.full((heads, 1), float("-inf"))], dim=1)[:, index]
    (expected,) = torch.autograd.grad(plain, table, grad)
    bias = torch.compile(model.WindowBias.apply, fullgraph=True)(table, index, h, w)
    assert torch.equal(bias, plain.detach())
    (got,) = torch.autograd.grad(bias, table, grad)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("shape", [(2, 96, 16, 12), (3, 64, 8, 8), (2, 288, 4, 4)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_norm_from_channel_sums_matches_native(shape, memory_format):
    """Forward and backward of the compiled path's group norm against F.group_norm in float64: to rounding in
    float64, and in float32 on inputs whose mean is larger than their spread, where one-pass variances lose
    digits (the native CPU kernel's own float32 error on channels-last inputs is 2e-5 to 6e-5 here)."""
    torch.manual_seed(0)
    x64 = (torch.randn(shape, dtype=torch.float64) * 3 + 20).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    native = F.group_norm(x64, 32, eps=1e-5)
    (native_grad,) = torch.autograd.grad(native, x64, grad)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = x64.detach().to(dtype).contiguous(memory_format=memory_format).requires_grad_()
        ours = model.GroupNormFromChannelSums.apply(x, 32, 1e-5)
        (ours_grad,) = torch.autograd.grad(ours, x, grad.to(dtype))
        assert ours.dtype == dtype and (ours.double() - native).abs().max() < tol
        assert (ours_grad.double() - native_grad).abs().max() < tol * native_grad.abs().max()


def test_group_norm_compiled_matches_eager():
    """model.group_norm under torch.compile (GroupNormFromChannelSums, the affine part, the output dtype)
    against its eager path, F.group_norm, in values and in the gradients of input, weight and bias."""
    torch.manual_seed(0)
    norm = model.GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 64, 12, 10)
    compiled = torch.compile(norm, fullgraph=True)
    results = []
    for fn in (norm, compiled):
        y = fn(x)
        results.append((y, *torch.autograd.grad(y, (x, norm.weight, norm.bias), grad)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    x16 = x.detach().bfloat16()
    assert compiled(x16).dtype == norm(x16).dtype == torch.bfloat16


def test_compiled_decoder_matches_eager():
    """The decoder as training compiles it (GroupNormFromChannelSums, WindowBias, Inductor's fusions) against
    eager PyTorch: velocity and the gradient of every parameter. Gradients that are zero in exact arithmetic
    (biases of convolutions followed by a one-channel-per-group norm) are compared on the scale of the largest.
    Measured: at most 1.6e-4 relative, with one thread (a float32 sum taken in another order)."""
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    for p in m.decoder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, z, t = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 8, 8), torch.rand(2)
    results = []
    for decoder in (m.decoder, torch.compile(m.decoder, fullgraph=True)):
        v = decoder(x, t, z)
        results.append((v, torch.autograd.grad(v.square().mean(), list(m.decoder.parameters()))))
    (v_eager, g_eager), (v_compiled, g_compiled) = results
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in g_eager)
    for (name, _), got, expected in zip(m.decoder.named_parameters(), g_compiled, g_eager):
        assert (got - expected).abs().max() < 3e-4 * max(expected.abs().max(), 1e-3 * scale), name


@pytest.mark.parametrize("encoder,shape", [("f8c4", (64, 96)), ("f16c8", (128, 64)), ("f4c3", (64, 64))])
def test_context_modulation_equals_upsampling(encoder, shape):
    """Modulating by broadcast equals the straightforward nearest-upsampled context at every level."""
    torch.manual_seed(0)
    m = SSDD(encoder, TINY)
    z = torch.randn(2, m.decoder.z_channels, shape[0] // m.factor, shape[1] // m.factor)
    ctx = torch.randn(2, 32, *z.shape[-2:])
    for level, div in zip(m.decoder.down_blocks, (1, 2, 4, 8)):
        norm = level.resnets[0].norm1
        h = torch.randn(2, level.resnets[0].conv1.in_channels, shape[0] // div, shape[1] // div)
        up = F.interpolate(ctx, size=h.shape[-2:], mode="nearest")
        scale, shift = F.conv2d(up, norm.ctx_proj.weight, norm.ctx_proj.bias).chunk(2, dim=1)
        ref = F.group_norm(h, 32, eps=1e-5) * (1 + scale) + shift
        torch.testing.assert_close(norm(h, ctx), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("power", [2, 4, 2.5])
def test_time_grid(power):
    for steps in (1, 2, 8, 12):
        expected = [(1 - i / steps) ** power for i in range(steps + 1)]
        torch.testing.assert_close(model.time_grid(steps, power), torch.tensor(expected))
    assert model.time_grid(4).tolist() == [1.0, 0.75 ** 2, 0.5 ** 2, 0.25 ** 2, 0.0]  # default power 2


def test_sampler():
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY).eval()
    for p in m.decoder.parameters():  # make the velocity depend on everything
        torch.nn.init.normal_(p, std=0.05)
    z = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        one = m.decode(z, steps=1, noise=noise)
        torch.testing.assert_close(one, noise + m.decoder(noise, torch.ones(2), z))

        def two_steps(t1):  # by hand: t = 1 -> t1 -> 0
            x = noise + (1 - t1) * m.decoder(noise, torch.ones(2), z)
            return x + t1 * m.decoder(x, torch.full((2,), t1), z)

        assert m.default_steps == 8 and m.time_power == 2
        torch.testing.assert_close(m.decode(z, steps=2, noise=noise), two_steps(0.5 ** 2))
        torch.testing.assert_close(m.decode(z, steps=2, noise=noise, time_power=4), two_steps(0.5 ** 4))
        m.time_power = 3
        torch.testing.assert_close(m.decode(z, steps=2, noise=noise), two_steps(0.5 ** 3))
        a = m.decode(z, generator=torch.Generator().manual_seed(1))
        b = m.decode(z, generator=torch.Generator().manual_seed(1))
        c = m.decode(z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (256, 256), (64, 128), (192, 64)])
def test_shapes(hw):
    m = SSDD("f8c4", TINY).eval()
    x = torch.rand(1, 3, *hw) * 2 - 1
    with torch.no_grad():
        z = m.encode(x)
        assert z.shape == (1, 4, hw[0] // 8, hw[1] // 8)
        assert m.decode(z, steps=1).shape == x.shape
        out = m(x, t=torch.rand(1))
    assert out["x0_hat"].shape == x.shape
    assert out["hidden"].shape == (1, hw[0] * hw[1] // 64, 64)


def test_encoder_factors():
    for name, f in (("f16c8", 16), ("f4c3", 4)):
        m = SSDD(name, TINY).eval()
        x = torch.rand(1, 3, 128, 64) * 2 - 1
        with torch.no_grad():
            z = m.encode(x)
            assert z.shape == (1, int(name.split("c")[1]), 128 // f, 64 // f)
            assert m.decode(z, steps=1).shape == x.shape


def test_input_errors():
    m = SSDD("f8c4", TINY)
    with pytest.raises(ValueError, match="at least 64 px"):
        m.encode(torch.zeros(1, 3, 32, 64))
    with pytest.raises(ValueError, match="divisible by 8"):
        m.encode(torch.zeros(1, 3, 68, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="latent z must be"):
        m.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="does not match latent"):
        m.decoder(torch.zeros(1, 3, 64, 64), torch.ones(1), torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="f8c4"):
        SSDD("vae", "M")
    with pytest.raises(ValueError, match="decoder size"):
        SSDD("f8c4", "XXL")
    with pytest.raises(ValueError, match="divisible by 16"):
        SSDD("f16c4", TINY).encode(torch.zeros(1, 3, 72, 64))


def test_training_call():
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    t, noise = torch.tensor([0.3, 1.0]), torch.randn(2, 3, 64, 64)
    out = m(x, t=t, noise=noise)
    assert out["kl"].ndim == 0 and out["kl"] > 0
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v = m.decoder(x_t, t, out["z"])
    torch.testing.assert_close(out["loss"], F.mse_loss(v, x - noise))
    torch.testing.assert_close(out["x0_hat"], x_t + t.view(-1, 1, 1, 1) * v)
    given = m(x, t=t, noise=noise, z=out["z"])
    assert given["kl"] is None
    torch.testing.assert_close(given["loss"], out["loss"])
    assert m(x)["t"].min() > 0  # logit-normal t when not given


def test_tiny_model_learns_real_photos():
    """Decoder-only training on a frozen encoder (stage 1) over 2 real photos: the flow-matching loss falls
    and the one-step reconstruction gets much better."""
    torch.manual_seed(0)
    m = SSDD("f8c4", TINY)
    x = photos(2)
    with torch.no_grad():
        z = m.encode(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def psnr():
        with torch.no_grad():
            mse = F.mse_loss((m.decode(z, steps=1, noise=noise) + 1) / 2, (x + 1) / 2)
        return -10 * torch.log10(mse).item()

    psnr_before = psnr()
    opt = torch.optim.Adam(m.decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = m(x, z=z)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])
    assert psnr() > psnr_before + 6
