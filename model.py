"""SSDD: Single-Step Diffusion Decoder (arXiv 2510.04961), the whole autoencoder in one file.

An LDM-style KL encoder maps an image in [-1, 1] to a latent z of shape (B, C, H/f, W/f). The decoder is a
flow-matching U-Net with a windowed-attention transformer in the middle: it predicts the velocity v = x - e
of x_t = (1 - t) x + t e, conditioned on z. Decoding integrates from pure noise (t = 1) to the image (t = 0)
with Euler steps; a distilled decoder does it in one step: x = e + D(e, 1, z).

State-dict keys and numerics follow the official code, so its checkpoints load unchanged. This file needs
only torch and the standard library: copy it into your project.
"""
import errno
import glob
import hashlib
import http.client
import json
import math
import os
import re
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# decoder sizes: base channels, channel multipliers per level, transformer depth
DECODER_SIZES = {
    "XS": (32, (1, 2, 3, 3), 8),
    "S": (48, (1, 2, 3, 3), 8),
    "B": (64, (1, 2, 3, 3), 10),
    "M": (96, (1, 2, 3, 3), 12),
    "L": (96, (1, 2, 4, 4), 16),
    "XL": (128, (1, 2, 4, 4), 16),
    "H": (192, (1, 2, 4, 4), 16),
    "XH": (256, (1, 2, 4, 4), 16),
    "G": (384, (1, 2, 4, 4), 16),
}
WINDOW = 8  # every token attends to the (2 * WINDOW - 1)^2 tokens around it
# Euler grid t_i = (1 - i / N) ** power: 2 in the authors' update, 4 in their first release. A sampler setting
# (training draws t from a logit-normal), kept in a checkpoint's header; checkpoints without it use 2.
TIME_POWER = 2.0


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
        q, k, v = (p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))
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


def run_block(block, recompute, *args):
    """block(*args); with recompute (activation checkpointing), its intermediate tensors are not kept for the
    backward pass but recomputed there from its inputs, one more forward of the block for much less memory.
    The decoder draws no random numbers, so the recomputation repeats the forward exactly without the RNG
    state being saved."""
    if recompute:
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
    return block(*args)


class MidBlock(nn.Module):
    def __init__(self, dim, depth, heads, ctx_ch):
        super().__init__()
        self.norm = GroupNorm(32, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, ctx_ch) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)
        self.repa_block = min(4, depth // 2)

    def forward(self, x, ctx, recompute=False):
        B, D, H, W = x.shape
        hc, wc = ctx.shape[-2:]
        if (hc, wc) != (H, W):  # latent grid coarser or finer than the token grid: nearest resize
            ctx = F.interpolate(ctx, size=(H, W), mode="nearest")
        ctx_act = F.silu(ctx).flatten(2).transpose(1, 2)
        index = window_index(H, W, x.device)
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        hidden = None
        for i, block in enumerate(self.transformer_blocks):
            h = run_block(block, recompute, h, ctx_act, index, (H, W))
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
    """D(x_t, t, z) -> velocity. widths: the four level widths; depth, heads: the middle transformer.
    checkpoint_activations: recompute the ResNet and transformer blocks in the backward pass (run_block)."""

    def __init__(self, z_channels, factor, widths, depth, heads):
        super().__init__()
        c0, dim = widths[0], widths[-1]
        self.z_channels, self.factor, self.width = z_channels, factor, dim
        self.checkpoint_activations = False
        self.conv_in = nn.Conv2d(3 + z_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, 4 * c0)
        self.ada_ctx_proj = nn.Sequential(nn.Conv2d(z_channels, c0, 3, padding=1), nn.SiLU(),
                                          nn.Conv2d(c0, c0, 3, padding=1))
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
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for level in self.down_blocks:
            for resnet in level.resnets:
                h = run_block(resnet, recompute, h, temb_act, ctx)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        h, hidden = self.mid_block(h, ctx, recompute)
        for level in self.up_blocks:
            for resnet in level.resnets:
                h = run_block(resnet, recompute, torch.cat([h, skips.pop()], dim=1), temb_act, ctx)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        v = self.conv_out(F.silu(self.conv_norm_out(h)))
        return (v, hidden) if return_hidden else v


def check_image_size(H, W, factor):
    if H % factor or W % factor or H % 8 or W % 8:
        raise ValueError(f"image sides must be divisible by {max(factor, 8)}; got {H}x{W}")
    if H < 8 * WINDOW or W < 8 * WINDOW:
        raise ValueError(f"images must be at least {8 * WINDOW} px per side (an {WINDOW}x{WINDOW} token grid); "
                         f"got {H}x{W}")


# ----------------------------------------------------------------------------------------------------------
# The autoencoder

def sample_posterior(mean, logvar, noise=None):
    """A sample mean + std * noise of the encoder's diagonal Gaussian posterior; noise ~ N(0, I) unless given."""
    return mean + (0.5 * logvar).exp() * (torch.randn_like(mean) if noise is None else noise)


def time_grid(steps, power=TIME_POWER, device=None):
    """Euler time points t_i = (1 - i / N)^power, i = 0..N, from 1 (noise) to 0 (image)."""
    return (1 - torch.arange(steps + 1, dtype=torch.float32, device=device) / steps) ** power


def decoder_spec(decoder):
    """The widths, depth and heads of a decoder size: a name of DECODER_SIZES, or a dict of those three keys
    (four level widths, multiples of 32 for the group norms; heads dividing the last width). Anything else
    is a one-line ValueError saying what is wrong, before a layer is built."""
    if isinstance(decoder, str):
        if decoder not in DECODER_SIZES:
            raise ValueError(f"decoder size must be one of {list(DECODER_SIZES)} or a dict of widths, depth and "
                             f"heads; got {decoder!r}")
        return decoder_config(decoder)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(decoder, dict) or sorted(decoder) != ["depth", "heads", "widths"]:
        raise ValueError(f"a custom decoder size is a dict of exactly widths, depth and heads; got {decoder!r}")
    widths, depth, heads = decoder["widths"], decoder["depth"], decoder["heads"]
    if not (isinstance(widths, (list, tuple)) and len(widths) == 4
            and all(is_int(w) and w > 0 and w % 32 == 0 for w in widths)):
        raise ValueError(f"decoder widths must be 4 positive multiples of 32; got {widths!r}")
    if not is_int(depth) or depth < 1:
        raise ValueError(f"decoder depth must be an integer of at least 1; got {depth!r}")
    if not is_int(heads) or heads < 1 or widths[-1] % heads:
        raise ValueError(f"decoder heads must be a positive integer dividing the last width {widths[-1]}; "
                         f"got {heads!r}")
    return dict(widths=tuple(widths), depth=depth, heads=heads)


class SSDD(nn.Module):
    def __init__(self, encoder="f8c4", decoder="M"):
        super().__init__()
        factor, z_channels = parse_encoder_name(encoder)
        dec = decoder_spec(decoder)
        self.config = dict(encoder=encoder, decoder=decoder if isinstance(decoder, str) else dec)
        self.factor = factor
        self.encoder = Encoder(factor, z_channels)
        self.decoder = Decoder(z_channels, factor, **dec)
        self.default_steps = 8
        self.time_power = TIME_POWER
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
    def decode(self, z, steps=None, noise=None, generator=None, time_power=None):
        """Euler sampling from noise at t = 1 to the image at t = 0 on the grid (1 - i / steps)^time_power;
        steps=1 is the single-step decode. steps and time_power default to the model's default_steps and
        time_power."""
        steps = steps or self.default_steps
        B, _, h, w = z.shape
        if noise is None:
            noise = torch.randn(B, 3, h * self.factor, w * self.factor, generator=generator, device=z.device)
        ts = time_grid(steps, time_power or self.time_power, z.device)
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
        meta = dict(config=self.config, default_steps=self.default_steps, time_power=self.time_power, **metadata)
        if self.latent_mean is not None:
            meta.update(latent_mean=self.latent_mean, latent_std=self.latent_std)
        save_safetensors(self.state_dict(), path, {k: json.dumps(v) for k, v in meta.items()})

    @classmethod
    def from_checkpoint(cls, path, device="cpu", sha256=None, encoder=None):
        """Load an official or our .safetensors checkpoint; the configuration is read off the tensor shapes,
        default_steps, time_power and the latent statistics off its metadata (official checkpoints have none:
        8 steps on the power-2 grid).
        path: a local file, an https:// URL or the name of a published checkpoint (published_url, e.g.
        "F8C4_M_256"); a URL is downloaded once into the torch hub cache and checked against sha256 (see
        download); the file is parsed, never unpickled.
        encoder: the encoder to put in front of the file's decoder, anything encoder_weights reads (an SD-VAE
        file in either layout, "sd-vae-ft-mse", an SSDD checkpoint, a URL or a published name). Required for a
        file that holds only a decoder, as the authors' decoders for the SD-VAE latent space do (their code
        keeps the VAE outside the module's state); for a complete checkpoint it replaces the file's encoder.
        The model saves as a complete checkpoint, encoder included."""
        path = checkpoint_file(path, sha256)
        tensors, meta = load_safetensors(path)
        check_finite(tensors, path)
        # a default of more than 1000 steps is no sampler setting (the network is fed 1000 t), only a way for
        # a file to make decode() run for hours
        steps = metadata_number(meta, "default_steps", path, True, lambda n: 1 <= n <= 1000,
                                "an integer from 1 to 1000", 8)
        power = metadata_number(meta, "time_power", path, False, lambda p: 0 < p <= 10, "a number in (0, 10]",
                                TIME_POWER)
        if ("latent_mean" in meta) != ("latent_std" in meta):
            raise ValueError(f"{path}: metadata holds only one of latent_mean and latent_std")
        mean = metadata_number(meta, "latent_mean", path, False, math.isfinite, "a finite number", None)
        std = metadata_number(meta, "latent_std", path, False, lambda s: 0 < s < math.inf, "a finite number > 0", None)
        parts = {k.split(".", 1)[0] for k in tensors}
        if encoder is None and "decoder" in parts and "encoder" not in parts:
            raise ValueError(f"{path} holds only a decoder (no encoder.* tensors, as the authors' decoders for the "
                             f"SD-VAE latent space): give the encoder to put in front of it, encoder= in Python, "
                             f"--encoder-ckpt in the scripts (e.g. sd-vae-ft-mse)")
        if encoder is not None:
            tensors = with_encoder(tensors, encoder, path)
        encoder_name, decoder = infer_config(tensors, path)
        with torch.device("meta"):
            model = cls(encoder_name, decoder)
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, tensors, f"{path} does not match "
                         f"SSDD(encoder={model.config['encoder']!r}, decoder={model.config['decoder']!r}):")
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
        model.default_steps, model.time_power, model.latent_mean, model.latent_std = steps, power, mean, std
        return model.to(device).eval()

    @classmethod
    def from_sd_vae(cls, path="sd-vae-ft-mse", decoder="M", device="cpu", sha256=None):
        """An SSDD whose f8c4 encoder is the SD-VAE ("kl-f8") encoder, with a fresh decoder of size `decoder`
        to train on its latent space. `path`: a local .safetensors file in the original LDM or in diffusers'
        AutoencoderKL layout, a URL (downloaded once, see download), or "sd-vae-ft-mse" for SD_VAE_URL. The
        VAE's decoder is ignored; ft-ema, ft-mse and the original SD-VAE share this encoder. Any VAE of these
        shapes loads (the SDXL VAE too, a different latent space). Latent diffusion models (Stable Diffusion
        1.x/2.x, DiT, SiT) train on SD-VAE latents times 0.18215; this decoder takes the unscaled latent, so
        decode their samples with model.decode(latents / 0.18215)."""
        model = cls("f8c4", decoder)
        model.encoder.load_state_dict(encoder_weights(path, sha256, sd_vae=True))
        return model.to(device).eval()


def init_weights(m):
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
        nn.init.zeros_(m.bias)


def with_encoder(tensors, encoder, path):
    """The decoder.* tensors of a checkpoint (path: its file, for messages) with the weights of `encoder`
    (encoder_weights) as its encoder.*, once the decoder's latent channels are seen to be the encoder's."""
    weights = encoder_weights(encoder)
    c = weights["conv_out.weight"].shape[0] // 2  # mean and log-variance
    ctx = tensors.get("decoder.ada_ctx_proj.0.weight")  # the decoder's first layer on z: C input channels
    if ctx is not None and ctx.ndim == 4 and ctx.shape[1] != c:
        raise ValueError(f"the decoder of {path} takes latents of {ctx.shape[1]} channels, the encoder {encoder} "
                         f"gives {c}")
    decoder = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    return decoder | {"encoder." + k: v for k, v in weights.items()}


def metadata_number(meta, key, path, integer, valid, rule, default):
    """meta[key], a number written as JSON text (an integer when integer), checked by valid; default when the
    field is absent. Anything else is a ValueError naming the file and the field."""
    if key not in meta:
        return default
    try:
        v = json.loads(meta[key])
        # JSON true is a Python int; float() of a 400-digit integer overflows
        v = (int(v) if integer else float(v)) if type(v) is int or (type(v) is float and not integer) else None
    except (ValueError, RecursionError, OverflowError):
        v = None
    if v is None or not valid(v):
        raise ValueError(f"{path}: metadata field {key!r} must be {rule}; got {meta[key][:40]!r}")
    return v


# Bounds on a configuration read off a checkpoint's shapes, far past the largest published one (G: widths up
# to 1536, depth 16, 16 heads; encoders f8c4 to f32c64). from_checkpoint builds the model the shapes describe
# (on the meta device) before it checks every key: unbounded, a crafted 4 MB file of 50,000 empty
# relative_bias_table tensors made it build 50,000 transformer blocks (65 s, 2.8 GB) before the error.
MAX_WIDTH, MAX_DEPTH, MAX_ENCODER_LEVELS, MAX_Z_CHANNELS = 4096, 64, 7, 1024


def infer_config(tensors, path):
    """Encoder name and decoder size (a name, or widths/depth/heads) from checkpoint tensor shapes, within the
    bounds above; check_state_dict then compares every key and shape with the model they describe."""
    def bad(why):
        return ValueError(f"{path} is not an SSDD checkpoint: {why}")

    def size(key, ndim, axis):
        if key not in tensors:
            raise bad(f"no tensor {key!r}")
        if tensors[key].ndim != ndim:
            raise bad(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {ndim} dimensions")
        return tensors[key].shape[axis]

    levels = len({k.split(".")[2] for k in tensors if k.startswith("encoder.down.")})
    if not 2 <= levels <= MAX_ENCODER_LEVELS:
        raise bad(f"{levels} encoder levels (encoder.down.*), expected 2 to {MAX_ENCODER_LEVELS}")
    z2 = size("encoder.conv_out.weight", 4, 0)  # mean and log-variance
    if z2 % 2 or not 2 <= z2 <= 2 * MAX_Z_CHANNELS:
        raise bad(f"encoder.conv_out.weight has {z2} output channels, expected 2C with C from 1 to {MAX_Z_CHANNELS}")
    widths = tuple(size(f"decoder.down_blocks.{i}.resnets.0.conv1.weight", 4, 0) for i in range(4))
    if not all(w % 32 == 0 and 32 <= w <= MAX_WIDTH for w in widths):  # GroupNorm(32) on every level
        raise bad(f"decoder level widths {widths}, expected multiples of 32 up to {MAX_WIDTH}")
    tables = [k for k in tensors if k.endswith("relative_bias_table")]
    if not 1 <= len(tables) <= MAX_DEPTH:
        raise bad(f"{len(tables)} relative_bias_table tensors (transformer depth), expected 1 to {MAX_DEPTH}")
    heads = size(tables[0], 3, 2)
    if heads < 1 or widths[-1] % heads:
        raise bad(f"{heads} attention heads (in {tables[0]}) do not divide the width {widths[-1]}")
    encoder = f"f{2 ** (levels - 1)}c{z2 // 2}"
    decoder = dict(widths=widths, depth=len(tables), heads=heads)
    for name in DECODER_SIZES:
        if decoder_config(name) == decoder:
            return encoder, name
    return encoder, decoder


def check_state_dict(shapes, tensors, heading, file_name="checkpoint", own_name="model"):
    """Strict loading: tensors must hold exactly the keys of shapes ({key: shape}) with those shapes, or a
    ValueError of the heading and a line counting the missing, unexpected and mis-shaped keys, naming the first
    ten of each."""
    missing = sorted(shapes.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - shapes.keys())
    mismatched = [f"{k}: {file_name} {tuple(tensors[k].shape)}, {own_name} {tuple(shapes[k])}"
                  for k in sorted(shapes.keys() & tensors.keys()) if tensors[k].shape != shapes[k]]
    if missing or unexpected or mismatched:
        lines = [heading]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {what}: " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        raise ValueError("\n".join(lines))


def check_finite(tensors, path):
    """A ValueError naming the file and its first floating-point tensor that holds a NaN or an infinity: such
    weights decode NaN images and give NaN latent statistics. aminmax propagates NaN: one pass over each
    tensor, without the tensor-sized mask of isfinite (350M float32 weights: 0.12 s, isfinite(t).all() 7 s on
    a small shared CPU)."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not all(v.isfinite() for v in torch.aminmax(t)):
            raise ValueError(f"{path}: tensor {key!r} holds non-finite values (NaN or infinity)")


# ----------------------------------------------------------------------------------------------------------
# The SD-VAE encoder. Stable Diffusion's "kl-f8" VAE encoder has our f8c4 encoder's architecture and shapes.
# Its files name the weights as the original LDM code does (our names, but quant_conv for our out_proj) or as
# diffusers' AutoencoderKL does.

SD_VAE_URL = "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors"
# diffusers' encoder names -> LDM names, applied in order; older diffusers versions named the attention
# projections query/key/value/proj_attn
DIFFUSERS_TO_LDM = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^encoder\.mid_block\.resnets\.0\.", "encoder.mid.block_1."),
    (r"^encoder\.mid_block\.resnets\.1\.", "encoder.mid.block_2."),
    (r"^encoder\.mid_block\.attentions\.0\.", "encoder.mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."),
    (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^encoder\.conv_norm_out\.", "encoder.norm_out."),
]


def encoder_weights(path, sha256=None, sd_vae=False):
    """The encoder state dict of an SSDD checkpoint or of an SD-VAE file in either layout, told apart by the
    SD-VAE's quant_conv (sd_vae: only an SD-VAE file will do). A URL, a published name (published_url) or
    "sd-vae-ft-mse" for SD_VAE_URL is downloaded once (see download). Non-finite weights are refused
    (check_finite); those of an SD-VAE file's decoder, which is not used, are not looked at."""
    hint = "pass the path of a local .safetensors file"
    if path == "sd-vae-ft-mse":  # the hub's file name is generic: cache the named VAE under its own name
        path = download(SD_VAE_URL, sha256, hint, file_name="sd-vae-ft-mse.safetensors")
    path = checkpoint_file(path, sha256, hint)
    with open(path, "rb") as f:  # the header tells the kinds apart: the file's data is read once
        names = safetensors_header(f, path)[0]
    if not sd_vae and "quant_conv.weight" not in names:
        return SSDD.from_checkpoint(path).encoder.state_dict()
    tensors, _ = load_safetensors(path)
    check_finite({k: t for k, t in tensors.items() if k.startswith(("encoder.", "quant_conv."))}, path)
    with torch.device("meta"):  # only the names and shapes
        encoder = Encoder(8, 4)
    return sd_vae_encoder_weights(tensors, encoder, path)


def sd_vae_encoder_weights(tensors, encoder, path):
    """The state dict of `encoder` (an f8c4 Encoder) from the tensors of an SD-VAE file in either
    layout, detected from the keys. Strict: every encoder tensor present with its shape, no other encoder
    tensor; the VAE's decoder tensors are ignored."""
    if any(k.startswith("encoder.down.") for k in tensors):
        renames = []
    elif any(k.startswith("encoder.down_blocks.") for k in tensors):
        renames = DIFFUSERS_TO_LDM
    else:
        raise ValueError(f"{path} holds no SD-VAE encoder: no encoder.down.* (LDM layout) or encoder.down_blocks.* "
                         "(diffusers layout) tensors; a decoder-only file, or not a VAE?")
    found = {}
    for key, t in tensors.items():
        if key.startswith(("encoder.", "quant_conv.")):
            for pattern, new in renames:
                key = re.sub(pattern, new, key)
            # diffusers' attention projections are Linear layers, the LDM ones 1x1 convs
            found[key] = t[:, :, None, None] if ".attn_1." in key and t.ndim == 2 else t
    own = {("quant_conv." + k[len("out_proj."):] if k.startswith("out_proj.") else "encoder." + k): (k, v.shape)
           for k, v in encoder.state_dict().items()}
    check_state_dict({name: shape for name, (_, shape) in own.items()}, found,
                     f"{path} does not hold the SD-VAE (kl-f8) encoder (LDM names shown):", "file", "SD-VAE")
    return {k: found[name] for name, (k, _) in own.items()}


# ----------------------------------------------------------------------------------------------------------
# The authors' published checkpoints, on the model hub page facebook/SSDD (CC-BY-NC 4.0)

def published_url(name):
    """The URL of the published checkpoint of this name, or None when name is not one: F{f}C{C}_{size}_{res}
    (e.g. F8C4_M_256: f8c4 encoder, M decoder, 256 px) lies in the folder F{f}C{C}/, demo_f8c4_M_128 at the
    top. The server is $HF_ENDPOINT when set (a mirror; every Hugging Face client reads it), else the hub."""
    match = re.fullmatch(rf"(F\d+C\d+)_({'|'.join(DECODER_SIZES)})_\d+|demo_f8c4_M_128", name)
    if match is None:
        return None
    folder = f"{match.group(1)}/" if match.group(1) else ""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/facebook/SSDD/resolve/main/{folder}{name}.safetensors"


def checkpoint_url(path):
    """The URL a checkpoint argument names: itself when it is an http(s):// URL, a published name's
    (published_url), or None for a local path."""
    path = str(path)
    return published_url(path) or (path if path.startswith(("https://", "http://")) else None)


def checkpoint_file(path, sha256=None, hint=None):
    """The local file of a checkpoint named by a path, an http(s):// URL or a published name (published_url): a
    URL is downloaded once (see download, which takes sha256 and hint)."""
    url = checkpoint_url(path)
    return download(url, sha256, hint) if url else path


# ----------------------------------------------------------------------------------------------------------
# downloads into the torch hub cache, with urllib: once, verified, bounded, and written by write_durably, so
# that an interrupted or corrupt download never leaves a file under the name the next call trusts

DOWNLOAD_TIMEOUT = 60  # seconds without a byte
# A read timeout alone never ends a download from a server that sends a byte every few seconds: one also fails
# when RATE_WINDOW seconds bring fewer than MIN_RATE bytes per second.
MIN_RATE, RATE_WINDOW = 10_000, 60
MAX_DOWNLOAD = 64 * 2**30  # bytes, without a Content-Length (a G checkpoint in float32 is 5.6 GB)
STALE_AGE = 3600  # seconds: a download's temporary file unchanged this long is one a killed process left


def url_file_name(url):
    """The name of the file at url, the last part of its path; a URL whose path ends in /, /. or /.. names no
    file: a ValueError."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if name in ("", ".", ".."):
        raise ValueError(f"{url} names no file (its path ends in {'/' + name!r})")
    return name


def cache_path(url, file_name=None):
    """Where download caches url: <torch hub dir>/checkpoints/<the first 16 hex digits of the URL's
    sha256>-<file_name, default url_file_name(url)>. Keyed by the whole URL, since hub files share a few names
    (model.safetensors; diffusion_pytorch_model.safetensors for sd-vae-ft-mse and the SDXL VAE): two URLs
    never share a file."""
    name = file_name or url_file_name(url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")


def download(url, sha256=None, hint=None, file_name=None):
    """Local path of the file at url, downloaded into the torch hub cache (cache_path) on first use and served
    from there afterwards, without network. sha256: the expected hex digest, or a prefix of it (torch.hub names
    files name-<prefix>.pth; names are not parsed here, as a name such as ssdd-f8c4.safetensors holds hex too),
    checked on the download and again whenever the cached file is used. A .safetensors file must parse (its
    header against its size, as load_safetensors checks it) before it takes its name, and whenever it is used.
    A download fails when it stalls (DOWNLOAD_TIMEOUT, MIN_RATE) or passes its Content-Length or MAX_DOWNLOAD;
    it first removes the temporary files of killed downloads of the same file (older than STALE_AGE).
    hint: what else the user can do, ending the offline error "..., or {hint}" (e.g. "pass --weights FILE").
    Every failure raises a one-line RuntimeError (a URL that names no file: ValueError; a full disk: OSError,
    see write_durably); the download ones say where to put the file by hand."""
    path = cache_path(url, file_name)
    sha256 = sha256 and sha256.lower()
    safetensors = path.endswith(".safetensors")
    if os.path.exists(path):
        if sha256 and not (digest := file_sha256(path)).startswith(sha256):
            raise RuntimeError(f"{path} has sha256 {digest}, expected {sha256} for {url}: damaged, or the file "
                               f"changed; remove it to download again")
        if safetensors:
            check_header(path, path, "remove it to download again")
        return path

    def unavailable(why):
        return RuntimeError(f"could not download {url} ({why}); fetch it on a machine with internet access and "
                            f"put it at {path}" + (f", or {hint}" if hint else ""))

    def fetch(f):
        h, n = hashlib.sha256(), 0
        try:
            r = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
        except urllib.error.HTTPError as e:
            raise unavailable(f"HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # offline, refused or timed out
            raise unavailable(getattr(e, "reason", e)) from None
        with r:
            size = r.headers.get("Content-Length")
            size = int(size) if size and size.isdigit() else None
            limit = MAX_DOWNLOAD if size is None else size
            print(f"downloading {url} to {path}", file=sys.stderr, flush=True)
            start, received = time.monotonic(), 0  # of the current rate window
            while True:
                try:
                    chunk = r.read1(1 << 20)  # what has arrived, up to 1 MiB (read would wait for the whole MiB)
                except (OSError, http.client.HTTPException) as e:  # reset or timed out
                    raise unavailable(getattr(e, "reason", e)) from None
                if not chunk:
                    break
                n += len(chunk)
                if n > limit:
                    raise unavailable(f"more than {limit} bytes")
                f.write(chunk)  # outside the trys above: a full disk is no network error
                h.update(chunk)
                received += len(chunk)
                if (elapsed := time.monotonic() - start) >= RATE_WINDOW:
                    if received < MIN_RATE * elapsed:
                        raise unavailable(f"stalled: {received} bytes in {elapsed:.0f} s, below {MIN_RATE} bytes/s")
                    start, received = time.monotonic(), 0
        if size is not None and n != size:  # urllib returns a body cut short as if it were whole
            raise unavailable(f"the connection closed after {n} of its {size} bytes")
        if sha256 and not h.hexdigest().startswith(sha256):
            raise RuntimeError(f"{url} downloaded with sha256 {h.hexdigest()}, expected {sha256}: "
                               f"corrupt, or the file changed; not kept")
        if safetensors:  # a body cut short without a Content-Length, or not safetensors at all
            f.flush()
            check_header(f.name, url, "not kept")

    os.makedirs(os.path.dirname(path), exist_ok=True)
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):  # write_durably's path.tmp<pid>
        try:
            if time.time() - os.path.getmtime(tmp) > STALE_AGE:
                os.remove(tmp)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    write_durably(path, fetch)
    return path


def check_header(file, name, advice):
    """A one-line RuntimeError, what safetensors_header finds wrong (naming the file as name) and then advice,
    unless the .safetensors file at file parses."""
    try:
        with open(file, "rb") as f:
            safetensors_header(f, name)
    except ValueError as e:
        raise RuntimeError(f"{e}; {advice}") from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# .safetensors without the package: 8-byte little-endian header length, a JSON header, raw tensor bytes.
# The reader is a security boundary (checkpoints come from the internet): nothing is unpickled and every
# header field is checked against the file before a byte of data is used.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# A G checkpoint's header is 73 kB (592 tensors). 2 MiB leaves room for far larger models and metadata, and
# bounds what json builds from a crafted header: 2 MiB of empty arrays is 0.2 to 0.5 s and 50 MB of Python
# objects (the safetensors package allows 100 MB: 10 s and 2.5 GB).
MAX_HEADER = 2 * 1024 * 1024
MAX_ENTRIES = 10_000  # per JSON object (tensors and __metadata__); infer_config's largest model has 1,314 tensors


def save_safetensors(tensors, path, metadata=None):
    """Write atomically: a crash mid-write never leaves a truncated file under the final name."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for key in sorted(tensors):
        t = tensors[key]
        header[key] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + t.nbytes])
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key in sorted(tensors):
            # one copy, from any device and memory layout, into the bytes written (bool and every other dtype
            # read as raw bytes)
            data = bytearray(tensors[key].nbytes)
            if data:
                torch.frombuffer(data, dtype=torch.uint8).copy_(tensors[key].detach().reshape(-1).view(torch.uint8))
            f.write(data)

    write_durably(path, write)


def write_durably(path, write, mode="wb"):
    """Write a file atomically and durably: write(f) fills path.tmp<pid>, which is fsynced and renamed over
    path, then the directory is fsynced. A crash leaves the old file or the new one, never a half-written one,
    and without the directory's fsync a power loss can lose the rename. On an error the temporary file is
    removed and the error raised, a full disk (or quota) as the one-line OSError "no space left on device
    writing PATH"; a killed process leaves it behind (open_run_dir removes such files)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # the OSError of a full disk, raised as it is or as the context of torch.save's RuntimeError
        # ("enforce fail at inline_container.cc")
        cause = e
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise OSError(f"{os.strerror(cause.errno).lower()} writing {path}") from None
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_keys(pairs):
    """json's object_pairs_hook: a dict, refusing duplicate keys (json keeps the last, other readers may keep
    the first) and objects of more than MAX_ENTRIES entries."""
    if len(pairs) > MAX_ENTRIES:
        raise ValueError(f"an object of {len(pairs)} entries, the limit is {MAX_ENTRIES}")
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {clipped(k)}")
        d[k] = v
    return d


def clipped(x):
    """repr(x) cut to 100 characters, for messages: a crafted value can be megabytes long."""
    r = repr(x)
    return r if len(r) <= 100 else r[:100] + "..."


def short_int(digits):
    """json's parse_int: sizes and offsets fit in 20 digits. Without it json converts integers of any length
    up to Python's limit of 4300 digits (none when lifted), and past it raises an error that names no file."""
    if len(digits) > 20:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def checked_numel(shape):
    """The element count of a header's shape, or None unless it is a list of sizes >= 0 whose product, zeros
    taken as ones, fits torch's int64 (else reshape fails, even for an empty tensor). Multiplied step by step:
    math.prod of the 100,000 20-digit sizes a header can hold takes a minute."""
    if not isinstance(shape, list):
        return None
    numel, bound = 1, 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        numel, bound = numel * d, bound * max(d, 1)
        if bound >= 2 ** 63:
            return None
    return numel


def safetensors_header(f, path):
    """The header of the .safetensors file open as f (binary, at its start), every field checked against the
    file's size before a byte of data is read: ({key: (dtype, shape, start, stop)} in the header's order,
    metadata {key: str}, number of data bytes). A ValueError names path and what is wrong."""
    def bad(why):
        return ValueError(f"{path}: not a valid .safetensors file: {why}")

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} exceeds the limit or the file size ({size} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=unique_keys, parse_int=short_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise bad(f"unreadable JSON header ({e})") from None
    data_size = size - 8 - n
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent, or null as the safetensors package accepts
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            raise bad(f"tensor {key!r} has no supported dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        numel = checked_numel(shape)
        if numel is None:
            raise bad(f"tensor {key!r} has an invalid shape {clipped(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {key!r} has data offsets {clipped(offsets)} outside the {data_size} data bytes "
                      f"(truncated file?)")
        nbytes = numel * DTYPES[info["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {key!r} of shape {clipped(shape)} and dtype {info['dtype']} needs {nbytes} bytes, "
                      f"its offsets give {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise bad(f"tensor {key!r} starts at byte {start}, expected {end} (overlapping or gapped data)")
        end = stop
    if end != data_size:
        raise bad(f"{data_size - end} trailing bytes after the last tensor")
    tensors = {key: (DTYPES[header[key]["dtype"]], header[key]["shape"], start, stop) for start, stop, key in spans}
    return tensors, metadata, data_size


def load_safetensors(path):
    """Returns ({key: tensor}, {metadata key: str}); raises ValueError naming what is wrong with the file."""
    with open(path, "rb") as f:
        header, metadata, data_size = safetensors_header(f, path)
        data = bytearray(data_size)
        if f.readinto(data) != data_size:
            raise ValueError(f"{path}: shorter than its header says (changed while it was read?)")
    tensors, view = {}, memoryview(data)  # the tensors share the file's one buffer: slicing bytes would copy it
    for key, (dtype, shape, start, stop) in header.items():
        buf = view[start:stop]
        tensors[key] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(shape)
    return tensors, metadata
