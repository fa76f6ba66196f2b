"""Inputs several nodes share (seed, steps, frame chunking, attention capture/injection) and their conversion."""
from __future__ import annotations

import comfy.model_management as mm
import torch

from ..core.attention import SFI_PRESETS
from . import types
from .api import io

MAX_SEED = 0xFFFFFFFFFFFFFFFF
PRESETS = list(SFI_PRESETS)                                # "shallow", "deep"
ALL_IN_BANK = "all in the bank"
BANK_STORAGE = ["cpu (fp16)", "compute device (fp16)"]


def advanced(inp):
    """Mark a research or parity input advanced: the frontend folds it behind "Show Advanced" (frontends that honour
    the input spec's ``advanced`` flag; older ones show it as usual, last in the widget list)."""
    inp.extra_dict["advanced"] = True
    return inp


def seed(tooltip="Noise seed. Noise is drawn on the CPU, so a seed reproduces across hardware."):
    return io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True, tooltip=tooltip)


def steps(default=50, what="sampling", name="steps", tooltip=None):
    return io.Int.Input(name, default=default, min=1, max=1000,
                        tooltip=tooltip or f"DDIM {what} steps. Inversion and smoothing must use the same number.")


def frame_batch(default=0):
    return io.Int.Input("frame_batch_size", default=default, min=0, max=1024,
                        tooltip="Frames per image-UNet call. 0 = automatic: as many as the free GPU memory holds "
                                "(all frames on the CPU), halved on an out-of-memory error. Results do not change.")


# ------------------------------------------------------------------ selective feature injection
def sfi_gamma():
    return io.Float.Input("sfi_gamma", default=SFI_PRESETS["shallow"][1], min=0.0, max=1.0, step=0.05,
                          tooltip="Selective Feature Injection blend gamma (EVS Eq. 11): the share of the inversion's "
                                  "queries; keys and values always come from the inversion. The paper's points: 0.5 "
                                  "with 'shallow' layers, 0.8 with 'deep'. Higher keeps more of the source video.")


def sfi_layers(options=PRESETS, default="shallow"):
    return io.Combo.Input("sfi_layers", options=list(options), default=default,
                          tooltip="Attention layers whose features are captured/injected: 'shallow' = the 9 decoder "
                                  "spatial self-attention layers (up_blocks 1-3), 'deep' = 6 (up_blocks 1-2). Motion "
                                  "modules are never injected.")


def bank_storage():
    return io.Combo.Input("bank_storage", options=BANK_STORAGE, default=BANK_STORAGE[0],
                          tooltip="Where captured attention features are kept: CPU memory (default; frees GPU "
                                  "memory) or the compute device (faster, uses its memory). Always fp16.")


def bank_budget():
    return io.Float.Input("bank_budget_gb", default=8.0, min=0.0, max=1024.0, step=0.5,
                          tooltip="Largest attention bank allowed, in GiB (0 = no limit). A larger one is refused "
                                  "before sampling with its size; use fewer layers or steps, or a smaller video.")


def attention_bank_input():
    return types.AttentionBank.Input("attention_bank", optional=True,
                                     tooltip="Attention features captured by VBDDIMInvert (capture_attention on) or a "
                                             "block's inversion, injected by Selective Feature Injection.")


def storage(choice: str):
    """(dtype, device) of a ``bank_storage`` choice."""
    return torch.float16, ("cpu" if choice == BANK_STORAGE[0] else mm.get_torch_device())


def native_image_model(what: str, negative_for: str = "cfg > 1", vae: bool = False) -> list:
    """The optional inputs that put a native SD1.5 MODEL in place of a node's VB ``image_model``: ``model``,
    ``positive``, ``negative`` (and ``vae`` where the node encodes or decodes frames). ``what`` names the role
    ("the image model"), ``negative_for`` what needs the negative prompt."""
    inputs = [io.Model.Input("model", optional=True,
                             tooltip=f"A native SD1.5 MODEL (CheckpointLoaderSimple, LoRAs, patches) as {what}, "
                                     "instead of image_model; its prompts are then positive and negative."),
              io.Conditioning.Input("positive", optional=True,
                                    tooltip=f"Prompt of {what} for a native model (CLIPTextEncode)."),
              io.Conditioning.Input("negative", optional=True,
                                    tooltip=f"Negative prompt of {what} for a native model (needed for "
                                            f"{negative_for}).")]
    if vae:
        inputs.append(io.Vae.Input("vae", optional=True,
                                   tooltip="The VAE for a native model (CheckpointLoaderSimple's VAE output): encodes "
                                           "and decodes the frames."))
    return inputs


def native_video_model() -> list:
    """The optional inputs that put a native motion-injected MODEL in place of a node's VB ``video_model``:
    ``model``, ``positive``, ``negative``."""
    return [io.Model.Input("model", optional=True,
                           tooltip="A native SD1.5 MODEL with a motion module injected (AnimateDiff-Evolved's Apply "
                                   "AnimateDiff Model / Use Evolved Sampling) as the video model, instead of "
                                   "video_model; its prompts are then positive and negative. The whole clip is one "
                                   "batch, on the SD1.5 'leading' grid."),
            io.Conditioning.Input("positive", optional=True,
                                  tooltip="Prompt of the video model for a native model (CLIPTextEncode)."),
            io.Conditioning.Input("negative", optional=True,
                                  tooltip="Negative prompt for a native model (needed when cfg > 1).")]
