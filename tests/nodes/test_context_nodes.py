"""Context windows in ComfyUI: the same windows and weights as ComfyUI core's, and VBContextWindows on the nodes."""
import math
import types

import pytest
import torch

from .test_nodes import MOTION, ZEROSCOPE, run

FRAMES, SIZE = 6, 64


def test_windows_and_weights_equal_comfyui_core(comfy_env):
    """Our pure functions against comfy/context_windows.py for every schedule, on lengths around the window size,
    overlaps, strides, loops and steps: equal wherever ComfyUI's windows cover exactly the clip's frames; where they
    leave a frame out or index past the clip (some strided uniform cases), ours still cover every frame, in range."""
    import comfy.context_windows as cw

    from videobridge.core.context import ContextWindows, fuse_weights, windows

    compared = 0
    for sched in ("standard_static", "standard_uniform", "looped_uniform", "batched"):
        for F in (5, 16, 17, 24, 37, 48):
            for L, O in ((16, 4), (8, 2), (8, 0)):
                for stride in (1, 2):
                    for closed in (False, True):
                        for step in range(5):
                            handler = types.SimpleNamespace(context_length=L, context_overlap=O, context_stride=stride,
                                                            closed_loop=closed, _step=step)
                            ref = cw.CONTEXT_MAPPING[sched](F, handler, {})
                            ours = windows(F, ContextWindows(L, O, sched, stride, closed), step)
                            assert all(0 <= i < F for w in ours for i in w)
                            if set().union(*map(set, ref)) == set(range(F)):     # ComfyUI's are usable
                                assert ours == ref, (sched, F, L, O, stride, closed, step)
                                compared += 1
                            else:                # ComfyUI leaves frames out or indexes past the clip; ours not
                                assert set().union(*map(set, ours)) == set(range(F))
    assert compared > 1000
    handler = types.SimpleNamespace(context_overlap=3)
    for n in (4, 5, 16):
        assert fuse_weights(n, "pyramid").tolist() == cw.create_weights_pyramid(n)
        assert fuse_weights(n, "overlap-linear", list(range(2, 2 + n)), 30, 3).tolist() == \
            cw.create_weights_overlap_linear(n, 30, list(range(2, 2 + n)), handler).tolist()


@pytest.fixture(scope="module")
def animatediff(N, base):
    return run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)",
               image_model=base)[0]


def windows_on(N, vm, **kw):
    args = dict(video_model=vm, context_length=16, context_overlap=4, context_schedule="standard_static",
                context_stride=1, closed_loop=False, fuse_method="pyramid", freenoise=False, branches_in_turn=False)
    args.update(kw)
    return run(N["VBContextWindows"], **args)[0]


def test_context_windows_node_on_smoothing(N, base, animatediff):
    """A window covering the clip changes nothing (bit for bit); smaller windows run every window and fuse;
    AnimateDiff-Evolved context options override the widgets; the loaded model is shared, not copied."""
    lat = {"samples": torch.randn(FRAMES, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))}

    def denoise(vm):
        return run(N["VBVideoDenoise"], video_model=vm, latent=lat, prompt="a cat", negative_prompt="", seed=1,
                   steps=3, cfg=7.5, strength=1.0)[0]["samples"]

    plain = denoise(animatediff)
    whole = windows_on(N, animatediff, context_length=FRAMES)
    assert whole.model is animatediff.model and whole.context.context_length == FRAMES
    assert torch.equal(denoise(whole), plain)
    small = windows_on(N, animatediff, context_length=4, context_overlap=2)
    calls = small.model.unet
    n = {"k": 0}
    h = calls.register_forward_pre_hook(lambda *a: n.__setitem__("k", n["k"] + 1))
    try:
        out = denoise(small)
    finally:
        h.remove()
    assert n["k"] == 3 * 2 and torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-4)
    ade = types.SimpleNamespace(contexts=[types.SimpleNamespace(context_length=4, context_overlap=2,
                                                                context_schedule="standard_static", context_stride=1,
                                                                closed_loop=False, fuse_method="pyramid")])
    assert torch.equal(denoise(windows_on(N, animatediff, context_options=ade)), out)
    noisy = denoise(windows_on(N, animatediff, context_length=4, context_overlap=2, freenoise=True))
    assert torch.isfinite(noisy).all() and not torch.equal(noisy, out)           # FreeNoise changes the SDEdit noise
    assert torch.equal(denoise(windows_on(N, animatediff, context_length=FRAMES, freenoise=True)), plain)  # one window
    in_turn = windows_on(N, animatediff, context_length=FRAMES, branches_in_turn=True)
    one = dict(video_model=animatediff, latent=lat, prompt="a cat", negative_prompt="", seed=1, steps=1, cfg=7.5,
               strength=1.0)
    a = run(N["VBVideoDenoise"], **one)[0]["samples"]
    b = run(N["VBVideoDenoise"], **dict(one, video_model=in_turn))[0]["samples"]
    assert float((a - b).norm() / a.norm()) < 1e-4   # same result; fp32 rounding of another batch size x CFG 7.5 (2.6e-5)
    with pytest.raises(ValueError, match="VBContextWindows: context_overlap must be in 0..context_length-1"):
        windows_on(N, animatediff, context_length=4, context_overlap=4)
    bad = types.SimpleNamespace(context_length=4, context_overlap=1, context_schedule="view_as_context")
    with pytest.raises(ValueError, match="VBContextWindows: context_options: schedule 'view_as_context'"):
        windows_on(N, animatediff, context_options=bad)


def test_model_loads_reserve_the_activations_of_the_calls(N, base, animatediff, monkeypatch):
    """ComfyUI's loader is asked for the activation memory of the calls to come (its own SD1.5 estimate, times the
    family's measured factor: ZeroScope 1.3), for the window length and branch count actually batched; on the CPU
    the image-model chunk stays 'all frames'."""
    import comfy.model_management as mm

    from videobridge.nodes import runtime

    asked = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **kw: (
        asked.append(memory_required), real(models, memory_required=memory_required, **kw))[1])
    lat = {"samples": torch.zeros(FRAMES, 4, SIZE // 8, SIZE // 8)}
    zeroscope = run(N["VBLoadVideoModel"], model_name=ZEROSCOPE, dtype="auto", sampling="model default (DDIM)")[0]
    for vm, rows in [(animatediff, 2 * FRAMES), (windows_on(N, animatediff, context_length=4, context_overlap=2), 8),
                     (windows_on(N, animatediff, context_length=4, context_overlap=2, branches_in_turn=True), 4),
                     (zeroscope, math.ceil(2 * FRAMES * 1.3))]:
        asked.clear()
        run(N["VBVideoDenoise"], video_model=vm, latent=lat, prompt="", negative_prompt="", seed=0, steps=1, cfg=7.5,
            strength=1.0)
        assert runtime.activation_bytes(rows, (SIZE // 8, SIZE // 8)) in asked and max(asked) > 0
    assert runtime.frame_chunk(0, 16, 2, (8, 8)) is None and runtime.frame_chunk(3, 16, 2, (8, 8)) == 3


def test_animatediff_shares_the_image_models_patcher_and_weights(N):
    """VBLoadVideoModel puts the motion UNet into the image model's ModelPatcher: one patcher, one copy of the
    spatial weights (its size counts them once), a move of that patcher's model moves both models, and a re-run of
    the loader reuses the motion UNet instead of adding another."""
    from videobridge.nodes import runtime

    image = run(N["VBLoadImageModel"], model_name="v1-5-pruned-emaonly.safetensors", dtype="auto", vae_dtype="auto")[0]
    video = run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)",
                image_model=image)[0]
    again = run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="Lightning (trailing grid)",
                image_model=image)[0]
    assert video.unet is image.unet and again.unet is image.unet and again.model.unet is video.model.unet
    assert video.model.spacing == "leading" and again.model.spacing == "trailing"
    holder = image.unet.model
    assert sum(1 for n, _ in holder.named_children() if n.startswith("motion_")) == 1
    image_bytes = runtime.unique_bytes(image.model.unet)
    motion_bytes = sum(p.numel() * p.element_size() for n, p in video.model.unet.named_parameters()
                       if "motion_modules" in n)
    assert image.unet.model_size() == runtime.unique_bytes(holder) <= image_bytes + motion_bytes + 2 ** 20
    import comfy.model_management as mm
    seen = []
    real = mm.load_models_gpu
    mm.load_models_gpu = lambda models, **kw: (seen.append(list(models)), real(models, **kw))[1]
    try:
        runtime.load(image.unet, video.unet)                     # one patcher: listed once for ComfyUI
    finally:
        mm.load_models_gpu = real
    assert seen == [[image.unet]]
    holder.to(torch.float64)                                     # what a device move does to every parameter
    assert video.model.unet.conv_in.weight.dtype == torch.float64 == image.model.unet.conv_in.weight.dtype
    assert video.model.unet.down_blocks[0].motion_modules[0].proj_in.weight.dtype == torch.float64
