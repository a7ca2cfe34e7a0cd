"""Weight files of the frozen networks (the FID Inception, LPIPS' backbones and heads, DINOv2): downloaded on
first use into the torch hub cache with a hint for offline users, read with torch.load (weights only), and
loaded strictly, every failure a one-line error that names the file. SSDD's own checkpoints are .safetensors,
read by model.py.
"""
import os
import re

import torch

import model


def download(url, hint, file_name=None):
    """State dict from url, cached in the torch hub folder by model.download. As in torch.hub, a file name
    name-<hex>.pth carries the prefix of its sha256 to check; a name without one (DINOv2's) is not checked.
    hint: the offline error's advice, e.g. "pass --fid-weights FILE"."""
    file_name = file_name or os.path.basename(url)
    prefix = re.search(r"-([0-9a-f]+)\.", file_name)
    path = model.download(url, prefix and prefix.group(1), hint, file_name)
    return load(path)


def load(path):
    """The state dict in a weights file (torch.load, weights only). A file that is not one is a one-line
    ValueError naming it (the unpickler's own errors vary with the bytes: EOFError, KeyError, multi-line
    UnpicklingError); a missing file or a folder stays an OSError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_into(module, state, path, name=None):
    """module.load_state_dict(state), strict; a mismatch is a one-line ValueError naming the file and what it
    should hold (name, default: the module's class)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" and a line per key: the keys, on one line
        raise ValueError(f"{path} does not hold the weights of {name or type(module).__name__}: "
                         f"{' '.join(str(e).split(':', 1)[-1].split())[:300]}") from None
