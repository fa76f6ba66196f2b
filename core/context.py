"""Context windows for video-model calls: long clips through a motion model trained on short ones.

A video UNet (AnimateDiff: trained on 16 frames) is evaluated on windows of ``context_length`` frames that overlap
by ``context_overlap``; each frame's noise prediction is the weighted mean over the windows that hold it (``flat``:
equal weights; ``pyramid``: weights rising to the window's middle). When one window covers the clip the denoiser
is called once on the whole clip, so the result is exactly the unwindowed one.

Schedules and names follow ComfyUI core's context windows (``comfy/context_windows.py``, the "Context Windows
(Manual)" node) and AnimateDiff-Evolved: ``standard_static`` (sliding windows, the last one shifted to end at the
last frame), ``looped_uniform`` (AnimateDiff's uniform schedule: windows wrap around the clip and their offset
changes every step, strides 1, 2, 4, ... up to ``context_stride``), ``standard_uniform`` (the same, with wrapping
windows shifted to the end instead), ``batched`` (no overlap). Window frame lists are plain Python lists of frame
indices; everything is a pure function of (frames, options, step), and equals ComfyUI's for the same inputs.

Layouts: latents ``[1, C, F, h, w]`` float32 (frames on dim 2), as every denoiser takes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

SCHEDULES = ("standard_static", "standard_uniform", "looped_uniform", "batched")
"""ComfyUI core's schedule names (``comfy.context_windows.ContextSchedules``)."""
FUSE_METHODS = ("pyramid", "relative", "flat", "overlap-linear")
"""ComfyUI core's fuse methods (``ContextFuseMethods.LIST_STATIC``); ``relative`` is ``pyramid`` there too."""


@dataclass(frozen=True)
class ContextWindows:
    """Context-window options (ComfyUI core's names and defaults: length 16, overlap 4, pyramid fusion)."""
    context_length: int = 16
    context_overlap: int = 4
    context_schedule: str = "standard_static"
    context_stride: int = 1
    closed_loop: bool = False
    fuse_method: str = "pyramid"
    freenoise: bool = False

    def checked(self) -> "ContextWindows":
        """Self, after validation; ValueError naming the option, the value and what is expected."""
        if self.context_length < 1:
            raise ValueError(f"context_length must be at least 1, got {self.context_length}")
        if not 0 <= self.context_overlap < self.context_length:
            raise ValueError(f"context_overlap must be in 0..context_length-1 ({self.context_length - 1}), got "
                             f"{self.context_overlap}")
        if self.context_schedule not in SCHEDULES:
            raise ValueError(f"context_schedule must be one of {list(SCHEDULES)}, got {self.context_schedule!r}")
        if self.fuse_method not in FUSE_METHODS:
            raise ValueError(f"fuse_method must be one of {list(FUSE_METHODS)}, got {self.fuse_method!r}")
        if self.context_stride < 1:
            raise ValueError(f"context_stride must be at least 1, got {self.context_stride}")
        return self


def _ordered_halving(val: int) -> float:
    """0, 1/2, 1/4, 3/4, 1/8, ... : the bit-reversed fraction of ``val`` (AnimateDiff's uniform schedule offset)."""
    bits = format(int(val) & 0xFFFFFFFFFFFFFFFF, "064b")
    return int(bits[::-1], 2) / (1 << 64)


def _uniform(F: int, opts: ContextWindows, step: int, closed_loop: bool) -> list:
    L, O = opts.context_length, opts.context_overlap
    stride = min(opts.context_stride, int(math.ceil(math.log2(F / L))) + 1)
    out = []
    for context_step in [1 << k for k in range(stride)]:
        pad = int(round(F * _ordered_halving(step)))
        for j in range(int(_ordered_halving(step) * context_step) + pad, F + pad + (0 if closed_loop else -O),
                       L * context_step - O):
            out.append([e % F for e in range(j, j + L * context_step, context_step)])
    return out


def _rolls_over(window: list, F: int) -> int:
    """Index where a wrapping window starts again from a lower frame, or -1."""
    prev = -1
    for i, v in enumerate(window):
        if v % F < prev:
            return i
        prev = v % F
    return -1


def _cover(out: list, F: int, L: int) -> list:
    """Append windows for frames no window holds (ComfyUI's uniform schedules with strides > 1 can leave some out,
    e.g. 37 frames, length 16, stride 2 at step 2): a frame without a window would have no prediction."""
    held = {i for w in out for i in w}
    while len(held) < F:
        start = min(min(set(range(F)) - held), F - L)
        out.append(list(range(start, start + L)))
        held |= set(out[-1])
    return out


def windows(num_frames: int, opts: ContextWindows, step: Optional[int] = 0) -> list:
    """The windows (lists of frame indices) of one call on a ``num_frames`` clip at sampler step ``step``.

    One window ``[0 .. F-1]`` when the clip fits in ``context_length``. ``standard_static``: starts 0, L-O, 2(L-O),
    ...; the last window ends at the last frame. ``batched``: consecutive windows of L frames (the last one shorter).
    ``looped_uniform``: AnimateDiff's ``uniform`` schedule (frames modulo F, an offset that depends on the step,
    strides 1, 2, 4, ... up to ``context_stride``; ``closed_loop`` also joins the end to the start).
    ``standard_uniform``: the same windows with wrapping ones shifted to end at the last frame, duplicates dropped.
    Every frame is in at least one window (a window is added where ComfyUI's uniform schedules leave one out).
    Source: ComfyUI ``comfy/context_windows.py`` (``create_windows_*``), from animatediff-cli's ``context.py``.
    """
    opts = opts.checked()
    F, L, O = int(num_frames), opts.context_length, opts.context_overlap
    sched, step = opts.context_schedule, int(step or 0)
    if F < L or (F == L and sched != "looped_uniform"):
        return [list(range(F))]
    if sched == "batched":
        return [list(range(s, min(s + L, F))) for s in range(0, F, L)]
    if sched == "standard_static":
        out, delta = [], L - O
        for start in range(0, F, delta):
            if start + L >= F:
                out.append(list(range(F - L, F)))
                break
            out.append(list(range(start, start + L)))
        return out
    if sched == "looped_uniform":
        return _cover(_uniform(F, opts, step, opts.closed_loop), F, L)
    out = _uniform(F, opts, step, False)
    i = 0
    while i < len(out):
        roll = _rolls_over(out[i], F)
        if roll >= 0:
            roll_val = out[i][roll]
            start = out[i][0]
            shifted = [((v - start) + F) % F for v in out[i]]
            shifted = [v + F - shifted[-1] - 1 for v in shifted]
            if max(shifted) < F:                  # (a strided window longer than the clip stays wrapped)
                out[i] = shifted
            if roll_val not in out[(i + 1) % len(out)]:
                out.insert(i + 1, list(range(roll_val, roll_val + L)))
        i += 1
    unique = []
    for w in out:
        if w not in unique:
            unique.append(w)
    return _cover(unique, F, L)


def fuse_weights(length: int, method: str, window: Optional[list] = None, num_frames: int = 0,
                 overlap: int = 0) -> torch.Tensor:
    """Per-frame weights of a window of ``length`` frames (ComfyUI's ``create_weights_*``): ``flat`` ones;
    ``pyramid``/``relative`` 1, 2, ..., peak, ..., 2, 1; ``overlap-linear`` ones with linear ramps over the
    ``overlap`` frames shared with the previous / next window (not at the clip's ends, read from ``window`` and
    ``num_frames``). float32 ``[length]``."""
    if method == "flat":
        return torch.ones(length)
    if method == "overlap-linear":
        w = torch.ones(length)
        if overlap and window is not None:
            if min(window) > 0:
                w[:overlap] = torch.linspace(1e-37, 1, overlap)
            if max(window) < num_frames - 1:
                w[-overlap:] = torch.linspace(1, 1e-37, overlap)
        return w
    if length % 2 == 0:
        half = length // 2
        seq = list(range(1, half + 1)) + list(range(half, 0, -1))
    else:
        half = (length + 1) // 2
        seq = list(range(1, half)) + [half] + list(range(half - 1, 0, -1))
    return torch.tensor(seq, dtype=torch.float32)


def _frames_of(branch, idx: list, num_frames: int):
    """A guidance branch restricted to the frames ``idx`` (per-frame text and concatenated channels follow)."""
    text = branch.text[idx] if branch.text.shape[0] == num_frames and num_frames > 1 else branch.text
    concat = None if branch.concat is None else branch.concat[:, :, idx]
    return replace(branch, text=text, concat=concat)


FREENOISE_STREAM = 0xF4EE
"""Offset of the seed of FreeNoise's permutations (its own stream: never shifts another draw)."""


def freenoise(noise: torch.Tensor, opts: ContextWindows, seed: int) -> torch.Tensor:
    """FreeNoise noise rescheduling (Qiu et al. 2023, "FreeNoise: Tuning-Free Longer Video Diffusion via Noise
    Rescheduling"; AnimateDiff-Evolved's FreeNoise option): the noise of frames after the first window repeats,
    block by block of ``context_length - context_overlap`` frames, a random permutation of the block before, so that
    every window starts from similar noise and long clips stay coherent. noise ``[1, C, F, h, w]``; returns a new
    tensor (unchanged when the clip fits in one window). Permutations come from ``seed + FREENOISE_STREAM``."""
    F, L, O = noise.shape[2], opts.context_length, opts.context_overlap
    out = noise.clone()
    if F <= L:
        return out
    g = torch.Generator("cpu").manual_seed(int(seed) + FREENOISE_STREAM)
    delta = L - O
    for start in range(0, F - L, delta):
        place = start + L
        n = min(delta, F - place)
        idx = torch.arange(start, start + n)[torch.randperm(n, generator=g)]
        out[:, :, place:place + n] = out[:, :, idx.to(out.device)]
    return out


def video_noise(denoiser, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """The starting noise of a video-model run: FreeNoise-rescheduled when ``denoiser`` runs on context windows with
    ``freenoise`` on, else ``noise`` itself. Every method that draws noise for a video model calls this."""
    if isinstance(denoiser, WindowedDenoiser) and denoiser.opts.freenoise:
        return freenoise(noise, denoiser.opts, seed)
    return noise


class WindowedDenoiser:
    """A video denoiser evaluated on context windows and fused (the module docstring). Same protocol as the wrapped
    denoiser (``eps = denoiser(x, t, guidance, step=i)``), same ``kind`` and ``schedule``; ``calls`` counts UNet
    calls. The wrapped denoiser is told each window (``window=`` frame indices), so attention capture and injection
    are keyed by window. Guidance with ``combine=False`` is fused branch by branch."""

    def __init__(self, inner, opts: ContextWindows):
        self.inner, self.opts = inner, opts.checked()
        self.kind, self.schedule = inner.kind, inner.schedule

    @property
    def calls(self):
        return self.inner.calls

    def controlled(self, controller):
        return self.inner.controlled(controller)

    def attention_layers(self, layers) -> tuple:
        return self.inner.attention_layers(layers)

    def bank_bytes(self, layers, num_frames: int, *args, **kwargs) -> int:
        """Bank bytes with windows: every window stores its own frames (overlaps are stored once per window)."""
        frames = sum(len(w) for w in windows(num_frames, self.opts, 0))
        return self.inner.bank_bytes(layers, frames, *args, **kwargs)

    def __call__(self, x: torch.Tensor, t, guidance, step: Optional[int] = None) -> torch.Tensor:
        n = x.shape[2]
        wins = windows(n, self.opts, step)
        if len(wins) == 1 and wins[0] == list(range(n)):
            return self.inner(x, t, guidance, step=step)
        out, total = None, torch.zeros(n, device=x.device)
        for w in wins:
            g = replace(guidance, branches=[_frames_of(b, w, n) for b in guidance.branches])
            eps = self.inner(x[:, :, w], t, g, step=step, window=tuple(w))
            weight = fuse_weights(len(w), self.opts.fuse_method, w, n, self.opts.context_overlap).to(x.device)
            if out is None:
                out = torch.zeros((*eps.shape[:2], n, *eps.shape[3:]), dtype=eps.dtype, device=eps.device)
            out.index_add_(2, torch.tensor(w, device=x.device), eps * weight.view(1, 1, -1, 1, 1))
            total.index_add_(0, torch.tensor(w, device=x.device), weight)
        return out / total.view(1, 1, -1, 1, 1)


def windowed(denoiser, opts: Optional[ContextWindows]):
    """``denoiser`` on context windows ``opts``; the denoiser itself when ``opts`` is None."""
    return denoiser if opts is None else WindowedDenoiser(denoiser, opts)
