"""Tiny deterministic random-weight "stand-in" models, written in the REAL file layouts users have on disk.

Used by the tests (round trips through ``core/models.py``) and by the main-job script, which runs the workflows on
these stand-ins when the user's real model files are absent. Every writer is seeded (same seed -> same tensors) and
returns the in-memory diffusers / transformers modules it wrote (in the written dtype), so tests can compare the
loaded tensors with ``torch.equal``.

Tiers (MODELS.md §4, "sd15tiny-LDM"): UNet channels (32, 32, 64, 64), 2 res blocks per level, 32 groups, 8 heads,
cross-attention = CLIP width; VAE (32, 32, 64, 64), 1 res block per level; CLIP with the full 49,408-token vocabulary
(inside ComfyUI the real SD1 tokenizer produces ids up to 49,407). The diffusers -> LDM converters below invert
diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_controlnet_checkpoint`` /
``convert_ldm_clip_checkpoint`` and the AnimateDiff rename.

Command line: ``python tools/standins.py MODELS_DIR`` creates the standard stand-ins missing from a ComfyUI models dir.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:          # run as a script; never reorder a path that has it (its nodes/ shadows ComfyUI's)
    sys.path.insert(0, _ROOT)
from core.models import bytes_to_unicode  # noqa: E402  (also run as a script: python tools/standins.py DIR)

TINY_CHANNELS = (32, 32, 64, 64)
TINY_LAYERS = 2
TINY_GROUPS = 32
TINY_HEADS = 8
CLIP_VOCAB = 49408
CLIP_HIDDEN = 32  # SD1 stand-in text width = UNet cross-attention width (768 at full size)
ZEROSCOPE_HIDDEN = 96  # ZeroScope's OpenCLIP-H is wider than SD1.5's CLIP-L (1024 vs 768)
HINT_CHANNELS = (16, 16, 32, 32)  # ControlNet hint encoder (16, 32, 96, 256 at full size)
SD15_ATTENTION = (0, 1, 2)  # levels with cross-attention blocks in SD1.5
STANDIN_ATTENTION = (1, 2)  # the smoke-run stand-ins skip the full-resolution level: 6x faster, same file layout

STANDIN_FILES = {
    "sd15": "checkpoints/v1-5-pruned-emaonly.safetensors",
    "sd15_inpainting": "checkpoints/sd-v1-5-inpainting.safetensors",
    "sd15_ip2p": "checkpoints/instruct-pix2pix-00-22000.safetensors",
    "controlnet_canny": "controlnet/control_v11p_sd15_canny.safetensors",
    "animatediff_v2": "animatediff_models/mm_sd_v15_v2.ckpt",
    "animatediff_lightning": "animatediff_models/animatediff_lightning_8step_comfyui.safetensors",
    "zeroscope": "diffusers/zeroscope_v2_576w",
    "sd15_full_attention": "checkpoints/dreamshaper_8.safetensors",
    "t2i_adapter_canny": "t2i_adapter/t2iadapter_canny_sd15v2.pth",
    "lora_sd15": "loras/add_detail.safetensors",
}
"""Standard stand-in paths relative to a ComfyUI ``models`` dir, by role (the README lists these)."""

_SEEDS = {"sd15": 0, "sd15_inpainting": 1, "sd15_ip2p": 2, "controlnet_canny": 3, "animatediff_v2": 4,
          "zeroscope": 5, "animatediff_lightning": 6, "sd15_full_attention": 7, "t2i_adapter_canny": 8,
          "lora_sd15": 9}
_VARIANT_IN = {"base": 4, "inpainting": 9, "instruct_pix2pix": 8}


# ====================================================================================================== helpers
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (in place): norm weights 1 + 0.1·N, norm biases 0.1·N,
    other weights N(0, 1/fan_in) (variance preserving, so activations stay O(1)), other biases 0.05·N. Unlike a
    fresh diffusers model, no output conv is zero, so ControlNet residuals and motion modules have an effect."""
    g = torch.Generator().manual_seed(int(seed))
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for _, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if isinstance(m, norms):
                    v = 1 + 0.1 * r if pname == "weight" else 0.1 * r
                elif p.ndim >= 2:
                    v = r / math.sqrt(max(1, p[0].numel()))
                else:
                    v = 0.05 * r
                p.copy_(v.to(p.dtype))
    return module


def _save(sd: dict, path: str, wrap_state_dict: bool = False) -> None:
    """Write ``sd`` as .safetensors, or with torch.save for .ckpt/.pt/.pth/.bin (optionally under "state_dict")."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if path.endswith(".safetensors"):
        _save_safetensors(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 0} if wrap_state_dict else sd, path)


def _save_safetensors(sd: dict, path: str) -> None:
    """safetensors.torch.save_file, then the usual 0644 mode (safetensors 0.8 creates files as 0600)."""
    from safetensors.torch import save_file
    save_file(sd, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)


def _fix_modes(folder: str) -> None:
    """Make every weights file under ``folder`` 0644 (save_pretrained's safetensors files come out 0600)."""
    for dirpath, _, files in os.walk(folder):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def tiny_tokenizer_vocab() -> tuple[dict, list]:
    """The tiny CLIP BPE vocabulary of MODELS.md §4: byte symbols, end-of-word symbols, a few whole-word merges
    and the two specials (525 ids; end = pad = last id). Every string tokenizes."""
    syms = list(bytes_to_unicode().values())
    vocab, merges = syms + [s + "</w>" for s in syms], []
    for w in ("a", "cat", "dog", "the", "photo", "of"):
        ch = list(w)
        ch[-1] += "</w>"
        while len(ch) > 1:
            merges.append((ch[0], ch[1]))
            vocab.append(ch[0] + ch[1])
            ch = [ch[0] + ch[1]] + ch[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(vocab))}, list(dict.fromkeys(merges))


def open_clip_vocab(source: Optional[str] = None) -> Optional[tuple[dict, list]]:
    """The real 49,408-id CLIP vocabulary from the ``open_clip_torch`` package / wheel (never imported), or None."""
    import gzip
    import importlib.util
    import zipfile

    raw = None
    if source and source.endswith(".whl"):
        raw = zipfile.ZipFile(source).read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        spec = importlib.util.find_spec("open_clip") if source is None else None
        folder = source or (list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations
                            else None)
        p = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz") if folder else None
        if p and os.path.isfile(p):
            raw = open(p, "rb").read()
    if raw is None:
        return None
    text = gzip.decompress(raw).decode("utf-8")
    merges = [tuple(m.split()) for m in text.split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer_folder(folder: str, vocab: Optional[dict] = None, merges: Optional[list] = None,
                           model_max_length: int = 8192) -> str:
    """Write a CLIP tokenizer folder in the classic layout of ComfyUI's ``comfy/sd1_tokenizer`` and of diffusers
    repos (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json; ComfyUI's says 8192, the loader
    overrides it with 77). Default vocabulary: the tiny one of MODELS.md §4."""
    if vocab is None:
        vocab, merges = tiny_tokenizer_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    return folder


# ====================================================================================================== builders
def _down_types(attention_levels, n=4) -> tuple:
    return tuple("CrossAttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(n))


def tiny_unet_config(in_channels: int = 4, cross_attention_dim: int = CLIP_HIDDEN,
                     attention_levels: tuple = SD15_ATTENTION) -> dict:
    """UNet2DConditionModel kwargs of the SD1.5 block layout at channels (32, 32, 64, 64); ``attention_levels``
    are the resolution levels with cross-attention blocks (SD1.5: 0, 1, 2)."""
    down = _down_types(attention_levels)
    return dict(sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=TINY_LAYERS,
                block_out_channels=TINY_CHANNELS, down_block_types=down,
                up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
                cross_attention_dim=cross_attention_dim, attention_head_dim=TINY_HEADS, norm_num_groups=TINY_GROUPS)


def tiny_vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=TINY_CHANNELS, norm_num_groups=TINY_GROUPS, sample_size=512, scaling_factor=0.18215)


def tiny_clip_config(vocab_size: int = CLIP_VOCAB, hidden: int = CLIP_HIDDEN, bos: int = 49406, eos: int = 2,
                     pad: int = 1) -> dict:
    """CLIPTextConfig kwargs; heads by SD1.5's ``hidden // 64`` rule (MODELS.md §3.2)."""
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=hidden, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def build_sd15_modules(variant: str = "base", seed: int = 0, clip_vocab: int = CLIP_VOCAB,
                       clip_hidden: int = CLIP_HIDDEN, attention_levels: tuple = SD15_ATTENTION) -> dict:
    """Seeded tiny SD1.5-family modules: {"unet", "vae", "text_encoder"} (float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if variant not in _VARIANT_IN:
        raise ValueError(f"variant must be one of {sorted(_VARIANT_IN)}, got {variant!r}")
    unet = randomize_(UNet2DConditionModel(**tiny_unet_config(_VARIANT_IN[variant], clip_hidden, attention_levels)), seed)
    vae = randomize_(AutoencoderKL(**tiny_vae_config()), seed + 1000)
    te = randomize_(CLIPTextModel(CLIPTextConfig(**tiny_clip_config(clip_vocab, clip_hidden))), seed + 2000)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": te.eval()}


# ====================================================================================================== diffusers -> LDM
_RESNET_UNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _resnet_unet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET_UNET).get(head, head) + "." + tail


def unet_to_ldm(sd: dict, layers_per_block: int, up_attention: list[bool]) -> dict:
    """Diffusers UNet2DConditionModel / ControlNet-trunk keys -> LDM ``openaimodel`` keys (no prefix).

    Inverts diffusers ``convert_ldm_unet_checkpoint``: down level i block j -> input_blocks.{i(L+1)+j+1}; its
    downsampler -> input_blocks.{(i+1)(L+1)}.0.op; up level i block j -> output_blocks.{i(L+1)+j}; its upsampler ->
    output_blocks.{i(L+1)+L}.{2 if the level has attention else 1}.conv; mid block -> middle_block.{0,1,2}.
    ``up_attention[i]``: whether up level i has attentions.
    """
    L, out = layers_per_block, {}
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        p = k.split(".")
        mod, leaf = ".".join(p[:-1]), p[-1]
        if mod in simple:
            out[f"{simple[mod]}.{leaf}"] = v
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                out[f"input_blocks.{i * (L + 1) + int(p[3]) + 1}.0." + _resnet_unet(".".join(p[4:]))] = v
            elif p[2] == "attentions":
                out[f"input_blocks.{i * (L + 1) + int(p[3]) + 1}.1." + ".".join(p[4:])] = v
            elif p[2] == "downsamplers":
                out[f"input_blocks.{(i + 1) * (L + 1)}.0.op.{leaf}"] = v
            else:
                raise KeyError(k)
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                out[f"middle_block.{2 * int(p[2])}." + _resnet_unet(".".join(p[3:]))] = v
            else:
                out["middle_block.1." + ".".join(p[3:])] = v
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                out[f"output_blocks.{i * (L + 1) + int(p[3])}.0." + _resnet_unet(".".join(p[4:]))] = v
            elif p[2] == "attentions":
                out[f"output_blocks.{i * (L + 1) + int(p[3])}.1." + ".".join(p[4:])] = v
            elif p[2] == "upsamplers":
                out[f"output_blocks.{i * (L + 1) + L}.{2 if up_attention[i] else 1}.conv.{leaf}"] = v
            else:
                raise KeyError(k)
        else:
            raise KeyError(k)
    return out


def vae_to_ldm(sd: dict, num_levels: int) -> dict:
    """Diffusers AutoencoderKL keys -> LDM ``first_stage_model`` keys (no prefix); inverts diffusers
    ``convert_ldm_vae_checkpoint``: decoder up_blocks.i -> up.{n-1-i}; mid attention -> 1x1 convs q/k/v/proj_out."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]
        if p[1] in ("conv_in", "conv_out") or side in ("quant_conv", "post_quant_conv"):
            out[k] = v
        elif p[1] == "conv_norm_out":
            out[f"{side}.norm_out.{p[-1]}"] = v
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            lvl = f"{side}.down.{i}" if p[1] == "down_blocks" else f"{side}.up.{num_levels - 1 - i}"
            if p[3] == "resnets":
                name = p[5].replace("conv_shortcut", "nin_shortcut")
                out[f"{lvl}.block.{p[4]}.{name}.{p[-1]}"] = v
            else:  # downsamplers / upsamplers
                out[f"{lvl}.{'downsample' if p[1] == 'down_blocks' else 'upsample'}.conv.{p[-1]}"] = v
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                out[f"{side}.mid.block_{int(p[3]) + 1}.{p[4]}.{p[-1]}"] = v
            else:
                name = attn[p[4]]
                if name != "norm" and p[-1] == "weight":
                    v = v[:, :, None, None]
                out[f"{side}.mid.attn_1.{name}.{p[-1]}"] = v
        else:
            raise KeyError(k)
    return out


def sd15_to_ldm(unet, vae, text_encoder, old_clip_keys: bool = False) -> dict:
    """The three modules as one LDM-layout SD1.5 state dict (``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.transformer.[text_model.]``), plus the schedule buffers and ``position_ids`` real files carry."""
    cfg = unet.config
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), cfg.layers_per_block,
                                                                  up_attn).items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(),
                                                                  len(vae.config.block_out_channels)).items()})
    clip_prefix = "cond_stage_model.transformer." + ("" if old_clip_keys else "text_model.")
    for k, v in text_encoder.state_dict().items():
        sd[clip_prefix + k.removeprefix("text_model.")] = v
    sd[clip_prefix + "embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    from diffusers import DDPMScheduler
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sd["betas"], sd["alphas_cumprod"] = s.betas.clone(), s.alphas_cumprod.clone()
    sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1), s.alphas_cumprod[:-1]])
    return sd


# ====================================================================================================== writers
def write_sd15_checkpoint(path: str, variant: str = "base", dtype: torch.dtype = torch.float16, seed: int = 0,
                          clip_vocab: int = CLIP_VOCAB, ema: bool = False, old_clip_keys: bool = False,
                          clip_hidden: int = CLIP_HIDDEN, attention_levels: tuple = SD15_ATTENTION) -> dict:
    """Write a tiny SD1.5-family single file in the LDM layout of ComfyUI's ``models/checkpoints``.

    ``variant``: "base" | "inpainting" | "instruct_pix2pix" (UNet input 4 / 9 / 8). ``ema``: add ``model_ema.*``
    keys (flattened names, different values; loaders must read ``model.diffusion_model.*`` as ComfyUI does).
    ``old_clip_keys``: CLIP keys without ``text_model.`` (old merges). ``.safetensors`` or, for ``.ckpt``/``.pt``,
    ``torch.save({"state_dict": ...})``. Returns the written modules {"unet", "vae", "text_encoder"} in ``dtype``.
    """
    mods = build_sd15_modules(variant, seed, clip_vocab, clip_hidden, attention_levels)
    mods = {k: m.to(dtype) for k, m in mods.items()}
    sd = sd15_to_ldm(mods["unet"], mods["vae"], mods["text_encoder"], old_clip_keys)
    if ema:
        g = torch.Generator().manual_seed(seed + 3000)
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            v = sd[k]
            sd["model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")] = \
                (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    _save(_cast(sd, dtype) if dtype != torch.float32 else sd, path, wrap_state_dict=True)
    return mods


def write_sdxl_like_checkpoint(path: str, kind: str = "sdxl") -> None:
    """A tiny file with SDXL (``conditioner.embedders.*``) or SD2.x (``cond_stage_model.model.*``) keys, for
    refusal tests. Not a working model."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    sd = {"model.diffusion_model.input_blocks.0.0.weight": r(32, 4, 3, 3),
          "model.diffusion_model.input_blocks.1.1.proj_in.weight": r(32, 32),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": r(32, 64),
          "first_stage_model.encoder.conv_in.weight": r(32, 3, 3, 3)}
    if kind == "sdxl":
        sd.update({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": r(16, 32),
                   "conditioner.embedders.1.model.positional_embedding": r(77, 64),
                   "model.diffusion_model.label_emb.0.0.weight": r(32, 64)})
    else:
        sd.update({"cond_stage_model.model.token_embedding.weight": r(16, 64),
                   "cond_stage_model.model.positional_embedding": r(77, 64)})
    _save(sd, path)


def build_motion_adapter(version: str = "v2", seed: int = 0):
    """Seeded tiny MotionAdapter matching the tiny checkpoint's widths: v2 has a mid block; v1 pe length 24."""
    from diffusers import MotionAdapter

    if version not in ("v1", "v2", "v3"):
        raise ValueError(f"version must be 'v1', 'v2' or 'v3', got {version!r}")
    ad = MotionAdapter(block_out_channels=TINY_CHANNELS, motion_layers_per_block=TINY_LAYERS,
                       motion_num_attention_heads=TINY_HEADS, motion_norm_num_groups=TINY_GROUPS,
                       use_motion_mid_block=version == "v2", motion_max_seq_length=24 if version == "v1" else 32)
    return randomize_(ad, seed).eval()


def motion_to_original(sd: dict) -> dict:
    """Diffusers MotionAdapter keys -> original AnimateDiff keys (inverse of diffusers
    ``convert_animatediff_checkpoint_to_diffusers``): ``motion_modules.N.temporal_transformer.*``, ``attn1/2`` ->
    ``attention_blocks.0/1``, ``norm1/2/3`` -> ``norms.0/1`` / ``ff_norm``, and ``pos_embed.pe`` ->
    ``attention_blocks.{0,1}.pos_encoder.pe`` (both)."""
    out = {}
    for k, v in sd.items():
        head, sep, rest = k.partition(".motion_modules.")
        idx, _, rest = rest.partition(".")
        base = f"{head}.motion_modules.{idx}.temporal_transformer."
        if rest.endswith(".pos_embed.pe"):
            blk = rest[:-len(".pos_embed.pe")]
            for a in (0, 1):
                out[base + f"{blk}.attention_blocks.{a}.pos_encoder.pe"] = v
            continue
        rest = (rest.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
                .replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm."))
        out[base + rest] = v
    return out


def write_motion_module(path: str, version: str = "v2", seed: int = 0, layout: str = "original",
                        dtype: torch.dtype = torch.float16):
    """Write a tiny AnimateDiff motion module (v1 / v2 / v3) matching the tiny checkpoint's channel widths.

    ``layout="original"``: the AnimateDiff key layout with ``pos_encoder.pe`` buffers (length 24 for v1, 32 else);
    ``layout="diffusers"``: ``MotionAdapter.state_dict()`` keys (with ``pos_embed.pe``). ``.ckpt`` files are written
    with ``torch.save`` (a flat state dict, like ``mm_sd_v15_v2.ckpt``). Returns the written ``MotionAdapter``.
    """
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    ad = build_motion_adapter(version, seed).to(dtype)
    sd = ad.state_dict()
    _save(motion_to_original(sd) if layout == "original" else sd, path)
    return ad


def build_controlnet(seed: int = 0, cross_attention_dim: int = CLIP_HIDDEN, attention_levels: tuple = SD15_ATTENTION):
    """Seeded tiny ControlNetModel matching the tiny checkpoint (randomised: residuals are non-zero)."""
    from diffusers import ControlNetModel

    cn = ControlNetModel(in_channels=4, conditioning_channels=3, layers_per_block=TINY_LAYERS,
                         block_out_channels=TINY_CHANNELS,
                         down_block_types=_down_types(attention_levels),
                         cross_attention_dim=cross_attention_dim, attention_head_dim=TINY_HEADS,
                         norm_num_groups=TINY_GROUPS, conditioning_embedding_out_channels=HINT_CHANNELS)
    return randomize_(cn, seed).eval()


def controlnet_to_ldm(cn) -> dict:
    """Diffusers ControlNetModel keys -> ControlNet v1.1 keys (no prefix): trunk as :func:`unet_to_ldm`,
    ``controlnet_down_blocks.i`` -> ``zero_convs.i.0``, ``controlnet_mid_block`` -> ``middle_block_out.0``,
    hint convs -> ``input_hint_block.{0,2,...,14}``."""
    trunk, out = {}, {}
    for k, v in cn.state_dict().items():
        p = k.split(".")
        if p[0] == "controlnet_down_blocks":
            out[f"zero_convs.{p[1]}.0.{p[-1]}"] = v
        elif p[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{p[-1]}"] = v
        elif p[0] == "controlnet_cond_embedding":
            n_blocks = 2 * (len(cn.config.conditioning_embedding_out_channels) - 1)
            idx = {"conv_in": 0, "conv_out": 2 * (n_blocks + 1)}.get(p[1])
            out[f"input_hint_block.{idx if idx is not None else 2 * (int(p[2]) + 1)}.{p[-1]}"] = v
        else:
            trunk[k] = v
    out.update(unet_to_ldm(trunk, cn.config.layers_per_block, []))
    return out


def write_controlnet(path: str, seed: int = 0, layout: str = "ldm", dtype: torch.dtype = torch.float16,
                     attention_levels: tuple = SD15_ATTENTION):
    """Write a tiny SD1.5 ControlNet matching the tiny checkpoint.

    ``layout``: "ldm" (ControlNet v1.1 keys prefixed ``control_model.``, as ComfyUI's fp16 safetensors),
    "ldm_bare" (the same without prefix) or "diffusers" (``ControlNetModel.state_dict()`` keys).
    Returns the written ``ControlNetModel``.
    """
    cn = build_controlnet(seed, attention_levels=attention_levels).to(dtype)
    if layout == "diffusers":
        sd = cn.state_dict()
    elif layout in ("ldm", "ldm_bare"):
        prefix = "control_model." if layout == "ldm" else ""
        sd = {prefix + k: v for k, v in controlnet_to_ldm(cn).items()}
    else:
        raise ValueError(f"layout must be 'ldm', 'ldm_bare' or 'diffusers', got {layout!r}")
    _save(sd, path)
    return cn


def build_t2i_adapter(seed: int = 0, in_channels: int = 3, num_res_blocks: int = 2):
    """Seeded tiny SD1.5 T2I-Adapter (diffusers ``T2IAdapter``, full adapter) whose feature widths match the tiny
    checkpoint's UNet levels."""
    from diffusers import T2IAdapter

    return randomize_(T2IAdapter(in_channels=in_channels, channels=list(TINY_CHANNELS), num_res_blocks=num_res_blocks,
                                 downscale_factor=8, adapter_type="full_adapter"), seed).eval()


def t2i_adapter_to_tencentarc(sd: dict, num_res_blocks: int) -> dict:
    """Diffusers ``T2IAdapter`` keys -> TencentARC full-adapter keys (inverse of MODELS.md §3.8):
    ``adapter.body.{l}.resnets.{j}.*`` -> ``body.{l*n+j}.*``, ``adapter.body.{l}.in_conv.*`` -> ``body.{l*n}.in_conv.*``."""
    out = {}
    for k, v in sd.items():
        k = k[len("adapter."):]
        if k.startswith("body."):
            level, rest = k[len("body."):].split(".", 1)
            if rest.startswith("resnets."):
                j, rest = rest[len("resnets."):].split(".", 1)
                k = f"body.{int(level) * num_res_blocks + int(j)}.{rest}"
            else:
                k = f"body.{int(level) * num_res_blocks}.{rest}"
        out[k] = v
    return out


def write_t2i_adapter(path: str, seed: int = 0, in_channels: int = 3, layout: str = "tencentarc",
                      dtype: torch.dtype = torch.float16, num_res_blocks: int = 2):
    """Write a tiny SD1.5 T2I-Adapter: ``layout`` "tencentarc" (the released ``t2iadapter_*_sd15v2.pth`` keys) or
    "diffusers" (``T2IAdapter.state_dict()``). ``in_channels`` 1 for canny/sketch, 3 for depth/openpose.
    Returns the written ``T2IAdapter``."""
    ad = build_t2i_adapter(seed, in_channels, num_res_blocks).to(dtype)
    sd = ad.state_dict() if layout == "diffusers" else t2i_adapter_to_tencentarc(ad.state_dict(), num_res_blocks)
    _save(sd, path)
    return ad


ZEROSCOPE_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.15.0", "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                       "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def _save_weights(module, folder: str, name: str, bin_weights: bool, state_dict: Optional[dict] = None) -> None:
    """Replace a save_pretrained folder's weights by ``state_dict`` (default: the module's), safetensors or .bin."""
    sd = {k: v.detach().contiguous().clone() for k, v in (state_dict or module.state_dict()).items()}
    for f in os.listdir(folder):
        if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json"):
            os.remove(os.path.join(folder, f))
    if bin_weights:
        torch.save(sd, os.path.join(folder, name + ".bin"))
    else:
        _save_safetensors(sd, os.path.join(folder, name + ".safetensors"))


def write_zeroscope_folder(folder: str, seed: int = 0, dtype: torch.dtype = torch.float16,
                           tokenizer: str = "auto", bin_weights: bool = False,
                           prediction_type: str = "epsilon") -> dict:
    """Write a tiny ZeroScope-like diffusers folder: model_index.json (``UNet3DConditionModel``), unet/, vae/,
    text_encoder/ (CLIP width 96, mimicking ZeroScope's 1024 vs SD1.5's 768; keys in the nested ``text_model.*``
    layout of the real repo), tokenizer/ (vocab.json + merges.txt), scheduler/scheduler_config.json (scaled_linear
    DDIM). ``tokenizer``: "auto" (the real CLIP BPE from open_clip_torch if installed, else tiny), "openclip" or
    "tiny". ``bin_weights``: ``.bin`` files like cerspense/zeroscope_v2_576w. Returns {"unet", "vae",
    "text_encoder", "vocab_size"} (modules in ``dtype``)."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vm = None
    if tokenizer in ("auto", "openclip"):
        vm = open_clip_vocab()
        if vm is None and tokenizer == "openclip":
            raise FileNotFoundError("open_clip_torch is not installed")
    vocab, merges = vm if vm is not None else tiny_tokenizer_vocab()
    eos = vocab["<|endoftext|>"]
    unet = randomize_(UNet3DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=TINY_LAYERS, block_out_channels=TINY_CHANNELS,
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, cross_attention_dim=ZEROSCOPE_HIDDEN,
        attention_head_dim=8, norm_num_groups=TINY_GROUPS), seed).eval().to(dtype)
    vae = randomize_(AutoencoderKL(**tiny_vae_config()), seed + 1000).eval().to(dtype)
    te = randomize_(CLIPTextModel(CLIPTextConfig(**tiny_clip_config(
        len(vocab), ZEROSCOPE_HIDDEN, bos=vocab["<|startoftext|>"], eos=eos, pad=eos))), seed + 2000).eval().to(dtype)
    os.makedirs(folder, exist_ok=True)
    index = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.15.0",
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet3DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    for sub, mod, wname in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model")):
        mod.save_pretrained(os.path.join(folder, sub))
        _save_weights(mod, os.path.join(folder, sub), wname, bin_weights)
    te_dir = os.path.join(folder, "text_encoder")
    te.save_pretrained(te_dir)
    nested = {"text_model." + k.removeprefix("text_model."): v for k, v in te.state_dict().items()
              if not k.endswith("position_ids")}
    _save_weights(te, te_dir, "pytorch_model" if bin_weights else "model", bin_weights, nested)
    write_tokenizer_folder(os.path.join(folder, "tokenizer"), vocab, merges, model_max_length=77)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**ZEROSCOPE_SCHEDULER, "prediction_type": prediction_type}, f, indent=2)
    _fix_modes(folder)
    return {"unet": unet, "vae": vae, "text_encoder": te, "vocab_size": len(vocab)}


def write_sd15_diffusers_folder(folder: str, variant: str = "base", seed: int = 0,
                                dtype: torch.dtype = torch.float32, prediction_type: str = "epsilon") -> dict:
    """Write a tiny SD1.5-family diffusers folder (unet/, vae/, text_encoder/, tokenizer/ (tiny vocabulary),
    scheduler/, model_index.json). ``prediction_type="v_prediction"`` makes a folder the loaders must refuse.
    Returns the written modules."""
    vocab, merges = tiny_tokenizer_vocab()
    mods = {k: m.to(dtype) for k, m in build_sd15_modules(variant, seed, clip_vocab=len(vocab)).items()}
    os.makedirs(folder, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    for sub in ("unet", "vae", "text_encoder"):
        mods[sub].save_pretrained(os.path.join(folder, sub))
    write_tokenizer_folder(os.path.join(folder, "tokenizer"), vocab, merges, model_max_length=77)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**ZEROSCOPE_SCHEDULER, "_class_name": "PNDMScheduler", "prediction_type": prediction_type}, f)
    _fix_modes(folder)
    return mods


def write_lora(path: str, seed: int = 0, rank: int = 4, attention_levels: tuple = STANDIN_ATTENTION) -> dict:
    """A rank-``rank`` SD1.5 LoRA in the kohya layout most LoRA files use (``lora_unet_<diffusers module name>`` and
    ``lora_te_<transformers module name>``, ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``) for the stand-in
    checkpoints: every cross-attention key/value projection of the UNet and every text-encoder query projection.
    Written as safetensors; returns the state dict."""
    mods = build_sd15_modules("base", 0, attention_levels=attention_levels)
    te = getattr(mods["text_encoder"], "text_model", mods["text_encoder"])   # transformers 5 has no .text_model
    g, out = torch.Generator().manual_seed(seed), {}
    for prefix, module, wanted in (("lora_unet", mods["unet"], ("attn2.to_k", "attn2.to_v")),
                                   ("lora_te_text_model", te, ("self_attn.q_proj",))):
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(wanted):
                key = f"{prefix}_{name.replace('.', '_')}"
                out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.5
                out[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.5
                out[f"{key}.alpha"] = torch.tensor(float(rank))
    _save_safetensors(_cast(out, torch.float16), path)
    return out


def teach_comfyui() -> None:
    """Make a running ComfyUI recognise the stand-in checkpoints, as it recognises real SD1.5 files: ComfyUI detects
    SD1.5 by its real widths (model_channels 320, context_dim 768, a 128-wide VAE, a 768-wide CLIP-L) and refuses the
    stand-ins ("Could not detect model type"). This registers a test-only supported-model entry with the stand-in
    widths (its CLIP target a 32-wide CLIP on ComfyUI's own SD1 tokenizer) and gives ComfyUI's VAE the stand-in's
    layout when it meets a 32-wide one. For tests and stand-in runs only (``tools/comfy_standins`` loads it into a
    server); real files never match these widths. Idempotent."""
    import functools

    import comfy.sd
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb

    if any(m.__name__ == "StandinSD15" for m in sm.models):
        return
    clip_config = dict(tiny_clip_config(), architectures=["CLIPTextModel"], model_type="clip_text_model")

    class StandinClip(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options,
                             textmodel_json_config=clip_config)

    class StandinSD15(sm.SD15):
        unet_config = dict(sm.SD15.unet_config, context_dim=CLIP_HIDDEN, model_channels=TINY_CHANNELS[0])

        def clip_target(self, state_dict={}):
            return smb.ClipTarget(sd1_clip.SD1Tokenizer, functools.partial(sd1_clip.SD1ClipModel,
                                                                           clip_model=StandinClip))

    sm.models.insert(0, StandinSD15)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": TINY_CHANNELS[0], "ch_mult": [c // TINY_CHANNELS[0] for c in TINY_CHANNELS],
                "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae_init = comfy.sd.VAE.__init__

    def init(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        w = sd.get("encoder.conv_in.weight") if config is None and sd is not None else None
        if w is not None and w.shape[0] == TINY_CHANNELS[0]:
            config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
        vae_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)

    comfy.sd.VAE.__init__ = init

    import comfy.cldm.cldm as cldm
    import comfy.ops
    import torch.nn as nn

    cn_init = cldm.ControlNet.__init__

    def cn(self, *args, **kwargs):                         # ComfyUI's hint encoder widths are fixed (16, 32, 96, 256)
        cn_init(self, *args, **kwargs)
        names = ("image_size", "in_channels", "model_channels", "hint_channels")
        a = {**dict(zip(names, args)), **kwargs}
        if a["model_channels"] != TINY_CHANNELS[0]:
            return
        ops, dims = a.get("operations", comfy.ops.disable_weight_init), a.get("dims", 2)
        c = HINT_CHANNELS
        convs = [(a["hint_channels"], c[0], 1)] + [x for i in range(len(c) - 1)
                                                   for x in ((c[i], c[i], 1), (c[i], c[i + 1], 2))]
        layers = []
        for cin, cout, stride in convs + [(c[-1], a["model_channels"], 1)]:
            layers += [ops.conv_nd(dims, cin, cout, 3, padding=1, stride=stride, dtype=self.dtype,
                                   device=a.get("device")), nn.SiLU()]
        self.input_hint_block = cldm.TimestepEmbedSequential(*layers[:-1])

    cldm.ControlNet.__init__ = cn


# ====================================================================================================== the standard set
def _write_role(role: str, path: str) -> None:
    seed = _SEEDS.get(role, 0)
    if role == "sd15":
        write_sd15_checkpoint(path, "base", seed=seed, attention_levels=STANDIN_ATTENTION)
    elif role == "sd15_inpainting":
        write_sd15_checkpoint(path, "inpainting", seed=seed, attention_levels=STANDIN_ATTENTION)
    elif role == "sd15_ip2p":
        write_sd15_checkpoint(path, "instruct_pix2pix", seed=seed, attention_levels=STANDIN_ATTENTION)
    elif role == "controlnet_canny":
        write_controlnet(path, seed=seed, layout="ldm", attention_levels=STANDIN_ATTENTION)
    elif role == "animatediff_v2":
        write_motion_module(path, "v2", seed=seed, layout="original")
    elif role == "animatediff_lightning":                  # AnimateDiff-Lightning has the v2 structure
        write_motion_module(path, "v2", seed=seed, layout="original")
    elif role == "zeroscope":
        write_zeroscope_folder(path, seed=seed)
    elif role == "sd15_full_attention":                    # T2I-Adapters need SD1.5's full-resolution attention
        write_sd15_checkpoint(path, "base", seed=seed, attention_levels=SD15_ATTENTION)
    elif role == "t2i_adapter_canny":
        write_t2i_adapter(path, seed=seed, in_channels=1)
    elif role == "lora_sd15":
        write_lora(path, seed=seed)
    else:
        raise ValueError(f"unknown stand-in role {role!r}; known: {sorted(STANDIN_FILES)}")


def ensure_standins(models_dir: str, names: Optional[dict] = None) -> list[str]:
    """Create the stand-in models missing from a ComfyUI ``models`` dir; return the paths it created.

    ``names`` maps role -> path relative to ``models_dir`` (default :data:`STANDIN_FILES`: SD1.5 base, inpainting
    and InstructPix2Pix checkpoints, a canny ControlNet, AnimateDiff v2 and Lightning motion modules and a ZeroScope folder);
    pass a subset or other file names to change what is created. Existing files / folders are never overwritten.
    Each stand-in is written under a temporary name and renamed, so an interrupted run leaves no half file.
    """
    created = []
    for role, rel in (STANDIN_FILES if names is None else names).items():
        path = os.path.join(models_dir, rel)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".partial-" + os.path.basename(path))
        if os.path.isdir(tmp):
            import shutil
            shutil.rmtree(tmp)
        _write_role(role, tmp)
        os.replace(tmp, path)
        created.append(path)
    return created


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("usage: python tools/standins.py MODELS_DIR")
        return 2
    created = ensure_standins(argv[0])
    for p in created:
        print("created", p)
    if not created:
        print("all stand-ins present in", argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
