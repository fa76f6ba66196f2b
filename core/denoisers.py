"""Denoisers: the only thing a sampler sees. ``eps = denoiser(x_t, t, guidance, step=i)``.

Layout everywhere: ``x_t`` is a video latent ``[1, C, F, h, w]`` float32, scaled by the VAE factor (diffusers
convention); ``t`` is a timestep of ``denoiser.schedule`` (int 0..999, or float when mapped); the result is the
guided noise prediction, float32, same shape as ``x_t`` (4 channels).

Conditioning is a ``Guidance``: a list of ``Branch``es (one UNet evaluation each: prompt embedding, optional
concatenated channels, optional ControlNet hint) and weights; the guided prediction is ``sum_k w_k * eps_k``. All
branches (and all frames, for image models) run as ONE batched UNet call. This covers
  - no guidance:       [cond]                 weights [1]
  - classifier-free:   [uncond, cond]         weights [1-g, g]            (eps_u + g (eps_c - eps_u))
  - InstructPix2Pix:   [text+img, null+img, null+0]  weights [s_t, s_i-s_t, 1-s_i]
                       (eps_0 + s_t (eps_TI - eps_I) + s_i (eps_I - eps_0), METHODS.md §2.2, MODELS.md §3.3)

Image denoisers (``UNet2DDenoiser``) fold frames into the batch, optionally in chunks of ``frame_batch_size``; video
denoisers (``VideoDenoiser``: diffusers ``UNetMotionModel`` or ``UNet3DConditionModel``) see the whole clip.
``step`` is the index of ``t`` in the sampler's grid (None when there is no grid). Inside
``denoiser.controlled(controller)`` the denoiser tells the attention controller (``core.attention``) what each UNet
call is (step, timestep, branch roles, frame range of the
chunk) right before the call. ``on_schedule`` lets a denoiser be driven on another model's timesteps by equal-alpha-bar mapping (METHODS.md §1.4).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention import CallContext, attention_control, estimate_bank_bytes, layer_table, resolve_layers
from .context import ContextWindows, WindowedDenoiser
from .latents import OOM_ERRORS
from .schedule import NoiseSchedule, Timestep

log = logging.getLogger(__name__)


@dataclass
class Branch:
    """Conditioning of one UNet evaluation over the whole clip.

    text: prompt embedding ``[1, 77, D]`` (same for every frame) or ``[F, 77, D]`` (per frame).
    concat: extra input channels ``[1, C', F, h, w]`` appended after ``x_t`` (InstructPix2Pix: the unscaled source
        image latent, 4 ch; inpainting: mask + scaled masked-image latent, 5 ch), or None.
    control: ControlNet hint ``[F, 3, H, W]`` in 0..1 at pixel size (8x the latent), or None.
    role: what the branch is in the batch ("cond", "uncond", "image_cond"; later "source"/"edit"), told to the
        attention controller with every call (``core.attention.CallContext.branches``).
    """
    text: torch.Tensor
    concat: Optional[torch.Tensor] = None
    control: Optional[torch.Tensor] = None
    role: str = "cond"


@dataclass
class Guidance:
    """Branches evaluated in one batch and combined linearly: ``eps = sum_k weights[k] * eps_k``.

    With ``combine=False`` the denoiser returns every branch's prediction, stacked ``[K, C, F, h, w]`` in branch order
    (one batched call still; the weights are unused): scorers that compare branches (I4VGen's diffusion-classifier
    score) need them separately."""
    branches: list
    weights: list = field(default_factory=lambda: [1.0])
    combine: bool = True

    def __post_init__(self):
        if len(self.branches) != len(self.weights) or not self.branches:
            raise ValueError(f"Guidance needs one weight per branch, got {len(self.branches)} branches and "
                             f"{len(self.weights)} weights")


def single(branch: Branch) -> Guidance:
    """No guidance: one conditional evaluation."""
    return Guidance([branch], [1.0])


def cfg(cond: Branch, uncond: Branch, scale: float) -> Guidance:
    """Classifier-free guidance ``eps_u + scale (eps_c - eps_u)`` as one batched call; scale 1 is a single pass."""
    if scale == 1.0:
        return single(cond)
    return Guidance([replace(uncond, role="uncond"), cond], [1.0 - scale, scale])


def ip2p(text: torch.Tensor, null: torch.Tensor, image_latent: torch.Tensor, text_scale: float,
         image_scale: float) -> Guidance:
    """InstructPix2Pix three-way guidance (Brooks et al. 2023 Eq. 3; diffusers pipeline_stable_diffusion_instruct_pix2pix).

    text/null: ``[1,77,D]`` embeddings of the instruction and the negative prompt; image_latent: the source frames'
    UNSCALED VAE latent ``[1,4,F,h,w]``. eps = e0 + s_t (e_TI - e_I) + s_i (e_I - e0).
    """
    zeros = torch.zeros_like(image_latent)
    return Guidance([Branch(text, image_latent), Branch(null, image_latent, role="image_cond"),
                     Branch(null, zeros, role="uncond")],
                    [text_scale, image_scale - text_scale, 1.0 - image_scale])


def _timestep_tensor(t: Timestep, n: int, device) -> torch.Tensor:
    if t is None:
        raise ValueError("a denoiser cannot be evaluated at the end level")
    if float(t) == int(t):
        return torch.full((n,), int(t), dtype=torch.long, device=device)
    return torch.full((n,), float(t), dtype=torch.float32, device=device)


def combine(eps: torch.Tensor, g: Guidance) -> torch.Tensor:
    """eps: [K, ...] float32 -> the guided prediction [1, ...], ``sum_k w_k eps_k``. Classifier-free guidance and
    InstructPix2Pix guidance are evaluated in the official order (``u + g (c - u)``; ``e0 + s_t (e_TI - e_I) +
    s_i (e_I - e0)``), which equals the weighted sum mathematically and matches the reference code's rounding."""
    if not g.combine:
        return eps
    roles, w = tuple(b.role for b in g.branches), g.weights
    if roles == ("uncond", "cond"):
        return eps[:1] + w[1] * (eps[1:2] - eps[:1])
    if roles == ("cond", "image_cond", "uncond"):
        s_t, s_i = w[0], w[0] + w[1]
        return eps[2:3] + s_t * (eps[:1] - eps[1:2]) + s_i * (eps[1:2] - eps[2:3])
    if len(w) == 1:
        return eps[:1] * w[0] if w[0] != 1.0 else eps[:1]
    weights = torch.tensor(w, dtype=eps.dtype, device=eps.device).view(-1, *([1] * (eps.dim() - 1)))
    return (eps * weights).sum(0, keepdim=True)


def tell(controller, step: Optional[int], t: Timestep, g: Guidance, start: int, nf: int, n_frames: int,
         window: Optional[tuple] = None) -> None:
    """Set ``controller.context`` for the next UNet call: step, timestep, branch roles and frames [start, start+nf)
    of an ``n_frames`` clip, and the context window (frame indices in the whole clip) it belongs to, if any. No-op
    without a controller."""
    if controller is not None:
        controller.context = CallContext(step, t, tuple(b.role for b in g.branches), (start, start + nf), n_frames,
                                         window)


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _module_dtype(m: torch.nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _module_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device


class _Controllable:
    """Attention control for denoisers that wrap a diffusers UNet (``self.unet``). Methods that capture or inject
    features use only these three calls, so another backend provides the same three."""
    controller = None

    def attention_layers(self, layers) -> tuple:
        """The controllable layer names of a preset or an explicit list (``core.attention.resolve_layers``)."""
        return resolve_layers(layer_table(self.unet), layers)

    def bank_bytes(self, layers, num_frames: int, latent_hw: tuple, num_steps: int,
                   dtype: torch.dtype = torch.float16) -> int:
        """Bytes a Q/K/V bank of ``layers`` would hold (``core.attention.estimate_bank_bytes``)."""
        return estimate_bank_bytes(layer_table(self.unet), layers, num_frames, latent_hw, num_steps, dtype)

    @contextlib.contextmanager
    def controlled(self, controller):
        """Within the block, ``controller`` (``core.attention.AttentionController``) controls the UNet's chosen
        layers and is told what every call is; processors are restored on exit, also after an exception."""
        with attention_control(self.unet, controller):
            self.controller = controller
            try:
                yield self
            finally:
                self.controller = None


def check_adapter(unet, adapter) -> None:
    """Raise ValueError when a T2I-Adapter's features cannot enter ``unet``: another number of levels or widths
    (an adapter for another model family), or a down block that diffusers feeds only after its downsampler (a block
    without attention that downsamples: SD1.5 has attention at every level but the last, where adapters need it)."""
    blocks = unet.down_blocks
    widths, want = list(adapter.config.channels), list(unet.config.block_out_channels)
    if widths != want:
        raise ValueError(f"the T2I-Adapter's feature widths {widths} do not fit this UNet's levels {want}: it belongs "
                         "to another model family")
    late = [i for i, b in enumerate(blocks) if not getattr(b, "has_cross_attention", False) and b.downsamplers]
    if late:
        raise ValueError(f"this UNet's down block {late[0]} has no attention layers, so a T2I-Adapter's features "
                         "would arrive after its downsampler at the wrong size; T2I-Adapters need the SD1.5 layout "
                         "(attention at every level but the last)")


class UNet2DDenoiser(_Controllable):
    """Frame-wise image denoiser over a diffusers ``UNet2DConditionModel`` (SD1.5, inpainting 9 ch, IP2P 8 ch).

    Frames and guidance branches are one batch ``[(K*F), C, h, w]`` (chunked over frames by ``frame_batch_size``;
    results do not depend on the chunking). With ``controlnet``, each branch's hint drives the ControlNet on the
    same batch and its residuals (times ``control_scale``) go into the UNet; a diffusers ``T2IAdapter`` in its place
    adds its features inside the UNet's down blocks instead. ``inflated_groupnorm`` reproduces the
    official BIVDiff inversion UNet (METHODS.md §7.1 B11): the resnet GroupNorms and the final ``conv_norm_out``
    compute statistics over all frames of the clip instead of per frame (then frames are never chunked).
    ``frame_group``: chunks hold whole groups of this many consecutive frames (Prompt2Prompt interleaves the source
    and edit copy of each frame, 2, and edits one from the other inside a call).
    """
    kind = "image"

    def __init__(self, unet, schedule: NoiseSchedule, controlnet=None, control_scale: float = 1.0,
                 frame_batch_size: Optional[int] = None, inflated_groupnorm: bool = False, frame_group: int = 1):
        self.unet, self.schedule, self.controlnet = unet, schedule, controlnet
        self.control_scale = float(control_scale)
        self.frame_batch_size = frame_batch_size
        self.inflated_groupnorm = inflated_groupnorm
        self.frame_group = int(frame_group)
        self.adapter = controlnet if type(controlnet).__name__ == "T2IAdapter" else None
        if self.adapter is not None:
            check_adapter(unet, controlnet)
        self._features = {}                 # T2I-Adapter features per frame chunk, for the hints they came from
        self.calls = 0                      # UNet forward calls (benchmarks count them)

    def __call__(self, x: torch.Tensor, t: Timestep, guidance: Guidance, step: Optional[int] = None) -> torch.Tensor:
        """On a GPU out-of-memory error the frame chunk is halved and the chunk retried (frames are independent, so
        the result does not change); the smaller chunk is kept for the following calls."""
        n_frames, group = x.shape[2], self.frame_group
        if n_frames % group:
            raise ValueError(f"this image denoiser takes frames in groups of {group}, got {n_frames} frames")
        chunk = n_frames if (self.inflated_groupnorm or not self.frame_batch_size) else int(self.frame_batch_size)
        chunk = max(group, chunk // group * group)
        out, start = [], 0
        while start < n_frames:
            try:
                out.append(self._eval(x[:, :, start:start + chunk], t, guidance, start, step, n_frames))
            except OOM_ERRORS:
                if chunk == group or self.inflated_groupnorm:
                    raise
                _free_cache()
                chunk = max(group, min(chunk, n_frames - start) // 2 // group * group)
                self.frame_batch_size = chunk
                log.warning("image model ran out of memory: continuing with %d frames per call (same result)", chunk)
                continue
            start += out[-1].shape[2]
        return torch.cat(out, dim=2)

    def _adapter_residuals(self, branches, hints: list, start: int, dtype) -> dict:
        """T2I-Adapter features of the chunk's hints, times ``control_scale``, as diffusers'
        ``down_intrablock_additional_residuals`` (added inside the UNet's down blocks; diffusers
        ``StableDiffusionAdapterPipeline``). The adapter runs once per chunk and set of hint tensors, not per step
        (its features do not depend on the noisy latent), once for all branches when they share the hint (CFG), and
        on the mean of the RGB channels for one-channel adapters (sketch, canny)."""
        ad, controls, nf = self.adapter, tuple(b.control for b in branches), hints[0].shape[0]
        kept = self._features.get((start, nf))
        if kept is None or len(kept[0]) != len(controls) or any(a is not b for a, b in zip(kept[0], controls)):
            same = all(c is controls[0] for c in controls)
            hint = torch.cat(hints[:1] if same else hints).to(_module_device(ad), _module_dtype(ad))
            if ad.config.in_channels == 1:
                hint = hint.mean(1, keepdim=True)
            kept = self._features[(start, nf)] = (controls, [f.to(dtype) * self.control_scale for f in ad(hint)])
        feats = kept[1]
        if feats[0].shape[0] != len(hints) * nf:                           # one hint for every branch
            feats = [f.repeat(len(hints), 1, 1, 1) for f in feats]
        return dict(down_intrablock_additional_residuals=list(feats))      # a new list: the UNet pops from it

    def _eval(self, x: torch.Tensor, t: Timestep, g: Guidance, start: int, step, n_frames: int) -> torch.Tensor:
        unet = self.unet
        dtype, device = _module_dtype(unet), _module_device(unet)
        nf, K = x.shape[2], len(g.branches)
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        inputs, texts, hints = [], [], []
        for br in g.branches:
            xi = frames
            if br.concat is not None:
                xi = torch.cat([xi, rearrange(br.concat[:, :, start:start + nf], "b c f h w -> (b f) c h w")
                                .to(xi)], dim=1)
            inputs.append(xi)
            text = br.text if br.text.shape[0] == 1 else br.text[start:start + nf]
            texts.append(text.expand(nf, -1, -1) if text.shape[0] == 1 else text)
            if self.controlnet is not None:
                if br.control is None:
                    raise ValueError("a ControlNet is attached but a guidance branch has no control hint")
                hint = br.control if br.control.shape[0] == 1 else br.control[start:start + nf]
                hints.append(hint.expand(nf, -1, -1, -1))
        sample = torch.cat(inputs).to(device, dtype)
        ctx = torch.cat(texts).to(device, dtype)
        ts = _timestep_tensor(t, sample.shape[0], device)
        kwargs = {}
        if self.adapter is not None:
            kwargs = self._adapter_residuals(g.branches, hints, start, dtype)
        elif self.controlnet is not None:
            cn = self.controlnet
            down, mid = cn(sample[:, :4], ts, encoder_hidden_states=ctx.to(_module_dtype(cn)),
                           controlnet_cond=torch.cat(hints).to(device, _module_dtype(cn)),
                           conditioning_scale=self.control_scale, return_dict=False)
            kwargs = dict(down_block_additional_residuals=[d.to(dtype) for d in down],
                          mid_block_additional_residual=mid.to(dtype))
        tell(self.controller, step, t, g, start, nf, n_frames)
        with _pooled_groupnorm(unet, K, nf) if self.inflated_groupnorm else contextlib.nullcontext():
            eps = unet(sample, ts, encoder_hidden_states=ctx, return_dict=False, **kwargs)[0]
        self.calls += 1
        eps = rearrange(eps.float(), "(k f) c h w -> k c f h w", k=K)
        return combine(eps, g)


class VideoDenoiser(_Controllable):
    """Whole-clip video denoiser over diffusers ``UNetMotionModel`` (AnimateDiff) or ``UNet3DConditionModel``
    (ZeroScope/ModelScope). Branches are batched as ``[K, C, F, h, w]``. ``UNetMotionModel`` takes its text per
    frame ``[(K*F), 77, D]`` (it does not repeat it), ``UNet3DConditionModel`` per clip ``[K, 77, D]``.
    """
    kind = "video"

    def __init__(self, unet, schedule: NoiseSchedule, sequential_branches: bool = False):
        self.unet, self.schedule = unet, schedule
        self.per_frame_text = type(unet).__name__ == "UNetMotionModel"
        self.sequential_branches = sequential_branches
        self.fallback = None                 # context windows taken after an out-of-memory error
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: Timestep, g: Guidance, step: Optional[int] = None,
                 window: Optional[tuple] = None) -> torch.Tensor:
        """``window``: the frame indices of ``x`` in the whole clip when ``x`` is one context window of it
        (``core.context.WindowedDenoiser``); the attention controller keys its features by it.

        ``sequential_branches`` runs the guidance branches one after the other (less memory, same result). On a GPU
        out-of-memory error the branches are run one after the other (same result); if that still fails on a whole
        clip, the clip is run on context windows of half its length, halved again as needed (the result changes:
        this is logged), and those windows are kept for the following calls."""
        if self.fallback is not None and window is None:
            return WindowedDenoiser(self, self.fallback)(x, t, g, step)
        longest = getattr(self.unet.config, "motion_max_seq_length", None) if self.per_frame_text else None
        if longest and x.shape[2] > longest:
            raise ValueError(f"this AnimateDiff motion module handles at most {longest} frames at once, the clip has "
                             f"{x.shape[2]}; connect the video model through VBContextWindows (context_length 16)")
        try:
            return self._branches(x, t, g, step, window)
        except OOM_ERRORS:
            _free_cache()
        if len(g.branches) > 1 and not self.sequential_branches:
            self.sequential_branches = True
            log.warning("video model ran out of memory: running the guidance branches one after the other "
                        "(same result)")
            try:
                return self._branches(x, t, g, step, window)
            except OOM_ERRORS:
                _free_cache()
        length = x.shape[2]
        while window is None and length > 1:
            length //= 2
            self.fallback = ContextWindows(length, length // 4)
            log.warning("video model ran out of memory on %d frames: continuing on context windows of %d frames "
                        "(overlap %d); the result differs from a whole-clip run", x.shape[2], length, length // 4)
            try:
                return WindowedDenoiser(self, self.fallback)(x, t, g, step)
            except OOM_ERRORS:
                _free_cache()
        raise torch.cuda.OutOfMemoryError(f"video model: out of memory on {x.shape[2]} frames even with the "
                                          "smallest context windows; lower the size or free GPU memory")

    def _branches(self, x, t, g, step, window) -> torch.Tensor:
        if not self.sequential_branches or len(g.branches) == 1:
            return combine(self._forward(x, t, g, step, window), g)
        eps = torch.cat([self._forward(x, t, replace(g, branches=[b], weights=[1.0]), step, window)
                         for b in g.branches])
        return combine(eps, g)

    def _forward(self, x, t, g, step, window) -> torch.Tensor:
        """One UNet call on all branches of ``g``: the stacked per-branch eps ``[K, C, F, h, w]`` float32."""
        unet = self.unet
        dtype, device = _module_dtype(unet), _module_device(unet)
        nf, K = x.shape[2], len(g.branches)
        inputs, texts = [], []
        for br in g.branches:
            if br.control is not None:
                raise ValueError("video denoisers take no ControlNet hint")
            inputs.append(x if br.concat is None else torch.cat([x, br.concat.to(x)], dim=1))
            if self.per_frame_text:
                texts.append(br.text.expand(nf, -1, -1) if br.text.shape[0] == 1 else br.text)
            else:
                if br.text.shape[0] != 1:
                    raise ValueError("UNet3DConditionModel takes one prompt embedding per clip, not per frame")
                texts.append(br.text)
        sample = torch.cat(inputs).to(device, dtype)
        ctx = torch.cat(texts).to(device, dtype)
        tell(self.controller, step, t, g, 0, nf, nf, window)
        eps = unet(sample, _timestep_tensor(t, K, device), encoder_hidden_states=ctx, return_dict=False)[0]
        self.calls += 1
        return eps.float()


class MappedDenoiser:
    """Drives ``inner`` on the timesteps of another (master) schedule: ``inner`` is called at the timestep of its own
    schedule with the same alpha-bar (nearest integer, or a float with ``exact``), METHODS.md §1.4. Master levels
    noisier than ``inner`` ever saw clamp to 999; this is logged once.
    """

    def __init__(self, inner, master: NoiseSchedule, exact: bool = False):
        self.inner, self.schedule, self.kind, self.exact = inner, master, inner.kind, exact
        self._warned = False

    def __call__(self, x, t, g, step=None):
        u = self.schedule.map_timestep(t, self.inner.schedule, exact=self.exact)
        if not self._warned and self.schedule.alpha_bar(t) < self.inner.schedule.alphas_cumprod[-1]:
            log.warning("timestep %s of the master schedule is noisier than the %s model was trained for; "
                        "clamped to %s", t, self.inner.kind, u)
            self._warned = True
        return self.inner(x, u, g, step=step)

    def controlled(self, controller):
        """Attention control of the wrapped denoiser (``_Controllable.controlled``)."""
        return self.inner.controlled(controller)

    def attention_layers(self, layers) -> tuple:
        return self.inner.attention_layers(layers)

    def bank_bytes(self, *args, **kwargs) -> int:
        return self.inner.bank_bytes(*args, **kwargs)

    @property
    def calls(self):
        """UNet forward calls of the wrapped denoiser."""
        return self.inner.calls


def on_schedule(denoiser, master: NoiseSchedule, exact: bool = False):
    """``denoiser`` itself when its schedule equals ``master`` (SD1.5 <-> ZeroScope), else a ``MappedDenoiser``."""
    if denoiser.schedule.same_as(master):
        return denoiser
    return MappedDenoiser(denoiser, master, exact)


# ------------------------------------------------------------------ frame-pooled GroupNorm (parity option, B11)
@contextlib.contextmanager
def _pooled_groupnorm(unet, n_branches: int, n_frames: int):
    """Temporarily make the UNet's resnet GroupNorms and ``conv_norm_out`` pool their statistics over frames, as the
    inflated (Tune-A-Video style) UNet of the official BIVDiff code does on ``[b, c, f, h, w]`` tensors. Attention
    blocks keep per-frame norms (the official Transformer3D folds frames first). Hooks are removed on exit, also
    after an exception.
    """
    def hook(module, args, output):
        x = args[0]
        x5 = rearrange(x, "(k f) c h w -> k c f h w", k=n_branches, f=n_frames)
        y = F.group_norm(x5, module.num_groups, module.weight, module.bias, module.eps)
        return rearrange(y, "k c f h w -> (k f) c h w")

    norms = [m for name, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)
             and (name == "conv_norm_out" or ".resnets." in name)]
    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
