"""The training objective of SSDD (arXiv 2510.04961) and its frozen networks:
    L = MSE(v_hat, x - e) + 0.5 LPIPS_vgg(x0_hat, x) + 0.25 REPA + 1e-6 KL (KL only when the encoder trains),
with REPA aligning the decoder's transformer tokens to DINOv2 ViT-B/14 features, the optional PatchGAN critic
of the paper's ablation, and the per-step noise that makes a run independent of its number of ranks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fid

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
        """Patch position embeddings resized bicubically to an h x w grid. The +0.1 in the scale factor is
        the official code's guard against rounding the output size down; it also sets the sample points."""
        n = int(math.sqrt(self.pos_embed.shape[1] - 1))
        cls_pos, patch_pos = self.pos_embed[:, :1].float(), self.pos_embed[:, 1:].float()
        if (h, w) != (n, n):
            grid = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
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
        state = fid.download(DINOV2_URL, hint="pass --dinov2-weights PATH")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("mask_token", None)  # only used by DINOv2's masked-image pretraining
    net = DINOv2()
    net.load_state_dict(state)
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

    def forward(self, hidden, target):
        pred = self.repa_mlp(hidden)
        return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


class PatchDiscriminator(nn.Module):
    """The optional GAN critic (--gan; an ablation of the paper, off in the recipe): a PatchGAN
    conditioned on (x_t, t) with BCE losses; the layers here are pix2pix's (4x4 convolutions, 64-128-256-512
    channels, LeakyReLU 0.2, one logit per 70x70 patch), with GroupNorm instead of BatchNorm so that a
    sample's logits depend neither on the rest of the batch nor on its split over ranks. Input: the clean or
    reconstructed image, the noisy x_t it came from and a constant map of t."""

    def __init__(self, ch=64):
        super().__init__()
        layers = [nn.Conv2d(3 + 3 + 1, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        for cin, cout, stride in ((ch, 2 * ch, 2), (2 * ch, 4 * ch, 2), (4 * ch, 8 * ch, 1)):
            layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.GroupNorm(32, cout), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(8 * ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, image, x_t, t):
        t_map = t.view(-1, 1, 1, 1).expand(-1, 1, *image.shape[-2:])
        return self.net(torch.cat([image, x_t.to(image.dtype), t_map.to(image.dtype)], dim=1))


def gan_losses(logits_fake, logits_real=None):
    """Non-saturating BCE: with only fake logits, the generator's loss (fakes labelled real); with both,
    the discriminator's (mean of the real and the fake term)."""
    def bce(logits, label):
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    if logits_real is None:
        return bce(logits_fake, 1.0)
    return 0.5 * (bce(logits_real, 1.0) + bce(logits_fake, 0.0))


def generator_gan_loss(critic, fake, x_t, t):
    """The generator's term: gradients reach the fake images through the critic, not its weights."""
    critic.requires_grad_(False)
    loss = gan_losses(critic(fake, x_t, t))
    critic.requires_grad_(True)
    return loss


def critic_gan_loss(critic, real, fake, x_t, t):
    """The critic's term, real and (detached) fake images in one batch: one DDP forward."""
    logits_real, logits_fake = critic(torch.cat([real, fake.detach()]), x_t.repeat(2, 1, 1, 1), t.repeat(2)).chunk(2)
    return gan_losses(logits_fake, logits_real)




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


def step_noise(seed, step, global_batch, image_shape, latent_shape, rank, world_size, device):
    """t ~ sigmoid(N(0, 1)), e and the posterior noise for this rank's share of global batch `step`. Drawn
    for the whole global batch from a generator seeded by (seed, step), so each sample gets the same values
    whatever the number of ranks, and a resumed run the same values as an uninterrupted one."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t = torch.sigmoid(torch.randn(global_batch, generator=g, device=device))
    noise = torch.randn((global_batch, *image_shape), generator=g, device=device)
    z_noise = torch.randn((global_batch, *latent_shape), generator=g, device=device)
    return t[rank::world_size], noise[rank::world_size], z_noise[rank::world_size]


def loss_networks(lpips_weight, repa_weight, dinov2_weights, device):
    """The frozen LPIPS-VGG and DINOv2 networks, each loaded only when its loss weight is nonzero (else None)."""
    lpips = fid.LPIPS(net="vgg").to(device).eval().requires_grad_(False) if lpips_weight > 0 else None
    dino = load_dinov2(dinov2_weights, device) if repa_weight > 0 else None
    return lpips, dino
