"""I4VGen as nodes: one per stage (candidates, anchor selection, static video, NI-VSDS; regeneration is
``VBVideoDenoise`` with strength p_re) and ``VBI4VGen``, the whole method in one box with the paper's defaults.

A thin skin over ``core.i4vgen`` (METHODS.md §3). Every stage node draws its noise from the stream ``VBI4VGen``
uses for that stage, so a staged graph whose nodes share one seed gives the one-box result.
"""
from __future__ import annotations

import logging

import torch
from einops import rearrange

from ..core import i4vgen
from ..core.context import video_noise
from ..core.denoisers import Branch, UNet2DDenoiser
from ..core.denoisers import cfg as cfg_guidance
from ..core.latents import check_size, decode_video, encode_video, vae_scale
from . import native, runtime, scorers, types, widgets
from .api import io
from .bivdiff import latent_scale

log = logging.getLogger(__name__)
D = i4vgen.I4VGenParams()
NODE_CATEGORY = "VideoBridge/I4VGen"


def _named(node: str, e: Exception) -> ValueError:
    return ValueError(str(e) if str(e).startswith(node) else f"{node}: {e}")


def _size(default=256):
    return [io.Int.Input("width", default=default, min=8, max=4096, step=8, tooltip="Width in pixels (multiple of 8)."),
            io.Int.Input("height", default=default, min=8, max=4096, step=8,
                         tooltip="Height in pixels (multiple of 8).")]


def _candidates():
    return io.Int.Input("num_candidates", default=D.num_candidates, min=1, max=256,
                        tooltip="N_c: how many candidate images the image model draws (paper and official code: 16). "
                                "Candidate n's noise does not depend on N_c.")


def _steps():
    return widgets.steps(D.steps, tooltip="DDIM steps N of every stage (the official AnimateDiff setting: 25).")


def _cfg(name="cfg", default=D.cfg, what="every stage"):
    return io.Float.Input(name, default=default, min=1.0, max=30.0, step=0.1,
                          tooltip=f"Classifier-free guidance of {what} (official: 7.5).")


def _scorer():
    return io.Combo.Input("scorer", options=list(i4vgen.SCORERS), default="auto",
                          tooltip="How the anchor is chosen among the candidates. auto: ImageReward if its weights "
                                  "are in models/image_reward, else a whole CLIP model in models/clip_vision or "
                                  "models/clip, else the weight-free score (the image model's own text-alignment "
                                  "estimate plus sharpness and exposure). first: candidate 0 (the paper's ablation).")


def _p_ni():
    return io.Float.Input("p_ni", default=D.p_ni, min=0.01, max=1.0, step=0.01,
                          tooltip="Share of the grid NI-VSDS runs over: floor(N p_ni) + 1 updates from the noisiest "
                                  "timestep (0.6 of 25 -> 16 updates, t 961 to 361).")


def _p_re():
    return io.Float.Input("p_re", default=D.p_re, min=0.01, max=1.0, step=0.01,
                          tooltip="Regeneration strength: share of the grid re-run after NI-VSDS (1.0 = re-noise to "
                                  "the noisiest timestep and run all N steps; lower keeps more of the NI-VSDS video).")


def _step_sizes():
    return widgets.advanced(io.String.Input("step_sizes", default="10, 10, 10, 1",
                           tooltip="NI-VSDS step sizes eta, one per update; the last repeats (official: 10, 10, 10, "
                                   "then 1)."))


def _official_candidates():
    return widgets.advanced(io.Boolean.Input("official_candidate_schedule", default=False,
                            tooltip="Parity with the official code: sample the candidates on AnimateDiff's linear "
                                    "schedule with its DDIM config (grid 960..0, x0 clipped to [-1, 1]) instead of "
                                    "the image model's own schedule."))


def _official_scheduler():
    return widgets.advanced(io.Boolean.Input("official_scheduler_config", default=False,
                            tooltip="Parity with the official code: NI-VSDS and regeneration on the official DDIM "
                                    "config (grid 960, 920, ..., 0 and x0 clipped to [-1, 1]) instead of the video "
                                    "model's own (961, ..., 1, no clipping)."))


def _candidate_index():
    return widgets.advanced(io.Int.Input("candidate_index", default=-1, min=-1, max=255,
                        tooltip="Force this candidate as the anchor (parity runs); -1 = the scorer's choice."))


def _check_base(node: str, image_model) -> None:
    if image_model.model.variant != "base":
        raise ValueError(f"{node}: image_model: I4VGen needs a base SD1.5 text-to-image model (4-channel UNet); this "
                         f"is an {image_model.model.variant} model")


def _check_latent_space(node: str, image_model, video_model, model=None) -> None:
    """The video model must share the image model's latent space (a VB image model's VAE, or a native MODEL's
    latent format)."""
    vm = video_model.model
    if model is not None:
        fmt = model.model.latent_format
        channels, scale = fmt.latent_channels, fmt.scale_factor
    else:
        channels, scale = image_model.model.unet.config.in_channels, vae_scale(image_model.model.vae)
    if vm.unet.config.in_channels != channels or abs(latent_scale(video_model) - scale) > 1e-6:
        raise ValueError(f"{node}: video_model: its latents ({vm.unet.config.in_channels} channels, scale "
                         f"{latent_scale(video_model)}) differ from the image model's ({channels}, {scale}); both "
                         "must use the SD VAE latent space")


def _native_image(node: str, image_model, model, vae=None, need_vae: bool = False):
    """(True, the MODEL's core schedule, its latent scale) for a native image model, after the checks; (False,
    None, the VB VAE's scale) for a VB one (a base SD1.5 model)."""
    if native.one_model(node, "image_model", image_model, model, "VBLoadImageModel"):
        if need_vae:
            native.need(node, "vae", vae)
        return True, native.schedule_of(model, f"{node}: model"), model.model.latent_format.scale_factor
    _check_base(node, image_model)
    return False, None, vae_scale(image_model.model.vae)


def _candidate_grid(model, schedule, params) -> list:
    """Stage 1's grid on a native MODEL's schedule (``candidate_stage`` on a planning denoiser)."""
    return i4vgen.candidate_stage(native.NativeDenoiser(model, schedule), params)[1]


def _native_alignment(den, seed: int, callbacks):
    """The weight-free scorer's alignment on a live native denoiser (conds "positive" and "negative")."""
    return lambda z: i4vgen.diffusion_alignment(den, z.to(runtime.mm.get_torch_device()), Branch("positive"),
                                                Branch("negative"), seed, callbacks=callbacks)


def _decode(image_model, z, callbacks) -> torch.Tensor:
    runtime.load(image_model.vae)
    return runtime.video_to_image(decode_video(image_model.model.vae, z, callbacks=callbacks))


def _select(node, image_model, prompt, negative_prompt, scorer, images, latents, seed, forced, callbacks,
            alignment=None) -> tuple:
    """(index, scores dict or None, table text) for candidates ``images`` / ``latents`` ([1, 4, N, h, w]);
    ``alignment`` replaces the VB image model in the weight-free scorer (``scorers.score``)."""
    kind, detail = scorers.resolve(scorer, node)
    scores = None
    if forced < 0 and kind != "first":
        scores = scorers.score(kind, detail, image_model, prompt, negative_prompt, images, latents, seed, callbacks,
                               alignment)
    try:
        index = i4vgen.choose(scores["score"], forced) if scores else max(forced, 0)
    except ValueError as e:
        raise _named(node, e) from None
    text = scorers.table(kind, scores, index)
    log.info("%s %s", node, text)
    return index, scores, text


# ============================================================================================ stage nodes
class VBAnchorCandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBAnchorCandidates", display_name="I4VGen Anchor Candidates (VideoBridge)",
            category=NODE_CATEGORY,
            description="I4VGen stage 1: N_c candidate images of the prompt from the image model (DDIM, CFG), all "
                        "candidates in one batch per step. Pick the anchor with VBSelectAnchor.",
            inputs=[
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 checkpoint (the video model's base); or connect a native "
                                               "MODEL to model instead."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What the video shows."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt."),
                widgets.seed("Noise seed (candidate stream; share one seed across the I4VGen nodes to reproduce "
                             "VBI4VGen)."),
                *_size(), _candidates(), _steps(), _cfg(what="the image model"), widgets.frame_batch(8),
                _official_candidates(),
                *widgets.native_image_model("the image model", vae=True),
            ],
            outputs=[io.Image.Output(display_name="candidates", tooltip="The N_c candidate images."),
                     io.Latent.Output(display_name="latent", tooltip="Their latents [N_c, 4, h, w].")])

    @classmethod
    def execute(cls, prompt, negative_prompt, seed, width, height, num_candidates, steps, cfg, frame_batch_size,
                official_candidate_schedule, image_model=None, model=None, positive=None, negative=None,
                vae=None) -> io.NodeOutput:
        node = "VBAnchorCandidates"
        is_native, schedule, scale = _native_image(node, image_model, model, vae, need_vae=True)
        try:
            check_size("width/height", height, width)
            params = i4vgen.I4VGenParams(steps=steps, cfg=cfg, num_candidates=num_candidates,
                                         official_candidate_schedule=official_candidate_schedule).checked()
        except ValueError as e:
            raise _named(node, e) from None
        hw = (height // 8, width // 8)
        noise = i4vgen.candidate_noise(seed, num_candidates, hw)
        if is_native:
            conds = native.conds(node, positive, negative, native.cfg_need(cfg))
            progress = runtime.Progress(steps)

            def loop(den):
                den, grid = i4vgen.candidate_stage(den, params)
                return i4vgen.generate_candidates(den, noise.to(runtime.mm.get_torch_device()), grid,
                                                  native.guidance(cfg), callbacks=progress.callbacks)

            z = native.run(model, conds, noise, _candidate_grid(model, schedule, params), schedule, loop, seed=seed)
            return io.NodeOutput(native.vae_decode(vae, z, scale), runtime.to_latent(z, scale))
        progress = runtime.Progress(steps + -(-num_candidates // 8))
        text, null = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
        device = runtime.load(image_model.unet, rows=2 * num_candidates, latent_hw=hw)
        m = image_model.model
        den, grid = i4vgen.candidate_stage(
            UNet2DDenoiser(m.unet, m.schedule, frame_batch_size=runtime.frame_chunk(frame_batch_size, num_candidates,
                                                                                    2, hw)), params)
        z = i4vgen.generate_candidates(den, noise.to(device), grid, cfg_guidance(Branch(text), Branch(null), cfg),
                                       callbacks=progress.callbacks)
        images = _decode(image_model, z, progress.callbacks)
        return io.NodeOutput(images, runtime.to_latent(z, scale))


class VBSelectAnchor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBSelectAnchor", display_name="I4VGen Select Anchor (VideoBridge)", category=NODE_CATEGORY,
            description="I4VGen stage 1: scores every candidate and keeps the best as the anchor image. The scores "
                        "of all candidates come out as text (and go to the log) so the choice can be checked.",
            inputs=[
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="The image model (its VAE, text encoder and, for the weight-free "
                                               "scorer, its UNet); or connect a native MODEL to model instead."),
                io.Image.Input("candidates", tooltip="Candidate images from VBAnchorCandidates."),
                io.Latent.Input("latent", tooltip="Their latents from VBAnchorCandidates."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The prompt the candidates show."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (the weight-free scorer compares the two)."),
                _scorer(),
                widgets.seed("Seed of the weight-free scorer's shared noise (score stream)."),
                _candidate_index(),
                *widgets.native_image_model("the image model (the weight-free scorer's)",
                                            negative_for="the weight-free scorer"),
            ],
            outputs=[io.Image.Output(display_name="anchor", tooltip="The chosen candidate image."),
                     io.Latent.Output(display_name="latent", tooltip="Its latent [1, 4, h, w]."),
                     io.String.Output(display_name="scores", tooltip="Every candidate's score; * marks the anchor.")])

    @classmethod
    def execute(cls, candidates, latent, prompt, negative_prompt, scorer, seed, candidate_index, image_model=None,
                model=None, positive=None, negative=None) -> io.NodeOutput:
        node = "VBSelectAnchor"
        is_native, schedule, scale = _native_image(node, image_model, model)
        z = runtime.from_latent(latent, "latent", scale, "cpu")
        if candidates.shape[0] != z.shape[2]:
            raise ValueError(f"{node}: candidates: {candidates.shape[0]} images but the latent has {z.shape[2]} "
                             "frames; connect both outputs of the same VBAnchorCandidates")
        runtime.image_to_video(candidates, "candidates", "cpu")           # shape and finite checks
        progress = runtime.Progress(len(i4vgen.SCORE_TIMESTEPS))
        def alignment(latents):                                          # the weight-free scorer on the MODEL
            conds = native.conds(node, positive, negative, "the weight-free scorer")
            return native.run(model, conds, latents, i4vgen.SCORE_TIMESTEPS, schedule,
                              lambda den: _native_alignment(den, seed, progress.callbacks)(latents), seed=seed)

        index, _, text = _select(node, None if is_native else image_model, prompt, negative_prompt, scorer,
                                 candidates, z, seed, candidate_index, progress.callbacks,
                                 alignment if is_native else None)
        runtime.progress_text(text.split("\n")[0])
        return io.NodeOutput(candidates[index:index + 1], runtime.to_latent(z[:, :, index:index + 1], scale), text)


class VBStaticVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBStaticVideo", display_name="I4VGen Static Video (VideoBridge)", category=NODE_CATEGORY,
            description="I4VGen stage 2: a still video, the anchor latent repeated for every frame; NI-VSDS then "
                        "sets it in motion.",
            inputs=[io.Latent.Input("latent", tooltip="The anchor latent (VBSelectAnchor, or any encoded image)."),
                    io.Int.Input("frames", default=16, min=1, max=1024,
                                 tooltip="Frame count of the video (AnimateDiff: 16)."),
                    io.Int.Input("index", default=0, min=0, max=4095,
                                 tooltip="Which frame of the input latent to use when it holds several.")],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The static video latent [frames, 4, h, w].")])

    @classmethod
    def execute(cls, latent, frames, index) -> io.NodeOutput:
        node = "VBStaticVideo"
        z = runtime.from_latent(latent, "latent", 1.0, "cpu")
        if index >= z.shape[2]:
            raise ValueError(f"{node}: index {index} is beyond the latent's {z.shape[2]} frame(s) (0..{z.shape[2] - 1})")
        out = i4vgen.static_video(z[:, :, index:index + 1], frames)
        return io.NodeOutput({"samples": rearrange(out, "1 c f h w -> f c h w").to(runtime.mm.intermediate_device())})


class VBNIVSDS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBNIVSDS", display_name="I4VGen NI-VSDS (VideoBridge)", category=NODE_CATEGORY,
            description="I4VGen stage 2: noise-invariant video score distillation. The video model's score at the "
                        "first floor(N p_ni) + 1 grid timesteps moves the (static) video towards what the video "
                        "model would make of it, with one noise drawn once for every update. Regenerate the result "
                        "with VBVideoDenoise (strength = p_re).",
            inputs=[
                types.VideoModel.Input("video_model", optional=True,
                                       tooltip="AnimateDiff (official) or another video model; or connect a native "
                                               "motion MODEL to model."),
                io.Latent.Input("latent", tooltip="A clean video latent, usually VBStaticVideo's."),
                io.String.Input("prompt", multiline=True, default="", tooltip="Video prompt."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt."),
                widgets.seed("Seed of the constant NI-VSDS noise (nivsds stream)."),
                _steps(), _cfg(what="the video model inside NI-VSDS"), _p_ni(), _step_sizes(),
                _official_scheduler(),
                *widgets.native_video_model(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The optimised clean video latent.")])

    @classmethod
    def execute(cls, latent, prompt, negative_prompt, seed, steps, cfg, p_ni, step_sizes, official_scheduler_config,
                video_model=None, model=None, positive=None, negative=None) -> io.NodeOutput:
        node = "VBNIVSDS"
        try:
            params = i4vgen.I4VGenParams(steps=steps, cfg=cfg, p_ni=p_ni, step_sizes=i4vgen.parse_step_sizes(step_sizes),
                                         official_scheduler_config=official_scheduler_config).checked()
        except ValueError as e:
            raise _named(node, e) from None
        if runtime.is_noisy(latent):
            raise ValueError(f"{node}: latent: NI-VSDS takes a clean latent; this one is an inversion at timestep "
                             f"{latent['vb_timestep']}")
        if native.one_model(node, "video_model", video_model, model, "VBLoadVideoModel"):
            conds = native.conds(node, positive, negative, native.cfg_need(cfg))
            schedule, scale = native.schedule_of(model, f"{node}: model"), model.model.latent_format.scale_factor
            grid = i4vgen.video_stages(native.NativeDenoiser(model, schedule, "video"), params)[1]
            z = runtime.from_latent(latent, "latent", scale, runtime.mm.get_torch_device())
            noise = i4vgen.stream_noise(z.shape, seed, "nivsds").to(z.device)
            progress = runtime.Progress(len(grid))
            out = native.run(model, conds, z, grid, schedule, lambda den: i4vgen.ni_vsds(
                i4vgen.video_stages(den, params)[0], z, noise, grid, native.guidance(cfg), params.step_sizes,
                callbacks=progress.callbacks), kind="video", seed=seed)
            return io.NodeOutput(runtime.to_latent(out, scale))
        scale = latent_scale(video_model)
        den, grid, _ = i4vgen.video_stages(runtime.video_denoiser(video_model), params)
        z = runtime.from_latent(latent, "latent", scale, "cpu")
        progress = runtime.Progress(len(grid))
        text, null = runtime.encode(video_model, [prompt, negative_prompt]).split(1)
        device = runtime.load(video_model.unet, rows=runtime.video_rows(video_model, z.shape[2], 1 + (cfg > 1)),
                              latent_hw=tuple(z.shape[-2:]))
        noise = video_noise(den, i4vgen.stream_noise(z.shape, seed, "nivsds"), seed)
        out = i4vgen.ni_vsds(den, z.to(device), noise.to(device), grid,
                             cfg_guidance(Branch(text), Branch(null), cfg), params.step_sizes,
                             callbacks=progress.callbacks)
        return io.NodeOutput(runtime.to_latent(out, scale))


# ============================================================================================ one box
class VBI4VGen(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBI4VGen", display_name="I4VGen Text to Video (VideoBridge)", category=NODE_CATEGORY,
            description="I4VGen in one node with the paper's defaults: candidate images from the image model, the "
                        "best-scoring one as anchor (or your own anchor_image), a static video of it set in motion "
                        "by NI-VSDS with the video model, then regenerated by the video model. Outputs the video, "
                        "the anchor, the NI-VSDS video and every candidate's score.",
            inputs=[
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 checkpoint: the image model; or connect a native MODEL to "
                                               "model instead."),
                types.VideoModel.Input("video_model", tooltip="AnimateDiff on the same checkpoint (official)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What the video shows."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt."),
                widgets.seed(),
                *_size(),
                io.Int.Input("frames", default=16, min=1, max=1024, tooltip="Frame count (AnimateDiff: 16)."),
                _steps(), _cfg(), _candidates(), _scorer(), _p_ni(), _p_re(),
                io.Image.Input("anchor_image", optional=True,
                               tooltip="Your own anchor picture (real-image mode; the first image of a batch): skips "
                                       "the candidates. It must have the width and height set here."),
                widgets.frame_batch(8),
                _step_sizes(),
                widgets.advanced(io.Float.Input("nivsds_cfg", default=-1.0, min=-1.0, max=30.0, step=0.1,
                               tooltip="Guidance inside NI-VSDS; -1 = cfg (official).")),
                _official_candidates(), _official_scheduler(), _candidate_index(),
                *widgets.native_image_model("the image model (candidates and the weight-free scorer; the video "
                                            "model still reads prompt)", negative_for="cfg > 1 or the weight-free "
                                            "scorer", vae=True),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The video latent (decode with VBDecodeFrames)."),
                     io.Image.Output(display_name="anchor", tooltip="The anchor image."),
                     io.Latent.Output(display_name="ni_vsds_latent", tooltip="The video after NI-VSDS, before "
                                                                              "regeneration."),
                     io.Image.Output(display_name="candidates", tooltip="All candidates (the anchor alone with an "
                                                                        "anchor_image)."),
                     io.String.Output(display_name="scores", tooltip="Every candidate's score; * marks the anchor.")])

    @classmethod
    def execute(cls, video_model, prompt, negative_prompt, seed, width, height, frames, steps, cfg, num_candidates,
                scorer, p_ni, p_re, frame_batch_size, step_sizes, nivsds_cfg, official_candidate_schedule,
                official_scheduler_config, candidate_index, anchor_image=None, image_model=None, model=None,
                positive=None, negative=None, vae=None) -> io.NodeOutput:
        node = "VBI4VGen"
        is_native, schedule, scale = _native_image(node, image_model, model, vae, need_vae=True)
        _check_latent_space(node, image_model, video_model, model)
        try:
            check_size("width/height", height, width)
            params = i4vgen.I4VGenParams(
                steps=steps, cfg=cfg, num_candidates=num_candidates, p_ni=p_ni, p_re=p_re,
                step_sizes=i4vgen.parse_step_sizes(step_sizes), nivsds_cfg=None if nivsds_cfg < 0 else nivsds_cfg,
                official_candidate_schedule=official_candidate_schedule,
                official_scheduler_config=official_scheduler_config, candidate_index=candidate_index).checked()
        except ValueError as e:
            raise _named(node, e) from None
        kind, detail = scorers.resolve(scorer, node)
        scores_candidates = anchor_image is None and kind != "first" and candidate_index < 0
        if is_native:
            need = [w for w, on in (("cfg > 1", cfg > 1), ("the weight-free scorer",
                                                           scores_candidates and kind == "weight-free")) if on]
            conds = native.conds(node, positive, negative, " and ".join(need) or None)
        h, w = height // 8, width // 8
        calls = i4vgen.unet_calls(params, with_candidates=anchor_image is None)
        if not scores_candidates:
            calls["score"] = 0
        decode_chunks = 0 if is_native else -(-num_candidates // 8) + 3 * -(-frames // 8)
        progress = runtime.Progress(sum(calls.values()) + decode_chunks)
        cb = progress.callbacks
        decode = (lambda z: native.vae_decode(vae, z, scale)) if is_native else (lambda z: _decode(image_model, z, cb))
        anchor = None
        if anchor_image is not None:
            pixels = runtime.image_to_video(anchor_image[:1], "anchor_image", "cpu")
            if tuple(pixels.shape[-2:]) != (height, width):
                raise ValueError(f"{node}: anchor_image is {pixels.shape[-1]}x{pixels.shape[-2]} but width/height are "
                                 f"{width}x{height}; set width/height to the picture's size or resize it (core "
                                 "ImageScale) first")
            if is_native:
                anchor = native.vae_encode(vae, pixels, scale)
            else:
                device = runtime.load(image_model.vae)
                anchor = encode_video(image_model.model.vae, pixels.to(device), callbacks=cb)
        text_v, null_v = runtime.encode(video_model, [prompt, negative_prompt]).split(1)
        g_v = cfg_guidance(Branch(text_v), Branch(null_v), cfg)
        g_ni = None if params.nivsds_cfg is None else cfg_guidance(Branch(text_v), Branch(null_v), params.nivsds_cfg)
        rows = max(2 * num_candidates, runtime.video_rows(video_model, frames, 1 + (cfg > 1)))
        picked = {}

        def on_stage(name, value):
            runtime.progress_text({"candidates": "stage 1: candidates done, scoring",
                                   "anchor": "stage 2: NI-VSDS", "ni_vsds": "stage 3: regeneration"}[name])

        def run(image_den, g_i, device, alignment=None, image_patcher=None):
            def score(latents):
                images = decode(latents)
                picked["images"] = images
                if kind == "first":
                    return None
                res = scorers.score(kind, detail, None if is_native else image_model, prompt, negative_prompt,
                                    images, latents, seed, cb, alignment)
                runtime.load(image_patcher, video_model.unet, rows=rows, latent_hw=(h, w))
                return res

            return i4vgen.i4vgen(image_den, runtime.video_denoiser(video_model), (1, 4, frames, h, w), g_i, g_v, seed,
                                 params, score=score, anchor=None if anchor is None else anchor.to(device),
                                 device=device, nivsds_guidance=g_ni, callbacks=cb, on_stage=on_stage)

        try:
            if is_native:                         # the VB video model is loaded inside, after ComfyUI loaded MODEL
                res = native.run(model, conds, torch.zeros(1, 4, num_candidates, h, w),
                                 _candidate_grid(model, schedule, params), schedule,
                                 lambda den: run(den, native.guidance(cfg), runtime.load(video_model.unet, rows=rows,
                                                                                          latent_hw=(h, w)),
                                                 _native_alignment(den, seed, cb)), seed=seed)
            else:
                m = image_model.model
                text_i, null_i = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
                device = runtime.load(image_model.unet, video_model.unet, rows=rows, latent_hw=(h, w))
                image_den = UNet2DDenoiser(m.unet, m.schedule, frame_batch_size=runtime.frame_chunk(
                    frame_batch_size, num_candidates, 2, (h, w)))
                res = run(image_den, cfg_guidance(Branch(text_i), Branch(null_i), cfg), device,
                          image_patcher=image_model.unet)
        except ValueError as e:
            raise _named(node, e) from None
        if anchor_image is not None:
            text = "anchor: the anchor_image input (no candidates)"
            anchor_px = anchor_image[:1, :, :, :3].to(runtime.mm.intermediate_device())
            cands = anchor_px
        else:
            kind_text = kind if res.scores is not None or params.candidate_index < 0 else "forced"
            text = scorers.table(kind_text, res.scores, res.index)
            cands = picked["images"] if "images" in picked else decode(res.candidates)
            anchor_px = cands[res.index:res.index + 1]
            log.info("%s %s", node, text)
        runtime.progress_text(text.split("\n")[0])
        return io.NodeOutput(runtime.to_latent(res.video, scale), anchor_px, runtime.to_latent(res.ni_vsds, scale),
                             cands, text)
