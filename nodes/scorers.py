"""I4VGen anchor scorers on what is on disk (METHODS.md §3.2, MODELS.md §9). Nothing is ever downloaded.

- ``imagereward``: ImageReward (the official scorer) when the ``image-reward`` package is installed and
  ``models/image_reward`` holds ``ImageReward.pt`` and ``med_config.json`` (BLIP's BERT tokenizer must already be in
  the Hugging Face cache; the hub is read offline).
- ``clip``: text-image cosine of a whole CLIP model (both towers, transformers layout ``.safetensors``, e.g.
  openai/clip-vit-large-patch14's ``model.safetensors``) found in ``models/clip_vision`` or ``models/clip``.
- ``weight-free``: the diffusion-classifier score of the loaded image model plus sharpness/exposure (§6.2).
- ``first``: candidate 0. ``auto`` takes the first available of imagereward, clip, weight-free.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from typing import Optional

import folder_paths
import torch

from ..core import i4vgen
from ..core.callbacks import NO_CALLBACKS
from ..core.denoisers import Branch, UNet2DDenoiser
from ..core.models import is_full_clip, load_clip_model, load_tokenizer
from . import runtime

log = logging.getLogger(__name__)

REWARD_KEY = "image_reward"
CLIP_KEYS = ("clip_vision", "clip")


def register_reward_folder() -> None:
    folder_paths.add_model_folder_path(REWARD_KEY, os.path.join(folder_paths.models_dir, REWARD_KEY))


def find_imagereward() -> Optional[tuple]:
    """(weights .pt, med_config.json) from a ``models/image_reward`` folder, or None."""
    for root in folder_paths.get_folder_paths(REWARD_KEY) if REWARD_KEY in folder_paths.folder_names_and_paths else []:
        pts = sorted(glob.glob(os.path.join(root, "ImageReward*.pt")))
        med = os.path.join(root, "med_config.json")
        if pts and os.path.isfile(med):
            return pts[0], med
    return None


def find_clip() -> Optional[str]:
    """The first ``.safetensors`` file in ``clip_vision`` or ``clip`` that holds a whole CLIP model (its keys are read
    without loading tensors), or None."""
    from safetensors import safe_open

    for key in CLIP_KEYS:
        for root in folder_paths.get_folder_paths(key) if key in folder_paths.folder_names_and_paths else []:
            for path in sorted(glob.glob(os.path.join(root, "**", "*.safetensors"), recursive=True)):
                try:
                    with safe_open(path, framework="pt") as f:
                        if is_full_clip(f.keys()):
                            return path
                except Exception:                   # unreadable files are some other node's problem
                    continue
    return None


def _imagereward_available() -> Optional[tuple]:
    files = find_imagereward()
    if files is None:
        return None
    if "ImageReward" not in sys.modules and importlib.util.find_spec("ImageReward") is None:
        log.warning("ImageReward weights are in models/%s but the image-reward package is not installed; "
                    "using another scorer", REWARD_KEY)
        return None
    return files


def resolve(choice: str, node: str) -> tuple:
    """(scorer, detail): the scorer ``choice`` stands for, with the file it uses. ``auto`` falls back in the order
    imagereward, clip, weight-free; an explicit choice whose files are missing raises ValueError saying where to put
    them."""
    if choice not in i4vgen.SCORERS:
        raise ValueError(f"{node}: scorer must be one of {list(i4vgen.SCORERS)}, got {choice!r}")
    if choice in ("imagereward", "auto"):
        files = _imagereward_available()
        if files:
            return "imagereward", files
        if choice == "imagereward":
            raise ValueError(f"{node}: scorer 'imagereward' needs the image-reward package and ImageReward.pt + "
                             f"med_config.json in models/{REWARD_KEY}; nothing is downloaded. Use 'auto' or "
                             "'weight-free' instead")
    if choice in ("clip", "auto"):
        path = find_clip()
        if path:
            return "clip", path
        if choice == "clip":
            raise ValueError(f"{node}: scorer 'clip' needs a whole CLIP model (text and vision towers, e.g. "
                             "openai/clip-vit-large-patch14 model.safetensors) in models/clip_vision or models/clip; "
                             "vision-only files cannot score text. Use 'auto' or 'weight-free' instead")
    return ("weight-free", None) if choice in ("weight-free", "auto") else ("first", None)


def score(kind: str, detail, image_model, prompt: str, negative_prompt: str, images: torch.Tensor,
          latents: torch.Tensor, seed: int, callbacks=None, alignment=None) -> dict:
    """Scores of N candidates: images ``[N, H, W, 3]`` in 0..1 and their scaled latents ``[1, 4, N, h, w]``.
    Returns a dict of [N] tensors with "score" (higher is better) and the scorer's components. (``first`` does not
    score: its callers take candidate 0.) The weight-free scorer runs the VB ``image_model``, or ``alignment``
    (latents -> ``core.i4vgen.diffusion_alignment``) when the image model is a native MODEL (``image_model`` None);
    the CLIP scorer then tokenizes with ComfyUI's own CLIP tokenizer."""
    if kind == "weight-free":
        if alignment is None:
            m = image_model.model
            text, null = runtime.encode(image_model, [prompt, negative_prompt]).split(1)
            n, hw = latents.shape[2], tuple(latents.shape[-2:])
            device = runtime.load(image_model.unet, rows=2 * n, latent_hw=hw)
            den = UNet2DDenoiser(m.unet, m.schedule, frame_batch_size=runtime.frame_chunk(0, n, 2, hw))

            def alignment(z):
                return i4vgen.diffusion_alignment(den, z.to(device), Branch(text), Branch(null), seed,
                                                  callbacks=callbacks or NO_CALLBACKS)
        return i4vgen.weight_free_scores(alignment(latents), images)
    if kind == "clip":
        model = load_clip_model(detail)
        device = runtime.load(runtime.patcher(model, "text"))
        tokenizer = image_model.model.tokenizer if image_model is not None else load_tokenizer(runtime.tokenizer_dir())
        return i4vgen.clip_scores(model.to(device), tokenizer, prompt, images.to(device))
    if kind == "imagereward":
        return {"score": imagereward_scores(detail, prompt, images)}
    raise ValueError(f"unknown scorer {kind!r}")


def imagereward_scores(files: tuple, prompt: str, images: torch.Tensor) -> torch.Tensor:
    """ImageReward scores (the official I4VGen selection, pipeline_animation.py) of ``[N, H, W, 3]`` images, read
    offline from ``files`` = (weights, med_config). Returns [N] float32."""
    import ImageReward as RM
    from PIL import Image

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = RM.load(files[0], device=str(runtime.mm.get_torch_device()), med_config=files[1])
    pil = [Image.fromarray((im.clamp(0, 1) * 255).round().byte().cpu().numpy()) for im in images]
    with torch.no_grad():
        scores = model.score(prompt, pil)
    return torch.tensor(scores if isinstance(scores, (list, tuple)) else [scores], dtype=torch.float32).flatten()


def table(kind: str, scores: Optional[dict], index: int) -> str:
    """A readable table of every candidate's score and components, the chosen one marked."""
    if not scores:
        return f"scorer: {kind}; anchor: candidate {index} (not scored)"
    keys = [k for k in ("score", "alignment", "sharpness", "exposure") if k in scores]
    lines = [f"scorer: {kind}; anchor: candidate {index}", "  #  " + "  ".join(f"{k:>10}" for k in keys)]
    for n in range(len(scores["score"])):
        mark = "*" if n == index else " "
        lines.append(f"{mark}{n:>2}  " + "  ".join(f"{float(scores[k][n]):>10.4f}" for k in keys))
    return "\n".join(lines)
