"""SSDD: Single-Step Diffusion Decoder (arXiv 2510.04961), the whole autoencoder in one file.

An LDM-style KL encoder maps an image in [-1, 1] to a latent z of shape (B, C, H/f, W/f). The decoder is a
flow-matching U-Net with a windowed-attention transformer in the middle: it predicts the velocity v = x - e
of x_t = (1 - t) x + t e, conditioned on z. Decoding integrates from pure noise (t = 1) to the image (t = 0)
with Euler steps; a distilled decoder does it in one step: x = e + D(e, 1, z).

State-dict keys and numerics follow the official code, so its checkpoints load unchanged. This file needs
only torch and the standard library: copy it into your project.
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

# decoder sizes: base channels, channel multipliers per level, transformer depth
DECODER_SIZES = {
    "S": (48, (1, 2, 3, 3), 8),
    "B": (64, (1, 2, 3, 3), 10),
    "M": (96, (1, 2, 3, 3), 12),
    "L": (96, (1, 2, 4, 4), 16),
    "XL": (128, (1, 2, 4, 4), 16),
    "H": (192, (1, 2, 4, 4), 16),
}
WINDOW = 8  # every token attends to the (2 * WINDOW - 1)^2 tokens around it
TIME_POWER = 4  # Euler grid t_i = (1 - i / N) ** TIME_POWER


def decoder_config(size):
    """Level widths, transformer depth and heads of a named decoder size."""
    ch, mult, depth = DECODER_SIZES[size]
    widths = tuple(math.ceil(ch * m / 32) * 32 for m in mult)
    return dict(widths=widths, depth=depth, heads=min(16, max(4, widths[-1] // 64)))


def parse_encoder_name(name):
    """'f8c4' -> (8, 4)."""
    try:
        f, c = name[1:].split("c")
        f, c = int(f), int(c)
    except ValueError:
        f = c = 0
    if not name.startswith("f") or f < 2 or f & (f - 1) or c < 1:
        raise ValueError(f"encoder must be named f{{2^k}}c{{C}}, e.g. 'f8c4'; got {name!r}")
    return f, c


# ----------------------------------------------------------------------------------------------------------
# Group norm

def group_mean(per_channel, groups, n):
    """(B, C) per-channel sums -> (B, C, 1, 1): the sum over each channel's group divided by n."""
    B, C = per_channel.shape
    return (per_channel.view(B, groups, -1).sum(2) / n).repeat_interleave(C // groups, 1)[:, :, None, None]


class GroupNormFromChannelSums(torch.autograd.Function):
    """F.group_norm without affine, in float32 or wider, with every statistic summed over H, W per channel
    first and then over the channels of a group, forward and backward. Inductor compiles its own group norm
    into reductions over strided group slices of a channels-last tensor, several times slower than these
    reductions along the contiguous channel axis (H200, compiled M decoding: 434 -> 515 img/s). The variance
    takes a second pass over the centred input, as exact as the native kernel's Welford update."""

    @staticmethod
    def forward(ctx, x, groups, eps):
        n = x[0, 0].numel() * (x.shape[1] // groups)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = group_mean(xf.sum((2, 3)), groups, n)
        centred = xf - mean
        rstd = torch.rsqrt(group_mean((centred ** 2).sum((2, 3)), groups, n) + eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.groups, ctx.n = groups, n
        return centred * rstd

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd = ctx.saved_tensors
        x_hat = (x.to(mean.dtype) - mean) * rstd
        grad_mean = group_mean(grad.sum((2, 3)), ctx.groups, ctx.n)
        grad_x_hat_mean = group_mean((grad * x_hat).sum((2, 3)), ctx.groups, ctx.n)
        return (rstd * (grad - grad_mean - x_hat * grad_x_hat_mean)).to(x.dtype), None, None


def group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    """F.group_norm, the same numbers; compiled, computed by GroupNormFromChannelSums. Eager keeps the native
    fused kernel. Output dtype as F.group_norm's: float32 under CUDA autocast, else x's."""
    if not torch.compiler.is_compiling():
        return F.group_norm(x, groups, weight, bias, eps)
    y = GroupNormFromChannelSums.apply(x, groups, eps)
    if weight is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return y if x.is_cuda and torch.is_autocast_enabled("cuda") else y.to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state-dict keys) computed by group_norm."""

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------------------------------------
# Encoder (LDM KL-VAE encoder)

class EncoderResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class EncoderAttention(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = GroupNorm(32, ch, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv; the encoder pads right and bottom only (asymmetric), the decoder pads all sides."""

    def __init__(self, ch, asymmetric):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Encoder(nn.Module):
    def __init__(self, factor=8, z_channels=4, ch=128):
        super().__init__()
        widths = [ch * m for m in (1, 2) + (4,) * (int(math.log2(factor)) - 1)]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, w in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList([EncoderResBlock(cin, w), EncoderResBlock(w, w)])
            if i < len(widths) - 1:
                level.downsample = Downsample(w, asymmetric=True)
            self.down.append(level)
            cin = w
        self.mid = nn.Module()
        self.mid.block_1 = EncoderResBlock(cin, cin)
        self.mid.attn_1 = EncoderAttention(cin)
        self.mid.block_2 = EncoderResBlock(cin, cin)
        self.norm_out = GroupNorm(32, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)
        self.out_proj = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)

    def forward(self, x):
        """Returns the posterior mean and log-variance, each (B, C, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.out_proj(self.conv_out(F.silu(self.norm_out(h))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


# ----------------------------------------------------------------------------------------------------------
# Decoder

def modulate(h, scale, shift):
    """h * (1 + scale) + shift, where scale and shift live on a grid r times coarser than h (nearest
    upsampling). Broadcasting over r x r blocks gives the same numbers as upsampling them, without
    materialising a full-resolution copy for every block."""
    B, C, H, W = h.shape
    hs, ws = scale.shape[-2:]
    if (hs, ws) == (H, W):
        return h * (1 + scale) + shift
    if hs > H:  # context finer than the features (small encoder factor): nearest downsampling
        scale, shift = (F.interpolate(s, size=(H, W), mode="nearest") for s in (scale, shift))
        return h * (1 + scale) + shift
    rh, rw = H // hs, W // ws
    h = h.view(B, C, hs, rh, ws, rw)
    scale, shift = scale[:, :, :, None, :, None], shift[:, :, :, None, :, None]
    return (h * (1 + scale) + shift).view(B, C, H, W)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine, then a per-pixel scale and shift from the latent context map."""

    def __init__(self, ch, ctx_ch):
        super().__init__()
        self.ctx_proj = nn.Conv2d(ctx_ch, 2 * ch, 1)

    def forward(self, h, ctx):
        # ctx_proj is pointwise, so it commutes with nearest resizing: project at latent resolution
        scale, shift = self.ctx_proj(ctx).chunk(2, dim=1)
        return modulate(group_norm(h, 32, eps=1e-5), scale, shift)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, ctx_ch, temb_ch):
        super().__init__()
        self.norm1 = AdaGroupNorm(cin, ctx_ch)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, 2 * cout)
        self.norm2 = GroupNorm(32, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb_act, ctx):
        h = self.conv1(F.silu(self.norm1(x, ctx)))
        scale, shift = self.time_emb_proj(temb_act)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def window_index(h, w, device):
    """For an h x w token grid, the (N, N) index of each (query, key) pair into a relative-bias table
    flattened to (2W-1)^2 rows, with pairs outside the window pointing to one extra row past the end."""
    r = WINDOW - 1
    di = torch.arange(h, device=device)
    dj = torch.arange(w, device=device)
    di = (di[:, None] - di[None, :])[:, None, :, None].expand(h, w, h, w).reshape(h * w, h * w)
    dj = (dj[:, None] - dj[None, :])[None, :, None, :].expand(h, w, h, w).reshape(h * w, h * w)
    inside = (di.abs() <= r) & (dj.abs() <= r)
    index = (di + r) * (2 * r + 1) + (dj + r)
    return torch.where(inside, index, (2 * r + 1) ** 2)


class WindowBias(torch.autograd.Function):
    """(heads, 2W-1, 2W-1) relative-bias table -> (heads, N, N) bias of an h x w token grid, -inf outside
    the window. The forward is a gather. Autograd's backward of that gather scatters N^2 values into
    (2W-1)^2 slots with atomic adds (10% of an M training step on an H200); the gradient of table row
    (a, b) is instead the sum of one diagonal band of the (h, w, h, w) gradient, read here as a strided view."""

    @staticmethod
    def forward(table, index, h, w):
        flat = table.flatten(1)
        return torch.cat([flat, flat.new_full((flat.shape[0], 1), float("-inf"))], dim=1)[:, index]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.grid = inputs[2:]

    @staticmethod
    def backward(ctx, grad):
        (h, w), r = ctx.grid, WINDOW - 1
        heads = grad.shape[0]
        # padded[.., i1, j1, i2 + r, j2 + r] = grad[.., i1, j1, i2, j2]; band[.., i1, j1, a, b] is the entry with
        # i2 = i1 + a - r, j2 = j1 + b - r, i.e. the offset (i1 - i2, j1 - j2) = (r - a, r - b)
        padded = F.pad(grad.reshape(heads, h, w, h, w), (r, r, r, r))
        s = padded.stride()
        band = padded.as_strided((heads, h, w, 2 * r + 1, 2 * r + 1), (s[0], s[1] + s[3], s[2] + s[4], s[3], s[4]))
        return band.sum((1, 2)).flip(1, 2), None, None, None


class RelativePositionBias(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.relative_bias_table = nn.Parameter(torch.zeros(2 * WINDOW - 1, 2 * WINDOW - 1, heads))

    def forward(self, index, h, w):
        """(heads, N, N) additive bias, -inf outside the window; rebuilt from the table on every call.
        Contiguous on purpose: SDPA's fused kernels need a unit stride in the last dimension and fall
        back to the slow float32 math path for a permuted view."""
        return WindowBias.apply(self.relative_bias_table.permute(2, 0, 1), index, h, w)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, bias):
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        # one bias shared by the whole batch: never a per-sample mask
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[None])
        return self.out_proj(h.transpose(1, 2).reshape(B, N, D))


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then a shift and scale per token from the latent context."""

    def __init__(self, dim, ctx_ch):
        super().__init__()
        self.linear = nn.Linear(ctx_ch, 2 * dim)

    def forward(self, x, ctx_act):
        shift, scale = self.linear(ctx_act).chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * (1 + scale) + shift


class GEGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj_in_act = GEGLU(dim, 4 * dim)
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.proj_out(self.proj_in_act(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, ctx_ch):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, ctx_ch)
        self.attn1 = Attention(dim, heads)
        self.relative_position_bias = RelativePositionBias(heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x, ctx_act, index, grid):
        x = x + self.attn1(self.norm1(x, ctx_act), self.relative_position_bias(index, *grid))
        return x + self.ff(self.norm2(x))


class MidBlock(nn.Module):
    def __init__(self, dim, depth, heads, ctx_ch):
        super().__init__()
        self.norm = GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, ctx_ch) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)
        self.repa_block = min(4, depth // 2)

    def forward(self, x, ctx):
        B, D, H, W = x.shape
        hc, wc = ctx.shape[-2:]
        if (hc, wc) != (H, W):  # latent grid coarser or finer than the token grid: nearest resize
            ctx = F.interpolate(ctx, size=(H, W), mode="nearest")
        ctx_act = F.silu(ctx).flatten(2).transpose(1, 2)
        index = window_index(H, W, x.device)
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        hidden = None
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, ctx_act, index, (H, W))
            if i == self.repa_block:
                hidden = h
        h = self.proj_out(h).transpose(1, 2).reshape(B, D, H, W)
        return x + h, hidden


def timestep_embedding(s, dim):
    """Sinusoidal embedding [cos(s f_k), sin(s f_k)], f_k = 10000^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
    args = s.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, ch, out_ch):
        super().__init__()
        self.linear_1 = nn.Linear(ch, out_ch)
        self.linear_2 = nn.Linear(out_ch, out_ch)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Decoder(nn.Module):
    """D(x_t, t, z) -> velocity. widths: the four level widths; depth, heads: the middle transformer."""

    def __init__(self, z_channels, factor, widths, depth, heads):
        super().__init__()
        c0, dim = widths[0], widths[-1]
        self.z_channels, self.factor, self.width = z_channels, factor, dim
        self.conv_in = nn.Conv2d(3 + z_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, 4 * c0)
        self.ada_ctx_proj = nn.Sequential(nn.Conv2d(z_channels, c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c0, 3, padding=1))
        skips = [c0]
        self.down_blocks = nn.ModuleList()
        cin = c0
        for i, w in enumerate(widths):
            level = nn.Module()
            level.resnets = nn.ModuleList([ResBlock(cin, w, c0, 4 * c0), ResBlock(w, w, c0, 4 * c0)])
            skips += [w, w]
            if i < len(widths) - 1:
                level.downsamplers = nn.ModuleList([Downsample(w, asymmetric=False)])
                skips.append(w)
            self.down_blocks.append(level)
            cin = w
        self.mid_block = MidBlock(dim, depth, heads, c0)
        self.up_blocks = nn.ModuleList()
        for i, w in enumerate(reversed(widths)):
            level = nn.Module()
            level.resnets = nn.ModuleList()
            for _ in range(3):
                level.resnets.append(ResBlock(cin + skips.pop(), w, c0, 4 * c0))
                cin = w
            if i < len(widths) - 1:
                level.upsamplers = nn.ModuleList([Upsample(w)])
            self.up_blocks.append(level)
        self.conv_norm_out = GroupNorm(32, c0, eps=1e-5)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

    def check_inputs(self, x_t, z):
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"latent z must be (B, {self.z_channels}, h, w); got {tuple(z.shape)}")
        if x_t.ndim != 4 or x_t.shape[1] != 3:
            raise ValueError(f"x_t must be (B, 3, H, W); got {tuple(x_t.shape)}")
        H, W = x_t.shape[-2:]
        if (H, W) != (z.shape[-2] * self.factor, z.shape[-1] * self.factor) or x_t.shape[0] != z.shape[0]:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match latent {tuple(z.shape)} at factor {self.factor}")
        check_image_size(H, W, self.factor)

    def forward(self, x_t, t, z, return_hidden=False):
        """Velocity v = x - e at time t in [0, 1] (shape (B,)); with return_hidden also the tokens of
        transformer block min(4, depth // 2), for REPA."""
        self.check_inputs(x_t, z)
        ctx = self.ada_ctx_proj(z)
        temb_act = F.silu(self.time_embedding(timestep_embedding(1000 * t, self.conv_in.out_channels)))
        z_up = F.interpolate(z, size=x_t.shape[-2:], mode="nearest")
        h = self.conv_in(torch.cat([x_t, z_up.to(x_t.dtype)], dim=1))
        skips = [h]
        for level in self.down_blocks:
            for resnet in level.resnets:
                h = resnet(h, temb_act, ctx)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        h, hidden = self.mid_block(h, ctx)
        for level in self.up_blocks:
            for resnet in level.resnets:
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act, ctx)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        v = self.conv_out(F.silu(self.conv_norm_out(h)))
        return (v, hidden) if return_hidden else v


def check_image_size(H, W, factor):
    if H % factor or W % factor or H % 8 or W % 8:
        raise ValueError(f"image sides must be divisible by {max(factor, 8)}; got {H}x{W}")
    if H < 8 * WINDOW or W < 8 * WINDOW:
        raise ValueError(f"images must be at least {8 * WINDOW} px per side (an {WINDOW}x{WINDOW} token grid); got {H}x{W}")


# ----------------------------------------------------------------------------------------------------------
# The autoencoder

def sample_posterior(mean, logvar, noise=None):
    """A sample mean + std * noise of the encoder's diagonal Gaussian posterior; noise ~ N(0, I) unless given."""
    return mean + (0.5 * logvar).exp() * (torch.randn_like(mean) if noise is None else noise)


def time_grid(steps, device=None):
    """Euler time points t_i = (1 - i / N)^4, i = 0..N, from 1 (noise) to 0 (image)."""
    return (1 - torch.arange(steps + 1, dtype=torch.float32, device=device) / steps) ** TIME_POWER


class SSDD(nn.Module):
    def __init__(self, encoder="f8c4", decoder="M"):
        super().__init__()
        factor, z_channels = parse_encoder_name(encoder)
        if isinstance(decoder, str):
            if decoder not in DECODER_SIZES:
                raise ValueError(f"decoder size must be one of {list(DECODER_SIZES)}; got {decoder!r}")
            dec = decoder_config(decoder)
        else:
            dec = dict(widths=tuple(decoder["widths"]), depth=decoder["depth"], heads=decoder["heads"])
        self.config = dict(encoder=encoder, decoder=decoder if isinstance(decoder, str) else dec)
        self.factor = factor
        self.encoder = Encoder(factor, z_channels)
        self.decoder = Decoder(z_channels, factor, **dec)
        self.default_steps = 8
        self.latent_mean, self.latent_std = None, None  # dataset statistics of the latents, when known
        self.apply(init_weights)
        for m in self.decoder.modules():  # residual branches start as the identity
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            if isinstance(m, FeedForward):
                nn.init.zeros_(m.proj_out.weight)

    def check_images(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
        check_image_size(x.shape[-2], x.shape[-1], self.factor)

    def encode(self, x, sample=False):
        """Images in [-1, 1] -> latent mean (or a posterior sample), (B, C, H/f, W/f)."""
        self.check_images(x)
        mean, logvar = self.encoder(x)
        return sample_posterior(mean, logvar) if sample else mean

    @torch.no_grad()
    def decode(self, z, steps=None, noise=None, generator=None):
        """Euler sampling from noise at t = 1 to the image at t = 0; steps=1 is the single-step decode."""
        steps = steps or self.default_steps
        B, _, h, w = z.shape
        if noise is None:
            noise = torch.randn(B, 3, h * self.factor, w * self.factor, generator=generator, device=z.device)
        ts = time_grid(steps, z.device)
        x = noise.float()  # the Euler sum stays in float32 under autocast
        for i in range(steps):
            v = self.decoder(x, ts[i].expand(B), z)
            x = x + (ts[i] - ts[i + 1]) * v
        return x

    def forward(self, x, t=None, noise=None, z=None, z_noise=None):
        """One flow-matching training evaluation on clean images x: the whole objective's randomness and
        arithmetic, written once. z: the latents to condition on (distillation); by default a posterior
        sample mean + std * z_noise of x, with the KL of the posterior to N(0, I) (summed over C, H, W,
        averaged over the batch). t ~ sigmoid(N(0, 1)), e ~ N(0, I) and z_noise ~ N(0, I) unless given.
        Returns the velocity MSE 'loss', 'kl' (None when z is given), the noisy input 'x_t', the one-step
        clean estimate 'x0_hat' = x_t + t v_hat, and the REPA tokens 'hidden'."""
        kl = None
        if z is None:
            self.check_images(x)
            mean, logvar = self.encoder(x)
            z = sample_posterior(mean, logvar, z_noise)
            kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).sum((1, 2, 3)).mean()
        if t is None:
            t = torch.sigmoid(torch.randn(x.shape[0], device=x.device))
        if noise is None:
            noise = torch.randn_like(x)
        t_ = t.view(-1, 1, 1, 1).to(x.dtype)
        x_t = (1 - t_) * x + t_ * noise
        v, hidden = self.decoder(x_t, t, z, return_hidden=True)
        loss = F.mse_loss(v.float(), (x - noise).float())
        x0_hat = x_t + t_ * v
        return dict(loss=loss, kl=kl, x_t=x_t, x0_hat=x0_hat, t=t, z=z, noise=noise, hidden=hidden)

    def normalize_latent(self, z):
        """(z - mean) / std with the dataset latent statistics, for training a latent diffusion model."""
        if self.latent_mean is None:
            raise ValueError("this model has no latent statistics: run latent_stats.py on its checkpoint")
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latent(self, z):
        if self.latent_mean is None:
            raise ValueError("this model has no latent statistics: run latent_stats.py on its checkpoint")
        return z * self.latent_std + self.latent_mean

    def save(self, path, **metadata):
        """Write the weights in the official layout as .safetensors, with config and defaults in its header."""
        meta = dict(config=self.config, default_steps=self.default_steps, **metadata)
        if self.latent_mean is not None:
            meta.update(latent_mean=self.latent_mean, latent_std=self.latent_std)
        save_safetensors(self.state_dict(), path, {k: json.dumps(v) for k, v in meta.items()})

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """Load an official or our .safetensors checkpoint; the configuration is read off the tensor shapes."""
        tensors, meta = load_safetensors(path)
        encoder, decoder = infer_config(tensors, path)
        with torch.device("meta"):
            model = cls(encoder, decoder)
        check_state_dict(model, tensors, path)
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
        model.default_steps = int(json.loads(meta.get("default_steps", "8")))
        if "latent_mean" in meta:
            model.latent_mean, model.latent_std = float(json.loads(meta["latent_mean"])), float(json.loads(meta["latent_std"]))
        return model.to(device).eval()


def init_weights(m):
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
        nn.init.zeros_(m.bias)


def infer_config(tensors, path):
    """Encoder name and decoder size (a name, or widths/depth/heads) from checkpoint tensor shapes."""
    try:
        levels = len({k.split(".")[2] for k in tensors if k.startswith("encoder.down.")})
        encoder = f"f{2 ** (levels - 1)}c{tensors['encoder.conv_out.weight'].shape[0] // 2}"
        widths = tuple(tensors[f"decoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(4))
        tables = [k for k in tensors if k.endswith("relative_bias_table")]
        decoder = dict(widths=widths, depth=len(tables), heads=tensors[tables[0]].shape[-1])
    except (KeyError, IndexError) as e:
        raise ValueError(f"{path} is not an SSDD checkpoint: no tensor {e}") from None
    for name in DECODER_SIZES:
        if decoder_config(name) == decoder:
            return encoder, name
    return encoder, decoder


def check_state_dict(model, tensors, path):
    """Strict loading, with one readable message naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(own.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - own.keys())
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & tensors.keys()) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{path} does not match SSDD(encoder={model.config['encoder']!r}, decoder={model.config['decoder']!r}):"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {what}: " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# .safetensors without the package: 8-byte little-endian header length, a JSON header, raw tensor bytes.
# The reader is a security boundary (checkpoints come from the internet): nothing is unpickled and every
# header field is checked against the file before a byte of data is used.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024


def save_safetensors(tensors, path, metadata=None):
    """Write atomically: a crash mid-write never leaves a truncated file under the final name."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors(path):
    """Returns ({key: tensor}, {metadata key: str}); raises ValueError naming what is wrong with the file."""
    def bad(why):
        return ValueError(f"{path}: not a valid .safetensors file: {why}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise bad(f"header length {n} exceeds the limit or the file size ({size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
        data = bytearray(f.read())
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise bad(f"tensor {key!r} has no supported dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise bad(f"tensor {key!r} has data offsets {offsets!r} outside the {len(data)} data bytes (truncated file?)")
        nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {key!r} of shape {shape} and dtype {info['dtype']} needs {nbytes} bytes, its offsets give {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise bad(f"tensor {key!r} starts at byte {start}, expected {end} (overlapping or gapped data)")
        end = stop
    if end != len(data):
        raise bad(f"{len(data) - end} trailing bytes after the last tensor")
    tensors = {}
    for start, stop, key in spans:
        info = header[key]
        buf = data[start:stop]
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[key] = t.reshape(info["shape"])
    return tensors, metadata


if __name__ == "__main__":
    # Decode (and encode) throughput on random weights: python model.py --size M --im 256 --batch 64 --compile
    import argparse
    import time

    p = argparse.ArgumentParser(description="SSDD decode/encode throughput benchmark")
    p.add_argument("--encoder", default="f8c4")
    p.add_argument("--size", default="M", choices=list(DECODER_SIZES))
    p.add_argument("--im", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the kernels that take the decode time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev = torch.device(args.device)
    m = SSDD(args.encoder, args.size).to(dev).eval()
    if args.channels_last:
        m = m.to(memory_format=torch.channels_last)
    if args.compile:
        m.encoder, m.decoder = torch.compile(m.encoder), torch.compile(m.decoder)
    x = torch.rand(args.batch, 3, args.im, args.im, device=dev) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def timed(fn):
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            for _ in range(2):  # warm-up (and compilation)
                out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.iters):
                out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return out, args.batch * args.iters / (time.perf_counter() - start)

    z, enc_speed = timed(lambda: m.encode(x))
    _, dec_speed = timed(lambda: m.decode(z, steps=args.steps))
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""
    if args.profile:
        with torch.profiler.profile() as prof, torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            m.decode(z, steps=args.steps)
        sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.encoder} {args.size} {args.im}px batch {args.batch} {args.steps} step(s) "
          f"{'compiled' if args.compile else 'eager'}{' channels-last' if args.channels_last else ''} on {where}: "
          f"decode {dec_speed:.1f} img/s, encode {enc_speed:.1f} img/s{mem}")
