"""BIVDiff as nodes: frame-wise generation -> DDIM inversion (image / video) -> Mixed Inversion -> temporal smoothing.

A thin skin over ``core.bivdiff`` (METHODS.md §2). A noisy LATENT (after inversion) carries ``vb_timestep``,
``vb_schedule`` and ``vb_grid``; VBMixLatents and VBVideoDenoise check them and refuse a mismatch.
"""
from __future__ import annotations

import contextlib

import torch

from ..core import bivdiff, evs
from ..core import prompt2prompt as P2P
from ..core.attention import FeatureBank, check_gamma
from ..core.context import video_noise
from ..core.denoisers import Branch, UNet2DDenoiser, on_schedule, single
from ..core.denoisers import cfg as cfg_guidance
from ..core.latents import check_size, decode_video, encode_video, vae_scale
from ..core.samplers import ddim_invert, initial_noise, sdedit
from . import native, runtime, types, widgets
from .api import io

INVERT_WITH = ["image model (frame-wise)", "video model (whole clip)"]
CAPTURE = ["off", *widgets.PRESETS, "custom"]


def latent_scale(video_model=None, image_model=None) -> float:
    vae = None
    if video_model is not None:
        vae = video_model.model.vae or (video_model.image.model.vae if video_model.image else None)
    if vae is None and image_model is not None:
        vae = image_model.model.vae
    return vae_scale(vae) if vae is not None else 0.18215


class VBFramewiseGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBFramewiseGenerate", display_name="Frame-wise Generate (VideoBridge)",
            category="VideoBridge/BIVDiff",
            description="BIVDiff step 1: every frame generated independently by the image model, batched (DDIM, "
                        "classifier-free guidance). The task follows the inputs: a ControlNet or T2I-Adapter with hint frames; an "
                        "InstructPix2Pix model with source frames; an inpainting model with frames and a MASK "
                        "(outpainting = a mask over the borders); or text only. Outputs the frames and their "
                        "re-encoded latent for VBDDIMInvert.",
            inputs=[
                types.ImageModel.Input("image_model", tooltip="SD1.5 base, inpainting or InstructPix2Pix model."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Prompt (the edit instruction for InstructPix2Pix)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt; the unconditional branch of guidance."),
                widgets.seed(),
                widgets.steps(),
                io.Float.Input("cfg", default=bivdiff.DEFAULT_CFG, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale (text guidance for InstructPix2Pix)."),
                io.Int.Input("width", default=256, min=8, max=4096, step=8,
                             tooltip="Width for text-only generation (otherwise the input frames' size)."),
                io.Int.Input("height", default=256, min=8, max=4096, step=8,
                             tooltip="Height for text-only generation (otherwise the input frames' size)."),
                io.Int.Input("frames", default=8, min=1, max=4096,
                             tooltip="Frame count for text-only generation or a single hint image (otherwise the "
                                     "input frames' count)."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="ControlNet conditioning scale, or the T2I-Adapter's feature scale."),
                io.Float.Input("image_guidance", default=bivdiff.DEFAULT_IMAGE_GUIDANCE, min=0.0, max=10.0,
                               step=0.05, tooltip="Image guidance scale s_I (InstructPix2Pix only)."),
                widgets.frame_batch(),
                types.ControlNet.Input("controlnet", optional=True,
                                       tooltip="ControlNet or T2I-Adapter (VBLoadControlNet) applied to every frame."),
                io.Image.Input("hints", optional=True,
                               tooltip="Control hint frames (e.g. Canny edges of the source video), one per frame or "
                                       "one for all."),
                io.Image.Input("images", optional=True,
                               tooltip="Source frames: the video to edit (InstructPix2Pix) or to inpaint/outpaint."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpainting mask, 1 = repaint; one per frame or one for all."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The generated frames."),
                     io.Latent.Output(display_name="latent",
                                      tooltip="The frames re-encoded by the VAE (BIVDiff's Z0), for VBDDIMInvert.")])

    @classmethod
    def execute(cls, image_model, prompt, negative_prompt, seed, steps, cfg, width, height, frames,
                control_strength, image_guidance, frame_batch_size, controlnet=None, hints=None, images=None,
                mask=None) -> io.NodeOutput:
        m = image_model.model
        task = {"instruct_pix2pix": "instruct_pix2pix", "inpainting": "inpaint"}.get(
            m.variant, "controlnet" if controlnet is not None else "text")
        _check_task_inputs(m.variant, task, controlnet, hints, images, mask)
        if images is not None:
            n, H, W = images.shape[0], images.shape[1], images.shape[2]
        elif hints is not None:                                         # one hint for all: the frames widget
            n, H, W = (hints.shape[0] if hints.shape[0] > 1 else frames), hints.shape[1], hints.shape[2]
        else:
            n, H, W = frames, height, width
        check_size("images" if images is not None else ("hints" if hints is not None else "width/height"), H, W)
        vae = m.vae
        chunks = -(-n // 8)
        progress = runtime.Progress(steps + 2 * chunks + (chunks if images is not None else 0), preview_every=1)
        cb = progress.callbacks

        text, null = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
        concat = control = None
        if images is not None:
            device = runtime.load(image_model.vae)
            pixels = runtime.image_to_video(images, "images", device)
            if task == "instruct_pix2pix":
                concat = bivdiff.ip2p_image_latent(vae, pixels, callbacks=cb)
            else:
                concat = bivdiff.inpaint_concat(vae, pixels, runtime.mask_to_core(mask, "mask", n, (H, W)),
                                                callbacks=cb)
        if controlnet is not None:
            control = runtime.hints_to_core(hints, "hints", n, (H, W))
        guidance = bivdiff.idm_guidance(task, text, null, cfg_scale=cfg, image_scale=image_guidance,
                                        control=control, concat=concat)

        K = len(guidance.branches)
        device = runtime.load(image_model.unet, controlnet.patcher if controlnet is not None else None,
                              rows=K * n, latent_hw=(H // 8, W // 8))
        try:
            denoiser = UNet2DDenoiser(m.unet, m.schedule, controlnet=controlnet.model if controlnet else None,
                                      control_scale=control_strength,
                                      frame_batch_size=runtime.frame_chunk(frame_batch_size, n, K, (H // 8, W // 8)))
        except ValueError as e:
            raise ValueError(f"VBFramewiseGenerate: controlnet: {e}") from None
        noise = initial_noise((1, 4, n, H // 8, W // 8), seed).to(device)
        z = bivdiff.framewise_generate(denoiser, noise, m.schedule.timesteps(steps), guidance,
                                       callbacks=cb)
        runtime.load(image_model.vae)
        pixels = decode_video(vae, z, callbacks=cb)
        z0 = encode_video(vae, pixels, callbacks=cb)                      # Z0 = E(D(z)), METHODS.md §2.2
        return io.NodeOutput(runtime.video_to_image(pixels), runtime.to_latent(z0, vae_scale(vae)))


def _check_task_inputs(variant, task, controlnet, hints, images, mask):
    if controlnet is not None and hints is None:
        raise ValueError("VBFramewiseGenerate: hints: a ControlNet is connected but no hint frames are")
    if hints is not None and controlnet is None:
        raise ValueError("VBFramewiseGenerate: controlnet: hint frames are connected but no ControlNet is")
    if task == "instruct_pix2pix":
        if images is None:
            raise ValueError("VBFramewiseGenerate: images: an InstructPix2Pix model edits source frames; connect "
                             "the video to edit")
        if controlnet is not None:
            raise ValueError("VBFramewiseGenerate: controlnet: ControlNet with InstructPix2Pix is not supported")
        if mask is not None:
            raise ValueError("VBFramewiseGenerate: mask: an InstructPix2Pix model takes no mask; disconnect it "
                             "(masked repainting needs an SD inpainting model)")
    if task == "inpaint" and (images is None or mask is None):
        raise ValueError("VBFramewiseGenerate: images and mask: an inpainting model needs the source frames and a "
                         "MASK (1 = repaint)" + (" — the mask is missing" if images is not None else ""))
    if task in ("text", "controlnet") and (images is not None or mask is not None):
        raise ValueError(f"VBFramewiseGenerate: images/mask are only used by inpainting and InstructPix2Pix "
                         f"models; this image_model is a {variant} model")


P2P_INVERSION = ["empty prompt", "source prompt"]


class VBPrompt2PromptEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBPrompt2PromptEdit", display_name="Prompt2Prompt Edit (VideoBridge)",
            category="VideoBridge/BIVDiff",
            description="BIVDiff's Prompt2Prompt frame-wise editing: change one thing in a video by changing one word of "
                        "its prompt ('a cat ...' -> 'a dog ...') while the rest keeps its layout. Every source frame "
                        "is DDIM-inverted by the base SD1.5 model, then denoised twice in one batch, with the source "
                        "and the edit prompt, the edit copy reusing the source's attention maps. Without images it "
                        "edits generated frames (both copies from the same seeded noise). Outputs the edited frames "
                        "and their re-encoded latent for VBDDIMInvert (BIVDiff alpha 0.25).",
            inputs=[
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 model (4-channel UNet); or connect a native MODEL, CLIP "
                                               "and VAE to model, clip and vae."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="Describes the source video, e.g. 'a cat sitting on grass'."),
                io.String.Input("edit_prompt", multiline=True, default="",
                                tooltip="The same description with the change, e.g. 'a dog sitting on grass'. "
                                        "replace: same number of words, the differing words are swapped; refine: "
                                        "words may be added or removed."),
                io.Combo.Input("mode", options=list(P2P.MODES), default="replace",
                               tooltip="replace: swap words (equal word counts); refine: add or change details, "
                                       "the token sequences are aligned."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt; the unconditional branch of guidance."),
                widgets.seed("Noise seed when no images are connected (generated frames); unused when editing a "
                             "video, whose noise comes from its inversion."),
                widgets.steps(),
                io.Float.Input("cfg", default=bivdiff.DEFAULT_CFG, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale."),
                io.Float.Input("n_cross", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps (the first, noisiest ones) whose cross-attention maps of "
                                       "the edit come from the source. Higher keeps more of the layout."),
                io.Float.Input("n_self", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps whose self-attention maps (on the coarse layers, 16x16 at "
                                       "512x512) come from the source. Higher keeps more of the shapes."),
                io.String.Input("reweight", default="",
                                tooltip="Make words of the edit prompt stronger or weaker: 'word:strength' entries, "
                                        "e.g. 'fluffy:2, red:0.5'. Empty: no reweighting."),
                io.String.Input("blend_source_words", default="",
                                tooltip="LocalBlend: words of the source prompt for the object that changes (e.g. "
                                        "'cat'). With blend_edit_words, only the region those words attend to is "
                                        "edited; the rest stays the source. Empty: off."),
                io.String.Input("blend_edit_words", default="",
                                tooltip="LocalBlend: words of the edit prompt for the new object (e.g. 'dog')."),
                io.Int.Input("width", default=256, min=8, max=4096, step=8,
                             tooltip="Width of generated frames (without images)."),
                io.Int.Input("height", default=256, min=8, max=4096, step=8,
                             tooltip="Height of generated frames (without images)."),
                io.Int.Input("frames", default=8, min=1, max=4096,
                             tooltip="Number of generated frames (without images)."),
                widgets.frame_batch(),
                io.Image.Input("images", optional=True, tooltip="Source frames to edit (the input video)."),
                widgets.advanced(io.Float.Input("blend_threshold", default=P2P.DEFAULT_THRESHOLD, min=0.01, max=0.99,
                                                step=0.01, optional=True, tooltip="LocalBlend mask threshold on the normalised word "
                                                                   "attention (0.3 in Prompt2Prompt).")),
                widgets.advanced(io.Combo.Input("inversion_prompt", options=P2P_INVERSION,
                                                default=P2P_INVERSION[0], optional=True,
                                                tooltip="Prompt of the frames' DDIM inversion: empty as in the "
                                                        "official BIVDiff code, or the source prompt (what its "
                                                        "comment intended).")),
                io.Model.Input("model", optional=True,
                               tooltip="A native base SD1.5 MODEL (CheckpointLoaderSimple, LoRAs, patches) instead of "
                                       "image_model; the attention edits go through ComfyUI's attention patches."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP of a native model: it encodes the three prompts (CLIP skip and CLIP "
                                      "LoRAs apply) and its tokenizer maps words to tokens. Plain words only: no "
                                      "'(word:1.2)' weighting or embeddings in the source and edit prompts."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE of a native model: encodes the source frames and decodes the edit."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The edited frames."),
                     io.Latent.Output(display_name="latent",
                                      tooltip="The edited frames re-encoded by the VAE (BIVDiff's Z0), for "
                                              "VBDDIMInvert."),
                     io.Image.Output(display_name="source_images",
                                     tooltip="The source copy: the inverted frames denoised with the source prompt. "
                                             "Far from the input means the inversion lost the video.")])

    @classmethod
    def execute(cls, source_prompt, edit_prompt, mode, negative_prompt, seed, steps, cfg, n_cross, n_self, reweight,
                blend_source_words, blend_edit_words, width, height, frames, frame_batch_size, image_model=None,
                images=None, blend_threshold=P2P.DEFAULT_THRESHOLD, inversion_prompt=P2P_INVERSION[0], model=None,
                clip=None, vae=None) -> io.NodeOutput:
        node = "VBPrompt2PromptEdit"
        for name, text in (("source_prompt", source_prompt), ("edit_prompt", edit_prompt)):
            if not text.strip():
                raise ValueError(f"{node}: {name} is empty; Prompt2Prompt edits a prompt into another")
        is_native = native.one_model(node, "image_model", image_model, model, "VBLoadImageModel")
        if is_native:
            native.need(node, "clip", clip)
            native.need(node, "vae", vae)
            tokenizer = native.clip_tokenizer(clip, f"{node}: clip")
            for name, text in (("source_prompt", source_prompt), ("edit_prompt", edit_prompt)):
                native.plain_prompt(clip, tokenizer, text, f"{node}: {name}")
            schedule = native.schedule_of(model, f"{node}: model")
        else:
            m = image_model.model
            if m.variant != "base":
                raise ValueError(f"{node}: image_model: Prompt2Prompt runs on a base SD1.5 model (4-channel UNet); "
                                 f"this is an {m.variant} model")
            tokenizer, schedule = m.tokenizer, m.schedule
        src_words, dst_words = P2P.parse_words(blend_source_words), P2P.parse_words(blend_edit_words)
        if bool(src_words) != bool(dst_words):
            raise ValueError(f"{node}: blend_{'edit' if src_words else 'source'}_words is empty; LocalBlend needs "
                             "words of both prompts (or neither)")
        try:
            edit = P2P.make_edit(tokenizer, source_prompt, edit_prompt, mode, steps, n_cross, n_self,
                                 P2P.parse_reweight(reweight), (src_words, dst_words) if src_words else None,
                                 blend_threshold)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        if images is not None:
            n, H, W = images.shape[0], images.shape[1], images.shape[2]
        else:
            n, H, W = frames, height, width
        check_size("images" if images is not None else "width/height", H, W)
        hw = (H // 8, W // 8)
        prompts = [source_prompt, edit_prompt, negative_prompt,
                   source_prompt if inversion_prompt == P2P_INVERSION[1] else ""]
        grid = schedule.timesteps(steps)
        if is_native:
            return cls.native(model, clip, vae, prompts, edit, grid, cfg, seed, images, n, hw, schedule)
        vae = m.vae
        chunks = -(-n // 8)
        progress = runtime.Progress((steps + chunks) * (2 if images is not None else 1) + 2 * chunks)
        cb = progress.callbacks
        src_t, dst_t, null_t, inv_t = runtime.encode(image_model, prompts).split(1)
        guidance = P2P.pair_guidance(src_t, dst_t, null_t, cfg, n)
        K = 1 + (cfg > 1)
        if images is not None:
            runtime.load(image_model.vae)
            z0 = encode_video(vae, runtime.image_to_video(images, "images", runtime.mm.get_torch_device()),
                              callbacks=cb)
        device = runtime.load(image_model.unet, rows=2 * K * n, latent_hw=hw)
        denoiser = UNet2DDenoiser(m.unet, m.schedule,
                                  frame_batch_size=runtime.frame_chunk(frame_batch_size, 2 * n, K, hw))
        if images is not None:
            z_src, z_edit = P2P.invert_and_edit(denoiser, z0.to(device), grid, edit, guidance, single(Branch(inv_t)),
                                                callbacks=cb)
        else:
            noise = initial_noise((1, 4, n, *hw), seed).to(device)
            z_src, z_edit = P2P.prompt2prompt(denoiser, noise, grid, edit, guidance, callbacks=cb)
        runtime.load(image_model.vae)
        edited = decode_video(vae, z_edit, callbacks=cb)
        source = decode_video(vae, z_src, callbacks=cb)
        z0_edit = encode_video(vae, edited, callbacks=cb)                 # Z0 = E(D(z)), METHODS.md §2.2
        return io.NodeOutput(runtime.video_to_image(edited), runtime.to_latent(z0_edit, vae_scale(vae)),
                             runtime.video_to_image(source))

    @staticmethod
    def native(model, clip, vae, prompts, edit, grid, cfg, seed, images, n, hw, schedule) -> io.NodeOutput:
        """Prompt2Prompt on a native MODEL (``nodes.native``): the prompts encoded by ``clip``; the source and edit
        copies get their prompts from one ``[2, 77, D]`` cond that ComfyUI repeats over the interleaved rows; the
        attention edits go through ComfyUI's attention patches; frames are encoded and decoded by ``vae``."""
        src, dst, null, inv = (clip.encode_from_tokens(clip.tokenize(p)) for p in prompts)
        conds = {"positive": [[torch.cat([src, dst]), {}]], "negative": [[null, {}]], "inversion": [[inv, {}]]}
        scale = model.model.latent_format.scale_factor
        progress = runtime.Progress(len(grid) * (2 if images is not None else 1))
        cb = progress.callbacks
        device = runtime.mm.get_torch_device()
        if images is not None:
            z0 = native.vae_encode(vae, runtime.image_to_video(images, "images", device), scale).to(device)

        def loop(den):
            if images is not None:
                return P2P.invert_and_edit(den, z0, grid, edit, native.guidance(cfg), single(Branch("inversion")),
                                           callbacks=cb)
            return P2P.prompt2prompt(den, initial_noise((1, 4, n, *hw), seed).to(device), grid, edit,
                                     native.guidance(cfg), callbacks=cb)

        z_src, z_edit = native.run(model, conds, torch.zeros(1, 4, 2 * n, *hw, device=device), grid, schedule, loop,
                                   seed=seed)
        edited = native.vae_decode(vae, z_edit, scale)
        z0_edit = native.vae_encode(vae, runtime.image_to_video(edited, "images", device), scale)   # Z0 = E(D(z))
        return io.NodeOutput(edited, runtime.to_latent(z0_edit, scale), native.vae_decode(vae, z_src, scale))


class VBDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBDDIMInvert", display_name="DDIM Invert (VideoBridge)", category="VideoBridge/BIVDiff",
            description="Deterministic DDIM inversion of a clean latent, with the image model frame by frame or with "
                        "the video model over the whole clip, on the video model's sampler grid; it ends exactly at "
                        "the timestep VBVideoDenoise starts from. Two of these plus VBMixLatents are BIVDiff's "
                        "Mixed Inversion.",
            inputs=[
                io.Latent.Input("latent", tooltip="Clean latent to invert (VBFramewiseGenerate or VBEncodeFrames)."),
                io.Combo.Input("invert_with", options=INVERT_WITH, default=INVERT_WITH[0],
                               tooltip="Which model inverts: the image model (frames independently) or the video "
                                       "model (whole clip)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Inversion prompt, no guidance. Empty (the null prompt) as in the paper; the "
                                        "official code used the negative prompt."),
                widgets.steps(what="inversion"),
                widgets.advanced(io.Int.Input("fixed_point_iterations", default=0, min=0, max=10,
                             tooltip="Extra UNet calls per step that solve the implicit DDIM equation, so sampling "
                                     "with the same prompt returns to the input. Measured on tiny models: 3 iterations "
                                     "cut the round-trip error from 0.11 to 5e-4 when the model is smooth in its "
                                     "input; on rough models it may not converge. 0 is plain DDIM inversion as in "
                                     "BIVDiff.")),
                widgets.frame_batch(),
                widgets.advanced(io.Boolean.Input("legacy_grid", default=False,
                                 tooltip="Parity with the official BIVDiff code: ends at timestep 998 instead of the "
                                         "sampler's first timestep. For comparisons only.")),
                widgets.advanced(io.Boolean.Input("inflated_groupnorm", default=False,
                                 tooltip="Parity with the official BIVDiff code (image model only): GroupNorm "
                                         "statistics pooled over all frames, as its inflated 3D UNet does.")),
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 model for frame-wise inversion."),
                types.VideoModel.Input("video_model", optional=True,
                                       tooltip="Video model: inverts the whole clip, and its schedule and steps define "
                                               "the grid (connect it for image inversion too)."),
                io.Combo.Input("capture_attention", options=CAPTURE, default=CAPTURE[0],
                               tooltip="Capture attention features (Q/K/V) during a video-model inversion for "
                                       "Selective Feature Injection in VBVideoDenoise / VBEncapsulatedT2V: 'shallow' "
                                       "(9 decoder self-attention layers), 'deep' (6), or 'custom' (custom_layers)."),
                io.String.Input("custom_layers", default="",
                                tooltip="Layers for capture_attention = custom: comma-separated names such as "
                                        "up_blocks.1.attentions.0.transformer_blocks.0.attn1 (spatial layers only)."),
                io.Int.Input("capture_steps", default=0, min=0, max=1000,
                             tooltip="Keep the features of this many of the noisiest steps (the first ones the "
                                     "denoiser injects); 0 = every step. Fewer steps, less memory."),
                widgets.bank_storage(),
                widgets.bank_budget(),
                io.Model.Input("model", optional=True,
                               tooltip="A native SD1.5 MODEL (CheckpointLoaderSimple, LoRAs, patches) instead of "
                                       "image_model for the frame-wise inversion, or a motion-injected one "
                                       "(AnimateDiff-Evolved) instead of video_model when invert_with is the video "
                                       "model (attention capture works on it); the inversion prompt is then the "
                                       "conditioning input."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Inversion prompt for a native model (CLIPTextEncode of an empty "
                                              "prompt, as in the paper)."),
            ],
            outputs=[io.Latent.Output(display_name="noisy_latent",
                                      tooltip="Inverted latent; it carries its timestep and schedule."),
                     types.AttentionBank.Output(display_name="attention_bank",
                                                tooltip="Captured attention features (empty when capture_attention "
                                                        "is off).")])

    @classmethod
    def execute(cls, latent, invert_with, prompt, steps, fixed_point_iterations, frame_batch_size, legacy_grid,
                inflated_groupnorm, image_model=None, video_model=None, capture_attention="off", custom_layers="",
                capture_steps=0, bank_storage=widgets.BANK_STORAGE[0], bank_budget_gb=8.0, model=None,
                conditioning=None) -> io.NodeOutput:
        node = "VBDDIMInvert"
        if runtime.is_noisy(latent):
            raise ValueError(f"{node}: latent: already noisy (timestep {latent['vb_timestep']}); invert a clean "
                             "latent from VBFramewiseGenerate or VBEncodeFrames")
        use_image = invert_with == INVERT_WITH[0]
        capture = capture_attention != CAPTURE[0]
        if capture and (use_image or legacy_grid):
            raise ValueError(f"{node}: capture_attention: features are captured from a video-model inversion on the "
                             f"sampler's grid; set invert_with to '{INVERT_WITH[1]}' and legacy_grid off")
        if model is not None:
            return cls.native(node, latent, use_image, steps, fixed_point_iterations, legacy_grid, inflated_groupnorm,
                              image_model, video_model, model, conditioning, capture_attention, custom_layers,
                              capture_steps, bank_storage, bank_budget_gb)
        if use_image and image_model is None:
            raise ValueError(f"{node}: image_model: invert_with is '{invert_with}' but no image_model is connected")
        if not use_image and video_model is None:
            raise ValueError(f"{node}: video_model: invert_with is '{invert_with}' but no video_model is connected")
        master = video_model.model.schedule if video_model is not None else image_model.model.schedule
        spacing = video_model.model.spacing if video_model is not None else "leading"
        grid = master.timesteps(steps, spacing)
        scale = latent_scale(video_model, image_model)
        progress = runtime.Progress(steps)
        frames, hw = latent["samples"].shape[-4 if latent["samples"].dim() == 4 else -3], \
            tuple(latent["samples"].shape[-2:])
        if use_image:
            m = image_model.model
            if m.variant != "base":
                raise ValueError(f"{node}: image_model: inversion needs a base SD1.5 model (4-channel UNet); this is "
                                 f"an {m.variant} model. Load the base checkpoint for inversion (BIVDiff inverts "
                                 "with the base SD1.5 UNet, not the task model).")
            emb = runtime.encode(image_model, [prompt])
            device = runtime.load(image_model.unet, rows=frames, latent_hw=hw)
            denoiser = on_schedule(UNet2DDenoiser(m.unet, m.schedule,
                                                  frame_batch_size=runtime.frame_chunk(frame_batch_size, frames, 1, hw),
                                                  inflated_groupnorm=inflated_groupnorm), master)
        else:
            emb = runtime.encode(video_model, [prompt])
            device = runtime.load(video_model.unet, rows=runtime.video_rows(video_model, frames), latent_hw=hw)
            denoiser = runtime.video_denoiser(video_model, master)
        z0 = runtime.from_latent(latent, "latent", scale, device)
        guidance = single(Branch(emb))
        dtype, where = widgets.storage(bank_storage)
        bank = FeatureBank(z0.shape[2], tuple(z0.shape[-2:]), master, dtype, where)
        if not capture:
            z = ddim_invert(denoiser, z0, grid, guidance, fixed_point_iters=fixed_point_iterations,
                            legacy_grid=legacy_grid, callbacks=progress.callbacks)
        else:
            layers, kept = cls.capture_plan(node, denoiser, capture_attention, custom_layers, grid, capture_steps,
                                            z0.shape, bank_budget_gb, dtype)
            z, bank = evs.sfi_invert(denoiser, z0, grid, guidance, layers, kept,
                                     fixed_point_iters=fixed_point_iterations, bank_dtype=dtype, bank_device=where,
                                     callbacks=progress.callbacks)
        return io.NodeOutput(runtime.to_latent(z, scale, timestep=grid[0], schedule=master, grid=grid), bank)

    @staticmethod
    def capture_plan(node, denoiser, capture_attention, custom_layers, grid, capture_steps, shape, budget_gb,
                     dtype) -> tuple:
        """The layers and timesteps to capture, ``(layers, kept)``, checked before any work: known spatial layers
        (errors name capture_attention or custom_layers) and a bank within ``budget_gb``."""
        try:
            layers = denoiser.attention_layers(custom_layers if capture_attention == "custom" else capture_attention)
        except ValueError as e:                                          # its message starts with "layers:"
            where_from = "custom_" if capture_attention == "custom" else f"capture_attention {capture_attention}: "
            raise ValueError(f"{node}: {where_from}{e}") from None
        kept = grid[:capture_steps] if capture_steps else grid
        evs.check_bank_budget(denoiser, layers, shape, len(kept), budget_gb, node, dtype)
        return layers, kept

    @classmethod
    def native(cls, node, latent, use_image, steps, fixed_point_iterations, legacy_grid, inflated_groupnorm,
               image_model, video_model, model, conditioning, capture_attention, custom_layers, capture_steps,
               bank_storage, bank_budget_gb) -> io.NodeOutput:
        """Inversion with a native ComfyUI MODEL (``nodes.native``): frame-wise with an SD1.5 MODEL, or over the
        whole clip with a motion-injected one (``invert_with`` video model; attention capture through ComfyUI's
        attention patches). The same core inversion on the same grid, so the result carries the same timestep,
        schedule and grid as with VB models."""
        if (image_model if use_image else video_model) is not None:
            raise ValueError(f"{node}: model and {'image' if use_image else 'video'}_model are both connected; "
                             f"connect one {'image' if use_image else 'video'} model")
        if conditioning is None:
            raise ValueError(f"{node}: conditioning: a native model needs its inversion prompt as CONDITIONING "
                             "(CLIPTextEncode with an empty prompt, as in the paper)")
        if inflated_groupnorm:
            raise ValueError(f"{node}: inflated_groupnorm is a parity option of the VB image model only")
        schedule = native.schedule_of(model, f"{node}: model")
        master = video_model.model.schedule if video_model is not None else schedule
        grid = master.timesteps(steps, video_model.model.spacing if video_model is not None else "leading")
        scale = latent_scale(video_model)
        z0 = runtime.from_latent(latent, "latent", scale, runtime.mm.get_torch_device())
        progress = runtime.Progress(steps)
        dtype, where = widgets.storage(bank_storage)
        kind = "image" if use_image else "video"
        capture = capture_attention != CAPTURE[0]
        if capture:
            layers, kept = cls.capture_plan(node, native.NativeDenoiser(model, schedule, kind), capture_attention,
                                            custom_layers, grid, capture_steps, z0.shape, bank_budget_gb, dtype)

        def loop(den):
            if capture:
                return evs.sfi_invert(den, z0, grid, single(Branch("positive")), layers, kept,
                                      fixed_point_iters=fixed_point_iterations, bank_dtype=dtype, bank_device=where,
                                      callbacks=progress.callbacks)
            return ddim_invert(on_schedule(den, master), z0, grid, single(Branch("positive")),
                               fixed_point_iters=fixed_point_iterations, legacy_grid=legacy_grid,
                               callbacks=progress.callbacks), FeatureBank(z0.shape[2], tuple(z0.shape[-2:]), master)

        z, bank = native.run(model, {"positive": conditioning}, z0, grid, schedule, loop, kind=kind)
        return io.NodeOutput(runtime.to_latent(z, scale, timestep=grid[0], schedule=master, grid=grid), bank)


class VBMixLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBMixLatents", display_name="Mix Latents (Mixed Inversion, VideoBridge)",
            category="VideoBridge/BIVDiff",
            description="BIVDiff Mixed Inversion: alpha * image-model inversion + (1 - alpha) * video-model "
                        "inversion. At alpha 1 (or 0) the other inversion is not needed and is not run.",
            inputs=[
                io.Latent.Input("latent_image", optional=True, lazy=True,
                                tooltip="Noisy latent from VBDDIMInvert with the image model."),
                io.Latent.Input("latent_video", optional=True, lazy=True,
                                tooltip="Noisy latent from VBDDIMInvert with the video model."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Image share alpha. Paper defaults: 1.0 ControlNet and InstructPix2Pix, "
                                       "0.1 inpainting/outpainting, 0.25 Prompt2Prompt."),
            ],
            outputs=[io.Latent.Output(display_name="noisy_latent", tooltip="The mixed noisy latent Z_T.")])

    @classmethod
    def check_lazy_status(cls, alpha, latent_image=None, latent_video=None):
        need = []
        if alpha > 0.0 and latent_image is None:
            need.append("latent_image")
        if alpha < 1.0 and latent_video is None:
            need.append("latent_video")
        return need

    @classmethod
    def execute(cls, alpha, latent_image=None, latent_video=None) -> io.NodeOutput:
        node = "VBMixLatents"
        alpha = bivdiff.check_alpha(alpha)
        used = [(n, l) for n, l, w in (("latent_image", latent_image, alpha), ("latent_video", latent_video,
                                                                                 1 - alpha)) if w > 0]
        for name, lat in used:
            if lat is None:
                raise ValueError(f"{node}: {name}: alpha = {alpha} needs this input; connect it")
            if not runtime.is_noisy(lat):
                raise ValueError(f"{node}: {name}: not an inverted latent (no timestep); connect VBDDIMInvert")
        if len(used) == 2:
            a, b = latent_image, latent_video
            for key in runtime.LATENT_KEYS:
                if a[key] != b[key]:
                    raise ValueError(f"{node}: the two inversions differ in {key} ({a[key]!s:.60} vs {b[key]!s:.60});"
                                     " invert both with the same video_model and steps")
        mixed = bivdiff.mix_latents(latent_image["samples"] if latent_image else None,
                                    latent_video["samples"] if latent_video else None, alpha)
        ref = used[0][1]
        return io.NodeOutput(dict({k: ref[k] for k in runtime.LATENT_KEYS}, samples=mixed))


class VBVideoDenoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBVideoDenoise", display_name="Video Denoise (VideoBridge)", category="VideoBridge/BIVDiff",
            description="DDIM sampling with the video model. From an inverted latent it is BIVDiff's temporal "
                        "smoothing (starting exactly where the inversion ended); from a clean latent it is SDEdit "
                        "with the given strength. With an attention_bank (VBDDIMInvert, capture_attention on) it "
                        "injects the inversion's attention features (EVS Selective Feature Injection) at every step "
                        "the bank holds.",
            inputs=[
                types.VideoModel.Input("video_model", optional=True,
                                       tooltip="AnimateDiff or ZeroScope/ModelScope video model (or connect a native "
                                               "motion MODEL to model instead)."),
                io.Latent.Input("latent", tooltip="Noisy latent from VBMixLatents/VBDDIMInvert, or a clean latent."),
                io.String.Input("prompt", multiline=True, default="", tooltip="Video prompt P* (the VDM's prompt)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (unconditional branch)."),
                widgets.seed("SDEdit noise seed for a clean latent (drawn on the CPU, so it reproduces across hardware). "
                             "Unused for an inverted latent: smoothing from it is deterministic."),
                widgets.steps(),
                io.Float.Input("cfg", default=bivdiff.DEFAULT_CFG, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale (1 for AnimateDiff-Lightning)."),
                io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="SDEdit strength for a CLEAN latent (share of the grid re-run); ignored for an "
                                       "inverted latent, which starts where the inversion ended."),
                widgets.attention_bank_input(),
                widgets.sfi_gamma(),
                widgets.sfi_layers([widgets.ALL_IN_BANK, *widgets.PRESETS], widgets.ALL_IN_BANK),
                *widgets.native_video_model(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Clean latent video (unscaled; VAEDecode-able).")])

    @classmethod
    def execute(cls, latent, prompt, negative_prompt, seed, steps, cfg, strength, video_model=None,
                attention_bank=None, sfi_gamma=0.5, sfi_layers=widgets.ALL_IN_BANK, model=None, positive=None,
                negative=None) -> io.NodeOutput:
        node = "VBVideoDenoise"
        if native.one_model(node, "video_model", video_model, model, "VBLoadVideoModel"):
            return cls.native(node, latent, seed, steps, cfg, strength, attention_bank, sfi_gamma, sfi_layers, model,
                              positive, negative)
        vm = video_model.model
        grid = cls.grid(node, latent, vm.schedule, vm.spacing, steps, strength)
        noisy = runtime.is_noisy(latent)
        scale = latent_scale(video_model)
        z = runtime.from_latent(latent, "latent", scale, runtime.mm.intermediate_device())
        denoiser = runtime.video_denoiser(video_model)
        inject = contextlib.nullcontext()
        if attention_bank is not None:
            layers = cls.injected_layers(node, denoiser, attention_bank, sfi_gamma, sfi_layers, z.shape, grid)
            inject = evs.injecting(denoiser, attention_bank, layers, sfi_gamma)
        progress = runtime.Progress(len(grid))
        text, null = runtime.encode(video_model, [prompt, negative_prompt]).split(1)
        device = runtime.load(video_model.unet, rows=runtime.video_rows(video_model, z.shape[2], 1 + (cfg > 1)),
                              latent_hw=tuple(z.shape[-2:]))
        z = z.to(device)
        guidance = cfg_guidance(Branch(text), Branch(null), cfg)
        with inject:
            if noisy:
                out = bivdiff.temporal_smoothing(denoiser, z, grid, guidance, callbacks=progress.callbacks)
            else:
                noise = video_noise(denoiser, initial_noise(z.shape, seed), seed).to(device)
                out = sdedit(denoiser, z, grid, guidance, noise, callbacks=progress.callbacks)
        return io.NodeOutput(runtime.to_latent(out, scale))

    @staticmethod
    def injected_layers(node, denoiser, bank, gamma, sfi_layers, shape, grid) -> tuple:
        """The layers Selective Feature Injection reads from ``bank``, checked before any work: gamma in [0, 1],
        known layers, and a bank from the same clip size, frame count, schedule and grid."""
        try:
            check_gamma(gamma)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        try:
            layers = bank.layers if sfi_layers == widgets.ALL_IN_BANK else denoiser.attention_layers(sfi_layers)
        except ValueError as e:                                          # its message starts with "layers:"
            raise ValueError(f"{node}: sfi_{e}") from None
        bank.check_compatible(f"{node}: attention_bank", shape[2], tuple(shape[-2:]), denoiser.schedule, layers, grid)
        return layers

    @staticmethod
    def grid(node, latent, schedule, spacing, steps, strength) -> list:
        """The sampler grid: the inversion's for a noisy latent (checked against this model's schedule and steps),
        the SDEdit share ``strength`` of the grid for a clean one."""
        if not runtime.is_noisy(latent):
            return schedule.timesteps(steps, spacing, strength)
        grid = schedule.timesteps(steps, spacing)
        if latent["vb_schedule"] != schedule.describe():
            raise ValueError(f"{node}: latent: it was inverted on a {latent['vb_schedule']['beta_schedule']} "
                             f"schedule but this video model uses {schedule.beta_schedule}; connect this "
                             "video model to VBDDIMInvert")
        if list(latent["vb_grid"]) != grid:
            raise ValueError(f"{node}: latent: it sits at timestep {latent['vb_timestep']} of a "
                             f"{len(latent['vb_grid'])}-step grid, but steps = {steps} starts at {grid[0]}; use "
                             f"steps = {len(latent['vb_grid'])} as in VBDDIMInvert")
        return grid

    @classmethod
    def native(cls, node, latent, seed, steps, cfg, strength, attention_bank, sfi_gamma, sfi_layers, model, positive,
               negative):
        """Temporal smoothing (or SDEdit) with a native motion-injected MODEL (``nodes.native``, kind "video"): the
        same core sampler on the same grid as with a VB video model on the SD1.5 schedule, with Selective Feature
        Injection through ComfyUI's attention patches when a bank is connected."""
        conds = native.conds(node, positive, negative, native.cfg_need(cfg))
        schedule = native.schedule_of(model, f"{node}: model")
        grid = cls.grid(node, latent, schedule, "leading", steps, strength)
        scale = model.model.latent_format.scale_factor
        z = runtime.from_latent(latent, "latent", scale, runtime.mm.get_torch_device())
        if attention_bank is not None:
            layers = cls.injected_layers(node, native.NativeDenoiser(model, schedule, "video"), attention_bank,
                                         sfi_gamma, sfi_layers, z.shape, grid)
        progress = runtime.Progress(len(grid))
        guidance = native.guidance(cfg)

        def loop(denoiser):
            with evs.injecting(denoiser, attention_bank, layers, sfi_gamma) if attention_bank is not None \
                    else contextlib.nullcontext():
                if runtime.is_noisy(latent):
                    return bivdiff.temporal_smoothing(denoiser, z, grid, guidance, callbacks=progress.callbacks)
                noise = initial_noise(z.shape, seed).to(z.device)
                return sdedit(denoiser, z, grid, guidance, noise, callbacks=progress.callbacks)

        return io.NodeOutput(runtime.to_latent(native.run(model, conds, z, grid, schedule, loop, kind="video",
                                                          seed=seed), scale))
