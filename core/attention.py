"""Attention control: capture and inject Q/K/V on chosen UNet attention layers, keyed by (layer, timestep).

One ``AttentionController`` per run holds the mode (``off`` / ``capture`` / ``inject``), the chosen layers, the
timesteps that are captured or injected, the ``FeatureBank`` and the blend ``gamma``. The denoiser sets
``controller.context`` (a ``CallContext``: step index, timestep, the role of each guidance branch in the batch and
the frame range of the chunk) right before every UNet call, so every decision is a function of
``(layer name, timestep or step, branch)`` and never of how many calls happened (METHODS.md §6.1): frame chunking,
CFG batching and ControlNet passes cannot change which stored feature a layer sees.

``attention_control(unet, controller)`` installs a ``ControlledAttnProcessor`` on the chosen layers only (the others
keep their processor objects) and always puts the original processors back: on success, on an exception, on
Cancel. Temporal layers (AnimateDiff motion modules, UNet3D temporal attention) are never controlled. The processor
projects Q/K/V and asks ``controller.attend(name, q, k, v, mask)`` for the attention output, so any controller with
``layers``, ``context`` and ``attend`` plugs in: this module's SFI controller, and Prompt2Prompt's
(``core.prompt2prompt.Prompt2PromptController``).

The injection itself is a plain function of tensors, ``sfi_attention`` (EVS paper Eq. 11), so any backend can use it.
Layers are named as in diffusers and described by a backend-free table ``{name: (level, inner_dim)}``
(``layer_table`` for a diffusers UNet); ``resolve_layers`` and ``estimate_bank_bytes`` read only that table, so
another backend (``nodes.native``: ComfyUI's attention replace patches) selects and sizes the same layers.

Layouts: spatial attention rows are ``(branch frame)`` = ``[(K*nf), L, C]`` in the batch (diffusers folds frames
into the batch for UNet2D, UNetMotionModel and UNet3D alike); after the head split ``[(K*nf), heads, L, d]``.
The bank stores one branch per entry as ``[F, heads, L, d]`` for the whole clip.

Sources: EVS (Su et al., CVPR 2025) §3.3 and Eq. 11; METHODS.md §5.3, §6.1; MODELS.md §6.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule, Timestep

MODES = ("off", "capture", "inject")

_DECODER_SELF = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (1, 2, 3) for a in (0, 1, 2)]
SFI_PRESETS = {
    "shallow": (tuple(_DECODER_SELF), 0.5),
    "deep": (tuple(n for n in _DECODER_SELF if not n.startswith("up_blocks.3")), 0.8),
}
"""Selective Feature Injection presets (METHODS.md §5.3): layer names and the paper's gamma for them. ``shallow``:
the 9 decoder spatial self-attention layers (up_blocks.1-3), gamma 0.5; ``deep``: up_blocks.1-2 (6 layers),
gamma 0.8."""

GIB = 1024 ** 3


# ------------------------------------------------------------------ what each UNet call is
@dataclass(frozen=True)
class CallContext:
    """What one UNet call computes, set by the denoiser right before the call.

    step: index of the timestep in the sampler's grid (inversion uses the index of its target timestep), or None.
    timestep: the timestep the UNet is evaluated at (0..999, int; float when mapped).
    branches: the role of each guidance branch in batch order, e.g. ("uncond", "cond"); rows of a spatial layer
        are ``(branch frame)``.
    frames: ``(start, stop)`` of the frames in this call within the clip (frame chunking).
    num_frames: frames in the whole clip.
    window: the frame indices of this call's clip in the whole clip when it is one context window of it
        (``core.context``), else None. Features are stored and looked up per window.
    """
    step: Optional[int]
    timestep: Timestep
    branches: tuple
    frames: tuple
    num_frames: int
    window: Optional[tuple] = None

    @property
    def chunk_frames(self) -> int:
        return self.frames[1] - self.frames[0]


# ------------------------------------------------------------------ layers
def layer_kind(name: str) -> str:
    """``temporal`` (motion modules, UNet3D temporal layers), ``self`` (spatial attn1) or ``cross`` (attn2)."""
    if "motion_modules" in name or "temp_attentions" in name or name.startswith("transformer_in."):
        return "temporal"
    return "self" if name.endswith("attn1") else "cross"


def attention_layers(unet: torch.nn.Module) -> list:
    """Names of every attention layer of a diffusers ``unet`` (processor keys without ``.processor``), in model
    order."""
    return [k[: -len(".processor")] for k in unet.attn_processors]


def layer_table(unet: torch.nn.Module) -> dict:
    """The attention layers of a diffusers ``unet`` as the backend-free table the functions below read:
    ``{name: (level, inner_dim)}`` in model order, with level the downsampling level of a spatial layer
    (down_blocks.i -> i, mid_block -> n-1, up_blocks.i -> n-1-i; -1 for temporal layers) and inner_dim the width of
    its queries (heads x head dim). Another backend (``nodes.native``: ComfyUI's UNet) builds the same table under
    the same diffusers names."""
    n = len(unet.config.block_out_channels)
    table = {}
    for name in attention_layers(unet):
        level = -1
        if layer_kind(name) != "temporal":
            block, index = name.split(".")[:2]
            level = n - 1 if block == "mid_block" else int(index) if block == "down_blocks" else n - 1 - int(index)
        table[name] = (level, unet.get_submodule(name).to_q.out_features)
    return table


def resolve_layers(table: dict, layers: Union[str, Iterable[str]]) -> tuple:
    """The layer names to control, out of ``table`` (``layer_table``: every attention layer of the model): a preset
    name (``shallow``, ``deep``), ``spatial`` (every self- and cross-attention layer that is not temporal:
    Prompt2Prompt), or an explicit list of names (a comma- or newline-separated string is split). Raises ValueError
    naming the layers that the model does not have or that are temporal (motion modules are never controlled), and
    for an empty selection.
    """
    if isinstance(layers, str) and layers.strip() == "spatial":
        return tuple(n for n in table if layer_kind(n) != "temporal")
    if isinstance(layers, str):
        if layers.strip() in SFI_PRESETS:
            layers = SFI_PRESETS[layers.strip()][0]
        else:
            layers = [s.strip() for s in layers.replace("\n", ",").split(",")]
    names = tuple(dict.fromkeys(n[: -len(".processor")] if n.endswith(".processor") else n for n in layers if n))
    if not names:
        raise ValueError(f"layers: empty selection; give a preset {sorted(SFI_PRESETS)} or layer names such as "
                         f"{_DECODER_SELF[0]!r}")
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"layers: {missing[:3]} not found in this model; spatial attention layers look like "
                         f"{_DECODER_SELF[0]!r}")
    temporal = [n for n in names if layer_kind(n) == "temporal"]
    if temporal:
        raise ValueError(f"layers: {temporal[:3]} are temporal (motion-module) layers, which are never controlled; "
                         "choose spatial attn1/attn2 layers")
    return names


def estimate_bank_bytes(table: dict, layers: Sequence[str], num_frames: int, latent_hw: tuple,
                        num_steps: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes a bank of Q, K and V for ``layers`` (names in ``table``, ``layer_table``) over ``num_steps`` timesteps
    will hold, for one branch of a ``num_frames``-frame clip with latents ``latent_hw`` = (h, w). Query tokens of a
    layer at level k are ``ceil(h/2^k)*ceil(w/2^k)``; self-attention keys/values have as many, cross-attention ones
    77. (0.61 GiB per step for the ``shallow`` preset at 16 frames, 512x512, fp16: METHODS.md §5.3.)
    """
    h, w = latent_hw
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in layers:
        level, inner = table[name]
        f = 2 ** level
        lq = math.ceil(h / f) * math.ceil(w / f)
        lk = lq if layer_kind(name) == "self" else 77
        total += num_frames * inner * (lq + 2 * lk) * item
    return int(total * num_steps)


def check_budget(nbytes: int, budget_gib: float, what: str, layers: int, steps: int) -> None:
    """Raise ValueError before any sampling when a bank of ``nbytes`` would exceed ``budget_gib`` GiB; the message
    gives the size and how to shrink it."""
    if budget_gib > 0 and nbytes > budget_gib * GIB:
        raise ValueError(f"{what}: the attention bank would hold {nbytes / GIB:.2f} GiB ({layers} layers x {steps} "
                         f"steps), over the budget of {budget_gib:g} GiB. Shrink it: fewer layers (preset 'deep' "
                         "has 6 instead of 9), fewer captured steps, fewer frames or a smaller size; or raise "
                         "the budget")


# ------------------------------------------------------------------ the bank
class FeatureBank:
    """Q/K/V captured per ``(layer, timestep)`` for the whole clip, one branch, ``[F, heads, L, d]`` each.

    Stored in ``dtype`` (fp16 by default) on ``device`` (the CPU by default). ``num_frames``, ``latent_hw`` and
    ``schedule`` describe what it was captured from; ``check_compatible`` refuses a bank from another clip size,
    frame count or schedule. Injection only reads it.
    """

    def __init__(self, num_frames: int, latent_hw: tuple, schedule: Optional[NoiseSchedule] = None,
                 dtype: torch.dtype = torch.float16, device: Union[str, torch.device] = "cpu"):
        self.num_frames, self.latent_hw, self.schedule = int(num_frames), tuple(latent_hw), schedule
        self.dtype, self.device = dtype, torch.device(device)
        self.entries: dict = {}
        self._held: set = set()                    # (layer, t) captured for any window: the hot-path lookup

    @property
    def layers(self) -> tuple:
        """Captured layer names, in capture order."""
        return tuple(dict.fromkeys(key[0] for key in self.entries))

    @property
    def timesteps(self) -> tuple:
        """Captured timesteps, descending."""
        return tuple(sorted({key[1] for key in self.entries}, reverse=True))

    @property
    def windowed(self) -> bool:
        """True when the features were captured per context window."""
        return any(len(key) == 3 for key in self.entries)

    def holds(self, layer: str, t: Timestep) -> bool:
        """Whether ``layer`` was captured at ``t`` (for any window)."""
        return (layer, t) in self._held

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(x.numel() * x.element_size() for e in self.entries.values() for x in e)

    def put(self, layer: str, t: Timestep, frames: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            window: Optional[tuple] = None):
        """Store ``q, k, v`` ``[nf, heads, L, d]`` for ``frames`` = (start, stop) of the clip, or of the context
        ``window`` (frame indices) when given: windows overlap, so each window keeps its own features (overwrites:
        with fixed-point inversion the last iterate stays)."""
        key = (layer, t) if window is None else (layer, t, tuple(window))
        n = self.num_frames if window is None else len(window)
        if key not in self.entries:
            self._held.add((layer, t))
            self.entries[key] = tuple(torch.zeros((n, *x.shape[1:]), dtype=self.dtype, device=self.device)
                                      for x in (q, k, v))
        for dst, src in zip(self.entries[key], (q, k, v)):
            dst[frames[0]:frames[1]].copy_(src.detach())

    def get(self, layer: str, t: Timestep, frames: tuple, window: Optional[tuple] = None):
        """``(q, k, v)`` of ``frames`` = (start, stop) of the clip or of context ``window``, or None when
        ``(layer, t)`` was not captured. A bank captured on the whole clip also serves any window (spatial features
        are per frame); a bank captured per window serves only the same windows (ValueError otherwise: capture and
        inject with the same context windows)."""
        if window is not None and (layer, t, tuple(window)) in self.entries:
            return tuple(x[frames[0]:frames[1]] for x in self.entries[(layer, t, tuple(window))])
        e = self.entries.get((layer, t))
        if e is not None:
            idx = list(range(self.num_frames)) if window is None else list(window)
            return tuple(x[idx[frames[0]:frames[1]]] for x in e)
        if self.holds(layer, t):
            raise ValueError(f"attention bank: {layer} at timestep {t} was captured on other context windows than "
                             f"this call's ({'the whole clip' if window is None else list(window)[:4]}...); capture "
                             "and inject with the same video model and context windows")
        return None

    def check_compatible(self, name: str, num_frames: int, latent_hw: tuple,
                         schedule: Optional[NoiseSchedule] = None, layers: Sequence[str] = (),
                         timesteps: Sequence[int] = ()) -> None:
        """Raise ValueError (naming input ``name``) when this bank cannot be injected into a run on a
        ``num_frames``-frame clip of latents ``latent_hw``, on ``schedule``, injecting ``layers`` at ``timesteps``:
        another frame count or resolution, another schedule, a layer it lacks, or none of the timesteps."""
        if not self.entries:
            raise ValueError(f"{name}: the attention bank is empty; capture it first (a DDIM inversion with "
                             "attention capture on)")
        if num_frames != self.num_frames:
            raise ValueError(f"{name}: the attention bank was captured on {self.num_frames} frames, this video has "
                             f"{num_frames}; capture it from the same clip")
        if tuple(latent_hw) != self.latent_hw:
            h, w = self.latent_hw
            raise ValueError(f"{name}: the attention bank was captured at {w * 8}x{h * 8}, this video is "
                             f"{latent_hw[1] * 8}x{latent_hw[0] * 8}; capture it at the same size")
        if schedule is not None and self.schedule is not None and not schedule.same_as(self.schedule):
            raise ValueError(f"{name}: the attention bank was captured on a {self.schedule.beta_schedule} schedule, "
                             f"this model samples on {schedule.beta_schedule}; capture it with the same video model")
        lacking = [n for n in layers if n not in self.layers]
        if lacking:
            raise ValueError(f"{name}: the attention bank has no features for {lacking[:3]}; it holds "
                             f"{len(self.layers)} layers. Inject a preset it covers, or capture those layers")
        if timesteps and not set(timesteps) & set(self.timesteps):
            raise ValueError(f"{name}: the attention bank holds timesteps {list(self.timesteps)}, none of the "
                             f"sampled {list(timesteps)}; capture with the same steps and grid")

    def __repr__(self) -> str:
        return (f"FeatureBank({len(self.layers)} layers x {len(self.timesteps)} steps, {self.num_frames} frames, "
                f"{self.nbytes / 2 ** 20:.1f} MiB {str(self.dtype).replace('torch.', '')} on {self.device})")


# ------------------------------------------------------------------ the injection math
def sfi_attention(q: torch.Tensor, q_inv: torch.Tensor, k_inv: torch.Tensor, v_inv: torch.Tensor, gamma: float,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selective Feature Injection, EVS Eq. 11: ``softmax((gamma*Q_inv + (1-gamma)*Q) K_inv^T / sqrt(d)) V_inv``.

    q: the current queries ``[B, heads, Lq, d]``; q_inv, k_inv, v_inv: the inversion's features, same layout (Lk for
    k_inv/v_inv). gamma in [0, 1]: 0 keeps the current queries, 1 uses the inversion's. No temperature. Returns
    ``[B, heads, Lq, d]`` (before the output projection). Raises ValueError for gamma outside [0, 1].
    """
    gamma = check_gamma(gamma)
    if gamma == 0.0:
        query = q
    elif gamma == 1.0:
        query = q_inv
    else:
        query = gamma * q_inv + (1.0 - gamma) * q
    return F.scaled_dot_product_attention(query, k_inv, v_inv, attn_mask=attention_mask)


def check_gamma(gamma: float) -> float:
    """Return gamma as a float; ValueError naming gamma, the value and [0, 1] otherwise."""
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"sfi_gamma (the share of the inversion's queries, EVS Eq. 11) must be in [0, 1], got {gamma}")
    return float(gamma)


# ------------------------------------------------------------------ controller and processor
class AttentionController:
    """Shared state of every controlled layer in one run.

    layers: the controlled layer names (``resolve_layers``).
    timesteps: the timesteps captured or injected (the bank holds only these); None = every timestep.
    mode: ``off`` / ``capture`` / ``inject``. bank: the ``FeatureBank`` written (capture) or read (inject).
    gamma: the query blend of ``sfi_attention``. capture_branch: the guidance branch role captured ("cond"; the
    first branch when the batch has no such role). ``context`` is set by the denoiser before every UNet call.
    """

    def __init__(self, layers: Sequence[str], bank: FeatureBank, mode: str = "capture",
                 timesteps: Optional[Iterable[Timestep]] = None, gamma: float = 0.5, capture_branch: str = "cond"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.layers, self.bank, self.mode = frozenset(layers), bank, mode
        self.timesteps = None if timesteps is None else frozenset(timesteps)
        self.gamma, self.capture_branch = check_gamma(gamma), capture_branch
        self.context: Optional[CallContext] = None

    def action(self, name: str) -> Optional[str]:
        """``capture``, ``inject`` or None for layer ``name`` in the current call: a function of the layer name, the
        call's timestep and the mode only."""
        ctx = self.context
        if self.mode == "off" or ctx is None or name not in self.layers:
            return None
        if self.timesteps is not None and ctx.timestep not in self.timesteps:
            return None
        if self.mode == "inject" and not self.bank.holds(name, ctx.timestep):
            return None
        return self.mode

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output ``[B, heads, Lq, d]`` of layer ``name`` for the current call: captures Q/K/V, injects
        the bank's (Eq. 11) or computes plain SDPA, as ``action`` says."""
        act = self.action(name)
        if act == "capture":
            self.capture(name, q, k, v)
        if act == "inject":
            return self.inject(name, q, attention_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``[(K*nf), heads, L, d]`` -> ``[K, nf, heads, L, d]``, checking the batch layout against the context."""
        ctx = self.context
        k, nf = len(ctx.branches), ctx.chunk_frames
        if x.shape[0] != k * nf:
            raise RuntimeError(f"attention control: layer {name} got {x.shape[0]} rows, expected {k} branches x "
                               f"{nf} frames; is it a spatial layer of the UNet the denoiser runs?")
        return x.view(k, nf, *x.shape[1:])

    def capture(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        ctx = self.context
        b = ctx.branches.index(self.capture_branch) if self.capture_branch in ctx.branches else 0
        self.bank.put(name, ctx.timestep, ctx.frames, *(self._rows(name, x)[b] for x in (q, k, v)),
                      window=ctx.window)

    def inject(self, name: str, q: torch.Tensor, attention_mask=None) -> torch.Tensor:
        ctx = self.context
        stored = self.bank.get(name, ctx.timestep, ctx.frames, ctx.window)
        n_branches = len(ctx.branches)
        q_inv, k_inv, v_inv = (x.to(q.device, q.dtype).repeat(n_branches, 1, 1, 1) for x in stored)
        if q_inv.shape != q.shape:
            raise ValueError(f"attention bank: layer {name} holds queries {tuple(q_inv.shape[1:])} per frame, this "
                             f"call has {tuple(q.shape[1:])}: the bank comes from another resolution or model")
        return sfi_attention(q, q_inv, k_inv, v_inv, self.gamma, attention_mask)


class ControlledAttnProcessor:
    """Attention processor of one controlled UNet layer: diffusers' SDPA processor maths (3-D input, no group or
    spatial norm) around ``controller.attend(name, q, k, v, mask)``, which computes the attention itself from the
    head-split ``[B, heads, L, d]`` tensors (plain SDPA, SFI capture/injection, or Prompt2Prompt edits)."""

    def __init__(self, name: str, controller: AttentionController):
        self.name, self.controller = name, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        x = hidden_states
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        B, L = x.shape[0], ctx.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, L, B).view(B, attn.heads, -1, L)
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))          # [B, heads, L, d]
        out = self.controller.attend(self.name, q, k, v, attention_mask)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, -1, attn.heads * d).to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def attention_control(unet: torch.nn.Module, controller: AttentionController):
    """Install ``ControlledAttnProcessor`` on ``controller.layers`` of ``unet`` (never a ControlNet: pass the UNet)
    for the duration of the block; every other layer keeps its processor object. The original processor objects
    are always restored, also after an exception or an interrupt (Cancel), and ``controller.context`` is cleared.

    Raises ValueError for a layer the UNet lacks, a temporal layer, or a layer whose attention uses group/spatial/QK
    norms or fused QKV projections (this processor does not implement them; SD1.5-family UNets use none).
    """
    names = resolve_layers(layer_table(unet), controller.layers)
    for n in names:
        attn = unet.get_submodule(n)
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None \
                or attn.norm_k is not None or getattr(attn, "fused_projections", False):
            raise ValueError(f"layers: {n} uses group/spatial/QK norms or fused QKV projections, which the controlled "
                             "processor does not implement (no fuse_qkv_projections while attention control is on)")
    old = dict(unet.attn_processors)
    selected = set(names)
    unet.set_attn_processor({k: ControlledAttnProcessor(k[: -len(".processor")], controller)
                             if k[: -len(".processor")] in selected else p for k, p in old.items()})
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(old))                 # set_attn_processor empties the dict it is given
        controller.context = None
