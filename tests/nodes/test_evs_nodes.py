"""EVS nodes and attention capture/injection executed in-process inside the real ComfyUI modules, on stand-ins."""
import pytest
import torch

from .test_nodes import INPAINT, MOTION, invert, run, video

FRAMES, SIZE = 4, 64
SFI = "deep"            # the smoke-run stand-ins have no attention at full resolution (up_blocks.3), so no 'shallow'
LIGHTNING = "Lightning (trailing grid)"


@pytest.fixture(scope="module")
def lightning(N, base):
    return run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling=LIGHTNING, image_model=base)[0]


def processors(vm):
    return dict(vm.model.unet.attn_processors)


def same_objects(before, after):
    return before.keys() == after.keys() and all(after[k] is p for k, p in before.items())


def refine(N, base, vm, **kw):
    args = dict(images=video(), image_model=base, video_model=vm, prompt="a cat", negative_prompt="", seed=1,
                upscale=1.0, s1=0.4, t2i_steps=10, cfg=7.5, t_T2V=201, t2v_steps=8, t_V=499, n_V=2, t2v_cfg=1.0,
                block="sdedit", renoise="initial noise", sfi_layers=SFI, sfi_gamma=0.5,
                fixed_point_iterations=0, frame_batch_size=8, bank_storage="cpu (fp16)", bank_budget_gb=8.0)
    args.update(kw)
    return run(N["VBEVSRefine"], **args)


def block(N, vm, latent, **kw):
    args = dict(video_model=vm, latent=latent, prompt="a cat", negative_prompt="", seed=0, t2v_steps=8, t_V=499,
                n_V=4, cfg=1.0, block="sdedit", sfi_layers=SFI, sfi_gamma=0.5, fixed_point_iterations=0,
                bank_storage="cpu (fp16)", bank_budget_gb=8.0)
    args.update(kw)
    return run(N["VBEncapsulatedT2V"], **args)[0]


def encode(N, base, frames=FRAMES):
    return run(N["VBEncodeFrames"], image_model=base, images=video(frames=frames), frames_per_chunk=8)[0]


# ------------------------------------------------------------------ VBEVSRefine
def test_refine_is_seeded_upscales_and_each_block_mode_leaves_no_patch(N, base, lightning):
    before = processors(lightning)
    imgs, lat = refine(N, base, lightning)
    assert imgs.shape == (FRAMES, SIZE, SIZE, 3) and lat["samples"].shape == (FRAMES, 4, 8, 8)
    assert torch.isfinite(imgs).all() and imgs.std() > 0
    assert torch.equal(imgs, refine(N, base, lightning)[0])
    assert not torch.equal(imgs, refine(N, base, lightning, seed=2)[0])
    sfi, _ = refine(N, base, lightning, block="inversion + SFI", sfi_gamma=0.8, sfi_layers="deep")
    assert torch.isfinite(sfi).all() and not torch.allclose(sfi, imgs, atol=1e-3)
    assert same_objects(before, processors(lightning))
    big, _ = refine(N, base, lightning, upscale=2.0, t2i_steps=5, s1=0.6, t_T2V=201)
    assert big.shape == (FRAMES, 2 * SIZE, 2 * SIZE, 3)


def test_refine_refuses_bad_settings_before_any_sampling(N, base, lightning, comfy_env):
    unet = base.model.unet
    calls = {"n": 0}
    hook = unet.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    cases = [(dict(t_T2V=200), r"VBEVSRefine: t_T2V = 200 .*choose one of"),
             (dict(t_V=500), r"VBEVSRefine: t_V = 500 .*\[999, 874"),
             (dict(n_V=7), r"n_V = 7 .*1\.\.4"),
             (dict(sfi_gamma=1.5), r"VBEVSRefine: sfi_gamma .* got 1\.5"),
             (dict(block="inversion + SFI", bank_budget_gb=1e-6), r"VBEVSRefine: the attention bank would hold .*GiB"),
             (dict(image_model=inp), "image_model.*inpainting")]
    try:
        for kw, msg in cases:
            with pytest.raises(ValueError, match=msg):
                refine(N, base, lightning, **kw)
    finally:
        hook.remove()
    assert calls["n"] == 0


def test_cancel_during_sfi_refinement_restores_the_processors(N, base, lightning):
    import comfy.model_management as mm

    before = processors(lightning)
    unet = lightning.model.unet
    calls = {"n": 0}

    def interrupt_on_second(*a):
        calls["n"] += 1
        if calls["n"] == 2:                                              # inside the SFI inversion
            mm.interrupt_current_processing(True)

    hook = unet.register_forward_pre_hook(interrupt_on_second)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            refine(N, base, lightning, block="inversion + SFI")
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2 and same_objects(before, processors(lightning))
    refine(N, base, lightning, block="inversion + SFI", n_V=1)            # runs cleanly afterwards


# ------------------------------------------------------------------ capture in VBDDIMInvert, injection downstream
def test_bank_from_ddim_invert_is_injected_by_video_denoise_and_encapsulated_block(N, base, lightning):
    lat = encode(N, base)
    noisy, bank = run(N["VBDDIMInvert"], latent=lat, invert_with="video model (whole clip)", prompt="", steps=8,
                      fixed_point_iterations=0, frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False,
                      video_model=lightning, capture_attention="deep", capture_steps=3,
                      bank_storage="cpu (fp16)", bank_budget_gb=8.0)
    assert len(bank.layers) == 6 and bank.timesteps == (999, 874, 749) and bank.nbytes > 0
    assert all(x.dtype == torch.float16 and x.device.type == "cpu" for e in bank.entries.values() for x in e)
    smooth = dict(video_model=lightning, latent=noisy, prompt="a cat", negative_prompt="", seed=0, steps=8, cfg=1.0,
                  strength=1.0)
    plain = run(N["VBVideoDenoise"], **smooth)[0]["samples"]
    before = processors(lightning)
    injected = run(N["VBVideoDenoise"], **smooth, attention_bank=bank, sfi_gamma=0.8, sfi_layers="all in the bank")
    assert not torch.allclose(injected[0]["samples"], plain, atol=1e-4) and same_objects(before, processors(lightning))
    _, one = run(N["VBDDIMInvert"], latent=lat, invert_with="video model (whole clip)", prompt="", steps=8,
                 fixed_point_iterations=0, frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False,
                 video_model=lightning, capture_attention="custom",
                 custom_layers="up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    with pytest.raises(ValueError, match="VBVideoDenoise: attention_bank.*no features"):
        run(N["VBVideoDenoise"], **smooth, attention_bank=one, sfi_gamma=0.8, sfi_layers="deep")
    with pytest.raises(ValueError, match=r"VBVideoDenoise: sfi_gamma .* got 1\.2"):
        run(N["VBVideoDenoise"], **smooth, attention_bank=bank, sfi_gamma=1.2, sfi_layers="all in the bank")
    # the block injects an external bank too (SDEdit mode), and refuses one from another clip
    out = block(N, lightning, lat, attention_bank=bank, sfi_layers="deep", t_V=999, n_V=8)
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(ValueError, match="VBEncapsulatedT2V: attention_bank.*4 frames, this video has 6"):
        block(N, lightning, encode(N, base, frames=6), attention_bank=bank, sfi_layers="deep", t_V=999, n_V=8)
    with pytest.raises(ValueError, match="VBVideoDenoise: attention_bank.*captured at 64x64"):
        big = run(N["VBEncodeFrames"], image_model=base, images=video(size=128), frames_per_chunk=8)[0]
        run(N["VBVideoDenoise"], **dict(smooth, latent=big, strength=0.5), attention_bank=bank, sfi_gamma=0.5,
            sfi_layers="all in the bank")
    # capture needs a video-model inversion, and an empty bank is refused where it is injected
    with pytest.raises(ValueError, match="capture_attention.*video model"):
        invert(N, lat, "image model (frame-wise)", image_model=base, video_model=lightning, capture_attention="deep")
    _, empty = run(N["VBDDIMInvert"], latent=lat, invert_with="video model (whole clip)", prompt="", steps=8,
                   fixed_point_iterations=0, frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False,
                   video_model=lightning)
    with pytest.raises(ValueError, match="attention bank is empty"):
        run(N["VBVideoDenoise"], **smooth, attention_bank=empty, sfi_gamma=0.5, sfi_layers="all in the bank")


def test_custom_layers_and_the_budget_on_capture(N, base, lightning):
    lat = encode(N, base)
    args = dict(latent=lat, invert_with="video model (whole clip)", prompt="", steps=8, fixed_point_iterations=0,
                frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False, video_model=lightning,
                capture_attention="custom", capture_steps=0, bank_storage="cpu (fp16)", bank_budget_gb=8.0)
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    _, bank = run(N["VBDDIMInvert"], **dict(args, custom_layers=name))
    assert bank.layers == (name,) and len(bank.timesteps) == 8
    with pytest.raises(ValueError, match="VBDDIMInvert: custom_layers.*temporal"):
        run(N["VBDDIMInvert"], **dict(args, custom_layers="up_blocks.1.motion_modules.0.transformer_blocks.0.attn1"))
    with pytest.raises(ValueError, match="VBDDIMInvert: the attention bank would hold"):
        run(N["VBDDIMInvert"], **dict(args, custom_layers=name, bank_budget_gb=1e-9))


# ------------------------------------------------------------------ VBEncapsulatedT2V
def test_encapsulated_block_modes(N, base, lightning):
    lat = encode(N, base)
    a = block(N, lightning, lat)
    assert a["samples"].shape == lat["samples"].shape and "vb_timestep" not in a
    assert torch.equal(a["samples"], block(N, lightning, lat)["samples"])
    b = block(N, lightning, lat, block="inversion + SFI", fixed_point_iterations=1)
    assert torch.isfinite(b["samples"]).all() and not torch.allclose(a["samples"], b["samples"], atol=1e-4)
    with pytest.raises(ValueError, match=r"VBEncapsulatedT2V: t_V = 501 .*\[999"):
        block(N, lightning, lat, t_V=501)
    noisy = invert(N, lat, "video model (whole clip)", video_model=lightning, steps=8)
    with pytest.raises(ValueError, match="VBEncapsulatedT2V: latent: it is noisy"):
        block(N, lightning, noisy)


@pytest.mark.parametrize("node", ["VBEVSRefine", "VBEncapsulatedT2V"])
def test_progress_counts_every_step_to_the_end_with_previews(N, base, lightning, node):
    """The bar reaches exactly its total (fixed-point iterations belong to their inversion step), with previews."""
    import comfy.cli_args
    import comfy.utils

    seen, lat = [], encode(N, base)
    old_hook, old_method = comfy.utils.PROGRESS_BAR_HOOK, comfy.cli_args.args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total,
                                                                                                    preview)))
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
    try:
        if node == "VBEVSRefine":
            refine(N, base, lightning, block="inversion + SFI", fixed_point_iterations=2)
            total = 4 + 1 + 2 + 4 + 2                    # T2I steps, re-evaluation, n_V, inversion steps, 2 VAE chunks
        else:
            block(N, lightning, lat, block="inversion + SFI", fixed_point_iterations=2, n_V=3)
            total = 3 + 4
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        comfy.cli_args.args.preview_method = old_method
    assert [v for v, _, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t, _ in seen)
    assert sum(p is not None for _, _, p in seen) >= total - 2          # every sampling step previews
