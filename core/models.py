"""Offline model loaders: SD1.5-family image models, AnimateDiff / ZeroScope video models, ControlNets, prompts.

Everything here is plain torch + diffusers + transformers + safetensors and never imports ComfyUI. Nothing may ever
touch the Hugging Face Hub: every ``from_single_file`` / ``from_pretrained`` call passes ``local_files_only=True`` and
an explicit config (built from the tensors for single files, read from the folder for diffusers folders). Model kinds
and variants are detected from state-dict keys and tensor shapes, never from file names (MODELS.md §1).

Sources: MODELS.md §3.1-3.9 (the verified recipes followed here), diffusers 0.42.1
``loaders/single_file_utils.py`` (the LDM -> diffusers converters) and ``models/unets/unet_motion_model.py``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .schedule import ANIMATEDIFF_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, NoiseSchedule

# diffusers 0.42 warns on every dtype cast "There are modules in X that should be kept in float32: []" even when that
# list is empty; with nothing in it the warning says nothing, so it is dropped (non-empty lists still show).
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())

if TYPE_CHECKING:  # the heavy imports happen inside the loaders
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel
    from diffusers import UNetMotionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

__all__ = [
    "ImageModel", "VideoModel", "PerFrameGroupNorm", "read_state_dict", "detect_file_kind",
    "sd15_configs_from_weights", "load_image_model", "load_tokenizer", "clip_tokenizer_from_open_clip",
    "load_motion_adapter", "use_per_frame_motion_norm", "build_animatediff", "load_unet3d_folder",
    "controlnet_config_from_weights", "load_controlnet", "encode_prompts", "list_diffusers_folders",
    "VARIANTS_BY_IN_CHANNELS", "TOKENIZER_MAX_LENGTH", "is_full_clip", "load_clip_model", "share_spatial_modules",
]

TOKENIZER_MAX_LENGTH = 77
VARIANTS_BY_IN_CHANNELS = {4: "base", 9: "inpainting", 8: "instruct_pix2pix"}
"""UNet ``conv_in`` input channels -> image-model variant (MODELS.md §3.3)."""

_U, _V = "model.diffusion_model.", "first_stage_model."
_CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
_SUPPORTED_IMAGE = "only SD1.5-family checkpoints (base, inpainting, InstructPix2Pix) are supported"


# ====================================================================================================== bundles
@dataclass
class ImageModel:
    """An SD1.5-family model bundle (MODELS.md §3.2-3.3).

    ``variant`` is "base" | "inpainting" | "instruct_pix2pix" (UNet ``in_channels`` 4 / 9 / 8); ``schedule`` is the
    SD1.5 scaled_linear schedule (or the diffusers folder's own scheduler config); ``source`` is the file or folder.
    """
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizer"
    schedule: NoiseSchedule
    variant: str
    source: str


@dataclass
class VideoModel:
    """A text-to-video model bundle.

    ``unet`` is a ``UNetMotionModel`` (AnimateDiff, ``kind == "motion"``: text embeddings ``(B*F, 77, D)``) or a
    ``UNet3DConditionModel`` (ZeroScope/ModelScope, ``kind == "unet3d"``: text embeddings ``(B, 77, D)``); both take
    samples ``(B, C, F, H, W)``. ``family`` is "animatediff-v1" | "animatediff-v2" | "animatediff-v3" | "zeroscope".
    ``vae`` is the folder's VAE for ZeroScope and None for AnimateDiff (which uses the image model's VAE).
    ``spacing`` is the default timestep spacing; callers may set "trailing" for AnimateDiff-Lightning.
    """
    unet: Union["UNetMotionModel", "UNet3DConditionModel"]
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizer"
    schedule: NoiseSchedule
    family: str
    vae: Optional["AutoencoderKL"]
    source: str
    spacing: str = "leading"

    @property
    def kind(self) -> str:
        """"motion" for AnimateDiff (UNetMotionModel), "unet3d" for ZeroScope/ModelScope (UNet3DConditionModel)."""
        return "motion" if self.family.startswith("animatediff") else "unet3d"


# ====================================================================================================== reading files
class _LightningStub:
    """Stand-in for the pytorch_lightning / numpy objects old ``.ckpt`` files pickle next to their weights."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _pickle_stubs() -> list:
    """Safe globals for ``torch.load(weights_only=True)`` on original SD ``.ckpt`` files (ComfyUI does the same)."""
    stubs = []
    for module, name in (("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                         ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
                         ("pytorch_lightning.callbacks.lr_monitor", "LearningRateMonitor")):
        stubs.append(type(name, (_LightningStub,), {"__module__": module, "__qualname__": name}))
    try:  # numpy scalars (e.g. best_model_score) in some callback states, under numpy 1.x and 2.x names
        import codecs

        import numpy as np
        core = getattr(np, "_core", None) or np.core
        stubs += [np.dtype, core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                  codecs.encode]
        stubs += [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    except Exception:  # pragma: no cover - numpy is optional here
        pass
    return stubs


def read_state_dict(path: str) -> dict:
    """Read a weights file into a flat ``{key: tensor}`` dict on the CPU.

    Formats: ``.safetensors`` (safetensors), ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (``torch.load`` with
    ``weights_only=True``; pytorch_lightning callback objects pickled in original SD ``.ckpt`` files are read as
    inert stubs). Nested ``"state_dict"`` entries are unwrapped, non-tensor entries (``global_step`` ...) dropped.
    Raises ``FileNotFoundError`` naming the path when it does not exist, ``ValueError`` naming the file, its folder
    and the fix ("download it again") for unreadable, truncated or empty files.
    Source: diffusers ``load_single_file_checkpoint`` (same unwrapping), without its Hub fallback.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path!r}")
    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            kw = {"mmap": True} if zipfile.is_zipfile(path) else {}
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, **kw)
            except pickle.UnpicklingError:
                with torch.serialization.safe_globals(_pickle_stubs()):
                    sd = torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:                      # SafetensorError, UnpicklingError, zip/EOF errors, ...
        raise ValueError(f"'{name}' in {os.path.dirname(os.path.abspath(path))} is incomplete or not a model; "
                         f"download it again ({type(e).__name__}: {str(e)[:200]})") from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"'{name}' does not contain a state dict (found {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _ids(sd: dict, prefix: str) -> list[int]:
    """Distinct integer indices that follow ``prefix`` in the keys (MODELS.md §3.2)."""
    out = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".")[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _has_prefix(sd: dict, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


def detect_file_kind(sd: dict) -> str:
    """Classify a state dict by its keys and shapes (never by file name; MODELS.md §2).

    Returns one of "sd15_checkpoint", "sd2_or_sdxl_checkpoint", "motion_module", "controlnet", "t2i_adapter",
    "unknown". SD2.x / SDXL: ``cond_stage_model.model.*`` (OpenCLIP) / ``conditioner.embedders.*`` keys, SDXL's
    ``label_emb``, or a 1024/2048-wide cross-attention / linear ``proj_in`` UNet. ControlNet: ``[control_model.]
    input_hint_block.*`` or diffusers ``controlnet_cond_embedding.*``. Motion module: ``*.motion_modules.*``.
    T2I-Adapter: TencentARC ``body.N.*`` or diffusers ``adapter.body.*``.
    """
    if _has_prefix(sd, "conditioner.embedders.", "cond_stage_model.model."):
        return "sd2_or_sdxl_checkpoint"
    if _U + "input_blocks.0.0.weight" in sd:
        if _has_prefix(sd, _U + "label_emb."):
            return "sd2_or_sdxl_checkpoint"
        k = next((k for k in sd if k.startswith(_U) and k.endswith(".attn2.to_k.weight")), None)
        if k is not None and sd[k].shape[1] in (1024, 2048):
            return "sd2_or_sdxl_checkpoint"
        return "sd15_checkpoint"
    if any(("input_hint_block." in k and k.split("input_hint_block.")[0] in ("", "control_model.")) for k in sd) \
            or "controlnet_cond_embedding.conv_in.weight" in sd:
        return "controlnet"
    if any(".motion_modules." in k or k.startswith("motion_modules.") for k in sd):
        return "motion_module"
    if _has_prefix(sd, "adapter.body.") or (_has_prefix(sd, "body.") and ("conv_in.weight" in sd)):
        return "t2i_adapter"
    return "unknown"


def _wrong_kind(name: str, kind: str, expected: str) -> ValueError:
    """A ValueError that names the file, what it is and which loader takes it."""
    hints = {
        "sd15_checkpoint": "is an SD1.5-family checkpoint; load it with VBLoadImageModel",
        "sd2_or_sdxl_checkpoint": f"is an SD2.x or SDXL checkpoint; {_SUPPORTED_IMAGE}",
        "motion_module": "is an AnimateDiff motion module; load it with VBLoadVideoModel",
        "controlnet": "is a ControlNet; load it with VBLoadControlNet",
        "t2i_adapter": "is a T2I-Adapter; load it with VBLoadControlNet (it serves ControlNets and T2I-Adapters)",
        "unknown": "is not a recognised model file (no SD1.5 UNet, motion module or ControlNet keys)",
    }
    return ValueError(f"'{name}' {hints[kind]} (expected {expected})")


# ====================================================================================================== SD1.5 image
def sd15_configs_from_weights(sd: dict, unet_heads: int = 8) -> tuple[dict, dict]:
    """Derive the LDM ``original_config`` (UNet + VAE) and the ``CLIPTextConfig`` kwargs of an SD1.5-family file.

    Every number comes from tensor shapes except the head counts, which use SD1.5's rule: ``unet_heads`` (8) UNet
    heads and ``hidden // 64`` CLIP heads (MODELS.md §3.2, verified to reproduce SD1.5's configs at full size).
    Raises ``ValueError`` for SD2.x/SDXL keys, a UNet whose cross-attention width differs from the text encoder's,
    and files without a VAE or text encoder.
    """
    if _has_prefix(sd, "conditioner.", "cond_stage_model.model."):
        raise ValueError(f"SDXL or SD2.x checkpoint; {_SUPPORTED_IMAGE}")
    s = lambda k: sd[k].shape  # noqa: E731
    mc, in_ch = s(_U + "input_blocks.0.0.weight")[:2]
    ops = [i for i in _ids(sd, _U + "input_blocks.") if _U + f"input_blocks.{i}.0.op.weight" in sd]
    nrb = ops[0] - 1 if ops else _ids(sd, _U + "input_blocks.")[-1]
    first = [i * (nrb + 1) + 1 for i in range(len(ops) + 1)]  # first res block of every level
    a0 = _U + f"input_blocks.{first[0]}.1."
    if a0 + "transformer_blocks.0.attn2.to_k.weight" not in sd:
        a0 = next((_U + f"input_blocks.{b}.1." for b in first
                   if _U + f"input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight" in sd), None)
        if a0 is None:
            raise ValueError("the UNet has no cross-attention layers; " + _SUPPORTED_IMAGE)
    context_dim = s(a0 + "transformer_blocks.0.attn2.to_k.weight")[1]
    linear = len(s(a0 + "proj_in.weight")) == 2
    if linear or context_dim in (1024, 2048):
        raise ValueError(f"SD2.x-like UNet (cross-attention width {context_dim}, linear proj_in={linear}); "
                         + _SUPPORTED_IMAGE)
    unet = dict(in_channels=int(in_ch), out_channels=int(s(_U + "out.2.weight")[0]), model_channels=int(mc),
                num_res_blocks=nrb,
                channel_mult=[s(_U + f"input_blocks.{b}.0.out_layers.3.weight")[0] // mc for b in first],
                attention_resolutions=[2 ** i for i, b in enumerate(first)
                                       if _U + f"input_blocks.{b}.1.proj_in.weight" in sd],
                num_heads=unet_heads, use_spatial_transformer=True, transformer_depth=1,
                context_dim=int(context_dim), use_linear_in_transformer=linear)
    if _V + "encoder.conv_in.weight" not in sd:
        raise ValueError("the checkpoint has no VAE ('first_stage_model.*' keys); " + _SUPPORTED_IMAGE
                         + " as full single files")
    ch = s(_V + "encoder.conv_in.weight")[0]
    vae = dict(double_z=True, z_channels=int(s(_V + "quant_conv.weight")[0]) // 2, resolution=256, in_channels=3,
               out_ch=3, ch=int(ch), attn_resolutions=[], dropout=0.0,
               num_res_blocks=len(_ids(sd, _V + "encoder.down.0.block.")),
               ch_mult=[s(_V + f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in _ids(sd, _V + "encoder.down.")])
    ldm = {"model": {"params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
                                "scale_factor": 0.18215, "unet_config": {"params": unet},
                                "first_stage_config": {"params": {"embed_dim": vae["z_channels"], "ddconfig": vae}}}}}
    T = next((p for p in _CLIP_PREFIXES if p + "embeddings.token_embedding.weight" in sd), None)  # old merges lack text_model.
    if T is None:
        raise ValueError("the checkpoint has no CLIP text encoder ('cond_stage_model.transformer.*' keys); "
                         + _SUPPORTED_IMAGE + " as full single files")
    vocab, hidden = s(T + "embeddings.token_embedding.weight")
    if hidden != context_dim:
        raise ValueError(f"text encoder width {hidden} does not match the UNet cross-attention width {context_dim}")
    clip = dict(vocab_size=int(vocab), hidden_size=int(hidden),
                intermediate_size=int(s(T + "encoder.layers.0.mlp.fc1.weight")[0]),
                num_hidden_layers=len(_ids(sd, T + "encoder.layers.")), num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=int(s(T + "embeddings.position_embedding.weight")[0]),
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=int(hidden),
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return ldm, clip


def _clip_from_ldm(sd: dict, clip_cfg: dict, dtype: torch.dtype) -> "CLIPTextModel":
    """Build the CLIP text encoder from the ``cond_stage_model.transformer.*`` tensors, matching whichever key layout
    the installed transformers uses (nested ``text_model.*`` before 5.6, flat after; MODELS.md §3.2)."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights(include_buffers=False):
        te = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    own = te.state_dict()
    nested = any(k.startswith("text_model.") for k in own)
    te_sd = {("text_model." if nested else "") + k.removeprefix("text_model."): v
             for k, v in convert_ldm_clip_checkpoint(sd).items()}
    te_sd = {k: v for k, v in te_sd.items() if k in own and own[k].shape == v.shape}  # drops position_ids etc.
    missing, _ = te.load_state_dict(te_sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"text encoder weights missing from the checkpoint: {missing[:3]}")
    return _frozen(te.to(dtype))


def bytes_to_unicode() -> dict:
    """The GPT-2 / CLIP byte -> printable-character map (MODELS.md §3.4)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _open_clip_bpe_bytes(source: Optional[str] = None) -> Optional[bytes]:
    """The gzipped CLIP BPE file shipped by the ``open_clip_torch`` package (never imported), or None."""
    if source is not None and os.fspath(source).endswith(".whl"):
        return zipfile.ZipFile(source).read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    if source is None:
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        source = list(spec.submodule_search_locations)[0]
    p = os.path.join(source, "bpe_simple_vocab_16e6.txt.gz")
    return open(p, "rb").read() if os.path.isfile(p) else None


def clip_tokenizer_from_open_clip(source: Optional[str] = None) -> "CLIPTokenizer":
    """The real CLIP BPE tokenizer (49,408 ids, pad = end = 49407), built from the ``open_clip_torch`` wheel's
    ``bpe_simple_vocab_16e6.txt.gz`` (MODELS.md §3.4). ``source``: a wheel path, the package folder, or None for the
    installed package (found with ``importlib.util.find_spec``; ``open_clip`` itself is never imported because it
    imports torchvision). Raises ``FileNotFoundError`` when no BPE file can be found.
    """
    from transformers import CLIPTokenizer

    raw = _open_clip_bpe_bytes(source)
    if raw is None:
        raise FileNotFoundError("open_clip_torch's bpe_simple_vocab_16e6.txt.gz was not found")
    text = gzip.decompress(raw).decode("utf-8")
    merges = [tuple(m.split()) for m in text.split("\n")[1:49152 - 256 - 2 + 1]]  # 48,894 merges
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]  # 49,408 ids
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=TOKENIZER_MAX_LENGTH)


def load_tokenizer(tokenizer_dir: Optional[str] = None, subfolder: Optional[str] = None) -> "CLIPTokenizer":
    """Load a ``CLIPTokenizer`` offline with ``model_max_length=77``.

    ``tokenizer_dir``: a tokenizer folder (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), e.g. ComfyUI's
    ``comfy/sd1_tokenizer`` (whose config says 8192, hence the override) or a diffusers folder with ``subfolder``.
    None: fall back to :func:`clip_tokenizer_from_open_clip` if ``open_clip_torch`` is installed, else raise
    ``ValueError`` explaining what to pass. Missing folder -> ``FileNotFoundError``. (MODELS.md §3.4)
    """
    from transformers import CLIPTokenizer

    if tokenizer_dir is None:
        try:
            return clip_tokenizer_from_open_clip()
        except FileNotFoundError:
            raise ValueError("no tokenizer: SD1.5 single files contain no tokenizer. Pass tokenizer_dir (inside "
                             "ComfyUI: the comfy/sd1_tokenizer folder) or install open_clip_torch, whose wheel ships "
                             "the CLIP BPE vocabulary") from None
    folder = os.path.join(tokenizer_dir, subfolder) if subfolder else tokenizer_dir
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder!r}")
    return CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, subfolder=subfolder or "",
                                         model_max_length=TOKENIZER_MAX_LENGTH)


def _variant(in_channels: int, name: str) -> str:
    try:
        return VARIANTS_BY_IN_CHANNELS[int(in_channels)]
    except KeyError:
        raise ValueError(f"'{name}': UNet input has {in_channels} channels; expected 4 (base), 9 (inpainting) or "
                         "8 (InstructPix2Pix)") from None


def _frozen(module):
    """Inference-only module: eval mode, no parameter gradients (the engine never needs them, ARCHITECTURE §5)."""
    return module.eval().requires_grad_(False)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _folder_modules(folder: str, unet_cls, dtype: torch.dtype) -> tuple:
    """(unet, vae, text_encoder, tokenizer) of a diffusers folder, offline, frozen; ValueError naming the folder
    when the text encoder's width does not match the UNet's cross-attention width."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    unet = unet_cls.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True)
    if te.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(f"'{os.path.basename(os.path.normpath(folder))}': text encoder width "
                         f"{te.config.hidden_size} does not match the UNet cross-attention width "
                         f"{unet.config.cross_attention_dim}")
    return _frozen(unet), _frozen(vae), _frozen(te), load_tokenizer(folder, subfolder="tokenizer")


def _load_image_folder(folder: str, dtype: torch.dtype) -> ImageModel:
    """SD1.5-family diffusers folder: unet/vae/text_encoder/tokenizer subfolders + scheduler config."""
    from diffusers import UNet2DConditionModel

    name = os.path.basename(os.path.normpath(folder))
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"'{name}' is a folder without model_index.json; expected a diffusers pipeline folder")
    index = _read_json(index_path)
    unet_cls = (index.get("unet") or [None, None])[1]
    if unet_cls == "UNet3DConditionModel":
        raise ValueError(f"'{name}' is a ZeroScope/ModelScope video model (UNet3DConditionModel); "
                         "load it with VBLoadVideoModel")
    if unet_cls != "UNet2DConditionModel":
        raise ValueError(f"'{name}': model_index.json names unet class {unet_cls!r}; expected UNet2DConditionModel "
                         f"({_SUPPORTED_IMAGE})")
    if "text_encoder_2" in index:
        raise ValueError(f"'{name}' is an SDXL pipeline (text_encoder_2); {_SUPPORTED_IMAGE}")
    ucfg = _read_json(os.path.join(folder, "unet", "config.json"))
    if ucfg.get("addition_embed_type") or ucfg.get("use_linear_projection") \
            or ucfg.get("cross_attention_dim") in (1024, 2048):
        raise ValueError(f"'{name}' is an SD2.x/SDXL-like UNet (cross_attention_dim "
                         f"{ucfg.get('cross_attention_dim')}); {_SUPPORTED_IMAGE}")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scfg = _read_json(sched_path) if os.path.isfile(sched_path) else dict(SD15_SCHEDULER_CONFIG)
    pred = scfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"'{name}' is a {pred} model (scheduler prediction_type={pred!r}); only epsilon-prediction "
                         f"models are supported ({_SUPPORTED_IMAGE})")
    unet, vae, te, tok = _folder_modules(folder, UNet2DConditionModel, dtype)
    return ImageModel(unet, vae, te, tok, NoiseSchedule.from_config(scfg), _variant(unet.config.in_channels, name),
                      folder)


def load_image_model(path: str, tokenizer_dir: Optional[str] = None,
                     dtype: torch.dtype = torch.float32) -> ImageModel:
    """Load an SD1.5-family image model (base / inpainting / InstructPix2Pix) offline.

    ``path``: an LDM-layout single file as found in ComfyUI's ``models/checkpoints`` (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer[.text_model].*``; fp16/fp32, with or without
    ``model_ema.*``; architecture derived from tensor shapes, MODELS.md §3.2), or a diffusers folder with
    ``model_index.json`` (unet / vae / text_encoder / tokenizer subfolders, scheduler/scheduler_config.json).
    The variant comes from the UNet input channels (4 / 9 / 8, MODELS.md §3.3). ``tokenizer_dir``: single files
    carry no tokenizer; pass ComfyUI's ``comfy/sd1_tokenizer`` (see :func:`load_tokenizer` for the fallback).

    Returns an :class:`ImageModel` in eval mode, weights in ``dtype``, SD1.5 scaled_linear schedule (or the
    folder's). Raises ``FileNotFoundError`` (missing path) and ``ValueError`` naming the file for: SD2.x / SDXL,
    v-prediction folders, motion modules / ControlNets / T2I-Adapters, unknown files and unsupported channel counts.
    Sources: diffusers ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file`` with a
    dict ``original_config``, ``convert_ldm_clip_checkpoint``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_image_folder(path, dtype)
    name = os.path.basename(path)
    sd = read_state_dict(path)
    kind = detect_file_kind(sd)
    if kind != "sd15_checkpoint":
        raise _wrong_kind(name, kind, "an SD1.5-family checkpoint: base, inpainting or InstructPix2Pix")
    try:
        ldm, clip = sd15_configs_from_weights(sd)
    except ValueError as e:
        raise ValueError(f"'{name}': {e}") from None
    except (KeyError, IndexError) as e:
        raise ValueError(f"'{name}' has SD1.5 UNet keys but an unsupported layout (missing {e}); "
                         + _SUPPORTED_IMAGE) from None
    variant = _variant(ldm["model"]["params"]["unet_config"]["params"]["in_channels"], name)
    unet = UNet2DConditionModel.from_single_file(sd, original_config=ldm, torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_single_file(sd, original_config=ldm, torch_dtype=dtype, local_files_only=True)
    te = _clip_from_ldm(sd, clip, dtype)
    tok = load_tokenizer(tokenizer_dir)
    return ImageModel(_frozen(unet), _frozen(vae), te, tok, NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG),
                      variant, path)


# ====================================================================================================== AnimateDiff
def load_motion_adapter(path: str, dtype: torch.dtype = torch.float32, num_heads: int = 8,
                        norm_groups: int = 32) -> tuple["MotionAdapter", str]:
    """Load an SD1.5 AnimateDiff motion module into a diffusers ``MotionAdapter`` (MODELS.md §3.5).

    Accepts the original layout (``temporal_transformer``, ``attention_blocks``, ``pos_encoder.pe``) and the
    diffusers layout (``attn1``); the channel widths and motion layers per block come from the weights, heads and
    groups use AnimateDiff's fixed 8 / 32. The number of UNet levels is read from the keys (SD1.5 has 4; any count
    whose widths match the image UNet works). Returns ``(adapter, family)`` with family "v1" (no mid block, pe 24),
    "v2" (mid block; Lightning has the same structure) or "v3" (no mid block, pe 32). Position embeddings are
    sinusoids recomputed at construction (``motion_max_seq_length = max(32, pe length)``).
    Raises ``FileNotFoundError`` and ``ValueError`` "'<name>' is not an AnimateDiff motion module (no down/up block
    motion modules)". Source: diffusers ``convert_animatediff_checkpoint_to_diffusers``.
    """
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    name = os.path.basename(os.fspath(path))
    raw = read_state_dict(path)
    pe = [v.shape[1] for k, v in raw.items() if k.endswith((".pos_encoder.pe", ".pos_embed.pe"))]
    sd = raw if any(".attn1." in k for k in raw) else convert_animatediff_checkpoint_to_diffusers(raw)
    sd = {k: v for k, v in sd.items() if not k.endswith(".pos_embed.pe")}
    levels = [i for i in _ids(sd, "down_blocks.") if f"down_blocks.{i}.motion_modules.0.proj_in.weight" in sd]
    if not levels or levels != list(range(len(levels))) or "up_blocks.0.motion_modules.0.proj_in.weight" not in sd:
        kind = detect_file_kind(raw)
        what = {"sd15_checkpoint": "; it is an SD1.5 checkpoint, load it with VBLoadImageModel",
                "controlnet": "; it is a ControlNet, load it with VBLoadControlNet",
                "sd2_or_sdxl_checkpoint": "; it is an SD2.x/SDXL checkpoint"}.get(kind, "")
        raise ValueError(f"'{name}' is not an AnimateDiff motion module (no down/up block motion modules){what}")
    if any("controlnet_cond_embedding" in k for k in sd):
        raise ValueError(f"'{name}' is a SparseCtrl model, not a motion module; it is not supported")
    mid = any(k.startswith("mid_block.") for k in sd)
    layers = len(_ids(sd, "down_blocks.0.motion_modules."))
    adapter = MotionAdapter(
        block_out_channels=tuple(int(sd[f"down_blocks.{i}.motion_modules.0.proj_in.weight"].shape[1]) for i in levels),
        motion_layers_per_block=layers, motion_num_attention_heads=num_heads, motion_norm_num_groups=norm_groups,
        use_motion_mid_block=mid, motion_max_seq_length=max([32] + pe))
    missing, unexpected = adapter.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.endswith("pos_embed.pe")]
    if unexpected or bad:
        raise ValueError(f"'{name}': motion module keys do not match an AnimateDiff adapter "
                         f"(missing {bad[:3]}, unexpected {list(unexpected)[:3]})")
    family = "v2" if mid else ("v1" if pe and max(pe) == 24 else "v3")
    return _frozen(adapter.to(dtype)), family


class PerFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm that normalises every frame of a ``(b, c, f, h, w)`` tensor separately, as the original AnimateDiff
    code (on ``(b*f, c, h, w)``) that the published motion modules were trained with (METHODS.md §7.2 I11,
    MODELS.md §3.6). diffusers' ``AnimateDiffTransformer3D.norm`` pools statistics over all frames instead.
    Same parameters and state-dict keys as ``nn.GroupNorm``; 4-D inputs behave exactly like ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def use_per_frame_motion_norm(unet: torch.nn.Module) -> int:
    """Turn the input GroupNorm of every ``AnimateDiffTransformer3D`` in ``unet`` into a :class:`PerFrameGroupNorm`
    in place (class swap: same parameters, no copy). Returns how many norms were switched."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    n = 0
    for m in unet.modules():
        if isinstance(m, AnimateDiffTransformer3D) and type(m.norm) is torch.nn.GroupNorm:
            m.norm.__class__ = PerFrameGroupNorm
            n += 1
    return n


SPATIAL_TOP = ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out")
SPATIAL_IN_BLOCKS = ("attentions", "resnets", "downsamplers", "upsamplers")


def share_spatial_modules(video_unet: torch.nn.Module, unet: torch.nn.Module) -> None:
    """Make the AnimateDiff UNet use the image UNet's spatial module objects (convolutions, resnets, spatial
    transformers, samplers, time embedding): one set of parameters, so any ``.to(device)`` of either model moves the
    same tensors and the weights never exist twice, on the GPU or in RAM (MODELS.md §3.6; shared storage alone is
    undone by the first device move). Only the motion modules are the video UNet's own. Both models compute exactly
    what they did before. Attention processors set on a shared layer apply to both models."""
    for name in SPATIAL_TOP:
        if hasattr(unet, name):
            setattr(video_unet, name, getattr(unet, name))
    for kind in ("down_blocks", "up_blocks"):
        for vb, ib in zip(getattr(video_unet, kind), getattr(unet, kind)):
            for name in SPATIAL_IN_BLOCKS:
                if getattr(ib, name, None) is not None:
                    setattr(vb, name, getattr(ib, name))
    for name in SPATIAL_IN_BLOCKS:
        if getattr(unet.mid_block, name, None) is not None:
            setattr(video_unet.mid_block, name, getattr(unet.mid_block, name))


def build_animatediff(image_model: ImageModel, adapter: "MotionAdapter", family: str,
                      dtype: Optional[torch.dtype] = None, source: Optional[str] = None) -> VideoModel:
    """Assemble an AnimateDiff ``UNetMotionModel`` from an SD1.5 base image model and a motion adapter.

    The spatial weights are shared with ``image_model.unet`` without copying (constructed on the meta device, then
    ``load_state_dict(..., assign=True)``: 0.3 s instead of 25 s at full size, MODELS.md §3.6), and the spatial
    modules themselves are the image UNet's (:func:`share_spatial_modules`), so the sharing survives device moves;
    unless ``dtype`` differs from the image UNet's dtype, in which case they are cast copies. Every motion-module input norm is a
    per-frame GroupNorm (:class:`PerFrameGroupNorm`). Text encoder and tokenizer are shared with the image model;
    ``vae`` is None; the schedule is AnimateDiff's linear-beta schedule. ``family`` is the adapter family from
    :func:`load_motion_adapter` ("v1"/"v2"/"v3", or already prefixed "animatediff-...").
    Raises ``ValueError`` for a non-base image model (inpainting / InstructPix2Pix) or mismatched channel widths.
    """
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel

    if image_model.variant != "base":
        raise ValueError(f"AnimateDiff needs a base SD1.5 image model; '{os.path.basename(image_model.source)}' is "
                         f"an {image_model.variant} model (UNet input {image_model.unet.config.in_channels} channels)")
    unet = image_model.unet
    ub, ab = tuple(unet.config.block_out_channels), tuple(adapter.config.block_out_channels)
    if ub != ab:
        raise ValueError(f"motion module channel widths {ab} do not match the image UNet's {ub}")
    dtype = dtype or unet.dtype
    unet_sd = {k: (v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype))
               for k, v in unet.state_dict().items()}
    ad_sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in adapter.state_dict().items()}
    with init_empty_weights():
        video_unet = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    video_unet.load_state_dict({**unet_sd, **ad_sd}, strict=True, assign=True)
    leftover = [n for n, t in [*video_unet.named_parameters(), *video_unet.named_buffers()] if t.is_meta]
    if leftover:  # pragma: no cover - guarded by strict=True
        raise RuntimeError(f"UNetMotionModel has unloaded tensors: {leftover[:3]}")
    if dtype == unet.dtype:
        share_spatial_modules(video_unet, unet)
    use_per_frame_motion_norm(video_unet)
    fam = family if family.startswith("animatediff") else f"animatediff-{family}"
    return VideoModel(_frozen(video_unet), image_model.text_encoder, image_model.tokenizer,
                      NoiseSchedule.from_config(ANIMATEDIFF_SCHEDULER_CONFIG), fam, None,
                      source or image_model.source)


# ====================================================================================================== ZeroScope
def load_unet3d_folder(folder: str, dtype: torch.dtype = torch.float32) -> VideoModel:
    """Load a ZeroScope / ModelScope diffusers folder (MODELS.md §3.9) as a ``VideoModel`` (kind "unet3d").

    One ``from_pretrained(folder, subfolder=..., local_files_only=True)`` each for ``UNet3DConditionModel`` (unet/),
    ``AutoencoderKL`` (vae/), ``CLIPTextModel`` (text_encoder/, 1024-d for ZeroScope) and ``CLIPTokenizer``
    (tokenizer/, model_max_length 77); ``.bin`` or safetensors weights. The schedule comes from
    scheduler/scheduler_config.json (scaled_linear DDIM for ZeroScope; SD1.5's when absent).
    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` naming the folder when model_index.json is
    missing or names no ``UNet3DConditionModel``, or for a non-epsilon scheduler.
    """
    from diffusers import UNet3DConditionModel

    folder = os.fspath(folder)
    name = os.path.basename(os.path.normpath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder!r}")
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"'{name}' has no model_index.json; expected a ZeroScope/ModelScope diffusers folder")
    unet_cls = (_read_json(index_path).get("unet") or [None, None])[1]
    if unet_cls != "UNet3DConditionModel":
        raise ValueError(f"'{name}' is not a ZeroScope/ModelScope video model: its model_index.json names unet class "
                         f"{unet_cls!r}, expected 'UNet3DConditionModel'")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scfg = _read_json(sched_path) if os.path.isfile(sched_path) else dict(SD15_SCHEDULER_CONFIG)
    try:
        schedule = NoiseSchedule.from_config(scfg)
    except ValueError as e:
        raise ValueError(f"'{name}': {e}") from None
    unet, vae, te, tok = _folder_modules(folder, UNet3DConditionModel, dtype)
    return VideoModel(unet, te, tok, schedule, "zeroscope", vae, folder)


# ====================================================================================================== ControlNet
def controlnet_config_from_weights(raw: dict, heads: int = 8, norm_groups: int = 32) -> dict:
    """``ControlNetModel`` kwargs derived from a ControlNet state dict (MODELS.md §3.7).

    Handles the ControlNet v1.x LDM layout (``control_model.``-prefixed or bare ``input_blocks`` /
    ``input_hint_block`` / ``zero_convs``) and the diffusers layout (``controlnet_cond_embedding.*``,
    ``down_blocks.*``). Heads follow SD1.5's 8-head rule (invisible in weights).
    """
    if "controlnet_cond_embedding.conv_in.weight" in raw:  # diffusers layout
        s = lambda k: raw[k].shape  # noqa: E731
        levels = _ids(raw, "down_blocks.")
        blocks = _ids(raw, "controlnet_cond_embedding.blocks.")
        return dict(in_channels=s("conv_in.weight")[1], conditioning_channels=s("controlnet_cond_embedding.conv_in.weight")[1],
                    layers_per_block=len(_ids(raw, "down_blocks.0.resnets.")),
                    block_out_channels=[s(f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in levels],
                    down_block_types=["CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in raw
                                      else "DownBlock2D" for i in levels],
                    cross_attention_dim=next(v.shape[1] for k, v in raw.items() if k.endswith("attn2.to_k.weight")),
                    conditioning_embedding_out_channels=[s("controlnet_cond_embedding.conv_in.weight")[0]]
                    + [s(f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in blocks[1::2]],
                    attention_head_dim=heads, norm_num_groups=norm_groups)
    p = "control_model." if any(k.startswith("control_model.") for k in raw) else ""
    s = lambda k: raw[p + k].shape  # noqa: E731
    ops = [i for i in _ids(raw, p + "input_blocks.") if p + f"input_blocks.{i}.0.op.weight" in raw]
    first = [i * ops[0] + 1 for i in range(len(ops) + 1)]  # ops[0] = res blocks per level + 1
    hint = _ids(raw, p + "input_hint_block.")  # convs 0,2,...,14; the last is conv_out
    attn_first = next(b for b in first if p + f"input_blocks.{b}.1.proj_in.weight" in raw)
    return dict(in_channels=s("input_blocks.0.0.weight")[1], conditioning_channels=s("input_hint_block.0.weight")[1],
                layers_per_block=ops[0] - 1,
                block_out_channels=[s(f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in first],
                down_block_types=["CrossAttnDownBlock2D" if p + f"input_blocks.{b}.1.proj_in.weight" in raw
                                  else "DownBlock2D" for b in first],
                cross_attention_dim=s(f"input_blocks.{attn_first}.1.transformer_blocks.0.attn2.to_k.weight")[1],
                conditioning_embedding_out_channels=[s(f"input_hint_block.{i}.weight")[0] for i in hint[:-1:2]],
                attention_head_dim=heads, norm_num_groups=norm_groups)


def t2i_adapter_from_weights(raw: dict, name: str) -> tuple:
    """The diffusers ``T2IAdapter`` state dict and config of a T2I-Adapter file (MODELS.md §3.8).

    TencentARC "full adapter" keys (``conv_in.*``, ``body.{i}.block{1,2}.*``, ``body.{i}.in_conv.*``; i runs over
    levels x res blocks) are renamed to diffusers' ``adapter.conv_in.*``, ``adapter.body.{level}.resnets.{j}.*``,
    ``adapter.body.{level}.in_conv.*``; diffusers-format files (``adapter.*``) are kept. Returns
    ``(state_dict, config)``. Raises ValueError naming the file for SDXL adapters (pixel-unshuffle 16: ``conv_in``
    takes a multiple of 256 channels), light/style adapters and unknown layouts.
    """
    sd = {k[len("adapter."):]: v for k, v in raw.items() if k.startswith("adapter.")} or dict(raw)
    if "conv_in.weight" not in sd or any(".body." in k for k in sd if k.startswith("body.")):
        raise ValueError(f"'{name}' is a T2I-Adapter of another kind (light/colour or style adapters are not "
                         "supported); use a full adapter: canny, sketch, depth, openpose, seg, zoedepth, lineart")
    cin = sd["conv_in.weight"].shape[1]
    if cin % 256 == 0:
        raise ValueError(f"'{name}' is an SDXL T2I-Adapter (its input is pixel-unshuffled by 16: {cin} channels); "
                         "only SD1.5 adapters (by 8) are supported")
    if cin % 64:
        raise ValueError(f"'{name}': T2I-Adapter conv_in takes {cin} channels, not a multiple of 64 (8x8 pixel "
                         "unshuffle); unsupported layout")
    raw_ids = _ids(sd, "body.")
    if not any(k.startswith("body.") and ".resnets." in k for k in sd):                  # TencentARC layout
        levels = 4
        per = len(raw_ids) // levels
        if per < 1 or len(raw_ids) % levels:
            raise ValueError(f"'{name}': {len(raw_ids)} T2I-Adapter blocks do not split into 4 levels")
        out = {}
        for k, v in sd.items():
            if not k.startswith("body."):
                out[k] = v
                continue
            i, rest = k[len("body."):].split(".", 1)
            level, j = divmod(int(i), per)
            out[f"body.{level}.{rest}" if rest.startswith("in_conv.") else f"body.{level}.resnets.{j}.{rest}"] = v
        sd = out
    levels = _ids(sd, "body.")
    per = len(_ids(sd, "body.0.resnets."))
    config = dict(in_channels=cin // 64, channels=[sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in levels],
                  num_res_blocks=per, downscale_factor=8, adapter_type="full_adapter")
    return {"adapter." + k: v for k, v in sd.items()}, config


def load_controlnet(path: str, dtype: torch.dtype = torch.float32, **overrides):
    """Load an SD1.5 ControlNet (v1.0/v1.1 LDM layout with or without ``control_model.``, or a diffusers-format
    single file) into a diffusers ``ControlNetModel`` in eval mode (MODELS.md §3.7), or an SD1.5 T2I-Adapter
    (TencentARC full adapter or diffusers layout) into a diffusers ``T2IAdapter`` (§3.8): ComfyUI keeps both in
    ``models/controlnet`` (and ``models/t2i_adapter``) and applies both as control.

    The config is derived from the weights (diffusers' ``from_single_file`` with an ``original_config`` is broken in
    0.42.1) and the keys converted with ``convert_controlnet_checkpoint``; loading is strict. ``overrides`` go to
    the ControlNet config, e.g. ``global_pool_conditions=True`` for shuffle. The hint image is 8x the latent size.
    Raises ``FileNotFoundError`` and ``ValueError`` naming the file for other files (SD checkpoints, motion
    modules, SparseCtrl, SD2.x/SDXL ControlNets and adapters).
    """
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    name = os.path.basename(os.fspath(path))
    raw = read_state_dict(path)
    kind = detect_file_kind(raw)
    if kind == "t2i_adapter":
        from diffusers import T2IAdapter

        sd, cfg = t2i_adapter_from_weights(raw, name)
        model = T2IAdapter(**cfg)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"'{name}': T2I-Adapter weights do not match the derived config: {str(e)[:500]}") \
                from None
        return _frozen(model.to(dtype))
    if kind != "controlnet":
        raise _wrong_kind(name, kind, "an SD1.5 ControlNet or T2I-Adapter")
    if any("motion_modules." in k for k in raw):
        raise ValueError(f"'{name}' is a SparseCtrl model; it is not supported as a ControlNet")
    try:
        cfg = {**controlnet_config_from_weights(raw), **overrides}
    except (KeyError, StopIteration, IndexError) as e:
        raise ValueError(f"'{name}' looks like a ControlNet but its layout is not supported (missing {e})") from None
    if cfg["cross_attention_dim"] in (1024, 2048):
        raise ValueError(f"'{name}' is an SD2.x/SDXL ControlNet (cross-attention {cfg['cross_attention_dim']}); "
                         "only SD1.5 ControlNets are supported")
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = ControlNetModel(**cfg)
    converted = convert_controlnet_checkpoint(raw, dict(model.config))
    converted = {k: v for k, v in converted.items() if v is not None}
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"'{name}': ControlNet weights do not match the derived config: {str(e)[:500]}") from None
    return _frozen(model.to(dtype))


# ====================================================================================================== prompts & folders
def encode_prompts(text_encoder: "CLIPTextModel", tokenizer: "CLIPTokenizer", prompts: Sequence[str],
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Encode prompts to CLIP ``last_hidden_state`` embeddings ``[N, 77, D]`` (float32).

    Padding to ``max_length`` 77 with truncation, as SD1.5 / ZeroScope pipelines do; the encoder runs in its own
    dtype on ``device`` (default: the encoder's device). Raises ``ValueError`` when the tokenizer produces ids the
    encoder's vocabulary cannot embed (a tiny stand-in encoder with a full tokenizer).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(list(prompts), padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    vocab = text_encoder.config.vocab_size
    if int(ids.max()) >= vocab:
        raise ValueError(f"tokenizer produced token id {int(ids.max())} but the text encoder has only {vocab} "
                         "embeddings: tokenizer and text encoder do not belong together")
    dev = torch.device(device) if device is not None else next(text_encoder.parameters()).device
    with torch.no_grad():
        out = text_encoder(ids.to(dev)).last_hidden_state
    return out.float()


def list_diffusers_folders(roots: Iterable[str], unet_class: Optional[Union[str, Sequence[str]]] = None) -> list[str]:
    """Sub-folders (one or two levels deep, e.g. ``<root>/zeroscope_v2_576w`` or ``<root>/cerspense/zeroscope``)
    of ``roots`` that contain a ``model_index.json``, optionally only those whose ``unet`` entry class name is
    ``unet_class`` (a name or a list of names). Missing roots are skipped; unreadable indexes are ignored.
    Returns full paths, sorted per root (MODELS.md §3.9)."""
    wanted = None if unet_class is None else ({unet_class} if isinstance(unet_class, str) else set(unet_class))

    def ok(folder):
        if wanted is None:
            return True
        try:
            return (_read_json(os.path.join(folder, "model_index.json")).get("unet") or [None, None])[1] in wanted
        except (OSError, ValueError, TypeError, IndexError):
            return False

    found = []
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        for a in sorted(os.listdir(root)):
            sub = os.path.join(root, a)
            if not os.path.isdir(sub):
                continue
            if os.path.isfile(os.path.join(sub, "model_index.json")):
                if ok(sub):
                    found.append(sub)
                continue
            for b in sorted(os.listdir(sub)):
                sub2 = os.path.join(sub, b)
                if os.path.isfile(os.path.join(sub2, "model_index.json")) and ok(sub2):
                    found.append(sub2)
    return found


# ====================================================================================================== CLIP scorer
CLIP_SCORER_KEYS = ("text_projection.weight", "visual_projection.weight",
                    "text_model.embeddings.token_embedding.weight", "vision_model.embeddings.class_embedding")


def is_full_clip(keys) -> bool:
    """True when a state dict's keys hold a whole transformers ``CLIPModel`` (both towers and both projections), as
    openai/clip-vit-* ``model.safetensors`` do; vision-only ``clip_vision`` files and SD text encoders do not."""
    keys = set(keys)
    return all(k in keys for k in CLIP_SCORER_KEYS)


def load_clip_model(path: str, dtype: torch.dtype = torch.float32) -> "CLIPModel":
    """A whole CLIP model (text and vision towers) from one transformers-layout weights file, offline, for scoring
    text-image similarity (I4VGen's CLIP anchor scorer, MODELS.md §9.4).

    The architecture is read from the tensor shapes: widths, layer counts, MLP sizes, patch size, image size
    (sqrt of the position count), vocabulary, context length and projection width; heads = width / 64 (every OpenAI
    and LAION CLIP). The activation cannot be read from weights: quick_gelu (OpenAI) unless the vision width is
    1280 or more (LAION ViT-H/G: gelu). Raises ``ValueError`` naming the file when it is not a whole CLIP model.
    """
    from transformers import CLIPConfig, CLIPModel

    name = os.path.basename(os.fspath(path))
    sd = read_state_dict(path)
    if not is_full_clip(sd):
        raise ValueError(f"'{name}' is not a whole CLIP model (text and vision towers with projections); "
                         "vision-only clip_vision files cannot score text")
    tok, vpos = sd["text_model.embeddings.token_embedding.weight"], sd["vision_model.embeddings.position_embedding.weight"]
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    v_width, t_width = int(sd["vision_model.embeddings.class_embedding"].shape[0]), int(tok.shape[1])
    grid = int(round((vpos.shape[0] - 1) ** 0.5))
    act = "gelu" if v_width >= 1280 else "quick_gelu"
    text = dict(vocab_size=int(tok.shape[0]), hidden_size=t_width, num_attention_heads=max(1, t_width // 64),
                intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=len(_ids(sd, "text_model.encoder.layers.")),
                max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
                hidden_act=act, eos_token_id=49407, bos_token_id=49406, pad_token_id=1)
    vision = dict(hidden_size=v_width, num_attention_heads=max(1, v_width // 64),
                  intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                  num_hidden_layers=len(_ids(sd, "vision_model.encoder.layers.")), patch_size=int(patch.shape[-1]),
                  image_size=int(patch.shape[-1]) * grid, hidden_act=act)
    config = CLIPConfig(text_config=text, vision_config=vision,
                        projection_dim=int(sd["text_projection.weight"].shape[0]))
    with torch.device("meta"):
        model = CLIPModel(config)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"'{name}': CLIP weights do not match the architecture read from them "
                         f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    for mod in model.modules():                          # buffers that are not in the file (position ids)
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                mod.register_buffer(bname, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
    return _frozen(model.to(dtype))
