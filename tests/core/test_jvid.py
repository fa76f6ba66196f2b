"""JVID (METHODS.md §4) against analytic Gaussian denoisers with an exact eps, and diffusers' DDPMScheduler."""
import pytest
import torch

from videobridge.core import jvid
from videobridge.core.denoisers import Branch, single
from videobridge.core.schedule import ANIMATEDIFF_SCHEDULER_CONFIG, NoiseSchedule

SD, AD = NoiseSchedule.sd15(), NoiseSchedule.animatediff()
G = single(Branch(torch.zeros(1, 77, 8)))
SHAPE = (1, 4, 4, 8, 8)


class Gaussian:
    """Exact eps for data x0 ~ N(mu, s^2) per element: eps = sqrt(1-ab)(x - sqrt(ab) mu)/(ab s^2 + 1 - ab)."""

    def __init__(self, kind, schedule, mu=0.5, s=0.4):
        self.kind, self.schedule, self.mu, self.s, self.log = kind, schedule, mu, s, []

    def __call__(self, x, t, g, step=None):
        self.log.append(t)
        a = self.schedule.alpha_bar(t)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


def constant(p):
    """P_V identically p."""
    return jvid.JVIDParams(t_v=0.0, t_e=0.0, p_e=p, p_f=p, gamma=1.0)


# ------------------------------------------------------------------ P_V and choices
def test_p_video_follows_the_consistent_reading():
    for name, p in jvid.PRESETS.items():
        assert jvid.p_video(0.0, p) == 1.0 and jvid.p_video(p.t_v - 1e-9, p) == 1.0
        assert jvid.p_video(p.t_e, p) == pytest.approx(p.p_e) and jvid.p_video(1.0, p) == pytest.approx(p.p_f)
        mid = (p.t_v + p.t_e) / 2
        assert jvid.p_video(mid, p) == pytest.approx((1 + p.p_e) / 2)                    # affine in between
    assert jvid.expected_video_steps(jvid.PRESETS["256"]) == pytest.approx(23.09, abs=0.01)
    assert jvid.expected_video_steps(jvid.PRESETS["128"]) == pytest.approx(34.11, abs=0.01)
    assert jvid.progress(0, 50) == 0.0 and jvid.progress(49, 50) == 1.0


def test_choices_come_from_their_own_stream():
    base = jvid.PRESETS["256"]
    a = jvid.choose_models(base, 7)
    assert a == jvid.choose_models(base, 7) and a != jvid.choose_models(base, 8)
    assert all(a[:5])                                                   # u < t_v = 0.1: video only
    assert sum(jvid.choose_models(constant(1.0), 7)) == 50 and sum(jvid.choose_models(constant(0.0), 7)) == 0
    # changing P_V changes the choices but never the noise: with identical models the outputs agree exactly
    d = Gaussian("video", SD)
    i = Gaussian("image", SD)
    out_a, used_a = jvid.jvid_sample(i, d, SHAPE, G, G, 3, jvid.PRESETS["256"])
    out_b, used_b = jvid.jvid_sample(i, d, SHAPE, G, G, 3, jvid.preset("256", t_v=0.3, p_f=0.6))
    assert used_a != used_b and torch.allclose(out_a, out_b, atol=1e-6)


def test_bad_parameters_name_the_knob():
    for kw, msg in [(dict(t_v=0.8, t_e=0.5), "t_v .*t_e"), (dict(p_e=1.5), r"p_e must be in \[0, 1\]"),
                    (dict(r_v=-0.1), "r_v"), (dict(gamma=-1), "gamma"), (dict(c_s=0), "c_s")]:
        with pytest.raises(ValueError, match=msg):
            jvid.preset("256", **kw)
    with pytest.raises(ValueError, match="preset"):
        jvid.preset("512")
    with pytest.raises(ValueError, match="image and a video"):
        jvid.jvid_sample(Gaussian("video", SD), Gaussian("video", SD), SHAPE, G, G, 0)


# ------------------------------------------------------------------ reductions and the sampled distribution
def test_all_video_steps_are_exactly_diffusers_ddpm():
    """P_V = 1: the loop is plain DDPM with the video model, step for step (diffusers DDPMScheduler, fixed_small)."""
    from diffusers import DDPMScheduler

    video, image = Gaussian("video", AD), Gaussian("image", SD)
    ours, used = jvid.jvid_sample(image, video, SHAPE, G, G, 11, constant(1.0))
    assert all(used) and not image.log
    sched = DDPMScheduler(**{k: v for k, v in ANIMATEDIFF_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    assert sched.config.clip_sample is False
    sched.set_timesteps(50)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11 + jvid.STREAMS["init"]))
    gen = torch.Generator().manual_seed(11 + jvid.STREAMS["step"])
    for t in sched.timesteps:
        x = sched.step(Gaussian("video", AD)(x, int(t), G), t, x, generator=gen).prev_sample
    assert [int(t) for t in sched.timesteps] == video.log
    assert torch.allclose(ours, x, atol=1e-4), float((ours - x).abs().max())


def test_all_image_steps_are_framewise_image_ddpm_on_mapped_timesteps():
    video, image = Gaussian("video", AD), Gaussian("image", SD)
    ours, used = jvid.jvid_sample(image, video, SHAPE, G, G, 5, constant(0.0))
    assert not any(used) and not video.log
    grid = AD.timesteps(50)
    assert image.log == [AD.map_timestep(t, SD) for t in grid] and image.log[:4] == [999] * 4
    # the same loop written out: the mapped image eps drives the master (AnimateDiff) DDPM posterior
    s = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5 + jvid.STREAMS["init"]))
    gen = torch.Generator().manual_seed(5 + jvid.STREAMS["step"])
    for i, t in enumerate(grid):
        eps = Gaussian("image", SD)(s, AD.map_timestep(t, SD), G)
        z = torch.randn(SHAPE, generator=gen)
        s = jvid.ddpm_step(AD, s, eps, t, grid[i + 1] if i + 1 < len(grid) else None, z)
    assert torch.allclose(ours, s, atol=1e-5)


def test_mixture_of_two_exact_denoisers_samples_the_data_distribution():
    """Video model exact for x0 ~ N(0.5, 0.4^2) on the AnimateDiff schedule, image model exact for the same data on the
    SD1.5 schedule, driven through the (interpolated) equal-alpha-bar mapping. With N = 1000 steps (DDPM's
    fixed-small variance makes 50 steps 11 % narrow, for a pure video run too) the mixture's samples have the data's
    mean and standard deviation within sampling error (8 seeds x 1024 elements)."""
    video, image = Gaussian("video", AD), Gaussian("image", SD)
    params = jvid.preset("256", steps=1000)

    def samples(p, seeds=8):
        return torch.cat([jvid.jvid_sample(image, video, SHAPE, G, G, seed, p, exact_mapping=True)[0].flatten()
                          for seed in range(seeds)])

    out = samples(params)
    assert 0 < len(image.log) < len(image.log) + len(video.log)             # both models ran
    assert abs(float(out.mean()) - 0.5) < 4 * 0.4 / out.numel() ** 0.5
    assert abs(float(out.std()) - 0.4) < 0.012, float(out.std())
    # a wrong posterior (say, no noise on image steps: gamma 0) visibly shrinks the spread
    assert float(samples(jvid.replace(params, gamma=0.0), 4).std()) < 0.38


def test_shared_noise_is_the_same_for_every_frame_and_keeps_unit_variance():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    z = jvid.step_noise((1, 4, 6, 16, 16), 1.0, g1, g2)
    assert torch.equal(z[:, :, :1].expand_as(z), z)
    z = jvid.step_noise((1, 4, 6, 64, 64), 0.5, g1, g2)
    assert abs(float(z.std()) - 1.0) < 0.02
    corr = float((z[:, :, 0] * z[:, :, 1]).mean() / z.var())
    assert abs(corr - 0.5) < 0.05                                        # frames share r of the variance


# ------------------------------------------------------------------ smoothing
def test_smoothing_replaces_exactly_the_voxels_below_c_s():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 5, 6, 6, generator=g)
    out = jvid.temporal_latent_smoothing(s, 2.0)
    mu = s.mean(2, keepdim=True)
    sigma = mu.std(dim=(-2, -1), unbiased=False, keepdim=True)
    d = ((s - mu).abs() / sigma).sum(1, keepdim=True)
    below = (d < 2.0).expand_as(s)
    assert 0 < int(below.sum()) < below.numel()
    assert torch.equal(out[~below], s[~below])
    assert torch.allclose(out[below], mu.expand_as(s)[below])
    static = torch.randn(1, 4, 1, 6, 6, generator=g).expand(1, 4, 5, 6, 6)
    assert torch.allclose(jvid.temporal_latent_smoothing(static, 2.0), static, atol=1e-6)   # a static clip stays
    assert torch.allclose(jvid.temporal_latent_smoothing(3 * s, 2.0), 3 * out, atol=1e-5)   # scale-invariant
    with pytest.raises(ValueError, match="c_s"):
        jvid.temporal_latent_smoothing(s, 0)


def test_equal_alpha_bar_mapping_round_trip():
    for t in AD.timesteps(50):
        u = AD.map_timestep(t, SD)
        if u < 999:                                                      # noisier levels clamp (METHODS.md §1.4)
            assert abs(SD.map_timestep(u, AD) - t) <= 1
        assert abs(float(SD.alpha_bar(AD.map_timestep(t, SD, exact=True)) - AD.alpha_bar(t))) < 1e-6 or u == 999
