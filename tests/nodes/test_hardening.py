"""Bad inputs found by trying the pack as a new user (issue 11): each gives a ValueError naming the input, raised
before any model runs."""
import os

import pytest
import torch

from .test_nodes import CANNY, IP2P, generate, run, video


def test_unreadable_model_files_name_the_file_the_folder_and_the_fix(N, comfy_env):
    folder = os.path.join(comfy_env[1], "checkpoints")
    for name, content in (("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"),
                          ("empty.safetensors", b""), ("garbage.ckpt", b"not a zip or pickle")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
        with pytest.raises(ValueError, match=rf"VBLoadImageModel: '{name}' in .*checkpoints.* is incomplete or not a "
                                             "model; download it again"):
            run(N["VBLoadImageModel"], model_name=name, dtype="auto", vae_dtype="auto")


def test_non_finite_inputs_are_refused_before_any_model_runs(N, base):
    calls = {"n": 0}
    hooks = [m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
             for m in (base.model.unet, base.model.vae)]
    bad = video()
    bad[1, 3, 3, 0] = float("nan")
    try:
        with pytest.raises(ValueError, match="images: .*NaN or inf"):
            run(N["VBEncodeFrames"], image_model=base, images=bad, frames_per_chunk=8)
        cn = run(N["VBLoadControlNet"], control_net_name=CANNY, dtype="auto")[0]
        with pytest.raises(ValueError, match="hints: .*NaN or inf"):
            generate(N, base, controlnet=cn, hints=bad)
        inp = run(N["VBLoadImageModel"], model_name="sd-v1-5-inpainting.safetensors", dtype="auto",
                  vae_dtype="auto")[0]
        mask = torch.zeros(64, 64)
        mask[0, 0] = float("inf")
        with pytest.raises(ValueError, match="mask: .*NaN or inf"):
            generate(N, inp, images=video(), mask=mask)
        lat = {"samples": torch.zeros(4, 4, 8, 8)}
        lat["samples"][0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="latent: .*NaN or inf"):
            run(N["VBDecodeFrames"], image_model=base, latent=lat, frames_per_chunk=8)
    finally:
        for h in hooks:
            h.remove()
    assert calls["n"] == 0


def test_empty_latents_are_refused(N, base):
    for shape in ((0, 4, 8, 8), (4, 4, 0, 8)):
        with pytest.raises(ValueError, match="latent: .*empty"):
            run(N["VBDecodeFrames"], image_model=base, latent={"samples": torch.zeros(shape)}, frames_per_chunk=8)


def test_soft_inpainting_masks_are_binarised_at_half(N):
    inp = run(N["VBLoadImageModel"], model_name="sd-v1-5-inpainting.safetensors", dtype="auto", vae_dtype="auto")[0]
    src = video()
    soft = torch.full((64, 64), 0.3)
    soft[16:48, 16:48] = 0.7
    hard = (soft >= 0.5).float()
    assert torch.equal(generate(N, inp, images=src, mask=soft)[0], generate(N, inp, images=src, mask=hard)[0])


def test_one_hint_without_a_source_video_uses_the_frames_widget(N, base):
    cn = run(N["VBLoadControlNet"], control_net_name=CANNY, dtype="auto")[0]
    imgs, lat = generate(N, base, controlnet=cn, hints=video(frames=1), frames=3)
    assert imgs.shape[0] == 3 and lat["samples"].shape[0] == 3


def test_a_mask_the_model_ignores_is_refused(N):
    ip2p = run(N["VBLoadImageModel"], model_name=IP2P, dtype="auto", vae_dtype="auto")[0]
    with pytest.raises(ValueError, match="VBFramewiseGenerate: mask: .*InstructPix2Pix"):
        generate(N, ip2p, images=video(), mask=torch.zeros(64, 64))




def test_region_mask_follows_the_video_size(N):
    frames = video(frames=3, size=64)
    for region, filled in (("top and bottom (outpaint)", 2 * 16 * 64), ("left and right (outpaint)", 2 * 16 * 64),
                           ("centre (inpaint)", 32 * 32)):
        mask = run(N["VBRegionMask"], images=frames, region=region, fraction=0.25)[0]
        assert mask.shape == (1, 64, 64) and float(mask.sum()) == filled
    assert float(run(N["VBRegionMask"], images=video(size=128), region="centre (inpaint)", fraction=0.25)[0].sum()) \
        == 64 * 64
