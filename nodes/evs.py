"""EVS as nodes: the encapsulated [T2V] block alone, and the whole T2I + [T2V] + T2I refinement of a video.

A thin skin over ``core.evs`` (METHODS.md §5). Knobs carry the paper's names (s1, t_T2V, t_V, n_V, gamma).
"""
from __future__ import annotations

import dataclasses

from ..core import evs
from ..core.context import video_noise
from ..core.denoisers import Branch, UNet2DDenoiser
from ..core.denoisers import cfg as cfg_guidance
from ..core.latents import decode_video, encode_video, vae_scale
from ..core.samplers import initial_noise
from . import native, runtime, types, widgets
from .api import io
from .bivdiff import latent_scale

D = evs.EVSParams()
BLOCK = {"sdedit": "sdedit", "inversion + SFI": "inversion_sfi"}
RENOISE = {"initial noise": "initial", "fresh noise": "fresh"}


def _t2v_steps():
    return widgets.steps(D.t2v_steps, name="t2v_steps",
                         tooltip="T_V: size of the T2V grid (8 for AnimateDiff-Lightning 8-step).")


def _t_v():
    return io.Int.Input("t_V", default=D.t_V, min=0, max=999,
                        tooltip="T2V timestep the block starts from; must be on the T2V grid (8-step trailing: 999, "
                                "874, 749, 624, 499, 374, 249, 124). Larger removes more flicker but pulls the look "
                                "towards the video model.")


def _n_v():
    return io.Int.Input("n_V", default=D.n_V, min=1, max=1000,
                        tooltip="Number of T2V evaluations in the block, from t_V down the grid (4 = to the end of "
                                "the 8-step grid). The block returns the clean latent the last one predicts.")


def _block():
    return io.Combo.Input("block", options=list(BLOCK), default="sdedit",
                          tooltip="How the T2V block starts: 'sdedit' noises the latent to t_V (paper Eq. 9, "
                                  "default); 'inversion + SFI' DDIM-inverts it to t_V and injects the inversion's "
                                  "attention features while denoising (Selective Feature Injection, Eq. 11: keeps "
                                  "more of the frames, for styles the video model does not know).")


def _fixed_point():
    return widgets.advanced(io.Int.Input("fixed_point_iterations", default=0, min=0, max=10,
                        tooltip="'inversion + SFI' only: extra T2V calls per inversion step that solve the implicit "
                                "DDIM equation (measured on tiny models: 3 iterations reproduce the block's input to "
                                "under 1e-3 relative, 10x better than none); 0 = plain DDIM inversion."))


def _named(node: str, e: ValueError) -> ValueError:
    """The error with the node's name in front (once)."""
    return ValueError(str(e) if str(e).startswith(node) else f"{node}: {e}")


def _check_image_model(node: str, image_model) -> None:
    if image_model.model.variant != "base":
        raise ValueError(f"{node}: image_model: EVS refines with a base SD1.5 text-to-image model (4-channel UNet); "
                         f"this is an {image_model.model.variant} model")


class VBEncapsulatedT2V(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBEncapsulatedT2V", display_name="Encapsulated T2V Block (EVS, VideoBridge)",
            category="VideoBridge/EVS",
            description="The EVS [T2V] block alone: a clean latent video in, a temporally consistent clean latent "
                        "out. The video model SDEdits it from t_V for n_V steps (default), or inverts it to t_V and "
                        "denoises with Selective Feature Injection. VBEVSRefine runs it inside the T2I denoising.",
            inputs=[
                types.VideoModel.Input("video_model", optional=True,
                                       tooltip="AnimateDiff (Lightning: load it with the trailing grid) or "
                                               "ZeroScope/ModelScope; or connect a native motion MODEL to model."),
                io.Latent.Input("latent", tooltip="Clean latent video (VBEncodeFrames, VBFramewiseGenerate)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="Prompt of the video model."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (only used with cfg > 1)."),
                widgets.seed(),
                _t2v_steps(),
                _t_v(),
                _n_v(),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="T2V classifier-free guidance (1 for AnimateDiff-Lightning)."),
                _block(),
                widgets.sfi_layers(),
                widgets.sfi_gamma(),
                _fixed_point(),
                widgets.bank_storage(),
                widgets.bank_budget(),
                widgets.attention_bank_input(),
                *widgets.native_video_model(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Clean, temporally smoothed latent video.")])

    @classmethod
    def execute(cls, latent, prompt, negative_prompt, seed, t2v_steps, t_V, n_V, cfg, block, sfi_layers, sfi_gamma,
                fixed_point_iterations, bank_storage, bank_budget_gb, video_model=None, attention_bank=None,
                model=None, positive=None, negative=None) -> io.NodeOutput:
        node = "VBEncapsulatedT2V"
        if runtime.is_noisy(latent):
            raise ValueError(f"{node}: latent: it is noisy (timestep {latent['vb_timestep']}); the block takes a "
                             "clean latent (VBEncodeFrames)")
        is_native = native.one_model(node, "video_model", video_model, model, "VBLoadVideoModel")
        if is_native:
            conds = native.conds(node, positive, negative, native.cfg_need(cfg))
            schedule, scale = native.schedule_of(model, f"{node}: model"), model.model.latent_format.scale_factor
            denoiser, spacing = native.NativeDenoiser(model, schedule, "video"), "leading"
        else:
            scale, spacing = latent_scale(video_model), video_model.model.spacing
            denoiser = runtime.video_denoiser(video_model)
        dtype, where = widgets.storage(bank_storage)
        params = evs.EVSParams(t2v_steps=t2v_steps, t2v_spacing=spacing, t_V=t_V, n_V=n_V, block=BLOCK[block],
                               sfi_layers=sfi_layers, sfi_gamma=sfi_gamma, fixed_point_iters=fixed_point_iterations,
                               bank_dtype=dtype, bank_device=where, bank_budget_gib=bank_budget_gb)
        z = runtime.from_latent(latent, "latent", scale, runtime.mm.intermediate_device())
        if attention_bank is not None:                                  # injected, not captured: no bank to budget
            params = dataclasses.replace(params, bank_budget_gib=0.0)
        try:
            grid_v = evs.check_block(denoiser, z.shape, params, node)
        except ValueError as e:
            raise _named(node, e) from None
        progress = runtime.Progress(n_V + (len(grid_v) if params.block == "inversion_sfi" else 0))

        def block_on(den, z, guidance):
            try:
                return evs.t2v_block(den, z, grid_v, n_V, guidance, mode=params.block,
                                     noise=video_noise(den, initial_noise(z.shape, seed + evs.STREAMS["t2v"]),
                                                       seed).to(z.device),
                                     bank=attention_bank, sfi_layers=sfi_layers, sfi_gamma=sfi_gamma,
                                     fixed_point_iters=fixed_point_iterations, bank_dtype=dtype, bank_device=where,
                                     callbacks=progress.callbacks)
            except ValueError as e:
                raise _named(node, e) from None

        if is_native:
            z = z.to(runtime.mm.get_torch_device())
            out = native.run(model, conds, z, grid_v, schedule, lambda den: block_on(den, z, native.guidance(cfg)),
                             kind="video", seed=seed)
            return io.NodeOutput(runtime.to_latent(out, scale))
        text, null = runtime.encode(video_model, [prompt, negative_prompt]).split(1)
        device = runtime.load(video_model.unet, rows=runtime.video_rows(video_model, z.shape[2], 1 + (cfg > 1)),
                              latent_hw=tuple(z.shape[-2:]))
        out = block_on(denoiser, z.to(device), cfg_guidance(Branch(text), Branch(null), cfg))
        return io.NodeOutput(runtime.to_latent(out, scale))


class VBEVSRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBEVSRefine", display_name="EVS Refine Video (VideoBridge)", category="VideoBridge/EVS",
            description="EVS: makes a weak or flickering video (e.g. an AnimateDiff output) sharper and temporally "
                        "consistent. The frames are upscaled, noised to the T2I strength s1 and denoised by the "
                        "image model; at t_T2V its predicted clean frames go through the video model's [T2V] block "
                        "and are re-noised, and the image model finishes. Every knob carries the paper's name.",
            inputs=[
                io.Image.Input("images", tooltip="The video to refine [frames, H, W, 3]."),
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 checkpoint (the paper uses epiCRealism); or connect a native "
                                               "MODEL to model instead."),
                types.VideoModel.Input("video_model",
                                       tooltip="AnimateDiff-Lightning on the same checkpoint, loaded with the "
                                               "trailing grid (paper setting); any VideoBridge video model works."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What the video shows; used by both "
                                                                              "models."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt of the image model's guidance."),
                widgets.seed(),
                io.Float.Input("upscale", default=2.0, min=0.25, max=4.0, step=0.25,
                               tooltip="Resize factor in pixel space before refining (paper: 2.0; 1.0 is about 4x "
                                       "faster). Sizes are rounded down to multiples of 8."),
                io.Float.Input("s1", default=D.s1, min=0.02, max=1.0, step=0.02,
                               tooltip="T2I noising strength: the share of the T2I grid re-run (0.4 = from timestep "
                                       "381 of 50 steps). Higher changes the frames more."),
                widgets.steps(D.t2i_steps, name="t2i_steps", tooltip="T1: size of the T2I DDIM grid (50)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="g_I: classifier-free guidance of the image model."),
                io.Int.Input("t_T2V", default=D.t_T2V, min=1, max=999,
                             tooltip="T2I timestep where the T2V block is encapsulated; must be on the T2I grid "
                                     "below the start (50 steps: ..., 221, 201, 181, ...). Larger gives better "
                                     "imaging but less consistency."),
                _t2v_steps(),
                _t_v(),
                _n_v(),
                io.Float.Input("t2v_cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance of the video model (1 for Lightning)."),
                _block(),
                widgets.advanced(io.Combo.Input("renoise", options=list(RENOISE), default="initial noise",
                               tooltip="eps_r, the noise that re-noises the T2V result to t_T2V: the initial SDEdit "
                                       "noise (default) or a fresh draw.")),
                widgets.sfi_layers(),
                widgets.sfi_gamma(),
                _fixed_point(),
                widgets.frame_batch(8),
                widgets.bank_storage(),
                widgets.bank_budget(),
                *widgets.native_image_model("the T2I image model (the video model still reads prompt)", vae=True),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The refined frames (upscaled size)."),
                     io.Latent.Output(display_name="latent", tooltip="The refined latent video.")])

    @classmethod
    def execute(cls, images, video_model, prompt, negative_prompt, seed, upscale, s1, t2i_steps, cfg, t_T2V,
                t2v_steps, t_V, n_V, t2v_cfg, block, renoise, sfi_layers, sfi_gamma, fixed_point_iterations,
                frame_batch_size, bank_storage, bank_budget_gb, image_model=None, model=None, positive=None,
                negative=None, vae=None) -> io.NodeOutput:
        node = "VBEVSRefine"
        vm = video_model.model
        dtype, where = widgets.storage(bank_storage)
        params = evs.EVSParams(t2i_steps=t2i_steps, s1=s1, t_T2V=t_T2V, t2v_steps=t2v_steps, t2v_spacing=vm.spacing,
                               t_V=t_V, n_V=n_V, block=BLOCK[block], renoise=RENOISE[renoise],
                               sfi_layers=sfi_layers, sfi_gamma=sfi_gamma, fixed_point_iters=fixed_point_iterations,
                               bank_dtype=dtype, bank_device=where, bank_budget_gib=bank_budget_gb)
        pixels = evs.upscale_pixels(runtime.image_to_video(images, "images", "cpu"), upscale)
        n, H, W = pixels.shape[2:]
        if native.one_model(node, "image_model", image_model, model, "VBLoadImageModel"):
            conds = native.conds(node, positive, negative, native.cfg_need(cfg))
            native.need(node, "vae", vae)
            schedule, scale = native.schedule_of(model, f"{node}: model"), model.model.latent_format.scale_factor
            image = native.NativeDenoiser(model, schedule)           # for plan's checks; the run makes the live one
        else:
            _check_image_model(node, image_model)
            m = image_model.model
            scale = vae_scale(m.vae)
            image = UNet2DDenoiser(m.unet, m.schedule, frame_batch_size=frame_batch_size or None)
        video = runtime.video_denoiser(video_model)
        try:                                                            # every setting checked before any work
            grid_i, _, _, grid_v = evs.plan(image, video, (1, 4, n, H // 8, W // 8), params, node)
        except ValueError as e:
            raise _named(node, e) from None
        vae_passes = 0 if model is not None else 2 * -(-n // 8)        # a ComfyUI VAE shows its own progress
        progress = runtime.Progress(evs.unet_calls(params, grid_v, per_step=True) + vae_passes)
        cb = progress.callbacks
        text_v, null_v = runtime.encode(video_model, [prompt, ""]).split(1)
        rows, hw = 2 * (frame_batch_size or n), (H // 8, W // 8)
        video_guidance = cfg_guidance(Branch(text_v), Branch(null_v), t2v_cfg)

        def refine(image_denoiser, image_guidance, z0):
            return evs.evs_refine(image_denoiser, video, z0.to(runtime.mm.get_torch_device()), image_guidance,
                                  video_guidance, seed, params, callbacks=cb)

        if model is not None:
            z0 = native.vae_encode(vae, pixels, scale)

            def loop(den):                        # the VB video model is loaded after ComfyUI loaded MODEL
                runtime.load(video_model.unet, rows=rows, latent_hw=hw)
                return refine(den, native.guidance(cfg), z0)

            z = native.run(model, conds, z0, grid_i, schedule, loop, seed=seed)
            return io.NodeOutput(native.vae_decode(vae, z, scale), runtime.to_latent(z, scale))
        text_i, null_i = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
        device = runtime.load(image_model.vae)
        z0 = encode_video(m.vae, pixels.to(device), callbacks=cb)
        runtime.load(image_model.unet, video_model.unet, rows=rows, latent_hw=hw)
        image.frame_batch_size = runtime.frame_chunk(frame_batch_size, n, 2, hw)
        z = refine(image, cfg_guidance(Branch(text_i), Branch(null_i), cfg), z0)
        runtime.load(image_model.vae)
        out = decode_video(m.vae, z, callbacks=cb)
        return io.NodeOutput(runtime.video_to_image(out), runtime.to_latent(z, scale))
