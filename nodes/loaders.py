"""Loader nodes: image model, ControlNet, video model (and its context windows). Files come from ComfyUI's model
folders, never the Hub."""
from __future__ import annotations

import dataclasses

from ..core import models as core_models
from ..core.context import FUSE_METHODS, SCHEDULES, ContextWindows
from . import paths, runtime, types
from .api import io

SAMPLING = ["model default (DDIM)", "Lightning (trailing grid)"]


def _dtype_input(id_="dtype", role="unet"):
    what = {"unet": "the UNet and text encoder", "vae": "the VAE"}[role]
    return io.Combo.Input(id_, options=runtime.DTYPES, default="auto",
                          tooltip=f"Weight dtype for {what}. auto: fp32 on CPU; fp16/bf16 on GPUs that support it"
                                  + (" (choose fp32 if decoded frames come out black or NaN)." if role == "vae" else "."))


class VBLoadImageModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBLoadImageModel", display_name="Load Image Model (VideoBridge)", category="VideoBridge/loaders",
            description="Loads an SD1.5-family image diffusion model (base, inpainting or InstructPix2Pix, detected "
                        "from the weights) from models/checkpoints (single file) or models/diffusers (folder). "
                        "SD2.x, SDXL and v-prediction models are refused.",
            inputs=[
                io.Combo.Input("model_name", options=paths.files("checkpoints") + paths.diffusers_folders(
                    "UNet2DConditionModel"), tooltip="SD1.5-family checkpoint in models/checkpoints, or "
                    "'diffusers/<folder>' in models/diffusers. The variant (base / inpainting 9-channel / "
                    "InstructPix2Pix 8-channel) is read from the weights."),
                _dtype_input(),
                _dtype_input("vae_dtype", "vae"),
            ],
            outputs=[types.ImageModel.Output(display_name="image_model",
                                             tooltip="UNet + VAE + CLIP-L text encoder + SD1.5 noise schedule.")])

    @classmethod
    def fingerprint_inputs(cls, model_name, dtype, vae_dtype):
        try:
            return (model_name, paths.mtime(paths.resolve("checkpoints", model_name, "VBLoadImageModel")))
        except FileNotFoundError:
            return model_name

    @classmethod
    def execute(cls, model_name, dtype, vae_dtype) -> io.NodeOutput:
        path = paths.resolve("checkpoints", model_name, "VBLoadImageModel")
        try:
            model = core_models.load_image_model(path, tokenizer_dir=runtime.tokenizer_dir(),
                                                 dtype=runtime.model_dtype(dtype))
        except ValueError as e:
            raise ValueError(f"VBLoadImageModel: {e}") from None
        if model.vae.dtype != runtime.model_dtype(vae_dtype, "vae"):
            model.vae.to(runtime.model_dtype(vae_dtype, "vae"))
        return io.NodeOutput(runtime.ImageHandle(model))


class VBLoadControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBLoadControlNet", display_name="Load ControlNet (VideoBridge)", category="VideoBridge/loaders",
            description="Loads an SD1.5 ControlNet v1.1 (original or diffusers layout) or an SD1.5 T2I-Adapter "
                        "(TencentARC full adapter: canny, sketch, depth, openpose, ...) from models/controlnet or "
                        "models/t2i_adapter, for VBFramewiseGenerate. What it is comes from the weights.",
            inputs=[io.Combo.Input("control_net_name", options=paths.files("controlnet"),
                                   tooltip="ControlNet or T2I-Adapter file in models/controlnet or models/t2i_adapter, "
                                           "e.g. control_v11p_sd15_canny or t2iadapter_canny_sd15v2."),
                    _dtype_input()],
            outputs=[types.ControlNet.Output(display_name="controlnet",
                                             tooltip="The ControlNet or T2I-Adapter model.")])

    @classmethod
    def fingerprint_inputs(cls, control_net_name, dtype):
        try:
            return (control_net_name, paths.mtime(paths.resolve("controlnet", control_net_name, "VBLoadControlNet")))
        except FileNotFoundError:
            return control_net_name

    @classmethod
    def execute(cls, control_net_name, dtype) -> io.NodeOutput:
        path = paths.resolve("controlnet", control_net_name, "VBLoadControlNet")
        try:
            model = core_models.load_controlnet(path, dtype=runtime.model_dtype(dtype))
        except ValueError as e:
            raise ValueError(f"VBLoadControlNet: {e}") from None
        return io.NodeOutput(runtime.ControlNetHandle(model, path))


class VBLoadVideoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VBLoadVideoModel", display_name="Load Video Model (VideoBridge)", category="VideoBridge/loaders",
            description="Loads a text-to-video model: an AnimateDiff motion module (v1/v2/v3/Lightning, from "
                        "models/animatediff_models, shared with AnimateDiff-Evolved) on top of an SD1.5 image "
                        "model, or a ZeroScope/ModelScope diffusers folder from models/diffusers.",
            inputs=[
                io.Combo.Input("model_name", options=paths.files(paths.MOTION_KEY) + paths.diffusers_folders(
                    "UNet3DConditionModel"), tooltip="AnimateDiff motion module in models/animatediff_models "
                    "(needs image_model), or 'diffusers/<folder>' holding a ZeroScope/ModelScope model."),
                _dtype_input(),
                io.Combo.Input("sampling", options=SAMPLING, default=SAMPLING[0],
                               tooltip="Timestep grid of this model's sampler: DDIM 'leading' (981, 961, ...) as the "
                                       "model was trained, or the 'trailing' grid (999, 874, ...) AnimateDiff-"
                                       "Lightning needs (use it with cfg 1 and its step count)."),
                types.ImageModel.Input("image_model", optional=True,
                                       tooltip="Base SD1.5 model the motion module is added to (AnimateDiff "
                                               "only); its text encoder and VAE are shared."),
            ],
            outputs=[types.VideoModel.Output(display_name="video_model",
                                             tooltip="Video UNet + its text encoder + its noise schedule.")])

    @classmethod
    def fingerprint_inputs(cls, model_name, dtype, sampling, image_model=None):
        key = paths.MOTION_KEY if not model_name.startswith(paths.DIFFUSERS_PREFIX) else "diffusers"
        try:
            return (model_name, sampling, paths.mtime(paths.resolve(key, model_name, "VBLoadVideoModel")))
        except FileNotFoundError:
            return model_name

    @classmethod
    def execute(cls, model_name, dtype, sampling, image_model=None) -> io.NodeOutput:
        node = "VBLoadVideoModel"
        torch_dtype = runtime.model_dtype(dtype)
        try:
            if model_name.startswith(paths.DIFFUSERS_PREFIX):
                model = core_models.load_unet3d_folder(paths.resolve("diffusers", model_name, node), torch_dtype)
                handle = runtime.VideoHandle(model)
            else:
                path = paths.resolve(paths.MOTION_KEY, model_name, node)
                if image_model is None:
                    raise ValueError(f"'{model_name}' is an AnimateDiff motion module: connect the SD1.5 "
                                     "image_model it should be added to")
                model = runtime.shared_animatediff(image_model, path, torch_dtype)
                if model is None:
                    adapter, family = core_models.load_motion_adapter(path, dtype=torch_dtype)
                    model = core_models.build_animatediff(image_model.model, adapter, family, dtype=torch_dtype,
                                                          source=path)
                model = dataclasses.replace(model)                      # its own spacing; the UNet is shared
                handle = runtime.animatediff_handle(model, image_model, path, torch_dtype)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        if sampling == SAMPLING[1]:
            model.spacing = "trailing"
        return io.NodeOutput(handle)


class VBContextWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        D = ContextWindows()
        return io.Schema(
            node_id="VBContextWindows", display_name="Context Windows and Memory for a Video Model (VideoBridge)",
            category="VideoBridge/loaders",
            description="Long clips: every call of this video model (inversion, smoothing, SDEdit, NI-VSDS, JVID and "
                        "EVS steps) runs on windows of context_length frames overlapping by context_overlap, fused "
                        "per frame. Names and defaults as ComfyUI's Context Windows (Manual) node; a connected "
                        "AnimateDiff-Evolved context_options overrides the widgets. Clips no longer than a window "
                        "are unchanged. branches_in_turn saves memory without changing the result.",
            inputs=[
                types.VideoModel.Input("video_model", tooltip="The video model to run on windows."),
                io.Int.Input("context_length", default=D.context_length, min=1, max=1024,
                             tooltip="Frames per window (AnimateDiff motion modules were trained on 16)."),
                io.Int.Input("context_overlap", default=D.context_overlap, min=0, max=1023,
                             tooltip="Frames shared by neighbouring windows."),
                io.Combo.Input("context_schedule", options=list(SCHEDULES), default=D.context_schedule,
                               tooltip="standard_static: sliding windows, the same at every step; standard_uniform / "
                                       "looped_uniform: AnimateDiff's uniform windows whose offset moves every step "
                                       "(looped ones wrap around the clip); batched: no overlap."),
                io.Int.Input("context_stride", default=D.context_stride, min=1, max=32,
                             tooltip="Uniform schedules only: also use windows of every 2nd, 4th, ... frame."),
                io.Boolean.Input("closed_loop", default=D.closed_loop,
                                 tooltip="looped_uniform only: windows also join the last frames to the first."),
                io.Combo.Input("fuse_method", options=list(FUSE_METHODS), default=D.fuse_method,
                               tooltip="How overlapping windows are averaged per frame: pyramid (= relative; weights "
                                       "peak in a window's middle), flat, or overlap-linear (ramps over the overlap)."),
                io.Boolean.Input("freenoise", default=False,
                                 tooltip="FreeNoise: the starting noise of later windows repeats shuffled blocks of "
                                         "the earlier noise, so a long clip stays one scene (Qiu et al. 2023; "
                                         "AnimateDiff-Evolved's FreeNoise). Applies to every noise drawn for this "
                                         "video model; off = independent noise per frame."),
                io.Boolean.Input("branches_in_turn", default=False,
                                 tooltip="Run the guidance branches (prompt and negative prompt) one after the other "
                                         "instead of as one batch: about half the activation memory, same result. "
                                         "Chosen automatically after an out-of-memory error."),
                types.ContextOptions.Input("context_options", optional=True,
                                           tooltip="AnimateDiff-Evolved context options (its first context is "
                                                   "used); overrides the widgets."),
            ],
            outputs=[types.VideoModel.Output(display_name="video_model",
                                             tooltip="The same model (no copy), run on context windows.")])

    @classmethod
    def execute(cls, video_model, context_length, context_overlap, context_schedule, context_stride, closed_loop,
                fuse_method, freenoise, branches_in_turn, context_options=None) -> io.NodeOutput:
        node = "VBContextWindows"
        opts = ContextWindows(context_length, context_overlap, context_schedule, context_stride, closed_loop,
                              fuse_method, freenoise)
        try:
            if context_options is not None:
                opts = dataclasses.replace(from_context_options(context_options), freenoise=freenoise)
            opts.checked()
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        return io.NodeOutput(dataclasses.replace(video_model, context=opts, sequential_branches=branches_in_turn))


def from_context_options(obj) -> ContextWindows:
    """ContextWindows from an AnimateDiff-Evolved ``CONTEXT_OPTIONS`` object (a group: its first context; read by
    attribute name). Raises ValueError naming what it cannot use."""
    ctx = obj.contexts[0] if getattr(obj, "contexts", None) else obj
    try:
        sched = str(getattr(ctx, "context_schedule"))
        fuse = str(getattr(ctx, "fuse_method", "pyramid"))
        opts = ContextWindows(int(ctx.context_length), int(ctx.context_overlap), sched,
                              int(getattr(ctx, "context_stride", 1)), bool(getattr(ctx, "closed_loop", False)), fuse)
    except AttributeError as e:
        raise ValueError(f"context_options: not a context options object ({e})") from None
    if sched not in SCHEDULES or fuse not in FUSE_METHODS:
        raise ValueError(f"context_options: schedule {sched!r} / fuse method {fuse!r} is not supported here; "
                         f"supported: {list(SCHEDULES)} / {list(FUSE_METHODS)}")
    return opts
