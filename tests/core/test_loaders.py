"""Offline loaders (core/models.py) against tiny stand-ins written in the users' real file layouts (tools/standins.py).

Round trips must be bit-exact (``torch.equal``) against the in-memory modules the writers wrote. The network is
blocked for the whole module: any socket connect raises, so a loader that tried the Hub would fail loudly.
"""
import glob
import hashlib
import json
import os
import socket
import sys
import types
import zipfile

import pytest
import torch
import torch.nn.functional as F

from tools import standins as S
from videobridge.core import models as M
from videobridge.core.models import PerFrameGroupNorm
from videobridge.core.schedule import NoiseSchedule

SMALL_VOCAB = 600  # >= the tiny tokenizer's 525 ids; the full 49,408 is only needed with the real SD1 tokenizer


# ---------------------------------------------------------------------------------------------------- fixtures
NETWORK_ATTEMPTS = []


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any socket connect raises (and is recorded, in case a library swallows the error); one intra-op thread."""
    def refuse(sock, address, *args, **kwargs):
        NETWORK_ATTEMPTS.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead (and stall badly on a busy machine)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield
    torch.set_num_threads(threads)
    assert NETWORK_ATTEMPTS in ([], [("127.0.0.1", 9)]), NETWORK_ATTEMPTS  # only test_network_is_blocked's own


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tok_dir(d):
    """A tokenizer folder in the layout of ComfyUI's comfy/sd1_tokenizer (config says 8192)."""
    return S.write_tokenizer_folder(str(d / "sd1_tokenizer"), model_max_length=8192)


@pytest.fixture(scope="module")
def base(d):
    path = str(d / "base.safetensors")
    return path, S.write_sd15_checkpoint(path, "base", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def base_model(base, tok_dir):
    return M.load_image_model(base[0], tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def mm_v2(d):
    path = str(d / "mm_sd_v15_v2.ckpt")
    return path, S.write_motion_module(path, "v2", seed=1, layout="original", dtype=torch.float32)


@pytest.fixture(scope="module")
def video_model(base_model, mm_v2):
    adapter, family = M.load_motion_adapter(mm_v2[0])
    return M.build_animatediff(base_model, adapter, family)


@pytest.fixture(scope="module")
def controlnet_file(d):
    path = str(d / "control_v11p_sd15_canny.safetensors")
    S.write_controlnet(path, seed=3, layout="ldm")
    return path


@pytest.fixture(scope="module")
def zeroscope(d):
    folder = str(d / "diffusers" / "zeroscope_v2_576w")
    return folder, S.write_zeroscope_folder(folder, seed=5, tokenizer="tiny")


def assert_same_weights(loaded, written):
    """Every tensor the writer's module has equals the loaded one exactly (after exact up-casting)."""
    a, b = loaded.state_dict(), written.state_dict()
    missing = [k for k in b if k not in a]
    assert not missing, missing[:3]
    bad = [k for k in b if not k.endswith(("position_ids", "pos_embed.pe"))
           and not torch.equal(a[k].to(b[k].dtype) if a[k].dtype != b[k].dtype else a[k], b[k])
           and not torch.equal(a[k].float(), b[k].float())]
    assert not bad, bad[:3]


# ---------------------------------------------------------------------------------------------------- SD1.5 files
@pytest.mark.parametrize("variant,dtype,ema,old_clip,ext", [
    ("base", torch.float32, False, False, "safetensors"),
    ("inpainting", torch.float16, True, False, "safetensors"),
    ("instruct_pix2pix", torch.float16, False, True, "ckpt"),
])
def test_sd15_single_file_round_trip(d, tok_dir, variant, dtype, ema, old_clip, ext):
    path = str(d / f"{variant}_{str(dtype)[6:]}_{ema}_{old_clip}.{ext}")
    mods = S.write_sd15_checkpoint(path, variant, dtype=dtype, seed=7, ema=ema, old_clip_keys=old_clip,
                                   clip_vocab=SMALL_VOCAB)
    sd = M.read_state_dict(path)
    assert M.detect_file_kind(sd) == "sd15_checkpoint"
    assert any(k.startswith("model_ema.") for k in sd) == ema
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd) != old_clip
    m = M.load_image_model(path, tokenizer_dir=tok_dir)
    assert m.variant == variant and m.source == path
    assert m.unet.config.in_channels == {"base": 4, "inpainting": 9, "instruct_pix2pix": 8}[variant]
    assert m.schedule.beta_schedule == "scaled_linear" and m.schedule.same_as(M.NoiseSchedule.sd15())
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(m, name)
        assert module.dtype == torch.float32 and not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert_same_weights(module, mods[name])  # EMA keys carry other values: the non-EMA weights are loaded
    assert m.tokenizer.model_max_length == 77


def test_sd15_loads_in_requested_dtype_and_inference_mode(base, tok_dir):
    with torch.inference_mode():
        m = M.load_image_model(base[0], tokenizer_dir=tok_dir, dtype=torch.float16)
    assert m.unet.dtype == m.vae.dtype == m.text_encoder.dtype == torch.float16
    assert_same_weights(m.unet, base[1]["unet"].half())


def test_sd15_forward_is_finite_and_nontrivial(base_model):
    m = base_model
    emb = M.encode_prompts(m.text_encoder, m.tokenizer, ["a photo of a cat", ""])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    assert not torch.equal(emb[0], emb[1])
    eps = m.unet(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500, emb).sample
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all() and eps.std() > 0.05
    img = m.vae.decode(torch.randn(1, 4, 8, 8)).sample
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_sd15_diffusers_folder(d, tok_dir):
    folder = str(d / "sd15_folder")
    mods = S.write_sd15_diffusers_folder(folder, "inpainting", seed=11)
    m = M.load_image_model(folder)
    assert m.variant == "inpainting" and m.source == folder
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(m, name), mods[name])
    assert M.encode_prompts(m.text_encoder, m.tokenizer, ["a dog"]).shape == (1, 77, 32)


def test_v_prediction_folder_is_refused(d):
    folder = str(d / "sd_v_pred")
    S.write_sd15_diffusers_folder(folder, "base", seed=12, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="sd_v_pred.*v_prediction"):
        M.load_image_model(folder)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind", ["sdxl", "sd2"])
def test_sd2_sdxl_refused(d, tok_dir, kind):
    path = str(d / f"{kind}_like.safetensors")
    S.write_sdxl_like_checkpoint(path, kind)
    assert M.detect_file_kind(M.read_state_dict(path)) == "sd2_or_sdxl_checkpoint"
    with pytest.raises(ValueError, match=rf"'{kind}_like.safetensors' is an SD2.x or SDXL checkpoint.*SD1.5"):
        M.load_image_model(path, tokenizer_dir=tok_dir)


def test_wrong_files_are_refused_with_a_pointer_to_the_right_loader(base, mm_v2, controlnet_file, tok_dir):
    with pytest.raises(ValueError, match="'mm_sd_v15_v2.ckpt' is an AnimateDiff motion module; load it with "
                                         "VBLoadVideoModel"):
        M.load_image_model(mm_v2[0], tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="'control_v11p_sd15_canny.safetensors' is a ControlNet; load it with "
                                         "VBLoadControlNet"):
        M.load_image_model(controlnet_file, tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match=r"'base.safetensors' is not an AnimateDiff motion module "
                                         r"\(no down/up block motion modules\)"):
        M.load_motion_adapter(base[0])
    with pytest.raises(ValueError, match="'base.safetensors' is an SD1.5-family checkpoint"):
        M.load_controlnet(base[0])
    with pytest.raises(ValueError, match="'mm_sd_v15_v2.ckpt' is an AnimateDiff motion module"):
        M.load_controlnet(mm_v2[0])


def test_t2i_adapter_and_unknown_files(d, tok_dir):
    t2i = str(d / "t2iadapter_canny_sd15v2.safetensors")
    S._save({"adapter.conv_in.weight": torch.zeros(32, 192, 3, 3),
             "adapter.body.0.resnets.0.block1.weight": torch.zeros(32, 32, 3, 3)}, t2i)
    assert M.detect_file_kind(M.read_state_dict(t2i)) == "t2i_adapter"
    with pytest.raises(ValueError, match="is a T2I-Adapter"):
        M.load_image_model(t2i, tokenizer_dir=tok_dir)
    junk = str(d / "junk.safetensors")
    S._save({"foo.weight": torch.zeros(2)}, junk)
    assert M.detect_file_kind(M.read_state_dict(junk)) == "unknown"
    with pytest.raises(ValueError, match="'junk.safetensors' is not a recognised model file"):
        M.load_image_model(junk, tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="'junk.safetensors' is not an AnimateDiff motion module"):
        M.load_motion_adapter(junk)


def test_missing_files_name_the_path(d):
    missing = str(d / "nope" / "missing.safetensors")
    for load in (M.load_image_model, M.load_motion_adapter, M.load_controlnet, M.read_state_dict,
                 M.load_unet3d_folder):
        with pytest.raises(FileNotFoundError, match="missing.safetensors"):
            load(missing)


def test_unreadable_file(d):
    path = str(d / "broken.ckpt")
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt"):
        M.read_state_dict(path)


def test_ckpt_with_pickled_lightning_callbacks(d):
    """Original SD .ckpt files pickle pytorch_lightning callbacks next to the weights; weights_only must cope."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    fake = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_k = "val/loss", 3

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    fake[names[-1]].ModelCheckpoint = ModelCheckpoint
    path = str(d / "lightning.ckpt")
    with pytest.MonkeyPatch.context() as mp:
        for n, mod in fake.items():
            mp.setitem(sys.modules, n, mod)
        torch.save({"state_dict": {"a.weight": torch.ones(2)}, "global_step": 470000,
                    "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    assert "pytorch_lightning" not in sys.modules
    sd = M.read_state_dict(path)
    assert list(sd) == ["a.weight"] and torch.equal(sd["a.weight"], torch.ones(2))


def test_tokenizer_needed_for_single_files(base, monkeypatch):
    monkeypatch.setattr(M, "_open_clip_bpe_bytes", lambda source=None: None)
    with pytest.raises(ValueError, match="no tokenizer.*sd1_tokenizer.*open_clip_torch"):
        M.load_image_model(base[0])


def _open_clip_wheel():
    found = sorted(glob.glob("/opt/pypi/files/open_clip_torch-*.whl"))
    return found[-1] if found else None


@pytest.mark.skipif(_open_clip_wheel() is None, reason="no open_clip_torch wheel on this machine")
def test_tokenizer_from_open_clip_wheel(base, monkeypatch):
    whl = _open_clip_wheel()
    tok = M.clip_tokenizer_from_open_clip(whl)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    bpe = zipfile.ZipFile(whl).read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    monkeypatch.setattr(M, "_open_clip_bpe_bytes", lambda source=None: bpe)
    m = M.load_image_model(base[0])  # tokenizer_dir=None -> the open_clip fallback; vocab 49408 stand-in encoder
    assert len(m.tokenizer) == 49408 and m.tokenizer.pad_token_id == 49407
    assert M.encode_prompts(m.text_encoder, m.tokenizer, ["a photo of a cat"]).shape == (1, 77, 32)


def test_encode_prompts_refuses_ids_beyond_the_vocabulary(tok_dir):
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = M.load_tokenizer(tok_dir)
    te = CLIPTextModel(CLIPTextConfig(**S.tiny_clip_config(vocab_size=100, hidden=32)))
    with pytest.raises(ValueError, match="only 100 embeddings"):
        M.encode_prompts(te, tok, ["a cat"])


# ---------------------------------------------------------------------------------------------------- AnimateDiff
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_motion_module_round_trip(d, version, layout):
    path = str(d / f"mm_{version}_{layout}.{'ckpt' if layout == 'original' else 'safetensors'}")
    written = S.write_motion_module(path, version, seed=2, layout=layout)
    raw = M.read_state_dict(path)
    assert M.detect_file_kind(raw) == "motion_module"
    pe = {v.shape[1] for k, v in raw.items() if k.endswith(".pe")}
    assert pe == {24 if version == "v1" else 32}
    assert any(".temporal_transformer." in k for k in raw) == (layout == "original")
    adapter, family = M.load_motion_adapter(path)
    assert family == version
    assert adapter.config.use_motion_mid_block == (version == "v2")
    assert adapter.config.motion_max_seq_length == 32
    assert_same_weights(adapter, written)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_motion_module_with_two_levels_loads_and_builds(d, layout):
    """The UNet depth is read from the keys, not assumed to be SD1.5's four levels (issue: any number of levels);
    the assembled model has per-frame motion norms."""
    from diffusers import MotionAdapter, UNet2DConditionModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    ad = S.randomize_(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                                    motion_norm_num_groups=32, use_motion_mid_block=True), 3).eval()
    path = str(d / f"mm_two_levels_{layout}.{'ckpt' if layout == 'original' else 'safetensors'}")
    S._save(S.motion_to_original(ad.state_dict()) if layout == "original" else ad.state_dict(), path)
    adapter, family = M.load_motion_adapter(path)
    assert tuple(adapter.config.block_out_channels) == (32, 64) and family == "v2"
    assert_same_weights(adapter, ad)
    unet = S.randomize_(UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                             cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4), 4)
    im = M.ImageModel(unet, None, None, None, NoiseSchedule.sd15(), "base", "tiny")
    vm = M.build_animatediff(im, adapter, family)
    norms = [m.norm for m in vm.unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    assert len(norms) == 2 * 2 + 1 + 2 * 3 and all(type(n) is PerFrameGroupNorm for n in norms)
    with torch.no_grad():
        eps = vm.unet(torch.randn(1, 4, 3, 8, 8), torch.tensor([500]), torch.randn(3, 77, 32)).sample
    assert eps.shape == (1, 4, 3, 8, 8) and torch.isfinite(eps).all()


def test_build_animatediff_shares_spatial_weights(base_model, video_model, mm_v2):
    vu, iu = video_model.unet, base_model.unet
    for k in ("conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
              "up_blocks.3.resnets.2.conv2.weight"):
        assert vu.get_parameter(k).data_ptr() == iu.get_parameter(k).data_ptr()
    assert torch.equal(vu.get_parameter("mid_block.motion_modules.0.proj_in.weight"),
                       mm_v2[1].get_parameter("mid_block.motion_modules.0.proj_in.weight"))
    assert not any(t.is_meta for t in [*vu.parameters(), *vu.buffers()])
    assert video_model.family == "animatediff-v2" and video_model.kind == "motion" and video_model.vae is None
    assert video_model.text_encoder is base_model.text_encoder and video_model.tokenizer is base_model.tokenizer
    assert video_model.schedule.beta_schedule == "linear" and video_model.spacing == "leading"
    assert not video_model.schedule.same_as(base_model.schedule)


def test_spatial_weight_sharing_survives_device_moves(base_model, mm_v2, monkeypatch):
    """The AnimateDiff UNet is built on the image UNet's own spatial modules: every image-UNet parameter IS a
    video-UNet parameter (one copy), the output equals a build with storage sharing only, bit for bit, and after
    moving either model (a dtype move and the meta device stand in for a GPU) the two still share every tensor."""
    import copy

    image = copy.deepcopy(base_model)                            # this test moves it
    vm = M.build_animatediff(image, *M.load_motion_adapter(mm_v2[0]))
    vu, iu = vm.unet, image.unet
    video_params = {id(p) for p in vu.parameters()}
    assert all(id(p) in video_params for p in iu.parameters())
    motion = sum(p.numel() for n, p in vu.named_parameters() if "motion_modules" in n)
    assert sum(p.numel() for p in vu.parameters()) == sum(p.numel() for p in iu.parameters()) + motion
    monkeypatch.setattr(M, "share_spatial_modules", lambda video_unet, unet: None)
    storage_only = M.build_animatediff(copy.deepcopy(base_model), *M.load_motion_adapter(mm_v2[0])).unet
    assert storage_only.conv_in is not copy.deepcopy(base_model).unet.conv_in
    x, ctx = torch.randn(1, 4, 3, 8, 8), torch.randn(3, 77, vu.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(vu(x, torch.tensor([500]), ctx).sample, storage_only(x, torch.tensor([500]), ctx).sample)
    iu.to(torch.float64)                                         # moving the image model moves the video model's
    assert vu.conv_in.weight.dtype == torch.float64 and vu.down_blocks[1].resnets[0].conv1.weight is \
        iu.down_blocks[1].resnets[0].conv1.weight
    vu.to("meta")                                                # and the other way round
    assert all(p.is_meta for p in iu.parameters())
    assert all(id(p) in {id(q) for q in vu.parameters()} for p in iu.parameters())


def test_motion_unet_forward_with_per_frame_context(video_model):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    m, F_ = video_model, 4
    norms = [mm.norm for mm in m.unet.modules() if isinstance(mm, AnimateDiffTransformer3D)]
    assert len(norms) == 4 * 2 + 1 + 4 * 3 and all(type(n) is PerFrameGroupNorm for n in norms)
    ctx = M.encode_prompts(m.text_encoder, m.tokenizer, ["a cat"])
    x = torch.randn(1, 4, F_, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x * torch.linspace(0.5, 2.0, F_).view(1, 1, F_, 1, 1)  # frames with different statistics
    with torch.no_grad():
        eps = m.unet(x, torch.tensor([500]), ctx.repeat_interleave(F_, 0)).sample
        for n in norms:  # diffusers' stock norm pools the statistics over frames: a different result
            n.__class__ = torch.nn.GroupNorm
        try:
            pooled = m.unet(x, torch.tensor([500]), ctx.repeat_interleave(F_, 0)).sample
        finally:
            for n in norms:
                n.__class__ = PerFrameGroupNorm
    assert eps.shape == (1, 4, F_, 8, 8) and torch.isfinite(eps).all()
    assert (eps - pooled).abs().max() > 1e-3


def test_per_frame_group_norm_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    b, c, f, h, w = 2, 32, 5, 4, 3
    x = torch.randn(b, c, f, h, w, generator=g) * torch.arange(1, f + 1).view(1, 1, f, 1, 1) \
        + torch.arange(f).view(1, 1, f, 1, 1)
    norm = PerFrameGroupNorm(8, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    ref = torch.stack([F.group_norm(x[:, :, i], 8, norm.weight, norm.bias, 1e-6) for i in range(f)], dim=2)
    out = norm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    pooled = torch.nn.GroupNorm.forward(norm, x)  # diffusers' behaviour on (b, c, f, h, w)
    assert (pooled - ref).abs().max() > 0.1
    x4 = torch.randn(3, c, h, w, generator=g)
    torch.testing.assert_close(norm(x4), torch.nn.GroupNorm.forward(norm, x4))
    assert list(norm.state_dict()) == ["weight", "bias"]


def test_build_animatediff_in_inference_mode_and_other_dtype(base, tok_dir, mm_v2, base_model):
    with torch.inference_mode():
        im = M.load_image_model(base[0], tokenizer_dir=tok_dir)
        adapter, family = M.load_motion_adapter(mm_v2[0])
        vm = M.build_animatediff(im, adapter, family)
        ctx = M.encode_prompts(vm.text_encoder, vm.tokenizer, ["a cat", "a dog"])
        eps = vm.unet(torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), ctx).sample  # per-frame prompts
    assert torch.isfinite(eps).all()
    vm16 = M.build_animatediff(base_model, *M.load_motion_adapter(mm_v2[0]), dtype=torch.float16)
    assert vm16.unet.dtype == torch.float16 and base_model.unet.dtype == torch.float32


def test_build_animatediff_refuses_inpainting_model(d, tok_dir, mm_v2):
    path = str(d / "inpaint_for_ad.safetensors")
    S.write_sd15_checkpoint(path, "inpainting", seed=3, clip_vocab=SMALL_VOCAB)
    im = M.load_image_model(path, tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="needs a base SD1.5 image model.*inpainting"):
        M.build_animatediff(im, *M.load_motion_adapter(mm_v2[0]))


# ---------------------------------------------------------------------------------------------------- ControlNet
@pytest.mark.parametrize("layout", ["ldm", "ldm_bare", "diffusers"])
def test_controlnet_round_trip(d, layout):
    path = str(d / f"cn_{layout}.safetensors")
    written = S.write_controlnet(path, seed=4, layout=layout)
    raw = M.read_state_dict(path)
    assert M.detect_file_kind(raw) == "controlnet"
    assert any(k.startswith("control_model.") for k in raw) == (layout == "ldm")
    cn = M.load_controlnet(path)
    assert tuple(cn.config.conditioning_embedding_out_channels) == S.HINT_CHANNELS
    assert_same_weights(cn, written)


# ---------------------------------------------------------------------------------------------------- T2I-Adapter
@pytest.mark.parametrize("layout, in_channels, res_blocks", [("tencentarc", 1, 2), ("tencentarc", 3, 1),
                                                              ("diffusers", 3, 2)])
def test_t2i_adapter_round_trip(d, layout, in_channels, res_blocks):
    path = str(d / f"t2iadapter_{layout}_{in_channels}.pth")
    written = S.write_t2i_adapter(path, seed=5, in_channels=in_channels, layout=layout, num_res_blocks=res_blocks)
    raw = M.read_state_dict(path)
    assert M.detect_file_kind(raw) == "t2i_adapter"
    assert any(k.startswith("body.") for k in raw) == (layout == "tencentarc")
    ad = M.load_controlnet(path)
    assert type(ad).__name__ == "T2IAdapter" and ad.config.in_channels == in_channels
    assert list(ad.config.channels) == list(S.TINY_CHANNELS) and ad.config.num_res_blocks == res_blocks
    assert_same_weights(ad, written)


def test_sdxl_and_light_t2i_adapters_are_refused(d):
    from diffusers import T2IAdapter

    xl = str(d / "t2i-adapter-canny-sdxl-1.0.safetensors")
    S._save(T2IAdapter(in_channels=1, channels=[8, 8, 16, 16], num_res_blocks=1, downscale_factor=16,
                       adapter_type="full_adapter_xl").state_dict(), xl)
    with pytest.raises(ValueError, match="'t2i-adapter-canny-sdxl-1.0.safetensors' is an SDXL T2I-Adapter"):
        M.load_controlnet(xl)
    light = str(d / "t2iadapter_color_sd14v1.pth")
    S._save({"conv_in.weight": torch.zeros(8, 192, 3, 3), "body.0.in_conv.weight": torch.zeros(8, 192, 1, 1),
             "body.0.body.0.block1.weight": torch.zeros(8, 8, 3, 3)}, light)
    with pytest.raises(ValueError, match="'t2iadapter_color_sd14v1.pth' is a T2I-Adapter of another kind"):
        M.load_controlnet(light)


def test_controlnet_residuals_are_nonzero(controlnet_file, base_model):
    cn = M.load_controlnet(controlnet_file)
    ctx = M.encode_prompts(base_model.text_encoder, base_model.tokenizer, ["a cat"])
    with torch.no_grad():
        out = cn(torch.randn(2, 4, 8, 8), 10, ctx.expand(2, -1, -1), torch.rand(2, 3, 64, 64))
        eps = base_model.unet(torch.randn(2, 4, 8, 8), 10, ctx.expand(2, -1, -1),
                              down_block_additional_residuals=out.down_block_res_samples,
                              mid_block_additional_residual=out.mid_block_res_sample).sample
    assert len(out.down_block_res_samples) == 12
    assert all(r.abs().mean() > 1e-3 for r in out.down_block_res_samples)
    assert torch.isfinite(eps).all()


# ---------------------------------------------------------------------------------------------------- ZeroScope
def test_zeroscope_folder_round_trip(zeroscope):
    folder, written = zeroscope
    vm = M.load_unet3d_folder(folder)
    assert vm.kind == "unet3d" and vm.family == "zeroscope" and vm.source == folder
    assert vm.schedule.beta_schedule == "scaled_linear" and vm.schedule.same_as(M.NoiseSchedule.sd15())
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(vm, name).dtype == torch.float32
        assert_same_weights(getattr(vm, name), written[name])
    ctx = M.encode_prompts(vm.text_encoder, vm.tokenizer, ["a cat"])
    assert ctx.shape == (1, 77, 96)
    with torch.no_grad():
        eps = vm.unet(torch.randn(1, 4, 3, 8, 8), torch.tensor([500]), ctx).sample
    assert eps.shape == (1, 4, 3, 8, 8) and torch.isfinite(eps).all()


def test_zeroscope_bin_weights(d):
    folder = str(d / "zs_bin")
    written = S.write_zeroscope_folder(folder, seed=6, tokenizer="tiny", bin_weights=True)
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    assert os.path.isfile(os.path.join(folder, "text_encoder", "pytorch_model.bin"))
    vm = M.load_unet3d_folder(folder, dtype=torch.float16)
    assert vm.unet.dtype == torch.float16
    assert_same_weights(vm.unet, written["unet"])
    assert_same_weights(vm.text_encoder, written["text_encoder"])


def test_folder_kind_mismatches(d, zeroscope):
    sd_folder = str(d / "sd15_folder_for_refusal")
    S.write_sd15_diffusers_folder(sd_folder, "base", seed=13)
    with pytest.raises(ValueError, match="'sd15_folder_for_refusal' is not a ZeroScope/ModelScope video model.*"
                                         "UNet2DConditionModel"):
        M.load_unet3d_folder(sd_folder)
    with pytest.raises(ValueError, match="'zeroscope_v2_576w' is a ZeroScope/ModelScope video model.*VBLoadVideoModel"):
        M.load_image_model(zeroscope[0])
    empty = d / "empty_folder"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="model_index.json"):
        M.load_unet3d_folder(str(empty))


def test_list_diffusers_folders(d, zeroscope):
    root = d / "listing"
    for rel, cls in (("zs", "UNet3DConditionModel"), ("org/ms", "UNet3DConditionModel"), ("sd", "UNet2DConditionModel")):
        (root / rel).mkdir(parents=True)
        (root / rel / "model_index.json").write_text(json.dumps({"unet": ["diffusers", cls]}))
    (root / "no_index").mkdir()
    (root / "stray.txt").write_text("x")
    (root / "bad").mkdir()
    (root / "bad" / "model_index.json").write_text("{not json")
    everything = M.list_diffusers_folders([str(root), str(d / "absent")])
    assert [os.path.relpath(p, root) for p in everything] == ["bad", os.path.join("org", "ms"), "sd", "zs"]
    video = M.list_diffusers_folders([str(root), os.path.dirname(zeroscope[0])], "UNet3DConditionModel")
    assert [os.path.basename(p) for p in video] == ["ms", "zs", "zeroscope_v2_576w"]


# ---------------------------------------------------------------------------------------------------- stand-in set
def test_standins_are_deterministic(d):
    paths = [str(d / f"det{i}.safetensors") for i in range(3)]
    for p, seed in zip(paths, (0, 0, 1)):
        S.write_motion_module(p, "v2", seed=seed, layout="original")
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    assert digest[0] == digest[1] != digest[2]


def test_ensure_standins_creates_a_loadable_set(tmp_path, tok_dir):
    created = S.ensure_standins(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in created) == sorted(S.STANDIN_FILES.values())
    assert S.ensure_standins(str(tmp_path)) == []
    assert not glob.glob(str(tmp_path / "*" / ".partial-*"))
    modes = {f: os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(tmp_path) for f in fs}
    assert set(modes.values()) == {0o644}, modes
    p = {role: str(tmp_path / rel) for role, rel in S.STANDIN_FILES.items()}
    m = M.load_image_model(p["sd15"], tokenizer_dir=tok_dir)
    assert m.variant == "base" and m.text_encoder.config.vocab_size == 49408  # the real SD1 tokenizer's ids fit
    for role, in_ch in (("sd15", 4), ("sd15_inpainting", 9), ("sd15_ip2p", 8)):
        assert os.path.getsize(p[role]) < 12e6
        sd = M.read_state_dict(p[role])
        assert M.detect_file_kind(sd) == "sd15_checkpoint"
        assert M.sd15_configs_from_weights(sd)[0]["model"]["params"]["unet_config"]["params"]["in_channels"] == in_ch
    assert M.load_motion_adapter(p["animatediff_v2"])[1] == "v2"
    assert M.load_controlnet(p["controlnet_canny"]).config.cross_attention_dim == 32
    assert M.load_unet3d_folder(p["zeroscope"]).kind == "unet3d"
    assert M.list_diffusers_folders([str(tmp_path / "diffusers")], "UNet3DConditionModel") == [p["zeroscope"]]
    # a subset under other names
    assert S.ensure_standins(str(tmp_path / "b"), {"sd15": "checkpoints/other.safetensors"}) == \
        [str(tmp_path / "b" / "checkpoints" / "other.safetensors")]


def test_network_is_blocked():
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
