"""The training objective of SSDD (arXiv 2510.04961) and its frozen networks:
    L = MSE(v_hat, x - e) + 0.5 LPIPS_vgg(x0_hat, x) + 0.25 REPA + 1e-6 KL (KL only when the encoder trains),
with REPA aligning the decoder's transformer tokens to DINOv2 ViT-B/14 features (its MLP head carried across the
stages of the recipe), the optional GAN critic of the paper's ablation, and the per-step noise that makes a run
independent of its number of ranks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
import optim
import weights
from model import timestep_embedding

# REPA: the decoder's transformer tokens are aligned with DINOv2 ViT-B/14 patch features (REPA,
# Yu et al., 2024).
# The ViT is written here with the key names of the official dinov2_vitb14 checkpoint.

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), DinoMlp(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 (pretrained at 518 px, a 37x37 grid of patch positions). forward(x) -> final-norm
    patch tokens (B, N, 768) of ImageNet-normalised images whose sides are multiples of 14."""

    def __init__(self, depth=12, dim=768, heads=12, patch=14, grid=37):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([DinoBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_embedding(self, h, w):
        """Patch position embeddings resized bicubically (in float32) to an h x w grid, as the transformers
        Dinov2Model of the official code resizes them: to the output size itself. The dinov2 repository's own
        code samples at a scale factor of (h + 0.1) / 37 instead, which gives slightly different embeddings."""
        n = int(math.sqrt(self.pos_embed.shape[1] - 1))
        cls_pos, patch_pos = self.pos_embed[:, :1].float(), self.pos_embed[:, 1:].float()
        if (h, w) != (n, n):
            grid = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embedding(h, w).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def load_dinov2(path=None, device="cpu"):
    """The frozen DINOv2 ViT-B/14 from the official dinov2_vitb14 checkpoint (downloaded into the torch hub
    cache on first use, or a local path), in eval mode. The official release publishes no checksum, so the
    file is checked by loading it strictly: every one of its tensors must have its ViT-B/14 name and shape."""
    if path is None:
        state = weights.download(DINOV2_URL, hint="pass --dinov2-weights FILE")
    else:
        state = weights.load(path)
    state.pop("mask_token", None)  # only used by DINOv2's masked-image pretraining
    net = DINOv2()
    weights.load_into(net, state, path or DINOV2_URL)
    return net.to(device).eval().requires_grad_(False)


def dinov2_input(x, grid):
    """Images in [-1, 1] -> [0, 1], ImageNet-normalised, bicubic-resized to 14 * grid, so the ViT's patch
    grid matches the decoder's token grid."""
    x = (x.float() + 1) / 2
    mean, std = torch.tensor(IMAGENET_MEAN, device=x.device), torch.tensor(IMAGENET_STD, device=x.device)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return F.interpolate(x, size=(14 * grid, 14 * grid), mode="bicubic", align_corners=False)


class REPALoss(nn.Module):
    """1 - mean cosine similarity between MLP(decoder tokens) and DINOv2 tokens, in float32."""

    def __init__(self, width, target_dim=768):
        super().__init__()
        self.repa_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, target_dim))
        for layer in (self.repa_mlp[0], self.repa_mlp[2]):  # the official init of a fresh head
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden, target):
        pred = self.repa_mlp(hidden)
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------------------
# The optional GAN (--gan; an ablation of the paper, off in the recipe), the official design


class TimeGroupNorm(nn.Module):
    """GroupNorm(32, affine), then x * (1 + scale) + shift with (shift, scale) = Linear(SiLU(temb))."""

    def __init__(self, channels, temb_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-5)
        self.proj = nn.Linear(temb_dim, 2 * channels)

    def forward(self, x, temb):
        shift, scale = self.proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class Critic(nn.Module):
    """The GAN critic: a PatchGAN in the pix2pix / taming style (n_layers 4, ndf 64, 4x4 convolutions with
    padding 1 and bias, LeakyReLU 0.2) on concat[x, x_t] clamped to [-1, 1] (x_t too); every convolution
    spectral-normalised (one power iteration per call in train mode), the norms conditioned on t; then the
    mean over positions, Linear(512, 1) and a sigmoid: forward(x, x_t, t) -> (B,) probabilities that x is
    real. x: the real, reconstructed or teacher image; x_t: the decoder's noisy input; t: (B,) times."""

    def __init__(self, ndf=64, n_layers=4, temb_dim=128):
        super().__init__()
        widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]  # 64, 128, 256, 512, 512
        self.convs = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip([6] + widths[:-1], widths)):
            conv = nn.Conv2d(cin, cout, 4, 2 if i < n_layers else 1, 1)
            nn.init.normal_(conv.weight, std=0.02)
            self.convs.append(nn.utils.parametrizations.spectral_norm(conv))
        self.norms = nn.ModuleList(TimeGroupNorm(c, temb_dim) for c in widths[1:])  # none after the first conv
        self.temb_dim = temb_dim
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.head = nn.Linear(widths[-1], 1)

    def forward(self, x, x_t, t):
        temb = self.time_mlp(timestep_embedding(t, self.temb_dim))  # of t itself, not the decoder's 1000 t
        h = F.leaky_relu(self.convs[0](torch.cat([x, x_t], dim=1).clamp(-1, 1)), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms):
            h = F.leaky_relu(norm(conv(h), temb), 0.2)
        return torch.sigmoid(self.head(h.mean((2, 3)))).squeeze(1)


def new_critic(lr, weight_decay, device):
    """A fresh critic, in train mode, and its optimizer: schedule-free RAdam like the model's (same lr and
    weight decay groups), in train mode too (the critic is only trained, never evaluated or released)."""
    critic = Critic().to(device)
    optimizer = optim.RAdamScheduleFree(optim.param_groups(critic.named_parameters(), weight_decay), lr=lr)
    optimizer.train()
    return critic, optimizer


def bce(p, label):
    return F.binary_cross_entropy(p, torch.full_like(p, label))


def generator_gan_loss(critic, fake, x_t, t):
    """BCE(D(x0_hat, x_t, t), 1) in float32 with autocast off. Its gradient reaches the fake images and, as in
    the official loop, the critic's weights too: the critic steps on the sum of that gradient (at the
    generator term's weight) and its own term's."""
    with torch.autocast(fake.device.type, enabled=False):
        return bce(critic(fake.float(), x_t.float(), t.float()), 1.0)


def critic_gan_loss(critic, real, fake, x_t, t):
    """(BCE(D(real, x_t, t), 1) + BCE(D(fake, x_t, t), 0)) / 2 in float32 with autocast off, fake detached.
    Real and fake go through in one batch, one DDP forward (per sample the same as two calls: the critic's
    norms are per sample)."""
    with torch.autocast(real.device.type, enabled=False):
        images = torch.cat([real, fake.detach()]).float()
        p_real, p_fake = critic(images, x_t.float().repeat(2, 1, 1, 1), t.float().repeat(2)).chunk(2)
        return (bce(p_real, 1.0) + bce(p_fake, 0.0)) / 2


# ----------------------------------------------------------------------------------------------------------
# The objective


class TrainingLoss(nn.Module):
    """SSDD plus the REPA head, one module so that DDP syncs the gradients of both. forward(x, t, noise,
    z_noise=None, z=None, dino_tokens=None) -> ({term: loss}, SSDD.forward's outputs): the flow-matching
    term, the KL when the encoder trains, REPA against dino_tokens when the head exists. Distillation passes
    its targets as x and the teacher's latents as z. All randomness comes in as arguments (see step_noise)."""

    def __init__(self, ssdd, train_encoder, repa):
        super().__init__()
        self.ssdd, self.train_encoder = ssdd, train_encoder
        ssdd.encoder.requires_grad_(train_encoder)  # frozen: no graph through it, no optimizer state
        self.repa_loss = REPALoss(ssdd.decoder.width) if repa else None

    def forward(self, x, t, noise, z_noise=None, z=None, dino_tokens=None):
        out = self.ssdd(x, t=t, noise=noise, z=z, z_noise=z_noise)
        terms = dict(fm=out["loss"])
        if self.train_encoder:
            terms["kl"] = out["kl"]
        if self.repa_loss is not None:
            terms["repa"] = self.repa_loss(out["hidden"], dino_tokens)
        return terms, out

    def clip_grad_norms(self):
        """Clip the gradients of the SSDD model and of the REPA head each to norm optim.GRAD_CLIP on its own,
        as the official code does; returns the norms before clipping, {'grad_norm', 'repa_grad_norm'}."""
        norms = dict(grad_norm=torch.nn.utils.clip_grad_norm_(self.ssdd.parameters(), optim.GRAD_CLIP))
        if self.repa_loss is not None:
            norms["repa_grad_norm"] = torch.nn.utils.clip_grad_norm_(self.repa_loss.parameters(), optim.GRAD_CLIP)
        return norms


def step_noise(seed, step, global_batch, image_shape, latent_shape, rank, world_size, device):
    """t ~ sigmoid(N(0, 1)), e and the posterior noise for this rank's share of global batch `step`. Drawn
    for the whole global batch from a generator seeded by (seed, step), so each image gets the same values
    whatever the number of ranks and of micro-batches (--grad-accum), and a resumed run the same values as an
    uninterrupted one. A share is contiguous (a copy under several ranks), so that the whole batch's noise is
    freed before the step runs."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t = torch.sigmoid(torch.randn(global_batch, generator=g, device=device))
    noise = torch.randn((global_batch, *image_shape), generator=g, device=device)
    z_noise = torch.randn((global_batch, *latent_shape), generator=g, device=device)
    return tuple(v[rank::world_size].contiguous() for v in (t, noise, z_noise))


def loss_networks(lpips_weight, repa_weight, dinov2_weights, device, lpips_backbone=None, lpips_heads=None):
    """The frozen LPIPS-VGG and DINOv2 networks, each loaded only when its loss weight is nonzero (else None),
    from the local files given (--dinov2-weights, --lpips-backbone, --lpips-heads) or downloaded."""
    lpips = metrics.LPIPS("vgg", lpips_heads, lpips_backbone).to(device) if lpips_weight > 0 else None  # frozen, eval
    dino = load_dinov2(dinov2_weights, device) if repa_weight > 0 else None
    return lpips, dino
