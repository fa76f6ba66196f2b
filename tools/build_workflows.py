#!/usr/bin/env python3
"""Writes the example workflows in ``workflows/`` (UI format, what ComfyUI saves) from the compact specs below.

    python3 tools/build_workflows.py [--thumbnails]

Widget values are laid out from a running ComfyUI's ``/object_info`` (the pack loaded), in the order the frontend
uses, so a saved file always matches the node schemas. ``--thumbnails`` then runs every workflow through the main
job (tools/run_workflow.py: real ComfyUI, the default clip, stand-in models where real ones are missing) and saves
a 2x2 grid of output frames as ``workflows/<name>.jpg``, the thumbnail ComfyUI's template browser shows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, ROOT)

BASE, INPAINT, IP2P = "v1-5-pruned-emaonly.safetensors", "sd-v1-5-inpainting.safetensors", \
    "instruct-pix2pix-00-22000.safetensors"
CANNY, MOTION, ZEROSCOPE = "control_v11p_sd15_canny.safetensors", "mm_sd_v15_v2.ckpt", "diffusers/zeroscope_v2_576w"
SIZE, FRAMES = 256, 8
INPUT_VIDEO = "videobridge_input.mp4"
INPUT_IMAGE = "videobridge_anchor.png"

# A node: (id, type, {widget: value}, {input: (source id, output slot)}, title)
VIDEO_IN = [
    (1, "LoadVideo", {"file": INPUT_VIDEO}, {}, "Input video"),
    (2, "GetVideoComponents", {}, {"video": (1, 0)}, None),
    (3, "ImageFromBatch", {"batch_index": 0, "length": FRAMES}, {"image": (2, 0)}, f"First {FRAMES} frames"),
    (4, "ImageScale", {"upscale_method": "bilinear", "width": SIZE, "height": SIZE, "crop": "center"},
     {"image": (3, 0)}, f"Resize to {SIZE}x{SIZE}"),
]


def video_out(first_id, images, stem, idm_images=None):
    nodes = [(first_id, "CreateVideo", {"fps": 8.0}, {"images": images, "fps": (2, 2)}, None),
             (first_id + 1, "SaveVideo", {"filename_prefix": f"videobridge/{stem}", "format": "auto", "codec": "auto"},
              {"video": (first_id, 0)}, "Smoothed video")]
    if idm_images is not None:
        nodes.append((first_id + 2, "SaveAnimatedWEBP", {"filename_prefix": f"videobridge/{stem}_framewise",
                                                          "fps": 8.0, "lossless": False, "quality": 85,
                                                          "method": "default"},
                      {"images": idm_images}, "Frame-wise result (before smoothing)"))
    return nodes


def inversion_and_smoothing(first_id, latent, image_model, video_model, alpha, prompt):
    i = first_id
    return [
        (i, "VBDDIMInvert", {"invert_with": "image model (frame-wise)", "prompt": "", "steps": 50},
         {"latent": latent, "image_model": image_model, "video_model": video_model}, "Image inversion (SD1.5)"),
        (i + 1, "VBDDIMInvert", {"invert_with": "video model (whole clip)", "prompt": "", "steps": 50},
         {"latent": latent, "video_model": video_model}, "Video inversion"),
        (i + 2, "VBMixLatents", {"alpha": alpha}, {"latent_image": (i, 0), "latent_video": (i + 1, 0)},
         "Mixed Inversion"),
        (i + 3, "VBVideoDenoise", {"prompt": prompt, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5},
         {"video_model": video_model, "latent": (i + 2, 0)}, "Temporal smoothing"),
        (i + 4, "VBDecodeFrames", {}, {"image_model": image_model, "latent": (i + 3, 0)}, None),
    ]


FOX = "a red fox running through fresh snow, photograph"


NOTE_ID = 30


RESEARCH = """Research options (last in each node): fixed-point iterations, legacy_grid and inflated_groupnorm (parity with the
official code), attention capture."""


def bivdiff_note(what: str, models: list, prompts: str, alpha: float, frames: int = FRAMES,
                 research: str = RESEARCH) -> tuple:
    """The Note node of a BIVDiff graph: what it does, which file goes where, what to change for real use."""
    files = "\n".join(f"- {m}" for m in models)
    text = f"""BIVDiff (Shi et al., CVPR 2024): {what}

Stages: 1 the input clip (frame count and size are set here, once); 2 the models; 3 every frame is made by the image
model on its own; 4 mixed inversion turns those frames back into noise (alpha = {alpha} of the image model's
inversion); 5 the video model denoises that noise into a temporally consistent clip; 6 the video and, for comparison,
the frame-wise result.

Models (ComfyUI/models/...):
{files}

Prompts: {prompts}

{f"Small defaults ({frames} frames at {SIZE}x{SIZE}, 50 steps) so it runs anywhere; for real use take 16 frames"
 if frames == FRAMES else f"Defaults: {frames} frames at {SIZE}x{SIZE}, 50 steps; for real use keep the frames, size"}
at 512x512 in group 1. Without the real model files the main job runs tiny random stand-ins, which give noise.
{research}"""
    return (NOTE_ID, "Note", {"text": text}, {}, "What this workflow does")


def bivdiff_stages(framewise: list, models: list, first: int) -> list:
    i = first
    return [("1 · Input video: frames and size", [1, 2, 3, 4]), ("2 · Models", models),
            ("3 · Frame-wise generation", framewise), ("4 · Mixed inversion", [i, i + 1, i + 2]),
            ("5 · Temporal smoothing", [i + 3, i + 4]), ("6 · Output", [i + 5, i + 6, i + 7])]


def controlnet_zeroscope():
    stem = "bivdiff_controlnet_zeroscope"
    return stem, "BIVDiff controllable video generation: ControlNet (Canny) frame-wise, ZeroScope temporal smoothing", [
        bivdiff_note("controllable generation. Canny edges of the input clip steer a ControlNet that draws every frame; "
                     "ZeroScope then smooths the frames into one consistent video.",
                     [f"checkpoints/{BASE}: any SD1.5 checkpoint (frame-wise image model and VAE).",
                      f"controlnet/{CANNY}: ControlNet v1.1 canny (lllyasviel).",
                      f"{ZEROSCOPE}/: the ZeroScope v2 576w diffusers folder (cerspense)."],
                     "the frame-wise prompt and the smoothing prompt describe the same video.", 1.0),
        *VIDEO_IN,
        (5, "Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (4, 0)}, "Canny hints"),
        (6, "VBLoadImageModel", {"model_name": BASE}, {}, None),
        (7, "VBLoadControlNet", {"control_net_name": CANNY}, {}, None),
        (8, "VBLoadVideoModel", {"model_name": ZEROSCOPE}, {}, None),
        (9, "VBFramewiseGenerate", {"prompt": FOX, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5},
         {"image_model": (6, 0), "controlnet": (7, 0), "hints": (5, 0)}, "Frame-wise ControlNet"),
        *inversion_and_smoothing(10, (9, 1), (6, 0), (8, 0), 1.0, FOX),
        *video_out(15, (14, 0), stem, (9, 0)),
    ], bivdiff_stages([5, 9], [6, 7, 8], 10)


LORA = "add_detail.safetensors"


def native_controlnet_zeroscope():
    stem = "bivdiff_native_controlnet_zeroscope"
    return stem, ("BIVDiff with ComfyUI's own models: checkpoint + LoRA + ControlNet (Canny) through KSampler "
                  "frame-wise, ZeroScope temporal smoothing"), [
        bivdiff_note("controllable generation with ComfyUI's own nodes for the frame-wise stage. The checkpoint, "
                     "its LoRA, the prompts (weights like (word:1.2), embeddings) and the ControlNet are core "
                     "ComfyUI: KSampler draws every frame as one batch. The pack then inverts those frames with the "
                     "same MODEL (LoRA included) and with ZeroScope, mixes the two, and ZeroScope smooths them into "
                     "one consistent video. Swap in any SD1.5 checkpoint, LoRA or ControlNet the usual way.",
                     [f"checkpoints/{BASE}: any SD1.5 checkpoint (CheckpointLoaderSimple: MODEL, CLIP, VAE).",
                      f"loras/{LORA}: any SD1.5 LoRA (set both strengths to 0, or bypass the node, to run "
                      "without).",
                      f"controlnet/{CANNY}: ControlNet v1.1 canny (lllyasviel).",
                      f"{ZEROSCOPE}/: the ZeroScope v2 576w diffusers folder (cerspense)."],
                     "the KSampler prompt and the smoothing prompt describe the same video; the inversion prompt "
                     "stays empty, as in the paper.", 1.0,
                     research="Research options (last in each node): fixed-point iterations and legacy_grid (parity "
                              "with the official code).\ninflated_groupnorm needs a VB image model, so it is refused "
                              "on this MODEL."),
        *VIDEO_IN,
        (5, "Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (4, 0)}, "Canny hints"),
        (6, "CheckpointLoaderSimple", {"ckpt_name": BASE}, {}, None),
        (7, "LoraLoader", {"lora_name": LORA, "strength_model": 1.0, "strength_clip": 1.0},
         {"model": (6, 0), "clip": (6, 1)}, None),
        (8, "ControlNetLoader", {"control_net_name": CANNY}, {}, None),
        (9, "VBLoadVideoModel", {"model_name": ZEROSCOPE}, {}, None),
        (10, "CLIPTextEncode", {"text": FOX}, {"clip": (7, 1)}, "Prompt"),
        (11, "CLIPTextEncode", {"text": ""}, {"clip": (7, 1)}, "Negative prompt"),
        (12, "ControlNetApplyAdvanced", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
         {"positive": (10, 0), "negative": (11, 0), "control_net": (8, 0), "image": (5, 0), "vae": (6, 2)}, None),
        (13, "GetImageSize", {}, {"image": (4, 0)}, "Frames and size of the clip"),
        (14, "EmptyLatentImage", {}, {"width": (13, 0), "height": (13, 1), "batch_size": (13, 2)},
         "One latent per frame"),
        (15, "KSampler", {"seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                          "denoise": 1.0},
         {"model": (7, 0), "positive": (12, 0), "negative": (12, 1), "latent_image": (14, 0)},
         "Frame-wise KSampler (every frame on its own)"),
        (16, "VAEDecode", {}, {"samples": (15, 0), "vae": (6, 2)}, None),
        (17, "VAEEncode", {}, {"pixels": (16, 0), "vae": (6, 2)}, "Re-encode (BIVDiff's Z0)"),
        (18, "CLIPTextEncode", {"text": ""}, {"clip": (7, 1)}, "Inversion prompt (empty)"),
        (19, "VBDDIMInvert", {"invert_with": "image model (frame-wise)", "prompt": "", "steps": 50},
         {"latent": (17, 0), "model": (7, 0), "conditioning": (18, 0), "video_model": (9, 0)},
         "Image inversion (the same MODEL + LoRA)"),
        (20, "VBDDIMInvert", {"invert_with": "video model (whole clip)", "prompt": "", "steps": 50},
         {"latent": (17, 0), "video_model": (9, 0)}, "Video inversion"),
        (21, "VBMixLatents", {"alpha": 1.0}, {"latent_image": (19, 0), "latent_video": (20, 0)}, "Mixed Inversion"),
        (22, "VBVideoDenoise", {"prompt": FOX, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5},
         {"video_model": (9, 0), "latent": (21, 0)}, "Temporal smoothing"),
        (23, "VAEDecode", {}, {"samples": (22, 0), "vae": (6, 2)}, None),
        *video_out(24, (23, 0), stem, (16, 0)),
    ], [("1 · Input video: frames and size", [1, 2, 3, 4]), ("2 · Models", [6, 7, 8, 9]),
        ("3 · Frame-wise generation (core ComfyUI)", [5, 10, 11, 12, 13, 14, 15, 16, 17]),
        ("4 · Mixed inversion", [18, 19, 20, 21]), ("5 · Temporal smoothing", [22, 23]),
        ("6 · Output", [24, 25, 26])]


LONG_FRAMES = 48


FOX_SOURCE, WOLF = "a fox running through fresh snow, photograph", "a wolf running through fresh snow, photograph"


def prompt2prompt_zeroscope():
    stem = "bivdiff_prompt2prompt_zeroscope"
    return stem, "BIVDiff video editing: Prompt2Prompt frame-wise word swap, ZeroScope temporal smoothing", [
        bivdiff_note("video editing by changing a word of the prompt. Every frame is inverted by SD1.5 and re-drawn "
                     "twice, with the source prompt and with the edit prompt; the edit reuses the source's attention, "
                     "so only what the swapped word names changes (LocalBlend keeps everything outside it). "
                     "ZeroScope then smooths the edited frames into one consistent video.",
                     [f"checkpoints/{BASE}: any SD1.5 checkpoint (Prompt2Prompt, inversion, VAE).",
                      f"{ZEROSCOPE}/: the ZeroScope v2 576w diffusers folder (cerspense)."],
                     "the source prompt describes the input clip; the edit prompt is the same sentence with the "
                     "word swapped (mode replace; refine allows added words); the smoothing prompt is the edit "
                     "prompt. LocalBlend words: the old and the new object ('fox', 'wolf').\n\nPrompt2Prompt knobs: "
                     "n_cross (0.4) and n_self (0.4) are the shares of the first steps whose attention the edit "
                     "takes from the source: higher keeps more of the layout and shapes, lower lets the new word "
                     "change more. reweight ('wolf:2') strengthens or weakens words of the edit prompt. With "
                     "LocalBlend words set, only the region those words attend to changes; clear both to edit the "
                     "whole frame. Advanced: blend_threshold (0.3), inversion_prompt (empty, as the official code).",
                     0.25),
        *VIDEO_IN,
        (5, "VBLoadImageModel", {"model_name": BASE}, {}, None),
        (6, "VBLoadVideoModel", {"model_name": ZEROSCOPE}, {}, None),
        (7, "VBPrompt2PromptEdit", {"source_prompt": FOX_SOURCE, "edit_prompt": WOLF, "mode": "replace", "steps": 50,
                                    "cfg": 7.5, "n_cross": 0.4, "n_self": 0.4, "blend_source_words": "fox",
                                    "blend_edit_words": "wolf"},
         {"image_model": (5, 0), "images": (4, 0)}, "Frame-wise Prompt2Prompt: fox -> wolf"),
        *inversion_and_smoothing(10, (7, 1), (5, 0), (6, 0), 0.25, WOLF),
        *video_out(15, (14, 0), stem, (7, 0)),
    ], bivdiff_stages([7], [5, 6], 10)


FULL_SD15, T2I_CANNY = "dreamshaper_8.safetensors", "t2iadapter_canny_sd15v2.pth"


def t2iadapter_animatediff():
    stem = "bivdiff_t2iadapter_animatediff"
    return stem, "BIVDiff controllable video generation: T2I-Adapter (Canny) frame-wise, AnimateDiff temporal smoothing", [
        bivdiff_note("controllable generation with a T2I-Adapter. Canny edges of the input clip steer a T2I-Adapter "
                     "(lighter than a ControlNet: its features are computed once per frame and added inside the UNet) "
                     "while SD1.5 draws every frame; AnimateDiff then smooths the frames into one consistent video.",
                     [f"checkpoints/{FULL_SD15}: any SD1.5 checkpoint (DreamShaper 8 here; v1-5-pruned-emaonly works "
                      "too): frame-wise image model, VAE and AnimateDiff's base.",
                      f"t2i_adapter/{T2I_CANNY}: the TencentARC T2I-Adapter canny for SD1.5 (models/controlnet works "
                      "too).",
                      f"animatediff_models/{MOTION}: the AnimateDiff v2 motion module (guoyww)."],
                     "the frame-wise prompt and the smoothing prompt describe the same video.", 1.0),
        *VIDEO_IN,
        (5, "Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (4, 0)}, "Canny hints"),
        (6, "VBLoadImageModel", {"model_name": FULL_SD15}, {}, None),
        (7, "VBLoadControlNet", {"control_net_name": T2I_CANNY}, {}, "Load T2I-Adapter"),
        (8, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (6, 0)}, None),
        (9, "VBFramewiseGenerate", {"prompt": FOX, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5},
         {"image_model": (6, 0), "controlnet": (7, 0), "hints": (5, 0)}, "Frame-wise T2I-Adapter"),
        *inversion_and_smoothing(10, (9, 1), (6, 0), (8, 0), 1.0, FOX),
        *video_out(15, (14, 0), stem, (9, 0)),
    ], bivdiff_stages([5, 9], [6, 7, 8], 10)


def long_clip_animatediff():
    stem = "bivdiff_long_clip_animatediff"
    video_in = [n if n[1] != "ImageFromBatch" else
                (3, "ImageFromBatch", {"batch_index": 0, "length": LONG_FRAMES}, {"image": (2, 0)},
                 f"First {LONG_FRAMES} frames") for n in VIDEO_IN]
    note = bivdiff_note(
        f"a long clip ({LONG_FRAMES} frames). Canny edges steer a ControlNet that draws every frame; AnimateDiff, "
        "whose motion modules were trained on 16 frames, smooths them on context windows of 16 frames overlapping "
        "by 4 (VBContextWindows, group 2), fused per frame. Clips no longer than a window run in one go.",
        [f"checkpoints/{BASE}: any SD1.5 checkpoint (frame-wise image model, VAE and AnimateDiff's base).",
         f"controlnet/{CANNY}: ControlNet v1.1 canny (lllyasviel).",
         f"animatediff_models/{MOTION}: the AnimateDiff v2 motion module (guoyww)."],
        "the frame-wise prompt and the smoothing prompt describe the same video.", 1.0, LONG_FRAMES)
    return stem, "BIVDiff long clip: ControlNet (Canny) frame-wise, AnimateDiff smoothing on context windows", [
        note,
        *video_in,
        (5, "Canny", {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (4, 0)}, "Canny hints"),
        (6, "VBLoadImageModel", {"model_name": BASE}, {}, None),
        (7, "VBLoadControlNet", {"control_net_name": CANNY}, {}, None),
        (8, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (6, 0)}, None),
        (20, "VBContextWindows", {"context_length": 16, "context_overlap": 4}, {"video_model": (8, 0)},
         "Context windows: 16 frames, overlap 4"),
        (9, "VBFramewiseGenerate", {"prompt": FOX, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5,
                                    "frame_batch_size": 8},
         {"image_model": (6, 0), "controlnet": (7, 0), "hints": (5, 0)}, "Frame-wise ControlNet"),
        *inversion_and_smoothing(10, (9, 1), (6, 0), (20, 0), 1.0, FOX),
        *video_out(15, (14, 0), stem, (9, 0)),
    ], bivdiff_stages([5, 9], [6, 7, 8, 20], 10)


def ip2p_animatediff():
    stem = "bivdiff_ip2p_animatediff"
    return stem, "BIVDiff video editing: InstructPix2Pix frame-wise edit, AnimateDiff temporal smoothing", [
        bivdiff_note("video editing. InstructPix2Pix edits every frame of the input clip by an instruction; AnimateDiff "
                     "then smooths the edited frames into one consistent video.",
                     [f"checkpoints/{IP2P}: InstructPix2Pix (timbrooks).",
                      f"checkpoints/{BASE}: SD1.5 (inversion, VAE, and the base of AnimateDiff).",
                      f"animatediff_models/{MOTION}: the AnimateDiff v2 motion module (guoyww)."],
                     "the frame-wise prompt is an instruction ('make it ...'); the smoothing prompt describes the "
                     "result, as the video model expects.", 1.0),
        *VIDEO_IN,
        (5, "VBLoadImageModel", {"model_name": IP2P}, {}, "InstructPix2Pix"),
        (6, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 (inversion, AnimateDiff base, VAE)"),
        (7, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (6, 0)}, None),
        (8, "VBFramewiseGenerate", {"prompt": "make it a watercolor painting", "negative_prompt": "", "seed": 0,
                                    "steps": 50, "cfg": 7.5, "image_guidance": 1.5},
         {"image_model": (5, 0), "images": (4, 0)}, "Frame-wise InstructPix2Pix"),
        *inversion_and_smoothing(9, (8, 1), (6, 0), (7, 0), 1.0, "a watercolor painting of a fox running"),
        *video_out(14, (13, 0), stem, (8, 0)),
    ], bivdiff_stages([8], [5, 6, 7], 9)


def inpaint_zeroscope(outpaint=False):
    stem = "bivdiff_outpaint_zeroscope" if outpaint else "bivdiff_inpaint_zeroscope"
    region = "top and bottom (outpaint)" if outpaint else "centre (inpaint)"
    if outpaint:
        title = "BIVDiff video outpainting: SD inpainting frame-wise on the top and bottom quarter, ZeroScope smoothing"
        what = ("video outpainting. SD inpainting repaints the top and bottom quarter of every frame (the mask node "
                "sets the bands); ZeroScope then smooths the frames into one consistent video.")
        prompt = "a snowy forest"
    else:
        title = "BIVDiff video inpainting: SD inpainting frame-wise in a masked region, ZeroScope smoothing"
        what = ("video inpainting. SD inpainting repaints the centre of every frame (the mask node sets the region; "
                "any MASK works); ZeroScope then smooths the frames into one consistent video.")
        prompt = ""
    return stem, title, [
        bivdiff_note(what, [f"checkpoints/{INPAINT}: SD1.5 inpainting (runwayml).",
                            f"checkpoints/{BASE}: SD1.5 (inversion, VAE).",
                            f"{ZEROSCOPE}/: the ZeroScope v2 576w diffusers folder (cerspense)."],
                     "one prompt for the repainted area and the smoothing (empty is allowed).", 0.1),
        *VIDEO_IN,
        (5, "VBRegionMask", {"region": region, "fraction": 0.25}, {"images": (4, 0)},
         "Outpainting mask" if outpaint else "Inpainting mask"),
        (9, "VBLoadImageModel", {"model_name": INPAINT}, {}, "SD inpainting"),
        (10, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 (inversion, VAE)"),
        (11, "VBLoadVideoModel", {"model_name": ZEROSCOPE}, {}, None),
        (12, "VBFramewiseGenerate", {"prompt": prompt, "negative_prompt": "", "seed": 0, "steps": 50, "cfg": 7.5},
         {"image_model": (9, 0), "images": (4, 0), "mask": (5, 0)}, "Frame-wise inpainting"),
        *inversion_and_smoothing(13, (12, 1), (10, 0), (11, 0), 0.1, prompt),
        *video_out(18, (17, 0), stem, (12, 0)),
    ], bivdiff_stages([5, 12], [9, 10, 11], 13)


LIGHTNING = "animatediff_lightning_8step_comfyui.safetensors"
EVS_NOTE = f"""EVS video refinement (Su et al., CVPR 2025)

A weak or flickering video goes in; the SD1.5 image model re-draws it (T2I denoising from strength s1) and, at
timestep t_T2V, hands its predicted clean frames to AnimateDiff-Lightning, whose [T2V] block makes them temporally
consistent; the image model then finishes the sharp details. Output: the refined video.

Models (ComfyUI/models/...):
- checkpoints/{BASE}: any SD1.5 checkpoint (the paper uses epiCRealism).
- animatediff_models/{LIGHTNING}: AnimateDiff-Lightning 8-step (ByteDance), loaded on the trailing grid.

Frame count and size: group 1 (First N frames, Resize). Small defaults (8 frames, {SIZE}x{SIZE}, upscale 1.0) so it
runs anywhere; for real use take 16 frames at 512x512 and upscale 2.0 (the paper's setting). Without the real model
files the main job runs tiny random stand-ins, which give noise.

EVS Refine knobs:
- upscale: resize before refining (paper 2.0).
- s1: how much of the T2I grid is re-run (0.4 = from timestep 381). Higher changes more.
- t2i_steps (T1 = 50), cfg (g_I = 7.5): the image model's DDIM grid and guidance.
- t_T2V (201): where the T2V block sits on the T2I grid. Larger = better image quality, less consistency.
- t2v_steps (8), t_V (499), n_V (4): the T2V block's grid, its start and its number of steps. Larger t_V removes
  more flicker but pulls the look towards the video model.
- t2v_cfg: 1 for Lightning.
Research options (last): block 'inversion + SFI' inverts instead of noising and injects attention (sfi_layers,
sfi_gamma: 'shallow' 0.5 or 'deep' 0.8), renoise, fixed-point iterations, frame_batch_size (memory only),
attention bank storage and budget."""


def evs_refine_lightning():
    stem = "evs_refine_animatediff_lightning"
    nodes = [
        *VIDEO_IN,
        (5, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 checkpoint (T2I)"),
        (6, "VBLoadVideoModel", {"model_name": LIGHTNING, "sampling": "Lightning (trailing grid)"},
         {"image_model": (5, 0)}, "AnimateDiff-Lightning 8-step (T2V)"),
        (7, "VBEVSRefine", {"prompt": FOX, "negative_prompt": "", "seed": 0, "upscale": 1.0},
         {"images": (4, 0), "image_model": (5, 0), "video_model": (6, 0)}, "EVS refine (T2I + [T2V] + T2I)"),
        (8, "CreateVideo", {"fps": 8.0}, {"images": (7, 0), "fps": (2, 2)}, None),
        (9, "SaveVideo", {"filename_prefix": f"videobridge/{stem}", "format": "auto", "codec": "auto"},
         {"video": (8, 0)}, "Refined video"),
        (10, "Note", {"text": EVS_NOTE}, {}, "What this workflow does"),
    ]
    stages = [("1 · Input video: frames and size", [1, 2, 3, 4]), ("2 · Models", [5, 6]),
              ("3 · EVS refinement", [7]), ("4 · Output", [8, 9])]
    return stem, "EVS: refine a video with SD1.5 + AnimateDiff-Lightning (T2I + encapsulated T2V block)", nodes, stages


JVID_NOTE = """JVID text-to-video (Reynaud et al.): a mixture of denoisers

One reverse diffusion (DDPM, 50 steps on the video model's grid) that, at every step, runs either the video model
(for motion) or the SD1.5 image model (for per-frame quality). The probability of a video step, P_V, is 1 at the
start, falls to p_e at progress t_e, then moves towards p_f. The text output under the sampler lists which model ran
at each step.

Models (ComfyUI/models/...):
- checkpoints/{base}: any SD1.5 checkpoint (the image model, and the base of AnimateDiff).
- {video}

Frame count and size: group 2 (JVID sampler: width, height, frames). Small defaults (8 frames, {size}x{size}); the
paper uses 16 frames. Without the real model files the main job runs tiny random stand-ins, which give noise.

Knobs: preset '256' (plain mixture, default), '128' and '64' add entropy reduction (gamma: step-noise scale on image
steps; r_i, r_v: noise shared by all frames) and temporal latent smoothing (c_s). Try '128' if the video flickers.
cfg: the paper's 2.0; pretrained SD models often look better at 7-7.5. -1 on a knob = the preset's value.
Research options (last): gamma_on_all_steps, image_timesteps (nearest or interpolated equal-noise timestep),
frame_batch_size (memory only)."""


def jvid_text_to_video(zeroscope=False):
    stem = "jvid_text_to_video_zeroscope" if zeroscope else "jvid_text_to_video"
    if zeroscope:
        loader = (3, "VBLoadVideoModel", {"model_name": ZEROSCOPE}, {}, "ZeroScope (video model)")
        video = f"diffusers/{ZEROSCOPE.split('/', 1)[1]}/: the ZeroScope v2 576w diffusers folder (cerspense)."
    else:
        loader = (3, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (2, 0)}, "AnimateDiff v2 (video model)")
        video = f"animatediff_models/{MOTION}: the AnimateDiff v2 motion module (guoyww)."
    nodes = [
        (1, "Note", {"text": JVID_NOTE.format(base=BASE, video=video, size=SIZE)}, {}, "What this workflow does"),
        (2, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 checkpoint (image model)"),
        loader,
        (4, "VBJVIDSample", {"prompt": FOX, "video_prompt": "", "negative_prompt": "", "seed": 0, "width": SIZE,
                             "height": SIZE, "frames": FRAMES, "steps": 50, "cfg": 2.0, "preset": "256"},
         {"image_model": (2, 0), "video_model": (3, 0)}, "JVID sampler (mixture of denoisers)"),
        (5, "PreviewAny", {}, {"source": (4, 1)}, "Which model ran at each step"),
        (6, "VBDecodeFrames", {}, {"image_model": (2, 0), "latent": (4, 0)}, None),
        (7, "CreateVideo", {"fps": 8.0}, {"images": (6, 0)}, None),
        (8, "SaveVideo", {"filename_prefix": f"videobridge/{stem}", "format": "auto", "codec": "auto"},
         {"video": (7, 0)}, "Generated video"),
    ]
    stages = [("1 · Models", [2, 3]), ("2 · JVID sampler: size, frames", [4, 5]), ("3 · Decode and save", [6, 7, 8])]
    title = f"JVID text-to-video: SD1.5 + {'ZeroScope' if zeroscope else 'AnimateDiff'} as a mixture of denoisers"
    return stem, title, nodes, stages


I4VGEN_NOTE = """I4VGen {what} (Guo et al.): image as a stepping stone

{stages}

Models (ComfyUI/models/...):
- checkpoints/{base}: any SD1.5 checkpoint (the image model, and the base of AnimateDiff).
- animatediff_models/{motion}: the AnimateDiff v2 motion module (guoyww).
{scorer}
Frame count and size: set once, {where}. Small defaults (8 frames, {size}x{size}); the paper's setting is 16 frames at
512x512. Steps: 25 DDIM steps with CFG 7.5 in every stage (the official AnimateDiff setting). Without the real model
files the main job runs tiny random stand-ins, which give noise.

Knobs: p_ni (share of the grid NI-VSDS runs over: 0.6 -> 16 updates from t 961 to 361), p_re (regeneration strength:
1.0 re-noises to t 961 and runs all 25 steps; lower keeps more of the NI-VSDS video), step_sizes (10, 10, 10, then 1,
as the official code). Research options (last): official_candidate_schedule, official_scheduler_config and
candidate_index reproduce the official code for comparisons."""

SCORER_NOTE = """- Anchor scorer (optional): with scorer 'auto' the anchor is picked by ImageReward if image_reward/ImageReward.pt and
  med_config.json are there (and the image-reward package is installed), else by a whole CLIP model
  (e.g. clip_vision/clip-vit-large-patch14.safetensors, both towers), else by a score computed from the SD1.5
  model itself (no extra files). Nothing is downloaded.
"""


def i4vgen_text_to_video():
    stem = "i4vgen_text_to_video_animatediff"
    stages_text = ("Stage 1: the image model draws 16 candidate images of the prompt and a scorer keeps the best as the "
                   "anchor (all candidates and their scores are shown). Stage 2: a still video of the anchor is set "
                   "in motion by noise-invariant video score distillation (NI-VSDS) with AnimateDiff; its result is "
                   "previewed. Stage 3: AnimateDiff regenerates the video from it (VBVideoDenoise, strength = p_re). "
                   "The prompt, seed and steps are typed once, in group 1.")
    note = I4VGEN_NOTE.format(what="text-to-video", stages=stages_text, base=BASE, motion=MOTION, scorer=SCORER_NOTE,
                              where="in group 3 (width, height on the candidates) and group 4 (frames on the static "
                                    "video)", size=SIZE)
    prompt, seed, steps = (2, 0), (3, 0), (4, 0)
    nodes = [
        (1, "Note", {"text": note}, {}, "What this workflow does"),
        (2, "PrimitiveStringMultiline", {"value": FOX}, {}, "Prompt"),
        (3, "PrimitiveInt", {"value": 0}, {}, "Seed"),
        (4, "PrimitiveInt", {"value": 25}, {}, "Steps (every stage)"),
        (5, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 checkpoint (image model)"),
        (6, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (5, 0)}, "AnimateDiff v2 (video model)"),
        (7, "VBAnchorCandidates", {"negative_prompt": "", "width": SIZE, "height": SIZE, "num_candidates": 16,
                                   "cfg": 7.5},
         {"image_model": (5, 0), "prompt": prompt, "seed": seed, "steps": steps}, "Candidate images: width, height"),
        (8, "VBSelectAnchor", {"negative_prompt": "", "scorer": "auto"},
         {"image_model": (5, 0), "candidates": (7, 0), "latent": (7, 1), "prompt": prompt, "seed": seed},
         "Select the anchor"),
        (9, "PreviewImage", {}, {"images": (7, 0)}, "All candidates"),
        (10, "PreviewImage", {}, {"images": (8, 0)}, "Anchor image"),
        (11, "PreviewAny", {}, {"source": (8, 2)}, "Scores (* = anchor)"),
        (12, "VBStaticVideo", {"frames": FRAMES}, {"latent": (8, 1)}, "Static video: frames"),
        (13, "VBNIVSDS", {"negative_prompt": "", "cfg": 7.5, "p_ni": 0.6},
         {"video_model": (6, 0), "latent": (12, 0), "prompt": prompt, "seed": seed, "steps": steps}, "NI-VSDS"),
        (14, "VBDecodeFrames", {}, {"image_model": (5, 0), "latent": (13, 0)}, None),
        (15, "SaveAnimatedWEBP", {"filename_prefix": f"videobridge/{stem}_nivsds", "fps": 8.0, "lossless": False,
                                  "quality": 85, "method": "default"}, {"images": (14, 0)}, "NI-VSDS video"),
        (16, "VBVideoDenoise", {"negative_prompt": "", "cfg": 7.5, "strength": 1.0},
         {"video_model": (6, 0), "latent": (13, 0), "prompt": prompt, "seed": seed, "steps": steps},
         "Regeneration (strength = p_re)"),
        (17, "VBDecodeFrames", {}, {"image_model": (5, 0), "latent": (16, 0)}, None),
        (18, "CreateVideo", {"fps": 8.0}, {"images": (17, 0)}, None),
        (19, "SaveVideo", {"filename_prefix": f"videobridge/{stem}", "format": "auto", "codec": "auto"},
         {"video": (18, 0)}, "Generated video"),
    ]
    stages = [("1 · Prompt, seed, steps", [2, 3, 4]), ("2 · Models", [5, 6]),
              ("3 · Anchor: candidates and selection", [7, 8, 9, 10, 11]),
              ("4 · NI-VSDS: static video set in motion", [12, 13, 14, 15]),
              ("5 · Regeneration and output", [16, 17, 18, 19])]
    return stem, "I4VGen text-to-video: SD1.5 anchor image + AnimateDiff (NI-VSDS, regeneration)", nodes, stages


def i4vgen_image_to_video():
    stem = "i4vgen_image_to_video_animatediff"
    stages_text = ("Your picture is the anchor (the paper's real-image mode): a still video of it is set in motion by "
                   "noise-invariant video score distillation (NI-VSDS) with AnimateDiff, then AnimateDiff regenerates "
                   "the video from it, all in the VBI4VGen node. The NI-VSDS video is previewed. Describe the picture "
                   "and the motion in the prompt. Pick the picture in group 1 (it is resized and centre-cropped to "
                   "the size set there).")
    note = I4VGEN_NOTE.format(what="image-to-video", stages=stages_text, base=BASE, motion=MOTION, scorer="",
                              where="in group 1 (width, height of the resize) and group 3 (frames on VBI4VGen; its "
                                    "width and height must equal the resize)", size=SIZE)
    nodes = [
        (1, "LoadImage", {"image": INPUT_IMAGE}, {}, "Anchor picture"),
        (2, "ImageScale", {"upscale_method": "bilinear", "width": SIZE, "height": SIZE, "crop": "center"},
         {"image": (1, 0)}, f"Resize to {SIZE}x{SIZE}"),
        (3, "VBLoadImageModel", {"model_name": BASE}, {}, "SD1.5 checkpoint (image model)"),
        (4, "VBLoadVideoModel", {"model_name": MOTION}, {"image_model": (3, 0)}, "AnimateDiff v2 (video model)"),
        (5, "VBI4VGen", {"prompt": FOX, "negative_prompt": "", "seed": 0, "width": SIZE, "height": SIZE,
                         "frames": FRAMES, "steps": 25, "cfg": 7.5, "scorer": "auto"},
         {"image_model": (3, 0), "video_model": (4, 0), "anchor_image": (2, 0)}, "I4VGen: frames"),
        (6, "VBDecodeFrames", {}, {"image_model": (3, 0), "latent": (5, 2)}, None),
        (7, "SaveAnimatedWEBP", {"filename_prefix": f"videobridge/{stem}_nivsds", "fps": 8.0, "lossless": False,
                                 "quality": 85, "method": "default"}, {"images": (6, 0)}, "NI-VSDS video"),
        (8, "VBDecodeFrames", {}, {"image_model": (3, 0), "latent": (5, 0)}, None),
        (9, "CreateVideo", {"fps": 8.0}, {"images": (8, 0)}, None),
        (10, "SaveVideo", {"filename_prefix": f"videobridge/{stem}", "format": "auto", "codec": "auto"},
         {"video": (9, 0)}, "Generated video"),
        (11, "Note", {"text": note}, {}, "What this workflow does"),
    ]
    stages = [("1 · Anchor picture: size", [1, 2]), ("2 · Models", [3, 4]), ("3 · I4VGen", [5]),
              ("4 · NI-VSDS preview", [6, 7]), ("5 · Output", [8, 9, 10])]
    return stem, "I4VGen image-to-video: your picture as the anchor, set in motion by AnimateDiff (NI-VSDS)", nodes, stages


def workflow_file(stem: str) -> str:
    """Path (without extension) of the workflow with id ``stem``: ``workflows/<stem>`` (the paths the issues and the
    README name). ComfyUI's frontend 1.32.9 (ComfyUI 0.3.75) lists a custom node's templates by file name only (it
    reads no title or description from the file); the title is in ``extra.info.title`` for frontends that read it."""
    return os.path.join(ROOT, "workflows", stem)


SPECS = [controlnet_zeroscope, native_controlnet_zeroscope, t2iadapter_animatediff, ip2p_animatediff,
         prompt2prompt_zeroscope, inpaint_zeroscope, lambda: inpaint_zeroscope(outpaint=True), long_clip_animatediff,
         evs_refine_lightning, jvid_text_to_video, lambda: jvid_text_to_video(zeroscope=True), i4vgen_text_to_video,
         i4vgen_image_to_video]

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PREVIEW_HEIGHT = {"LoadVideo": 460, "SaveVideo": 460, "PreviewAny": 300, "LoadImage": 420, "PreviewImage": 340,
                  "SaveAnimatedWEBP": 420}                            # heights once their previews show
GROUP_PAD, GROUP_TITLE = 20, 70     # a node's title bar (30 px) sits above its pos; the group title above that


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _default(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    if kind == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


ROW_WIDTH = 3300               # stages flow left to right and wrap into rows no wider than this
NODE_WIDTH, NOTE_WIDTH, COLUMN, GAP = 340, 440, 380, 50


def flow_stages(ui_nodes: list, stages: list, depth) -> None:
    """Position nodes stage by stage: inside a stage, one column per graph depth present, nodes stacked; stages
    left to right, wrapping into a new row past ``ROW_WIDTH``; a Note (in no stage) goes first, at the left."""
    by_id = {n["id"]: n for n in ui_nodes}
    x0, y0 = 40, 100
    notes = [n for n in ui_nodes if n["type"] == "Note"]
    for n in notes:
        n["pos"] = [x0, y0]
    x = x0 + (max(n["size"][0] for n in notes) + 80 if notes else 0)
    row_x, y, row_h = x, y0, 0
    for _, members in stages:
        rank = {dep: k for k, dep in enumerate(sorted({depth(i) for i in members}))}   # one column per depth
        cols = {}
        for i in sorted(members, key=lambda i: (depth(i), i)):
            cols.setdefault(rank[depth(i)], []).append(by_id[i])
        width = max(cols) * COLUMN + max(n["size"][0] for c in cols.values() for n in c)
        height = max(sum(n["size"][1] + GAP for n in c) for c in cols.values())
        if x > row_x and x + width > ROW_WIDTH:
            x, y, row_h = row_x, y + row_h + GROUP_TITLE + 2 * GROUP_PAD + GAP, 0
        for k, col in cols.items():
            cy = y
            for n in col:
                n["pos"] = [x + k * COLUMN, cy]
                cy += n["size"][1] + GAP
        x += width + 2 * GROUP_PAD + GAP
        row_h = max(row_h, height)


def note_size(text: str) -> list:
    """Width and height of a Note that shows ``text`` without scrolling (about 60 characters a line)."""
    lines = sum(max(1, -(-len(line) // 60)) for line in text.splitlines())
    return [NOTE_WIDTH, 40 + 18 * lines]


def build(spec, object_info) -> dict:
    """UI-format workflow (LiteGraph 0.4) from a spec ``(stem, title, nodes, stages)``: ``Note`` nodes (UI only) hold
    ``widgets["text"]``; ``stages`` is ``[(group title, [node ids])]``, laid out by ``flow_stages`` with a group
    drawn around each."""
    stem, title, nodes, stages = spec
    by_id = {n[0]: n for n in nodes}
    depth = {}

    def d(i):
        if i not in depth:
            depth[i] = 1 + max([d(src) for src, _ in by_id[i][3].values()], default=-1)
        return depth[i]

    links, ui_nodes = [], []
    outputs_links = {}
    for nid, ntype, widgets, inputs, _ in nodes:
        for name, (src, slot) in inputs.items():
            links.append([len(links) + 1, src, slot, nid, name, None])
    for order, (nid, ntype, widgets, inputs, ntitle) in enumerate(sorted(nodes, key=lambda n: (d(n[0]), n[0]))):
        if ntype == "Note":
            ui_nodes.append({"id": nid, "type": "Note", "pos": [0, 0], "size": note_size(widgets["text"]),
                             "flags": {}, "order": order,
                             "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                             "widgets_values": [widgets["text"]], "title": ntitle or "Note",
                             "color": "#432", "bgcolor": "#653"})
            outputs_links[nid] = []
            continue
        info = object_info[ntype]
        spec_in = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order_in = info.get("input_order", {})
        names = list(order_in.get("required", [])) + list(order_in.get("optional", []))
        unknown = set(widgets) | set(inputs)
        unknown -= set(names)
        if unknown:
            raise KeyError(f"{stem}: {ntype} has no inputs {sorted(unknown)}")
        ui_inputs, values = [], []
        for name in names:
            s = spec_in[name]
            if _is_widget(s):
                values.append(widgets.get(name, _default(s)))
                if len(s) > 1 and s[1].get("control_after_generate"):
                    values.append("fixed")
            link = next((l for l in links if l[3] == nid and l[4] == name), None)
            if not _is_widget(s) or link is not None:
                entry = {"name": name, "type": s[0] if not isinstance(s[0], list) else "COMBO",
                         "link": link[0] if link else None}
                if _is_widget(s):
                    entry["widget"] = {"name": name}
                ui_inputs.append(entry)
                if link:
                    link[4] = len(ui_inputs) - 1
                    link[5] = entry["type"]
        outs = [{"name": oname, "type": otype, "links": [], "slot_index": k}
                for k, (otype, oname) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        height = PREVIEW_HEIGHT.get(ntype, 80 + 26 * (len(values) + len(ui_inputs)))
        node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [NODE_WIDTH, height], "flags": {},
                "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outs,
                "properties": {"Node name for S&R": ntype}, "widgets_values": values}
        if ntitle:
            node["title"] = ntitle
        ui_nodes.append(node)
        outputs_links[nid] = outs
    for link in links:
        outputs_links[link[1]][link[2]]["links"].append(link[0])
    ui_nodes.sort(key=lambda n: n["id"])
    flow_stages(ui_nodes, stages, d)
    groups = []
    for gtitle, members in stages:
        boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in ui_nodes if n["id"] in members]
        x0, y0 = min(b[0] for b in boxes) - GROUP_PAD, min(b[1] for b in boxes) - GROUP_TITLE
        x1, y1 = max(b[2] for b in boxes) + GROUP_PAD, max(b[3] for b in boxes) + GROUP_PAD
        groups.append({"title": gtitle, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": "#3f789e",
                       "font_size": 24, "flags": {}})
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"title": title}},
            "version": 0.4}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thumbnails", action="store_true", help="run every workflow and save its output thumbnail")
    ap.add_argument("--only", nargs="+", metavar="STEM", help="thumbnails of these workflows only (all are rewritten)")
    args = ap.parse_args(argv)
    from tools.comfy_env import ensure_env

    env = ensure_env()
    if os.path.abspath(sys.executable) != os.path.abspath(env.python) or not os.environ.get("VIDEOBRIDGE_COMFYUI"):
        return subprocess.call([env.python, __file__, *(argv or sys.argv[1:])],
                               env=dict(os.environ, VIDEOBRIDGE_COMFYUI=env.comfy_dir))
    from tools.comfy_server import ComfyServer

    with ComfyServer(os.environ.get("VIDEOBRIDGE_COMFYUI")) as server:
        info = server.object_info()
        for make in SPECS:
            spec = make()
            wf = build(spec, info)
            path = workflow_file(spec[0]) + ".json"
            with open(path, "w") as f:
                json.dump(wf, f, indent=1)
            server.convert(wf)                                            # must convert
            print("wrote", os.path.relpath(path, ROOT))
    if args.thumbnails:
        for make in SPECS:
            stem = make()[0]
            if args.only and stem not in args.only:
                continue
            rc = subprocess.call([sys.executable, os.path.join(TOOLS, "run_workflow.py"), stem,
                                  "--thumbnail", workflow_file(stem) + ".jpg"])
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
