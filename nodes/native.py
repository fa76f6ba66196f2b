"""ComfyUI's own models as core denoisers: a native ``MODEL`` with named ``CONDITIONING`` presented to the core
samplers as ``eps = denoiser(x_t, t, guidance, step=i)``.

The core loop runs INSIDE ComfyUI's sampler machinery: ``run`` starts a ``comfy.samplers.CFGGuider`` (the guider
KSampler uses) with a ``KSAMPLER`` whose sampler function is the core loop. ComfyUI therefore loads the model and
its additional models, processes the conds (ControlNet / T2I-Adapter / IPAdapter / area conds, hooks), applies
LoRAs, model patches and wrappers (AnimateDiff-Evolved injects its motion module this way) on its cloned patcher
and cleans everything up, also after an exception or Cancel; the user's MODEL object is never touched.

Guidance stays the core's: a ``Branch`` whose ``text`` is the NAME of one of the conds given to ``run`` (``cfg(
Branch("positive"), Branch("negative"), g)``, see ``guidance``). Every call evaluates all branches of the guidance in
one ``comfy.samplers.calc_cond_batch`` (ComfyUI's batched cond evaluation, with its cond/uncond batching, ControlNet
and model wrappers) and combines them as the VB backend does. Each call converts between the core's DDPM
parametrisation and ComfyUI's k-diffusion one through the model's own ``model_sampling``:

    sigma = sqrt((1 - abar(t)) / abar(t)),   x_k = x_t / sqrt(abar(t)),   eps_k = (x_k - D_k(x_k, sigma)) / sigma

The model turns sigma back into the integer timestep t (nearest entry of its sigma table), so it is evaluated at
exactly the core's timesteps.

Attention control (EVS Selective Feature Injection, BIVDiff's feature capture, Prompt2Prompt) goes through
ComfyUI's attention replace patches: ``NativeDenoiser.controlled(controller)`` puts a patch on each controlled layer
into a copy of the run's model options (``transformer_options["patches_replace"]``; the user's MODEL and the
patcher ComfyUI cloned are untouched) and drops it on exit. The patch gets ComfyUI's projected Q/K/V, splits the
heads and asks the same backend-free ``controller.attend`` as the diffusers processor; the branch roles of each call
come from the call's ``cond_or_uncond`` (ComfyUI may batch the guidance branches in several calls). Layers keep
their diffusers names (``down_blocks.2.attentions.1.transformer_blocks.0.attn2``), so presets and banks are the
same on both backends. Latents are the core's scaled ``[1, 4, F, h, w]``; frames are the batch, all of them
in one call (a motion-injected MODEL sees the whole clip). Scope: SD1.5-family epsilon models (ComfyUI
``latent_formats.SD15``). Sampler-level CFG patches (``sampler_cfg_function``, e.g. RescaleCFG) do not apply: the
methods' guidance is their own.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Callable, Optional

import comfy.latent_formats
import comfy.ldm.modules.attention
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import torch
from einops import rearrange

from ..core.attention import estimate_bank_bytes, resolve_layers
from ..core.denoisers import Branch, Guidance, combine, cfg, tell
from ..core.schedule import NoiseSchedule, Timestep


def guidance(cfg_scale: float) -> Guidance:
    """Classifier-free guidance over the conds ``run`` gets as ``positive`` and ``negative``."""
    return cfg(Branch("positive"), Branch("negative"), cfg_scale)


def one_model(node: str, vb_name: str, vb, model, loader: str) -> bool:
    """True when the native ``model`` input is the one connected, False for the VB input ``vb_name``; raises
    ValueError naming both when both or neither are connected. ``loader`` names the VB loader node."""
    if (vb is None) == (model is None):
        raise ValueError(f"{node}: {vb_name} / model: connect one of them, a VB model ({loader}) or a native MODEL; "
                         f"{'both are' if model is not None else 'neither is'} connected")
    return model is not None


def conds(node: str, positive, negative, negative_for: Optional[str] = None) -> dict:
    """The conds ``run`` gets from a node's ``positive`` / ``negative`` CONDITIONING inputs; ``negative_for`` says
    what needs the negative one (e.g. "cfg > 1"), None when it may be absent. Raises ValueError naming the missing
    input."""
    if positive is None or (negative_for and negative is None):
        raise ValueError(f"{node}: {'positive' if positive is None else 'negative'}: a native model takes its "
                         f"prompts as CONDITIONING (CLIPTextEncode)"
                         + (f"; the negative one is needed for {negative_for}" if negative_for else ""))
    return {"positive": positive, **({"negative": negative} if negative is not None else {})}


def need(node: str, name: str, value) -> None:
    """Raise ValueError naming input ``name`` ("vae", "clip") when a native model's companion from
    CheckpointLoaderSimple is not connected."""
    if value is None:
        raise ValueError(f"{node}: {name}: a native model needs its {name.upper()} too (CheckpointLoaderSimple's "
                         f"{name.upper()} output)")


def cfg_need(cfg_scale: float) -> Optional[str]:
    """What needs a negative cond at this guidance scale (``conds``' ``negative_for``)."""
    return "cfg > 1" if cfg_scale > 1 else None


def vae_encode(vae, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """Core pixels ``[1, 3, F, H, W]`` in -1..1 through a ComfyUI ``VAE`` (its own batching, device and dtype) to
    the core's scaled latent ``[1, 4, F, H/8, W/8]`` float32 (``scale``: the MODEL's latent_format factor)."""
    images = rearrange((pixels.float() + 1) / 2, "1 c f h w -> f h w c").clamp(0, 1)
    return rearrange(vae.encode(images).float(), "f c h w -> 1 c f h w") * scale


def vae_decode(vae, z: torch.Tensor, scale: float) -> torch.Tensor:
    """The core's scaled latent ``[1, 4, F, h, w]`` through a ComfyUI ``VAE`` to an ``IMAGE`` ``[F, 8h, 8w, 3]``
    in 0..1."""
    return vae.decode(rearrange(z, "1 c f h w -> f c h w") / scale).float()


def clip_tokenizer(clip, name: str):
    """The Hugging Face CLIP tokenizer a native SD1.5 ``CLIP`` tokenizes with (what Prompt2Prompt's word mappers
    need). Raises ValueError naming input ``name`` for a CLIP of another family (SDXL's two encoders, T5, ...)."""
    tok = clip.tokenizer
    inner = getattr(tok, getattr(tok, "clip", ""), None)
    if getattr(tok, "clip_name", None) != "l" or inner is None or not hasattr(inner, "tokenizer"):
        raise ValueError(f"{name}: this CLIP is {type(tok).__name__}; an SD1.5 CLIP (one CLIP-L text encoder, "
                         "CheckpointLoaderSimple of an SD1.5 checkpoint) is needed")
    return inner.tokenizer


def plain_prompt(clip, tokenizer, text: str, name: str) -> None:
    """Raise ValueError naming input ``name`` unless ComfyUI reads ``text`` as exactly the plain CLIP tokens
    (``tokenizer``'s): prompt weighting ``(word:1.2)``, embeddings and prompts over 75 tokens change the tokens or
    their weights, which word-to-token mapping cannot follow."""
    chunks = clip.tokenize(text)[clip.tokenizer.clip_name]
    want = tokenizer(text).input_ids
    ids = [t[0] for t in chunks[0]]
    if len(chunks) > 1 or any(t[1] != 1.0 for c in chunks for t in c) or ids[:len(want)] != want:
        raise ValueError(f"{name}: ComfyUI reads this prompt as other tokens than the plain CLIP tokenizer (prompt "
                         "weighting '(word:1.2)', an embedding, or over 75 tokens); Prompt2Prompt maps words to "
                         "token positions, so write plain words and strengthen words with reweight")


def schedule_of(model, name: str) -> NoiseSchedule:
    """The core schedule of a native ``MODEL`` (a ComfyUI ModelPatcher): SD1.5's, after checking that the model is
    an SD1.5-family epsilon model on that schedule. Raises ValueError naming input ``name`` otherwise (SDXL, SD3,
    Flux, v-prediction, another noise schedule), with what was found."""
    base = model.model
    family = type(getattr(base, "model_config", None)).__name__
    if not isinstance(getattr(base, "latent_format", None), comfy.latent_formats.SD15):
        raise ValueError(f"{name}: this MODEL is {family} ({type(base.latent_format).__name__} latents); only SD1.5-"
                         "family models (SD1.5 checkpoints, their LoRAs and merges) are supported here")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.V_PREDICTION):
        raise ValueError(f"{name}: this MODEL predicts {type(ms).__name__}; only epsilon-prediction SD1.5 models "
                         "are supported (remove ModelSamplingDiscrete v_prediction patches)")
    sd = NoiseSchedule.sd15()
    sigmas = getattr(ms, "sigmas", None)
    if sigmas is None or sigmas.shape[0] != sd.num_train_timesteps:
        raise ValueError(f"{name}: this MODEL samples on a continuous or {getattr(sigmas, 'shape', ['?'])[0]}-step "
                         "schedule; the SD1.5 1000-step schedule is needed")
    abar = 1.0 / (1.0 + sigmas.double().cpu() ** 2)
    if float(((abar - sd.alphas_cumprod.double()).abs() / sd.alphas_cumprod.double()).max()) > 1e-4:
        raise ValueError(f"{name}: this MODEL's noise schedule is not SD1.5's (zero-terminal SNR or a patched "
                         "schedule); remove the schedule patch")
    return sd


def sigma_of(schedule: NoiseSchedule, t: Timestep) -> float:
    """ComfyUI's k-diffusion noise level of timestep ``t``: ``sqrt((1 - abar(t)) / abar(t))``."""
    abar = float(schedule.alpha_bar(t))
    return math.sqrt((1.0 - abar) / abar)


def attention_layers(model) -> dict:
    """The spatial attention layers of a native SD1.5-family ``MODEL`` under their diffusers names:
    ``{name: (patch key, level, inner_dim)}``, patch key ``(block, number, transformer_index)`` as ComfyUI's
    attention replace patches address a layer (``("output", 3, 0)`` is diffusers ``up_blocks.1.attentions.0``), level
    the downsampling level and inner_dim the query width (``core.attention.layer_table``'s columns). Read from the
    openaimodel ``UNetModel`` blocks: level i has ``num_res_blocks[i]`` input blocks then a downsampler (but the
    last), the output side ``num_res_blocks[i] + 1`` blocks per level, deepest first."""
    unet = model.model.diffusion_model
    n, res = len(unet.channel_mult), list(unet.num_res_blocks)
    places = []
    block = 1
    for level in range(n):
        places += [(f"down_blocks.{level}.attentions.{a}", ("input", block + a), level) for a in range(res[level])]
        block += res[level] + (level < n - 1)
    places.append(("mid_block.attentions.0", ("middle", 0), n - 1))
    block = 0
    for b, level in enumerate(reversed(range(n))):
        places += [(f"up_blocks.{b}.attentions.{a}", ("output", block + a), level) for a in range(res[level] + 1)]
        block += res[level] + 1
    out = {}
    for prefix, (where, number), level in places:
        blocks = unet.middle_block if where == "middle" else \
            (unet.input_blocks if where == "input" else unet.output_blocks)[number]
        for st in blocks:
            if isinstance(st, comfy.ldm.modules.attention.SpatialTransformer):
                for j, tb in enumerate(st.transformer_blocks):
                    for attn in ("attn1", "attn2"):
                        out[f"{prefix}.transformer_blocks.{j}.{attn}"] = ((where, number, j), level,
                                                                           getattr(tb, attn).to_q.out_features)
    return out


class NativeDenoiser:
    """Core denoiser over ComfyUI's model inside a running sampler (``run``): frames are the batch.

    model: the native MODEL (its layers name the controllable attention); schedule: the model's core schedule
    (``schedule_of``); kind: "image" (frame-wise SD1.5) or "video" (a motion-injected MODEL: the core treats it as a
    video denoiser); guider: the running CFGGuider (its ``inner_model`` and processed ``conds`` by name) and
    model_options: the sampler's, both None for a denoiser that only answers planning questions (schedule, kind,
    layers, bank sizes). ``calls`` counts the batched evaluations. ``schedule`` is what samplers read and may be
    swapped (``core.i4vgen.with_schedule``: the same UNet sampled on another schedule); sigma always comes from the
    model's own table, so the model still sees timestep t and x_t. All frames go in one call, so any frame group
    (``frame_group``, Prompt2Prompt's source/edit pairs) stays whole.
    """
    frame_group = 1

    def __init__(self, model, schedule: NoiseSchedule, kind: str = "image", guider=None,
                 model_options: Optional[dict] = None):
        self.model, self.schedule, self.kind = model, schedule, kind
        self.guider, self.model_options = guider, model_options if model_options is not None else {}
        self.model_schedule = schedule
        self.controller, self._roles, self._layers = None, (), None
        self.calls = 0

    @property
    def layers(self) -> dict:
        """``attention_layers(model)``, read once."""
        if self._layers is None:
            self._layers = attention_layers(self.model)
        return self._layers

    @property
    def table(self) -> dict:
        """The layers as ``core.attention``'s backend-free table ``{name: (level, inner_dim)}``."""
        return {n: v[1:] for n, v in self.layers.items()}

    def attention_layers(self, layers) -> tuple:
        """The controllable layer names of a preset or an explicit list (``core.attention.resolve_layers``)."""
        return resolve_layers(self.table, layers)

    def bank_bytes(self, layers, num_frames: int, latent_hw: tuple, num_steps: int,
                   dtype: torch.dtype = torch.float16) -> int:
        """Bytes a Q/K/V bank of ``layers`` would hold (``core.attention.estimate_bank_bytes``)."""
        return estimate_bank_bytes(self.table, layers, num_frames, latent_hw, num_steps, dtype)

    @contextlib.contextmanager
    def controlled(self, controller):
        """Within the block, ``controller`` (``core.attention.AttentionController`` or Prompt2Prompt's) computes the
        attention of its layers through replace patches in a copy of the run's model options, and is told what
        every call is. Raises ValueError naming the layer when the MODEL already replaces that layer's attention
        (an IPAdapter or attention-couple patch: two replacements cannot share a layer)."""
        names = self.attention_layers(controller.layers)
        options = dict(self.model_options)
        taken = options.get("transformer_options", {}).get("patches_replace", {})
        for name in names:
            key, attn = self.layers[name][0], name.rsplit(".", 1)[1]
            if key in taken.get(attn, {}) or key[:2] in taken.get(attn, {}):
                raise ValueError(f"model: this MODEL already replaces the attention of {name} ({attn} of ComfyUI "
                                 f"block {key[:2]}), e.g. with an IPAdapter; attention control cannot share the "
                                 "layer. Apply that patch to another model or choose other layers")
            comfy.model_patcher.set_model_options_patch_replace(options, self._patch(name, controller), attn, *key)
        saved = self.model_options
        self.model_options, self.controller = options, controller
        try:
            yield self
        finally:
            self.model_options, self.controller = saved, None
            controller.context = None

    def _patch(self, name: str, controller):
        """ComfyUI attention replace patch of layer ``name``: projected ``[B, L, heads*d]`` Q/K/V in, the attention
        before the output projection out, computed by ``controller.attend`` on ``[B, heads, L, d]``."""
        def attend(q, k, v, extra):
            roles = tuple(self._roles[i] for i in extra["cond_or_uncond"])
            ctx = controller.context
            if ctx is not None and q.shape[0] != len(roles) * ctx.chunk_frames:
                raise ValueError(f"model: layer {name} got {q.shape[0]} rows for {len(roles)} guidance branches of "
                                 f"{ctx.chunk_frames} frames: this MODEL evaluates the clip in pieces (context "
                                 "options of AnimateDiff-Evolved, area conds), and attention control needs the whole "
                                 "clip in one call; remove them, or use a VB video model with VBContextWindows")
            if ctx is not None and ctx.branches != roles:
                controller.context = replace(ctx, branches=roles)
            q, k, v = (rearrange(x, "b l (h d) -> b h l d", h=extra["n_heads"]) for x in (q, k, v))
            return rearrange(controller.attend(name, q, k, v, None), "b h l d -> b l (h d)")
        return attend

    def __call__(self, x: torch.Tensor, t: Timestep, guidance: Guidance, step: Optional[int] = None) -> torch.Tensor:
        """Guided eps ``[1, 4, F, h, w]`` float32 (or ``[K, 4, F, h, w]`` with ``combine=False``) at timestep ``t``
        (0..999) for the scaled latent ``x``; the branches name conds given to ``run``. Raises KeyError naming an
        unknown cond."""
        conds = self.guider.conds
        missing = [b.text for b in guidance.branches if b.text not in conds]
        if missing:
            raise KeyError(f"guidance names conds {missing} that the run was not given ({sorted(conds)})")
        sigma = sigma_of(self.model_schedule, t)
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        self._roles = tuple(b.role for b in guidance.branches)
        tell(self.controller, step, t, guidance, 0, x.shape[2], x.shape[2])
        device = self.guider.model_patcher.load_device                 # the sampler's device, wherever x lives
        xk = frames.to(device) * math.sqrt(1.0 + sigma * sigma)         # x_t / sqrt(abar)
        s = torch.full((frames.shape[0],), sigma, device=device, dtype=torch.float32)
        outs = comfy.samplers.calc_cond_batch(self.guider.inner_model, [conds[b.text] for b in guidance.branches],
                                              xk, s, self.model_options)
        self.calls += 1
        eps = torch.stack([(xk - d.float()) / sigma for d in outs])      # [K, F, c, h, w]
        return combine(rearrange(eps, "k f c h w -> k c f h w"), guidance).to(x.device)


def run(model, conds: dict, latent: torch.Tensor, timesteps, schedule: NoiseSchedule,
        loop: Callable[[NativeDenoiser], torch.Tensor], kind: str = "image", seed: int = 0) -> torch.Tensor:
    """Run ``loop(denoiser)`` (a core sampler or inversion on the scaled latent ``[1, 4, F, h, w]`` it closes over)
    inside ComfyUI's CFGGuider for ``model`` with ``conds`` (name -> CONDITIONING; the guidance's branches name
    them). ``latent`` gives the batch shape and device; ``timesteps`` (the core grid, 0..999) become the sampler's
    sigmas, which model patches read. Returns what ``loop`` returns."""
    frames = rearrange(latent, "b c f h w -> (b f) c h w")
    sigmas = torch.tensor([sigma_of(schedule, t) for t in timesteps] + [0.0], dtype=torch.float32)
    out = {}

    def sampler_function(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model                                    # KSamplerX0Inpaint -> the CFGGuider
        options = (extra_args or {}).get("model_options", {})
        out["x"] = loop(NativeDenoiser(model, schedule, kind, guider, options))
        return noise

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    guider.sample(torch.zeros_like(frames), torch.zeros_like(frames), comfy.samplers.KSAMPLER(sampler_function),
                  sigmas, seed=seed)
    return out["x"]
