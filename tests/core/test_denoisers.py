import pytest
import torch

from videobridge.core.denoisers import Branch, Guidance, MappedDenoiser, UNet2DDenoiser, VideoDenoiser, cfg, \
    ip2p, on_schedule, single
from videobridge.core.schedule import NoiseSchedule

from . import tiny

SD = NoiseSchedule.sd15()
AD = NoiseSchedule.animatediff()
F_ = 4


def latent(seed=0, frames=F_, ch=4):
    return torch.randn(1, ch, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cfg_is_one_batched_call_equal_to_separate_calls():
    d = UNet2DDenoiser(tiny.unet2d(), SD)
    x, c, u = latent(), tiny.text(1), tiny.text(2)
    guided = d(x, 501, cfg(Branch(c), Branch(u), 7.5))
    assert d.calls == 1 and guided.shape == x.shape and guided.dtype == torch.float32
    ec, eu = d(x, 501, single(Branch(c))), d(x, 501, single(Branch(u)))
    assert torch.allclose(guided, eu + 7.5 * (ec - eu), atol=1e-5)


@torch.no_grad()
def test_image_denoiser_is_framewise_and_chunking_does_not_change_it():
    unet = tiny.unet2d()
    x, g = latent(), single(Branch(tiny.text(1)))
    full = UNet2DDenoiser(unet, SD)(x, 301, g)
    chunked = UNet2DDenoiser(unet, SD, frame_batch_size=3)(x, 301, g)
    assert torch.allclose(full, chunked, atol=1e-5)
    one = UNet2DDenoiser(unet, SD)(x[:, :, 2:3], 301, g)                    # frame 2 alone
    assert torch.allclose(full[:, :, 2:3], one, atol=1e-5)


@torch.no_grad()
def test_per_frame_prompts_and_bf16_model_returns_float32():
    unet = tiny.unet2d().to(torch.bfloat16)
    texts = tiny.text(3, n=F_)
    eps = UNet2DDenoiser(unet, SD)(latent(), 101, single(Branch(texts)))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


@torch.no_grad()
def test_controlnet_residuals_change_eps_and_hints_are_required():
    unet, cn = tiny.unet2d(), tiny.controlnet()
    hint = torch.rand(F_, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x, c = latent(), tiny.text(1)
    plain = UNet2DDenoiser(unet, SD)(x, 401, single(Branch(c)))
    ctrl = UNet2DDenoiser(unet, SD, controlnet=cn)(x, 401, single(Branch(c, control=hint)))
    weak = UNet2DDenoiser(unet, SD, controlnet=cn, control_scale=0.0)(x, 401, single(Branch(c, control=hint)))
    assert not torch.allclose(plain, ctrl, atol=1e-4)
    assert torch.allclose(plain, weak, atol=1e-5)
    with pytest.raises(ValueError, match="control hint"):
        UNet2DDenoiser(unet, SD, controlnet=cn)(x, 401, single(Branch(c)))


@torch.no_grad()
def test_ip2p_three_way_guidance():
    d = UNet2DDenoiser(tiny.unet2d(in_channels=8), SD)
    x, img, c, n = latent(), latent(5), tiny.text(1), tiny.text(2)
    eps = d(x, 601, ip2p(c, n, img, 7.5, 1.5))
    e_ti = d(x, 601, single(Branch(c, img)))
    e_i = d(x, 601, single(Branch(n, img)))
    e_0 = d(x, 601, single(Branch(n, torch.zeros_like(img))))
    assert torch.allclose(eps, e_0 + 7.5 * (e_ti - e_i) + 1.5 * (e_i - e_0), atol=1e-4)


@torch.no_grad()
def test_inflated_groupnorm_pools_over_frames_and_is_removed_after_use():
    unet = tiny.unet2d()
    x, g = latent(), single(Branch(tiny.text(1)))
    per_frame = UNet2DDenoiser(unet, SD)(x, 201, g)
    pooled = UNet2DDenoiser(unet, SD, inflated_groupnorm=True)
    out = pooled(x, 201, g)
    assert (out - per_frame).abs().max() > 1e-3
    assert torch.allclose(pooled(x[:, :, :1], 201, g), per_frame[:, :, :1], atol=1e-5)   # 1 frame: identical
    assert torch.allclose(UNet2DDenoiser(unet, SD)(x, 201, g), per_frame)                 # hooks gone
    assert all(not m._forward_hooks for m in unet.modules())
    with pytest.raises(Exception):
        pooled(x, 201, single(Branch(torch.zeros(1, 77, 5))))                             # wrong text width
    assert all(not m._forward_hooks for m in unet.modules())


@torch.no_grad()
@pytest.mark.parametrize("kind", ["motion", "unet3d"])
def test_video_denoiser_batches_guidance(kind):
    unet = tiny.motion_unet() if kind == "motion" else tiny.unet3d()
    d = VideoDenoiser(unet, SD)
    x, c, u = latent(), tiny.text(1), tiny.text(2)
    guided = d(x, 501, cfg(Branch(c), Branch(u), 5.0))
    ec, eu = d(x, 501, single(Branch(c))), d(x, 501, single(Branch(u)))
    assert guided.shape == x.shape and torch.allclose(guided, eu + 5.0 * (ec - eu), atol=1e-4)
    # the video model mixes frames: changing frame 0 changes frame 3's eps
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert (d(x2, 501, single(Branch(c)))[:, :, 3] - ec[:, :, 3]).abs().max() > 1e-5


def test_mapped_denoiser_calls_inner_at_equal_alpha_bar():
    seen = []

    class Rec:
        kind, schedule, calls = "image", SD, 0

        def __call__(self, x, t, g, step=None):
            seen.append(t)
            return x

    ad = NoiseSchedule.animatediff()
    m = on_schedule(Rec(), ad)
    assert isinstance(m, MappedDenoiser) and m.schedule is ad
    for t in (500, 201, 961):
        m(torch.zeros(1), t, None)
    assert seen == [600, 252, 999]
    assert on_schedule(Rec(), NoiseSchedule.sd15()).__class__ is Rec


def test_guidance_needs_a_weight_per_branch():
    with pytest.raises(ValueError):
        Guidance([Branch(tiny.text(0))], [0.5, 0.5])


@torch.no_grad()
def test_guidance_is_combined_in_the_official_order_bit_for_bit():
    """u + g (c - u) and e0 + s_t (e_TI - e_I) + s_i (e_I - e0), as diffusers' pipelines and the official code write
    them (a weighted sum is equal mathematically but rounds differently)."""
    unet = tiny.unet2d()
    d, x, c, u = UNet2DDenoiser(unet, SD), latent(), tiny.text(1), tiny.text(2)
    ec, eu = d(x, 501, single(Branch(c))), d(x, 501, single(Branch(u)))
    assert torch.equal(d(x, 501, cfg(Branch(c), Branch(u), 7.5)), eu + 7.5 * (ec - eu))
    ip = UNet2DDenoiser(tiny.unet2d(in_channels=8), SD)
    img = latent(seed=3)
    e_ti = ip(x, 301, single(Branch(c, img)))
    e_i = ip(x, 301, single(Branch(u, img)))
    e_0 = ip(x, 301, single(Branch(u, torch.zeros_like(img))))
    assert torch.equal(ip(x, 301, ip2p(c, u, img, 7.5, 1.5)), e_0 + 7.5 * (e_ti - e_i) + 1.5 * (e_i - e_0))


class OOMAbove(torch.nn.Module):
    """Wraps a UNet; raises CUDA's out-of-memory error when a call's batch is above ``limit`` rows (frames x branches
    for 2-D UNets, branches x frames for video UNets); records the batch sizes it accepted."""

    def __init__(self, unet, limit, video=False):
        super().__init__()
        self.unet, self.limit, self.video, self.ok = unet, limit, video, []

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample, *args, **kwargs):
        rows = sample.shape[0] * (sample.shape[2] if self.video else 1)
        if rows > self.limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: {rows} rows")
        self.ok.append(rows)
        return self.unet(sample, *args, **kwargs)


class OOMMotion(OOMAbove):
    pass


OOMMotion.__name__ = "UNetMotionModel"       # VideoDenoiser reads the per-frame text layout from the class name


def test_out_of_memory_halves_image_chunks_with_the_same_result(caplog):
    from videobridge.core.denoisers import UNet2DDenoiser

    unet = tiny.unet2d(0)
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 7.5)
    with torch.no_grad():
        ref = UNet2DDenoiser(unet, SD)(x, 501, g)
        tight = OOMAbove(unet, 6)
        den = UNet2DDenoiser(tight, SD)
        out = den(x, 501, g)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    assert max(tight.ok) <= 6 and den.frame_batch_size == 2 and "ran out of memory" in caplog.text
    with torch.no_grad(), pytest.raises(torch.cuda.OutOfMemoryError):
        UNet2DDenoiser(OOMAbove(unet, 1), SD)(x, 501, g)                   # 2 branches x 1 frame still too many
    paired = OOMAbove(unet, 10)                                            # Prompt2Prompt: frames go in pairs
    with torch.no_grad():
        den = UNet2DDenoiser(paired, SD, frame_batch_size=7, frame_group=2)
        torch.testing.assert_close(den(x, 501, g), ref, rtol=1e-4, atol=2e-5)
    assert paired.ok == [4] * 4 and den.frame_batch_size == 2              # 7 -> 6 frames (12 rows), halved: 3 -> 2
    with torch.no_grad(), pytest.raises(torch.cuda.OutOfMemoryError):
        UNet2DDenoiser(OOMAbove(unet, 3), SD, frame_group=2)(x, 501, g)    # one pair is the smallest chunk


def test_out_of_memory_on_a_video_model_runs_branches_in_turn_then_windows(caplog):
    """First the guidance branches one after the other (same result), then context windows (logged: the result
    differs), which are kept for the next calls; sequential_branches on request gives the same result."""
    from videobridge.core.denoisers import VideoDenoiser

    unet = tiny.motion_unet(0)
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 7.5)
    with torch.no_grad():
        ref = VideoDenoiser(unet, AD)(x, 501, g)
        seq = VideoDenoiser(OOMMotion(unet, 8, video=True), AD)
        torch.testing.assert_close(seq(x, 501, g), ref, rtol=1e-4, atol=2e-5)
        assert seq.sequential_branches and seq.fallback is None
        torch.testing.assert_close(VideoDenoiser(unet, AD, sequential_branches=True)(x, 501, g), ref,
                                   rtol=1e-4, atol=2e-5)
        tight = OOMMotion(unet, 4, video=True)
        win = VideoDenoiser(tight, AD)
        out = win(x, 501, g)
        assert win.fallback.context_length == 4 and max(tight.ok) <= 4
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
        n = len(tight.ok)
        win(x, 501, g)
        assert all(r <= 4 for r in tight.ok[n:])                            # the windows are kept
    assert "context windows of 4 frames" in caplog.text


@torch.no_grad()
@pytest.mark.parametrize("in_channels", [1, 3])
def test_t2i_adapter_residuals_match_diffusers_frame_by_frame(in_channels):
    """The denoiser's batched, chunked T2I-Adapter path equals diffusers' own: per frame and branch,
    ``unet(x_f, t, text, down_intrablock_additional_residuals=[scale * f for f in T2IAdapter(hint_f)])``, the hint
    grey (mean of RGB) for a one-channel adapter."""
    from diffusers import T2IAdapter

    unet = tiny.unet2d(0)
    ad = tiny.randomize(T2IAdapter(in_channels=in_channels, channels=list(tiny.CH), num_res_blocks=2,
                                   downscale_factor=8, adapter_type="full_adapter"), 7)
    frames, scale = 3, 0.8
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(0))
    hints = torch.rand(frames, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    c, u = tiny.text(1), tiny.text(2)
    g = cfg(Branch(c, control=hints), Branch(u, control=hints), 7.5)
    ours = UNet2DDenoiser(unet, SD, controlnet=ad, control_scale=scale, frame_batch_size=2)(x, 501, g)
    ref = []
    for f in range(frames):
        hint = hints[f:f + 1] if in_channels == 3 else hints[f:f + 1].mean(1, keepdim=True)
        eps = [unet(x[:, :, f], 501, text, down_intrablock_additional_residuals=[scale * r for r in ad(hint)]).sample
               for text in (u, c)]
        ref.append(eps[0] + 7.5 * (eps[1] - eps[0]))
    ref = torch.stack(ref, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    plain = UNet2DDenoiser(unet, SD)(x, 501, cfg(Branch(c), Branch(u), 7.5))
    assert float((ours - plain).abs().max()) > 1e-2                     # the adapter acts
    zero = UNet2DDenoiser(unet, SD, controlnet=ad, control_scale=0.0)(x, 501, g)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-6)        # scale 0: no adapter


@torch.no_grad()
def test_t2i_adapter_runs_once_per_chunk_not_per_step():
    """The adapter's features depend only on the hints: over a 3-step sampling run in chunks of 2 frames the adapter
    runs once per chunk, and new hint tensors are encoded again."""
    from diffusers import T2IAdapter

    from videobridge.core.samplers import ddim_sample

    unet = tiny.unet2d(0)
    ad = tiny.randomize(T2IAdapter(in_channels=3, channels=list(tiny.CH), num_res_blocks=1,
                                   adapter_type="full_adapter"), 7)
    calls = []
    ad.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    x = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hints = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    den = UNet2DDenoiser(unet, SD, controlnet=ad, frame_batch_size=2)
    g = cfg(Branch(tiny.text(1), control=hints), Branch(tiny.text(2), control=hints), 7.5)
    ddim_sample(den, x, SD.timesteps(3), g)
    assert calls == [2, 2]                                               # 2 chunks, once each, shared by both branches
    den(x, 501, cfg(Branch(tiny.text(1), control=hints.clone()), Branch(tiny.text(2), control=hints), 7.5))
    assert calls == [2, 2, 4, 4]                                         # other hint objects: encoded again, per branch
