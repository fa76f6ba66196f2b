"""Custom socket types that pass between VideoBridge nodes only (native IMAGE/MASK/LATENT at every boundary).

- ``VB_IMAGE_MODEL``: an SD1.5-family bundle (UNet, VAE, CLIP-L text encoder, tokenizer, schedule, variant
  base / inpainting / instruct_pix2pix), each heavy module behind a ComfyUI ModelPatcher.
- ``VB_VIDEO_MODEL``: an AnimateDiff UNetMotionModel (on top of a VB_IMAGE_MODEL) or a ZeroScope/ModelScope
  UNet3D with its own text encoder and VAE.
- ``VB_CONTROLNET``: a ControlNet v1.1 model, applied by VBFramewiseGenerate.
- ``VB_ATTENTION_BANK``: Q/K/V features captured during a video-model DDIM inversion (``core.attention.FeatureBank``,
  keyed by layer and timestep, on the CPU in fp16 by default), injected by Selective Feature Injection.
- ``CONTEXT_OPTIONS``: AnimateDiff-Evolved's context options, accepted by VBContextWindows.
"""
from .api import io

ImageModel = io.Custom("VB_IMAGE_MODEL")
VideoModel = io.Custom("VB_VIDEO_MODEL")
ControlNet = io.Custom("VB_CONTROLNET")
AttentionBank = io.Custom("VB_ATTENTION_BANK")
ContextOptions = io.Custom("CONTEXT_OPTIONS")      # AnimateDiff-Evolved's context options (read by VBContextWindows)
