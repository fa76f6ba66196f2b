"""I4VGen (METHODS.md §3) on analytic denoisers with an exact eps, and against a line-by-line transcription of the
official pipeline (xiefan-guo/i4vgen pipeline_animation.py) run with diffusers' DDIMScheduler on tiny models."""
import dataclasses

import pytest
import torch

from videobridge.core import i4vgen
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg
from videobridge.core.models import use_per_frame_motion_norm
from videobridge.core.schedule import NoiseSchedule

from . import tiny

SD, AD = NoiseSchedule.sd15(), NoiseSchedule.animatediff()


class Gaussian:
    """Exact eps for data x0 ~ N(mu, s^2) per element: eps(x, t) = sqrt(1-ab)(x - sqrt(ab) mu)/(ab s^2 + 1 - ab),
    with (mu, s) the branch's text tensor; s = 0 is a point mass at mu. Honours Guidance weights and
    ``combine=False``."""

    def __init__(self, kind, schedule):
        self.kind, self.schedule, self.log = kind, schedule, []

    def __call__(self, x, t, g, step=None):
        self.log.append((t, x.clone()))
        a = self.schedule.alpha_bar(t)
        eps = torch.stack([(1 - a).sqrt() * (x[0] - a.sqrt() * br.text[0]) / (a * br.text[1] ** 2 + 1 - a)
                           for br in g.branches])
        if not g.combine:
            return eps
        return sum(w * e for w, e in zip(g.weights, eps))[None]


def mu(v, s=0.0):
    return Branch(torch.tensor([float(v), float(s)]))


# ------------------------------------------------------------------ NI-VSDS
def test_nivsds_contracts_to_the_guided_data_point_independently_of_its_noise():
    """For a point-mass data model the update is z <- z - eta sqrt(ab (1-ab)) (z - mu_g): the fixed point is the
    guided point mu_u + g (mu_c - mu_u), the distance shrinks by a known factor per step, and the constant noise
    cancels exactly (noise invariance)."""
    p = i4vgen.I4VGenParams()
    grid = AD.timesteps(25)[:i4vgen.nivsds_iterations(25, 0.6)]
    assert grid[0] == 961 and grid[-1] == 361 and len(grid) == 16
    den = Gaussian("video", AD)
    g = cfg(mu(0.8), mu(-0.2), 7.5)                       # guided point: -0.2 + 7.5 * 1.0 = 7.3
    z0 = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (1, 2):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(s))
        outs.append(i4vgen.ni_vsds(den, z0, noise, grid, g, p.step_sizes))
    factor = 1.0
    for t, eta in zip(grid, i4vgen.eta_schedule(p.step_sizes, len(grid))):
        a = AD.alpha_bar(t).double()
        factor *= 1 - eta * (a * (1 - a)).sqrt()
    expected = 7.3 + (z0.double() - 7.3) * factor
    assert 0 < factor < 0.1                                # it moves most of the way
    for out in outs:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # every update points from z to the guided point, and each evaluation sees q(z, t, the SAME noise)
    first_x = den.log[0][1]
    a = AD.alpha_bar(961)
    torch.testing.assert_close(first_x, a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(
        z0.shape, generator=torch.Generator().manual_seed(1)))


def test_nivsds_step_sizes_and_iterations_follow_the_official_code():
    assert i4vgen.nivsds_iterations(25, 0.6) == 16 and i4vgen.nivsds_iterations(25, 1.0) == 25
    assert i4vgen.nivsds_iterations(50, 0.6) == 31
    assert i4vgen.eta_schedule((10, 10, 10, 1), 6) == [10, 10, 10, 1, 1, 1]
    assert i4vgen.parse_step_sizes("10, 10;10 ,1") == (10.0, 10.0, 10.0, 1.0)
    for bad in ("", "10, x", "10, -1", "nan"):
        with pytest.raises(ValueError, match="step_sizes"):
            i4vgen.parse_step_sizes(bad)
    for kw, msg in [(dict(p_ni=0.0), "p_ni"), (dict(p_re=1.5), "p_re"), (dict(num_candidates=0), "num_candidates"),
                    (dict(candidate_index=16), "candidate_index"), (dict(step_sizes=()), "step_sizes")]:
        with pytest.raises(ValueError, match=msg):
            dataclasses.replace(i4vgen.I4VGenParams(), **kw).checked()


# ------------------------------------------------------------------ candidates, scoring, regeneration
def test_candidate_noise_is_per_seed_and_independent_of_the_count():
    a = i4vgen.candidate_noise(5, 3, (8, 8))
    b = i4vgen.candidate_noise(5, 16, (8, 8))
    assert a.shape == (1, 4, 3, 8, 8) and torch.equal(a, b[:, :, :3])
    assert not torch.equal(a, i4vgen.candidate_noise(6, 3, (8, 8)))
    unet = tiny.unet2d(0)
    den = UNet2DDenoiser(unet, SD, frame_batch_size=2)
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 7.5)
    grid = SD.timesteps(4)
    few = i4vgen.generate_candidates(den, a, grid, g)
    many = i4vgen.generate_candidates(UNet2DDenoiser(unet, SD), b, grid, g)
    # chunking and N_c change nothing but fp32 rounding of differently sized batches (measured 7.6e-6)
    torch.testing.assert_close(few, many[:, :, :3], rtol=1e-4, atol=2e-5)


def test_weight_free_scorer_picks_the_planted_candidate():
    """The prompt's data are N(0.5, 0.1^2), the negative prompt's N(0, 2^2); candidates at 0.0, 0.5, 1.0, -0.5: the
    likelihood ratio p(x|prompt)/p(x|negative), which the diffusion-classifier score estimates, peaks at candidate 1;
    images are equal so the heuristics tie."""
    den = Gaussian("image", SD)
    lat = torch.tensor([0.0, 0.5, 1.0, -0.5]).view(1, 1, 4, 1, 1).expand(1, 4, 4, 4, 4).clone()
    d = i4vgen.diffusion_alignment(den, lat, mu(0.5, 0.1), mu(0.0, 2.0), seed=3)
    assert int(d.argmax()) == 1 and d[1] > d[0] and d[1] > d[2] and d[1] > d[3]
    images = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    images = images[:1].expand(4, -1, -1, -1)
    s = i4vgen.weight_free_scores(d, images)
    assert i4vgen.choose(s["score"]) == 1 and i4vgen.choose(s["score"], forced=3) == 3
    # the heuristics: a blurred copy is less sharp, a blown-out one is penalised
    sharp = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    blurred = torch.nn.functional.avg_pool2d(sharp.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    blown = torch.ones_like(sharp)
    both = torch.cat([sharp, blurred, blown])
    assert i4vgen.sharpness(both)[0] > i4vgen.sharpness(both)[1]
    e = i4vgen.exposure(both)
    assert e[2] == 1.0 and e[0] < 0.1 and e[1] < e[0] + 1e-6
    flat = i4vgen.weight_free_scores(torch.zeros(3), both)
    assert i4vgen.choose(flat["score"]) == 0 and flat["score"][2] < flat["score"][1]
    assert i4vgen.choose(torch.tensor([1.0, 2.0, 2.0])) == 1                    # ties -> lowest index


def test_regeneration_starts_at_q_of_the_nivsds_video():
    den = Gaussian("video", AD)
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    n = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    for p_re, start in [(1.0, 961), (0.8, 761)]:
        den.log.clear()
        _, _, grid = i4vgen.video_stages(den, i4vgen.I4VGenParams(p_re=p_re))
        assert grid[0] == start and len(grid) == int(25 * p_re)
        i4vgen.regenerate(den, z, n, grid, cfg(mu(0.3), mu(0.0), 7.5))
        assert den.log[0][0] == start and len(den.log) == len(grid)
        torch.testing.assert_close(den.log[0][1], AD.add_noise(z, n, start))


def test_official_schedule_is_diffusers_default_ddim_on_linear_betas():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    ref.set_timesteps(25)
    off = i4vgen.official_schedule()
    assert off.timesteps(25) == ref.timesteps.tolist() == list(range(960, -1, -40))
    assert ref.config.clip_sample and off.clip_sample == 1.0 and off.final_alpha_cumprod == 1.0
    x, e = torch.randn(1, 4, 1, 4, 4) * 3, torch.randn(1, 4, 1, 4, 4)
    for t in (960, 40, 0):
        torch.testing.assert_close(off.ddim_step(x, e, t, t - 40 if t else None), ref.step(e, t, x).prev_sample)


# ------------------------------------------------------------------ the whole method against the official loops
def official_pipeline(unet2d, video_unet, text_uncond, text_cond, noise, index, F, steps=25, g=7.5, p_ni=0.6, p_re=1.0,
                      constant_noise=None, regen_noise=None, candidates=None):
    """pipeline_animation.py ``AnimationPipeline.__call__`` stages 1-1, 2-1 and 2-2 transcribed line by line with its
    scheduler (diffusers DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")). The official
    UNet3D on 1-frame clips is the plain SD UNet (its motion modules skip clips under 16 frames; METHODS §7.2 I1);
    on 16-frame clips it is the AnimateDiff UNet with per-frame motion norms (§7.2 I11)."""
    from diffusers import DDIMScheduler
    from einops import rearrange

    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    text_embeddings = torch.cat([text_uncond, text_cond])
    image_text_embeddings = torch.cat([text_embeddings[0:1]] * F + [text_embeddings[1:2]] * F, dim=0)
    latents = rearrange(noise, "b c f h w -> (b f) c h w")               # candidate n = frame n of the T2V draw
    for t in timesteps if candidates is None else []:                    # (given candidates: the benchmark's (C))
        inp = torch.cat([latents] * 2)
        pred = unet2d(inp, t, encoder_hidden_states=image_text_embeddings).sample
        u, c = pred.chunk(2)
        latents = sch.step(u + g * (c - u), t, latents).prev_sample
    candidates = latents.clone() if candidates is None else candidates
    latents = candidates
    latents = torch.cat([latents[index:index + 1].unsqueeze(2)] * F, dim=2)
    tau = int(steps * p_ni) + 1
    z = latents.clone()
    sizes = [10, 10, 10] + [1] * 22
    per_frame = torch.cat([text_embeddings.repeat_interleave(F, 0)])
    for i, t in enumerate(timesteps[:tau]):
        x = sch.add_noise(z, constant_noise, t)
        pred = video_unet(torch.cat([x] * 2), t, encoder_hidden_states=per_frame).sample
        u, c = pred.chunk(2)
        z = z - sizes[i] * ((1 - sch.alphas_cumprod[t]) * (u + g * (c - u) - constant_noise))
    nivsds = z.clone()
    init = min(int(steps * p_re), steps)
    ts = sch.timesteps[max(steps - init, 0):]
    x = sch.add_noise(z, regen_noise, ts[:1])
    for t in ts:
        pred = video_unet(torch.cat([x] * 2), t, encoder_hidden_states=per_frame).sample
        u, c = pred.chunk(2)
        x = sch.step(u + g * (c - u), t, x).prev_sample
    return candidates, nivsds, x


def test_parity_with_the_official_pipeline_stage_by_stage():
    """With both parity options and a forced index, every stage equals the official loop to fp32 rounding, both
    chained and from the official stage input. 16 frames: below that the official motion module switches off."""
    F, h, w, seed, index = 16, 8, 8, 7, 5
    unet = tiny.unet2d(0)
    video = tiny.motion_unet(0, unet)
    assert use_per_frame_motion_norm(video) > 0
    uncond, cond = tiny.text(1), tiny.text(2)
    params = i4vgen.I4VGenParams(num_candidates=F, official_candidate_schedule=True, official_scheduler_config=True,
                                 candidate_index=index, steps=6)
    noise = i4vgen.candidate_noise(seed, F, (h, w))
    eps_c = i4vgen.stream_noise((1, 4, F, h, w), seed, "nivsds")
    eps_r = i4vgen.stream_noise((1, 4, F, h, w), seed, "regen")
    with torch.no_grad():
        ref_cand, ref_ni, ref_video = official_pipeline(unet, video, uncond, cond, noise, index, F, steps=6,
                                                        constant_noise=eps_c, regen_noise=eps_r)
        g = cfg(Branch(cond), Branch(uncond), 7.5)
        seen = {}
        res = i4vgen.i4vgen(UNet2DDenoiser(unet, SD), VideoDenoiser(video, AD), (1, 4, F, h, w), g, g, seed, params,
                            on_stage=seen.__setitem__)
        # chained
        torch.testing.assert_close(res.candidates[0].permute(1, 0, 2, 3), ref_cand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.ni_vsds, ref_ni, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.video, ref_video, rtol=1e-5, atol=1e-5)
        assert res.index == index and set(seen) == {"candidates", "anchor", "ni_vsds"}
        # from the official stage inputs
        _, grid_c = i4vgen.candidate_stage(UNet2DDenoiser(unet, SD), params)
        video_o, grid_ni, grid_re = i4vgen.video_stages(VideoDenoiser(video, AD), params)
        assert grid_c == [830, 664, 498, 332, 166, 0] and grid_ni == [830, 664, 498, 332]
        z = i4vgen.ni_vsds(video_o, ref_cand[index][None, :, None].expand(1, 4, F, h, w), eps_c, grid_ni, g)
        torch.testing.assert_close(z, ref_ni, rtol=1e-5, atol=1e-5)
        out = i4vgen.regenerate(video_o, ref_ni, eps_r, grid_re, g)
        torch.testing.assert_close(out, ref_video, rtol=1e-5, atol=1e-5)
    # without the parity options the candidates differ (SD schedule, grid 961..1, no clipping)
    with torch.no_grad():
        plain = i4vgen.generate_candidates(UNet2DDenoiser(unet, SD), noise, SD.timesteps(6), g)
    assert (plain[0].permute(1, 0, 2, 3) - ref_cand).abs().max() > 1e-3


def test_given_anchor_skips_candidates_and_must_match_the_size():
    den_i, den_v = Gaussian("image", SD), Gaussian("video", AD)
    g = cfg(mu(0.5), mu(0.0), 2.0)
    anchor = torch.full((1, 4, 1, 4, 4), 0.25)
    res = i4vgen.i4vgen(den_i, den_v, (1, 4, 3, 4, 4), g, g, 0, i4vgen.I4VGenParams(steps=5), anchor=anchor)
    assert not den_i.log and res.candidates is None and res.index == -1
    assert len(den_v.log) == i4vgen.nivsds_iterations(5, 0.6) + 5
    with pytest.raises(ValueError, match="anchor: .*40x40"):
        i4vgen.i4vgen(den_i, den_v, (1, 4, 3, 5, 5), g, g, 0, i4vgen.I4VGenParams(steps=5), anchor=anchor)


def test_clip_preprocessing_matches_transformers_clip_image_processor():
    """Resize of the shorter side, centre crop and OpenAI normalisation as CLIPImageProcessor does them (its uint8
    input and PIL resampling leave 0.018 at most, measured; a wrong crop, scale or channel order leaves > 0.3)."""
    import numpy as np
    from transformers import CLIPImageProcessor

    imgs = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    imgs = torch.nn.functional.avg_pool2d(imgs.permute(0, 3, 1, 2), 5, 1, 2).permute(0, 2, 3, 1)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=[(im.numpy() * 255).round().astype(np.uint8) for im in imgs], return_tensors="pt").pixel_values
    ours = i4vgen.clip_pixels(imgs, 32)
    assert ours.shape == ref.shape == (2, 3, 32, 32) and (ours - ref).abs().max() < 0.03
    assert (i4vgen.clip_pixels(imgs.flip(-1), 32) - ref).abs().max() > 0.3
