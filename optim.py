"""The optimizer of the recipe: schedule-free RAdam, its weight-decay groups, and the EMA of its averaged
weights (which evaluation and the released checkpoints use)."""
import math

import torch

# Schedule-free RAdam (Defazio et al., "The Road Less Scheduled", 2024), written from the algorithm of the
# `schedulefree` package's RAdamScheduleFree with its defaults (the first steps, where RAdam's variance
# rectification is undefined, leave the weights untouched). The parameters hold y, the point where the
# gradient is taken; the state keeps z (the SGD-like iterate) and Adam's second moment. The averaged
# weights x, used for evaluation, the EMA and checkpoints, satisfy y = (1 - beta1) z + beta1 x.


class RAdamScheduleFree(torch.optim.Optimizer):
    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0, weight_lr_power=2.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r, weight_lr_power=weight_lr_power,
                        k=0, weight_sum=0.0, lr_max=0.0, scheduled_lr=0.0, train_mode=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _swap(self, train):
        """Move the parameters between y (train) and x (eval)."""
        for group in self.param_groups:
            if group["train_mode"] != train:
                beta1 = group["betas"][0]
                params = [p for p in group["params"] if "z" in self.state[p]]
                if params:
                    torch._foreach_lerp_(params, [self.state[p]["z"] for p in params],
                                         1 - beta1 if train else 1 - 1 / beta1)
                group["train_mode"] = train

    def train(self):
        self._swap(True)

    def eval(self):
        self._swap(False)

    @torch.no_grad()
    def averaged(self, params):
        """The averaged weights x of params (what eval() would put in them), without touching them."""
        out = list(params)
        for group in self.param_groups:
            if group["train_mode"]:
                mine = set(group["params"])
                moved = [i for i, p in enumerate(out) if p in mine and "z" in self.state[p]]
                x = torch._foreach_lerp([out[i] for i in moved], [self.state[out[i]]["z"] for i in moved],
                                        1 - 1 / group["betas"][0]) if moved else []
                for i, xi in zip(moved, x):
                    out[i] = xi
        return out

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("call optimizer.train() before optimizer.step()")
            beta1, beta2 = group["betas"]
            step = group["k"] = group["k"] + 1
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
            adam = rho_t > 4
            rect = 0.0
            if adam:
                rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            lr = group["scheduled_lr"] = group["lr"] * rect
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = step ** group["r"] * lr_max ** group["weight_lr_power"]
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0

            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            z = [self.state[p]["z"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            if adam:
                denom = torch._foreach_div(v, 1 - beta2**step)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, group["eps"])
                grads = torch._foreach_div(grads, denom)
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_lerp_(params, z, ckp1)
            torch._foreach_add_(params, grads, alpha=lr * (beta1 * (1 - ckp1) - 1))
            torch._foreach_sub_(z, grads, alpha=lr)


# the official recipe's, as the authors' update of 2025-11-12 set them (the first release: weight decay 1e-3)
WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 1e-2, 0.1, 0.999


def param_groups(named_params, weight_decay):
    """Weight decay on conv / linear weights and norm scales (every '.weight', and '.weight.original', a
    spectral-normalised weight), none on biases and relative-position bias tables."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if name.endswith((".weight", ".weight.original")) else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def ema_decay(step, start):
    """The EMA's decay after `step` optimizer steps: 0 (a plain copy) up to step `start`, then
    min(0.999, (1 + n) / (10 + n)) with n = step - start, a warm-up over the first ~9k steps."""
    if step <= start:
        return 0.0
    n = step - start
    return min(EMA_DECAY, (1 + n) / (10 + n))


@torch.no_grad()
def update_ema(ema, model, optimizer, decay):
    """ema <- decay * ema + (1 - decay) * x, x the optimizer's averaged weights; decay 0 copies x."""
    ema_params = list(ema.parameters())
    x = optimizer.averaged(list(model.parameters()))
    if decay == 0:
        torch._foreach_copy_(ema_params, x)
    else:
        torch._foreach_lerp_(ema_params, x, 1 - decay)
