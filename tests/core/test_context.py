"""Context windows (core/context.py): schedules, fusion, exactness, and attention capture/injection per window."""
import dataclasses

import pytest
import torch

from videobridge.core.attention import AttentionController, FeatureBank, layer_table, resolve_layers
from videobridge.core.context import ContextWindows, WindowedDenoiser, fuse_weights, windows
from videobridge.core.denoisers import Branch, VideoDenoiser, cfg
from videobridge.core.models import use_per_frame_motion_norm
from videobridge.core.schedule import NoiseSchedule

from . import tiny

AD = NoiseSchedule.animatediff()


def test_standard_static_windows_of_48_frames():
    opts = ContextWindows(16, 4)
    assert [(w[0], w[-1]) for w in windows(48, opts)] == [(0, 15), (12, 27), (24, 39), (32, 47)]
    assert windows(16, opts) == [list(range(16))] and windows(5, opts) == [list(range(5))]
    assert [len(w) for w in windows(40, dataclasses.replace(opts, context_schedule="batched"))] == [16, 16, 8]
    for sched in ("standard_static", "standard_uniform", "looped_uniform", "batched"):
        for step in range(4):
            ws = windows(37, dataclasses.replace(opts, context_schedule=sched, context_stride=2), step)
            assert set().union(*map(set, ws)) == set(range(37)), (sched, step)        # every frame is covered
    looped = [windows(48, dataclasses.replace(opts, context_schedule="looped_uniform"), s)[0][0] for s in range(4)]
    assert len(set(looped)) > 1                                                       # the offset moves per step
    for kw, msg in [(dict(context_overlap=16), "context_overlap"), (dict(context_length=0), "context_length"),
                    (dict(context_schedule="x"), "context_schedule"), (dict(fuse_method="x"), "fuse_method")]:
        with pytest.raises(ValueError, match=msg):
            windows(48, dataclasses.replace(opts, **kw))


def test_fuse_weights():
    assert fuse_weights(4, "pyramid").tolist() == [1, 2, 2, 1] and fuse_weights(5, "relative").tolist() == [1, 2, 3, 2, 1]
    assert fuse_weights(3, "flat").tolist() == [1, 1, 1]
    w = fuse_weights(6, "overlap-linear", list(range(4, 10)), 20, 2)
    assert w[0] < 1e-30 and w[1] == 1 and w[-1] < 1e-30 and w[2:4].tolist() == [1, 1]
    assert fuse_weights(6, "overlap-linear", list(range(0, 6)), 20, 2)[0] == 1                  # first window


class FrameLocal:
    """A video 'denoiser' whose eps of a frame depends on that frame (and its text) only; records its calls."""
    kind, calls = "video", 0

    def __init__(self):
        self.schedule, self.seen = AD, []

    def __call__(self, x, t, g, step=None, window=None):
        self.seen.append((window, tuple(b.text.shape[0] for b in g.branches)))
        text = g.branches[0].text
        per_frame = text[:, 0, 0].view(1, 1, -1, 1, 1) if text.shape[0] > 1 else text[0, 0, 0]
        return torch.sin(x * 3) + per_frame


def test_windows_fuse_to_the_unwindowed_result_for_frame_local_models():
    """Each frame's prediction is a convex combination of its windows' predictions; for a frame-local model all of
    them equal the unwindowed one, for any schedule and fusion. Per-frame prompts follow the windows."""
    x = torch.randn(1, 4, 23, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.arange(23.0).view(23, 1, 1).expand(23, 77, 8).clone()
    g = cfg(Branch(text), Branch(text), 1.0)
    ref = FrameLocal()(x, 500, g)
    for sched in ("standard_static", "standard_uniform", "looped_uniform", "batched"):
        for fuse in ("pyramid", "flat", "overlap-linear"):
            inner = FrameLocal()
            out = WindowedDenoiser(inner, ContextWindows(8, 3, sched, 2, False, fuse))(x, 500, g, step=1)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            assert len(inner.seen) > 1 and all(n == (len(w),) for w, n in inner.seen)


def test_one_window_covering_the_clip_is_exactly_the_plain_call():
    unet = tiny.motion_unet(0)
    use_per_frame_motion_norm(unet)
    den = VideoDenoiser(unet, AD)
    x = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 7.5)
    with torch.no_grad():
        plain = den(x, 500, g)
        assert torch.equal(WindowedDenoiser(den, ContextWindows(6, 2))(x, 500, g), plain)
        windowed = WindowedDenoiser(den, ContextWindows(4, 2))(x, 500, g)
    assert windowed.shape == plain.shape and (windowed - plain).abs().max() > 1e-4     # the motion module saw less


def test_attention_capture_and_injection_are_keyed_by_window():
    """Captured with windows, injected with the same windows at the same input: the output is reproduced (gamma 1
    uses only the stored features); injecting into whole-clip calls is refused with a clear error."""
    unet = tiny.motion_unet(0)
    use_per_frame_motion_norm(unet)
    opts = ContextWindows(4, 2)
    den = WindowedDenoiser(VideoDenoiser(unet, AD), opts)
    layers = resolve_layers(layer_table(unet), "deep")
    x = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 1.0)      # one branch: injection feeds every branch the cond's
    bank = FeatureBank(6, (8, 8), AD, dtype=torch.float32)
    with torch.no_grad():
        with den.controlled(AttentionController(layers, bank, "capture")):
            ref = den(x, 500, g, step=3)
        assert bank.windowed and len({k[2] for k in bank.entries}) == len(windows(6, opts))
        assert bank.nbytes == den.bank_bytes(layers, 6, (8, 8), 1, torch.float32)
        with den.controlled(AttentionController(layers, bank, "inject", gamma=1.0)):
            again = den(x, 500, g, step=3)
        torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)
        plain = VideoDenoiser(unet, AD)
        with pytest.raises(ValueError, match="other context windows"):
            with plain.controlled(AttentionController(layers, bank, "inject", gamma=1.0)):
                plain(x, 500, g, step=3)


def test_clips_longer_than_the_motion_module_need_windows():
    """AnimateDiff v2 encodes 32 positions: a 40-frame clip is refused with the fix named; on windows it runs."""
    unet = tiny.motion_unet(0)
    x = torch.randn(1, 4, 40, 8, 8, generator=torch.Generator().manual_seed(3))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="at most 32 frames.*VBContextWindows"):
        VideoDenoiser(unet, AD)(x, 500, g)
    with torch.no_grad():
        assert torch.isfinite(WindowedDenoiser(VideoDenoiser(unet, AD), ContextWindows())(x, 500, g)).all()


def test_freenoise_repeats_shuffled_blocks_of_the_earlier_noise():
    """48 frames, windows 16 / overlap 4: frames 16.. repeat permutations of the 12-frame block 12 frames earlier;
    the first window's noise is untouched; each block is a permutation (no frame lost or doubled); seeded; a clip that
    fits one window, or windows without freenoise, keep their noise."""
    from videobridge.core.context import freenoise, video_noise

    noise = torch.randn(1, 4, 48, 2, 2, generator=torch.Generator().manual_seed(0))
    opts = ContextWindows(16, 4, freenoise=True)
    out = freenoise(noise, opts, seed=5)
    assert torch.equal(out[:, :, :16], noise[:, :, :16]) and not torch.equal(out, noise)
    for start, place, n in ((0, 16, 12), (12, 28, 12), (24, 40, 8)):      # block after each window's start block
        def frames(a, b):
            return sorted(tuple(out[0, :, i].flatten().tolist()) for i in range(a, b))
        assert frames(place, place + n) == frames(start, start + n)
        assert not torch.equal(out[:, :, place:place + n], out[:, :, start:start + n])   # shuffled, not copied
    assert torch.equal(out, freenoise(noise, opts, seed=5)) and not torch.equal(out, freenoise(noise, opts, seed=6))
    assert torch.equal(freenoise(noise[:, :, :16], opts, 5), noise[:, :, :16])
    inner = FrameLocal()
    assert torch.equal(video_noise(WindowedDenoiser(inner, opts), noise, 5), out)
    assert video_noise(WindowedDenoiser(inner, ContextWindows(16, 4)), noise, 5) is noise and \
        video_noise(inner, noise, 5) is noise
