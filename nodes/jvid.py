"""JVID as nodes: the mixture-of-denoisers sampler, and temporal latent smoothing for any video latent.

A thin skin over ``core.jvid`` (METHODS.md §4). Knobs carry the paper's names (t_v, t_e, p_e, p_f, gamma, r_i, r_v,
c_s); -1 on a knob means "the preset's value".
"""
from __future__ import annotations

import dataclasses

import torch
from einops import rearrange

from ..core import jvid
from ..core.denoisers import Branch, UNet2DDenoiser
from ..core.denoisers import cfg as cfg_guidance
from ..core.latents import check_size, vae_scale
from . import native, runtime, types, widgets
from .api import io
from .bivdiff import latent_scale

PRESETS = [*jvid.PRESETS, "custom"]                       # "64", "128", "256", "custom"
SMOOTHING = ["preset", "on", "off"]
MAPPING = ["nearest integer", "interpolated"]
KNOBS = {
    "t_v": "Sampling progress (0 = pure noise, 1 = end) until which only the video model runs.",
    "t_e": "Progress at which the video probability P_V has fallen to p_e.",
    "p_e": "P_V at t_e.",
    "p_f": "P_V at the end of sampling.",
    "gamma": "Step-noise scale on image-model steps (entropy reduction; 1 = off).",
    "r_i": "Share of the step noise shared by all frames on image-model steps.",
    "r_v": "Share of the step noise shared by all frames on video-model steps.",
}


def _knob(name: str):
    hi = 10.0 if name == "gamma" else 1.0
    return io.Float.Input(name, default=-1.0, min=-1.0, max=hi, step=0.01,
                          tooltip=f"{KNOBS[name]} -1 = the preset's value (preset 'custom' needs every knob set).")


def jvid_params(preset: str, smoothing: str, c_s: float, gamma_on_all_steps: bool, steps: int, **knobs) -> jvid.JVIDParams:
    """The JVIDParams of the node's widgets: the preset with every knob >= 0 (and smoothing other than 'preset')
    overriding it; 'custom' needs every knob. Raises ValueError naming the knob."""
    given = {k: v for k, v in knobs.items() if v is not None and v >= 0}
    if smoothing != "preset":
        given["smoothing"] = smoothing == "on"
    if c_s >= 0:
        given["c_s"] = c_s
    if preset == "custom":
        missing = [k for k in KNOBS if k not in given] + (["smoothing"] if "smoothing" not in given else [])
        if missing:
            raise ValueError(f"preset 'custom' needs every knob set; {', '.join(missing)} still say -1 / 'preset'")
        base = jvid.JVIDParams()
    else:
        base = jvid.PRESETS[preset]
    return dataclasses.replace(base, gamma_on_all_steps=gamma_on_all_steps, steps=steps, **given).checked()


def model_table(used: list, grid: list) -> str:
    """The model that ran at each step: a summary line, then 'step t model' rows."""
    n_v = sum(used)
    rows = [f"{i:>4} {t:>4} {'video' if v else 'image'}" for i, (t, v) in enumerate(zip(grid, used))]
    return f"video model {n_v}/{len(used)} steps, image model {len(used) - n_v}\nstep    t model\n" + "\n".join(rows)


class VBJVIDSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBJVIDSample", display_name="JVID Sample (mixture of denoisers, VideoBridge)",
            category="VideoBridge/JVID",
            description="JVID text-to-video: one DDPM reverse diffusion that, at every step, uses the video model "
                        "(motion) or the image model (per-frame quality) with probability P_V, which falls from 1 to "
                        "p_e and then towards p_f as sampling progresses. Optional entropy reduction (frame-shared "
                        "noise, gamma) and temporal latent smoothing. Outputs the latent and which model ran when.",
            inputs=[
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 checkpoint: the image model (or connect a native MODEL to "
                                               "model instead)."),
                types.VideoModel.Input("video_model",
                                       tooltip="AnimateDiff (default in the paper's spirit) or ZeroScope: its schedule "
                                               "is the sampler's; the image model follows by equal alpha-bar."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Prompt of the image model (a native model takes positive/negative instead; "
                                        "the video model then uses video_prompt, or this one when that is empty)."),
                io.String.Input("video_prompt", multiline=True, default="",
                                tooltip="Prompt of the video model (empty = the same prompt)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt of both models."),
                widgets.seed(),
                io.Int.Input("width", default=256, min=8, max=4096, step=8, tooltip="Video width (multiple of 8)."),
                io.Int.Input("height", default=256, min=8, max=4096, step=8, tooltip="Video height (multiple of 8)."),
                io.Int.Input("frames", default=16, min=1, max=1024, tooltip="Frame count (the paper uses 16)."),
                widgets.steps(50, what="DDPM", tooltip="DDPM steps N on the video model's grid (the paper uses 50)."),
                io.Float.Input("cfg", default=2.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance of both models. The paper's 2.0 was tuned for models "
                                       "trained from scratch; pretrained SD-family models usually want 7-7.5."),
                io.Combo.Input("preset", options=PRESETS, default="256",
                               tooltip="Paper Table 6 settings by resolution: '256' (plain mixture, the default), "
                                       "'128' and '64' (with entropy reduction and smoothing; try 128 if the output "
                                       "flickers), or 'custom' (set every knob below)."),
                *[_knob(k) for k in KNOBS],
                io.Combo.Input("smoothing", options=SMOOTHING, default="preset",
                               tooltip="Temporal latent smoothing after sampling: as the preset says, on or off."),
                io.Float.Input("c_s", default=-1.0, min=-1.0, max=100.0, step=0.1,
                               tooltip="Smoothing threshold: latent voxels whose normalised distance to the temporal "
                                       "mean is below c_s become that mean. -1 = the preset's (2)."),
                widgets.advanced(io.Boolean.Input("gamma_on_all_steps", default=False,
                                 tooltip="Apply gamma to video-model steps too (the paper applies it to image steps).")),
                widgets.advanced(io.Combo.Input("image_timesteps", options=MAPPING, default=MAPPING[0],
                               tooltip="How the image model is called at the video schedule's noise level: the nearest "
                                       "integer timestep of equal alpha-bar, or the interpolated float timestep.")),
                widgets.frame_batch(),
                *widgets.native_image_model("the image model"),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent video (VAEDecode-able)."),
                     io.String.Output(display_name="model_per_step",
                                      tooltip="Which model ran at each step (also shown under the node while it runs).")])

    @classmethod
    def execute(cls, video_model, prompt, video_prompt, negative_prompt, seed, width, height, frames, steps, cfg,
                preset, t_v, t_e, p_e, p_f, gamma, r_i, r_v, smoothing, c_s, gamma_on_all_steps, image_timesteps,
                frame_batch_size, image_model=None, model=None, positive=None, negative=None) -> io.NodeOutput:
        node = "VBJVIDSample"
        vm = video_model.model
        try:
            params = jvid_params(preset, smoothing, c_s, gamma_on_all_steps, steps, t_v=t_v, t_e=t_e, p_e=p_e,
                                 p_f=p_f, gamma=gamma, r_i=r_i, r_v=r_v)
            check_size("width/height", height, width)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        if native.one_model(node, "image_model", image_model, model, "VBLoadImageModel"):
            schedule = native.schedule_of(model, f"{node}: model")
            fmt = model.model.latent_format
            in_channels, scale = fmt.latent_channels, fmt.scale_factor
            conds = native.conds(node, positive, negative, native.cfg_need(cfg))
            if image_timesteps == MAPPING[1]:
                raise ValueError(f"{node}: image_timesteps: a native MODEL is evaluated at integer timesteps only; "
                                 f"use '{MAPPING[0]}'")
        else:
            m = image_model.model
            if m.variant != "base":
                raise ValueError(f"{node}: image_model: JVID needs a base SD1.5 text-to-image model (4-channel "
                                 f"UNet); this is an {m.variant} model")
            schedule, in_channels, scale = m.schedule, m.unet.config.in_channels, vae_scale(m.vae)
        if vm.unet.config.in_channels != in_channels or abs(latent_scale(video_model) - scale) > 1e-6:
            raise ValueError(f"{node}: video_model: its latents ({vm.unet.config.in_channels} channels, scale "
                             f"{latent_scale(video_model)}) differ from the image model's ({in_channels}, {scale}); "
                             "both must use the SD VAE latent space")
        grid = vm.schedule.timesteps(steps, "leading")
        progress = runtime.Progress(steps)
        text_v, null_v = runtime.encode(video_model, [video_prompt or prompt, negative_prompt]).split(1)
        hw = (height // 8, width // 8)
        shape = (1, 4, frames, height // 8, width // 8)
        counts = {True: 0, False: 0}

        def on_step(i, t, video):
            counts[video] += 1
            runtime.progress_text(f"step {i + 1}/{steps} (t = {t}): {'video' if video else 'image'} model\n"
                                  f"so far: video {counts[True]}, image {counts[False]}")

        def sample(image_denoiser, image_guidance, image_patcher=None):
            device = runtime.load(image_patcher, video_model.unet, latent_hw=hw,
                                  rows=max(2 * frames, runtime.video_rows(video_model, frames, 1 + (cfg > 1))))
            return jvid.jvid_sample(
                image_denoiser, runtime.video_denoiser(video_model), shape, image_guidance,
                cfg_guidance(Branch(text_v), Branch(null_v), cfg), seed, params, device=device,
                exact_mapping=image_timesteps == MAPPING[1], callbacks=progress.callbacks, on_step=on_step)

        if model is not None:                     # the VB video model is loaded inside, after ComfyUI loaded MODEL
            z, used = native.run(model, conds, torch.zeros(shape), grid, schedule,
                                 lambda den: sample(den, native.guidance(cfg)), seed=seed)
        else:
            text_i, null_i = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
            z, used = sample(UNet2DDenoiser(m.unet, m.schedule, frame_batch_size=runtime.frame_chunk(
                frame_batch_size, frames, 2, hw)), cfg_guidance(Branch(text_i), Branch(null_i), cfg), image_model.unet)
        table = model_table(used, grid)
        runtime.progress_text(table.split("\n")[0])
        return io.NodeOutput(runtime.to_latent(z, scale), table)


class VBTemporalLatentSmoothing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBTemporalLatentSmoothing", display_name="Temporal Latent Smoothing (JVID, VideoBridge)",
            category="VideoBridge/JVID",
            description="JVID's temporal latent smoothing on any video latent: every latent voxel whose normalised "
                        "distance to the clip's temporal mean is below c_s becomes that mean (static areas stop "
                        "flickering); moving areas are kept exactly.",
            inputs=[io.Latent.Input("latent", tooltip="A video latent [frames, 4, h, w] (any pack's)."),
                    io.Float.Input("c_s", default=2.0, min=0.01, max=100.0, step=0.1,
                                   tooltip="Threshold on the channel-summed normalised distance (paper: 2). Higher "
                                           "smooths more.")],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The smoothed latent.")])

    @classmethod
    def execute(cls, latent, c_s) -> io.NodeOutput:
        z = runtime.from_latent(latent, "latent", 1.0, "cpu")               # distance is scale-invariant
        try:
            out = jvid.temporal_latent_smoothing(z, c_s)
        except ValueError as e:
            raise ValueError(f"VBTemporalLatentSmoothing: {e}") from None
        samples = rearrange(out, "1 c f h w -> f c h w").to(latent["samples"].device, torch.float32)
        return io.NodeOutput(dict(latent, samples=samples))
