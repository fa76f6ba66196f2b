import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from videobridge.core.schedule import ANIMATEDIFF_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, NoiseSchedule


@pytest.mark.parametrize("cfg", [SD15_SCHEDULER_CONFIG, ANIMATEDIFF_SCHEDULER_CONFIG])
def test_tables_equal_diffusers(cfg):
    s = NoiseSchedule.from_config(cfg)
    ref = DDIMScheduler.from_config(cfg)
    assert s.alphas_cumprod.dtype == torch.float32
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod.float())
    assert s.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))


def test_table_values_from_methods_doc():
    sd, ad = NoiseSchedule.sd15(), NoiseSchedule.animatediff()
    for t, a_sd, a_ad in [(0, 0.99915, 0.99915), (201, 0.7521, 0.6712), (499, 0.2777, 0.1618), (999, 0.00466, 0.00158)]:
        assert float(sd.alpha_bar(t)) == pytest.approx(a_sd, abs=6e-5)
        assert float(ad.alpha_bar(t)) == pytest.approx(a_ad, abs=6e-5)
    assert sd.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-5) and ad.final_alpha_cumprod == 1.0


@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("leading", 25), ("leading", 4), ("trailing", 8),
                                           ("trailing", 4), ("linspace", 50), ("linspace", 4)])
def test_grids_equal_diffusers_set_timesteps(spacing, steps):
    s = NoiseSchedule.sd15()
    ref = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert s.timesteps(steps, spacing) == ref.timesteps.tolist()


def test_grid_examples_and_strength():
    s = NoiseSchedule.sd15()
    g50 = s.timesteps(50)
    assert g50[:3] == [981, 961, 941] and g50[-1] == 1 and len(g50) == 50
    assert s.timesteps(25)[:2] == [961, 921]
    assert s.timesteps(8, "trailing") == [999, 874, 749, 624, 499, 374, 249, 124]
    assert s.timesteps(50, strength=0.4) == g50[30:]
    assert s.timesteps(25, strength=0.6)[0] == 561
    for bad in [dict(steps=0), dict(steps=10, spacing="karras"), dict(steps=10, strength=0.0),
                dict(steps=10, strength=1.5)]:
        with pytest.raises(ValueError):
            s.timesteps(**bad)


def test_map_timestep_animatediff_to_sd():
    ad, sd = NoiseSchedule.animatediff(), NoiseSchedule.sd15()
    assert ad.map_timestep(500, sd) == 600
    assert ad.map_timestep(201, sd) == 252
    assert all(ad.map_timestep(t, sd) == 999 for t in (906, 961, 981, 999))
    assert [sd.map_timestep(t, ad) for t in (981, 801, 601, 201)] == [886, 696, 501, 161]
    exact = ad.map_timestep(500, sd, exact=True)
    assert abs(float(sd.alpha_bar(exact)) - float(ad.alpha_bar(500))) < 1e-6
    zs = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    assert sd.map_timestep(381, zs) == 381 and sd.map_timestep(None, ad) is None


def test_ddim_arithmetic_matches_diffusers_step():
    s = NoiseSchedule.sd15()
    ref = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    for t, t_next in [(981, 961), (21, 1), (1, None)]:
        ours = s.ddim_step(x, e, t, t_next)
        theirs = ref.step(e, t, x).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5), t
    # add_noise / predict_x0 invert each other; alpha-bar stays float32 for fp16 inputs
    x0 = s.predict_x0(s.add_noise(x.half(), e.half(), 381), e.half(), 381)
    assert x0.dtype == torch.float32 and torch.allclose(x0, x.half().float(), atol=1e-3)
    assert s.alphas_cumprod.dtype == torch.float32


def test_lightning_euler_trailing_is_ddim_on_trailing_grid():
    cfg = dict(ANIMATEDIFF_SCHEDULER_CONFIG, timestep_spacing="trailing")
    s = NoiseSchedule.from_config(cfg)
    eul = EulerDiscreteScheduler.from_config(cfg)
    eul.set_timesteps(8)
    grid = s.timesteps(8, "trailing")
    assert [int(t) for t in eul.timesteps] == grid
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g) * float(eul.init_noise_sigma)
    x_ddim = x / float(eul.init_noise_sigma ** 2 + 1) ** 0.5
    for i, t in enumerate(grid):
        e = torch.tanh(x_ddim) * 0.5                                  # the same eps function for both
        x = eul.step(e, eul.timesteps[i], x).prev_sample
        x_ddim = s.ddim_step(x_ddim, e, t, grid[i + 1] if i + 1 < len(grid) else None)
    assert torch.allclose(x, x_ddim, atol=1e-4)


def test_v_prediction_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.from_config(dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction"))
