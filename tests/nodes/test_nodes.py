"""Every node executed in-process inside the real ComfyUI modules, on tiny stand-in models."""
import json
import os

import pytest
import torch

BASE, INPAINT, IP2P = "v1-5-pruned-emaonly.safetensors", "sd-v1-5-inpainting.safetensors", \
    "instruct-pix2pix-00-22000.safetensors"
CANNY, MOTION, ZEROSCOPE = "control_v11p_sd15_canny.safetensors", "mm_sd_v15_v2.ckpt", "diffusers/zeroscope_v2_576w"
T2I, FULL = "t2iadapter_canny_sd15v2.pth", "dreamshaper_8.safetensors"  # FULL: SD1.5 stand-in with attention at level 0
FRAMES, SIZE, STEPS = 4, 64, 2
SNAPSHOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "schema_snapshot.json")


def run(node, **kw):
    with torch.inference_mode():
        return node.execute(**kw).result


@pytest.fixture(scope="module")
def zeroscope(N):
    return run(N["VBLoadVideoModel"], model_name=ZEROSCOPE, dtype="auto", sampling="model default (DDIM)")[0]


@pytest.fixture(scope="module")
def animatediff(N, base):
    return run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)",
               image_model=base)[0]


def video(frames=FRAMES, size=SIZE, seed=0):
    return torch.rand(frames, size, size, 3, generator=torch.Generator().manual_seed(seed))


def generate(N, model, **kw):
    args = dict(image_model=model, prompt="a cat", negative_prompt="", seed=1, steps=STEPS, cfg=7.5, width=SIZE,
                height=SIZE, frames=FRAMES, control_strength=1.0, image_guidance=1.5, frame_batch_size=0)
    args.update(kw)
    return run(N["VBFramewiseGenerate"], **args)


def invert(N, latent, invert_with, **kw):
    args = dict(latent=latent, invert_with=invert_with, prompt="", steps=STEPS, fixed_point_iterations=0,
                frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False)
    args.update(kw)
    return run(N["VBDDIMInvert"], **args)[0]


def smooth(N, vm, latent, **kw):
    args = dict(video_model=vm, latent=latent, prompt="a cat", negative_prompt="", seed=0, steps=STEPS, cfg=7.5,
                strength=1.0)
    args.update(kw)
    return run(N["VBVideoDenoise"], **args)[0]


# ------------------------------------------------------------------ schema
def schema_of(node):
    s = node.GET_SCHEMA()
    return {"inputs": [[i.id, i.get_io_type(), getattr(i, "default", None)] for i in s.inputs],
            "outputs": [[o.get_io_type(), o.display_name] for o in s.outputs]}


def test_schema_has_tooltips_descriptions_and_matches_snapshot(N):
    current = {}
    for name, node in N.items():
        s = node.GET_SCHEMA()
        assert s.node_id == name and name.startswith("VB") and s.description
        for i in list(s.inputs) + list(s.outputs):
            assert i.tooltip, f"{name}.{getattr(i, 'id', i)} has no tooltip"
        current[name] = schema_of(node)
    current = json.loads(json.dumps(current))
    if os.environ.get("VIDEOBRIDGE_UPDATE_SNAPSHOT"):                 # deliberate, after appending inputs or nodes
        with open(SNAPSHOT, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
    with open(SNAPSHOT) as f:
        snap = json.load(f)
    for name, old in snap.items():
        assert name in current, f"node {name} was removed or renamed"
        new = current[name]
        assert new["inputs"][:len(old["inputs"])] == old["inputs"], f"{name}: inputs renamed or reordered"
        assert new["outputs"][:len(old["outputs"])] == old["outputs"], f"{name}: outputs changed"
    unrecorded = sorted(set(current) - set(snap))
    assert not unrecorded, f"nodes {unrecorded} are not in {SNAPSHOT}; record them with VIDEOBRIDGE_UPDATE_SNAPSHOT=1"
    grown = sorted(n for n in snap if current[n] != snap[n])
    assert not grown, f"inputs/outputs appended to {grown}; record them with VIDEOBRIDGE_UPDATE_SNAPSHOT=1"


# ------------------------------------------------------------------ loaders and frames
def test_image_model_variants_detected(N, base):
    assert base.model.variant == "base"
    assert run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0].model.variant == "inpainting"
    assert run(N["VBLoadImageModel"], model_name=IP2P, dtype="fp32", vae_dtype="fp32")[0].model.variant == \
        "instruct_pix2pix"


def test_encode_is_unscaled_and_decode_round_trips_shapes(N, base):
    frames = video()
    lat = run(N["VBEncodeFrames"], image_model=base, images=frames, frames_per_chunk=3)[0]
    assert lat["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    vae = base.model.vae
    with torch.inference_mode():
        ref = vae.encode(frames.movedim(-1, 1) * 2 - 1).latent_dist.mean
    assert torch.allclose(lat["samples"], ref, atol=1e-5)                 # ComfyUI convention: unscaled
    img = run(N["VBDecodeFrames"], image_model=base, latent=lat, frames_per_chunk=2)[0]
    assert img.shape == frames.shape and 0 <= float(img.min()) and float(img.max()) <= 1


# ------------------------------------------------------------------ BIVDiff through the nodes
@pytest.mark.parametrize("vdm", ["zeroscope", "animatediff"])
def test_controlnet_bivdiff_pipeline(N, base, vdm, request):
    vm = request.getfixturevalue(vdm)
    cn = run(N["VBLoadControlNet"], control_net_name=CANNY, dtype="auto")[0]
    hints = video(seed=3)
    imgs, lat = generate(N, base, controlnet=cn, hints=hints)
    assert imgs.shape == (FRAMES, SIZE, SIZE, 3) and lat["samples"].shape == (FRAMES, 4, 8, 8)
    imgs2, _ = generate(N, base, controlnet=cn, hints=hints)
    assert torch.equal(imgs, imgs2)                                      # seeded
    assert not torch.equal(imgs, generate(N, base, controlnet=cn, hints=hints, seed=2)[0])
    z_img = invert(N, lat, "image model (frame-wise)", image_model=base, video_model=vm)
    z_vid = invert(N, lat, "video model (whole clip)", video_model=vm)
    assert z_img["vb_timestep"] == z_vid["vb_timestep"] == vm.model.schedule.timesteps(STEPS)[0]
    mixed = run(N["VBMixLatents"], alpha=0.5, latent_image=z_img, latent_video=z_vid)[0]
    assert torch.allclose(mixed["samples"], 0.5 * z_img["samples"] + 0.5 * z_vid["samples"])
    out = smooth(N, vm, mixed)
    assert out["samples"].shape == (FRAMES, 4, 8, 8) and "vb_timestep" not in out
    frames = run(N["VBDecodeFrames"], image_model=base, latent=out, frames_per_chunk=8)[0]
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and torch.isfinite(frames).all()


def test_t2i_adapter_from_the_t2i_adapter_folder_drives_framewise_generation(N, base):
    """A TencentARC canny adapter in models/t2i_adapter loads through VBLoadControlNet; on an SD1.5-layout model the
    hints steer the frames (the strength scales them, 0 = none); on a UNet without full-resolution attention (the
    smoke stand-in) the error names the input and why."""
    assert T2I in N["VBLoadControlNet"].define_schema().inputs[0].options
    ad = run(N["VBLoadControlNet"], control_net_name=T2I, dtype="auto")[0]
    assert type(ad.model).__name__ == "T2IAdapter" and ad.model.config.in_channels == 1
    full = run(N["VBLoadImageModel"], model_name=FULL, dtype="auto", vae_dtype="auto")[0]
    hints = video(seed=3)
    imgs, lat = generate(N, full, controlnet=ad, hints=hints)
    plain, _ = generate(N, full, controlnet=ad, hints=hints, control_strength=0.0)
    text_only, _ = generate(N, full)
    assert float((imgs - plain).abs().max()) > 1e-3
    assert float((plain - text_only).abs().max()) < 1e-4              # strength 0: the adapter adds nothing
    other, _ = generate(N, full, controlnet=ad, hints=video(seed=4))
    assert not torch.equal(imgs, other)                                 # the hints steer
    with pytest.raises(ValueError, match="VBFramewiseGenerate: controlnet: this UNet's down block 0 has no "
                                         "attention layers"):
        generate(N, base, controlnet=ad, hints=hints)


def test_mix_lazy_status_skips_the_unused_inversion(N):
    mix = N["VBMixLatents"]
    assert mix.check_lazy_status(alpha=1.0) == ["latent_image"]
    assert mix.check_lazy_status(alpha=0.0) == ["latent_video"]
    assert mix.check_lazy_status(alpha=0.3) == ["latent_image", "latent_video"]


def test_ip2p_and_inpainting_and_outpainting(N, base, zeroscope):
    ip2p = run(N["VBLoadImageModel"], model_name=IP2P, dtype="auto", vae_dtype="auto")[0]
    imgs, lat = generate(N, ip2p, images=video(), prompt="make it snowy")
    assert imgs.shape == (FRAMES, SIZE, SIZE, 3)
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    mask = torch.zeros(SIZE, SIZE)
    mask[: SIZE // 4], mask[-SIZE // 4:] = 1, 1                            # outpainting: top and bottom bands
    src = video()
    imgs, lat = generate(N, inp, images=src, mask=mask)
    assert imgs.shape == src.shape
    z = invert(N, lat, "image model (frame-wise)", image_model=base, video_model=zeroscope)
    zv = invert(N, lat, "video model (whole clip)", video_model=zeroscope)
    out = smooth(N, zeroscope, run(N["VBMixLatents"], alpha=0.1, latent_image=z, latent_video=zv)[0])
    assert torch.isfinite(out["samples"]).all()


def test_sdedit_from_a_clean_latent(N, base, animatediff):
    lat = run(N["VBEncodeFrames"], image_model=base, images=video(), frames_per_chunk=8)[0]
    out = smooth(N, animatediff, lat, strength=0.5, steps=4)
    assert out["samples"].shape == lat["samples"].shape and not torch.allclose(out["samples"], lat["samples"])


# ------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(N, base, zeroscope):
    cn = run(N["VBLoadControlNet"], control_net_name=CANNY, dtype="auto")[0]
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    cases = [
        (dict(model=inp, images=video(), mask=torch.zeros(SIZE, SIZE), controlnet=cn, hints=video(frames=3)),
         "hints.*3 frames"),
        (dict(model=inp, images=video(), mask=torch.zeros(3, SIZE, SIZE)), "mask.*3 frames"),
        (dict(controlnet=cn, hints=video(size=60)), "multiples of 8"),
        (dict(width=60), "multiples of 8"),
        (dict(model=inp, images=video(frames=0), mask=torch.zeros(SIZE, SIZE)), "images.*empty"),
        (dict(controlnet=cn), "hints"),
        (dict(images=video()), "base model"),
    ]
    for kw, msg in cases:
        model = kw.pop("model", base)
        with pytest.raises(ValueError, match=msg):
            generate(N, model, **kw)
    with pytest.raises(ValueError, match="hint frames.*ControlNet|frames"):
        generate(N, inp, images=video(frames=4), mask=torch.zeros(SIZE, SIZE), hints=video(frames=2))
    with pytest.raises(ValueError, match="alpha"):
        lat = {"samples": torch.zeros(2, 4, 8, 8), "vb_timestep": 1, "vb_schedule": {}, "vb_grid": [1]}
        run(N["VBMixLatents"], alpha=1.5, latent_image=lat, latent_video=lat)


def test_noisy_latent_is_checked_by_the_next_node(N, base, zeroscope, animatediff):
    lat = run(N["VBEncodeFrames"], image_model=base, images=video(), frames_per_chunk=8)[0]
    z = invert(N, lat, "video model (whole clip)", video_model=zeroscope)
    with pytest.raises(ValueError, match="steps = 2"):
        smooth(N, zeroscope, z, steps=3)
    with pytest.raises(ValueError, match="schedule"):
        smooth(N, animatediff, z)
    with pytest.raises(ValueError, match="already noisy"):
        invert(N, z, "video model (whole clip)", video_model=zeroscope)
    with pytest.raises(ValueError, match="base SD1.5"):
        inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
        invert(N, lat, "image model (frame-wise)", image_model=inp)
    with pytest.raises(ValueError, match="image_model"):
        invert(N, lat, "image model (frame-wise)", video_model=zeroscope)


def test_wrong_model_files_are_refused(N, comfy_env):
    from tools.standins import write_motion_module, write_sdxl_like_checkpoint

    ckpt_dir = os.path.join(comfy_env[1], "checkpoints")
    write_sdxl_like_checkpoint(os.path.join(ckpt_dir, "sdxl_base.safetensors"))
    write_motion_module(os.path.join(ckpt_dir, "motion_in_wrong_folder.ckpt"))
    with pytest.raises(ValueError, match="SDXL|SD2"):
        run(N["VBLoadImageModel"], model_name="sdxl_base.safetensors", dtype="auto", vae_dtype="auto")
    with pytest.raises(ValueError, match="motion module"):
        run(N["VBLoadImageModel"], model_name="motion_in_wrong_folder.ckpt", dtype="auto", vae_dtype="auto")
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        run(N["VBLoadImageModel"], model_name="missing.safetensors", dtype="auto", vae_dtype="auto")
    with pytest.raises(ValueError, match="image_model"):
        run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)")


def test_cancel_mid_sampling_stops_and_leaves_no_patch(N, base, zeroscope):
    import comfy.model_management as mm

    lat = run(N["VBEncodeFrames"], image_model=base, images=video(), frames_per_chunk=8)[0]
    calls = {"n": 0}
    unet = base.model.unet
    orig = unet.forward

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            mm.interrupt_current_processing(True)
        return orig(*a, **k)

    unet.forward = counting
    try:
        with pytest.raises(mm.InterruptProcessingException):
            invert(N, lat, "image model (frame-wise)", image_model=base, video_model=zeroscope, steps=10,
                   inflated_groupnorm=True)
    finally:
        del unet.forward
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2                                               # stopped within one step
    assert all(not m._forward_hooks for m in unet.modules())             # frame-pooled GroupNorm hooks removed


def test_latents_interoperate_with_core_vae_nodes(N, base):
    """Our LATENT is unscaled like core VAEEncode's: core VAEDecode reads it, on an identical full-size SD VAE."""
    import dataclasses

    import comfy.sd
    import nodes as comfy_nodes
    from diffusers import AutoencoderKL

    from tools.standins import vae_to_ldm
    from videobridge.nodes.runtime import ImageHandle

    torch.manual_seed(0)
    dvae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=32, scaling_factor=0.18215).eval()
    with torch.inference_mode():
        core_vae = comfy.sd.VAE(sd=vae_to_ldm(dvae.state_dict(), 4))
        handle = ImageHandle(dataclasses.replace(base.model, vae=dvae))
        frames = video(frames=2)
        ours = run(N["VBEncodeFrames"], image_model=handle, images=frames, frames_per_chunk=8)[0]
        theirs = comfy_nodes.VAEEncode().encode(core_vae, frames)[0]
        assert ours["samples"].shape == theirs["samples"].shape
        assert torch.allclose(ours["samples"], theirs["samples"].float(), atol=1e-3, rtol=1e-3)
        decoded_core = comfy_nodes.VAEDecode().decode(core_vae, ours)[0]
        decoded_ours = run(N["VBDecodeFrames"], image_model=handle, latent=ours, frames_per_chunk=8)[0]
    assert decoded_core.shape == decoded_ours.shape == frames.shape
    assert torch.allclose(decoded_core.float(), decoded_ours, atol=2e-3)


def test_progress_reports_every_step_with_latent_previews(N, base, zeroscope):
    """Every sampling step goes through ComfyUI's progress hook, with a preview image when previews are enabled."""
    import comfy.cli_args
    import comfy.utils

    lat = run(N["VBEncodeFrames"], image_model=base, images=video(), frames_per_chunk=8)[0]
    seen = []
    old_hook, old_method = comfy.utils.PROGRESS_BAR_HOOK, comfy.cli_args.args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total,
                                                                                                    preview)))
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
    try:
        smooth(N, zeroscope, lat, steps=5, strength=1.0)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        comfy.cli_args.args.preview_method = old_method
    assert [v for v, _, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t, _ in seen)
    fmt, image, _ = seen[-1][2]
    assert fmt == "JPEG" and image.size == (8, 8)                          # one frame, latent-sized RGB preview


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_weights_keep_float32_latents(N, dtype):
    model = run(N["VBLoadImageModel"], model_name=BASE, dtype=dtype, vae_dtype="fp32")[0]
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert model.model.unet.dtype == want and model.model.vae.dtype == torch.float32
    imgs, lat = generate(N, model, frames=2, width=32, height=32)
    assert lat["samples"].dtype == torch.float32 and torch.isfinite(lat["samples"]).all()
    assert imgs.shape == (2, 32, 32, 3)


def test_lightning_sampling_uses_the_trailing_grid_end_to_end(N, base):
    vm = run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="Lightning (trailing grid)",
             image_model=base)[0]
    lat = run(N["VBEncodeFrames"], image_model=base, images=video(), frames_per_chunk=8)[0]
    z = invert(N, lat, "image model (frame-wise)", image_model=base, video_model=vm, steps=4)
    assert z["vb_grid"] == [999, 749, 499, 249] and z["vb_schedule"]["beta_schedule"] == "linear"
    out = smooth(N, vm, z, steps=4, cfg=1.0)
    assert torch.isfinite(out["samples"]).all()
