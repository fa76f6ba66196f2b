"""Core sampler math against an analytic denoiser with an exact eps.

Data model: x0 ~ N(mu, s^2 I) per element. Then x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and the exact noise
prediction is eps(x_t, t) = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). The probability-flow ODE keeps the
standardised variable z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab) constant, which gives closed forms.
"""
import pytest
import torch

from videobridge.core.callbacks import Callbacks
from videobridge.core.denoisers import Branch, single
from videobridge.core.samplers import ddim_invert, ddim_sample, sdedit
from videobridge.core.schedule import NoiseSchedule


class Gaussian:
    kind = "video"

    def __init__(self, schedule, mu, s):
        self.schedule, self.mu, self.s, self.calls = schedule, mu, s, 0

    def var(self, t):
        a = self.schedule.alpha_bar(t)
        return a * self.s ** 2 + 1 - a

    def __call__(self, x, t, g, step=None):
        self.calls += 1
        a = self.schedule.alpha_bar(t)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / self.var(t)

    def standardise(self, x, t):
        a = self.schedule.alpha_bar(t)
        return (x - a.sqrt() * self.mu) / self.var(t).sqrt()


G = single(Branch(torch.zeros(1, 77, 8)))


def model(sched=None):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 4, 3, 4, 4, generator=g)
    return Gaussian(sched or NoiseSchedule.sd15(), mu, 0.5)


def test_ddim_sample_converges_to_the_probability_flow_solution():
    d = model()
    xT = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    errs = []
    for steps in (25, 100, 500):
        grid = d.schedule.timesteps(steps)
        z = d.standardise(xT, grid[0])
        expected = d.schedule.alpha_bar(None).sqrt() * d.mu + d.var(None).sqrt() * z
        errs.append(float((ddim_sample(d, xT, grid, G) - expected).abs().max()))
    assert errs[0] > 3 * errs[1] and errs[1] > 3 * errs[2] and errs[2] < 1e-2, errs    # first order in the step size


class ConstantEps:
    """eps independent of x: DDIM inversion is then exact and has a closed form."""
    kind = "video"

    def __init__(self, schedule, eps):
        self.schedule, self.eps = schedule, eps

    def __call__(self, x, t, g, step=None):
        return self.eps


@pytest.mark.parametrize("sched", [NoiseSchedule.sd15(), NoiseSchedule.animatediff()], ids=["sd15", "animatediff"])
def test_inversion_ends_exactly_at_the_samplers_first_timestep(sched):
    eps = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    z0 = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    grid = sched.timesteps(50)
    xT = ddim_invert(ConstantEps(sched, eps), z0, grid, G)
    x0_hat = sched.predict_x0(z0, eps, None)                       # the clean latent sits at the end level
    assert grid[0] == 981
    assert torch.allclose(xT, sched.add_noise(x0_hat, eps, 981), atol=1e-5)
    assert not torch.allclose(xT, sched.add_noise(x0_hat, eps, 998), atol=1e-3)
    # ... and sampling the same grid back returns z0
    assert torch.allclose(ddim_sample(ConstantEps(sched, eps), xT, grid, G), z0, atol=1e-4)


@pytest.mark.parametrize("steps", [25, 50])
def test_fixed_point_inversion_round_trip(steps):
    d = model()
    grid = d.schedule.timesteps(steps)
    z0 = d.mu + 0.5 * torch.randn(d.mu.shape, generator=torch.Generator().manual_seed(3))
    plain = ddim_sample(d, ddim_invert(d, z0, grid, G), grid, G)
    exact = ddim_sample(d, ddim_invert(d, z0, grid, G, fixed_point_iters=3), grid, G)
    rel = lambda a: float((a - z0).norm() / z0.norm())
    assert rel(exact) < 1e-3
    assert rel(plain) > 10 * rel(exact)


def test_fixed_point_costs_k_extra_calls_and_reports_every_step():
    d = model()
    seen = []
    ddim_invert(d, d.mu, d.schedule.timesteps(5), G, fixed_point_iters=2, callbacks=Callbacks(progress=seen.append))
    assert d.calls == 15 and len(seen) == 5


def test_legacy_grid_matches_official_reverse_step():
    """Official BIVDiff reverse_step: eps at the source level, next = min(998, t + 20), clean latent taken as t=1."""
    d = model()
    s = d.schedule
    grid = s.timesteps(50)
    z0 = d.mu.clone()
    x = z0.clone()
    for t in reversed(grid):
        e = d(x, t, G)
        nxt = min(998, t + 20)
        x0 = (x - (1 - s.alphas_cumprod[t]).sqrt() * e) / s.alphas_cumprod[t].sqrt()
        x = s.alphas_cumprod[nxt].sqrt() * x0 + (1 - s.alphas_cumprod[nxt]).sqrt() * e
    assert torch.allclose(ddim_invert(d, z0, grid, G, legacy_grid=True), x, atol=1e-6)
    with pytest.raises(ValueError):
        ddim_invert(d, z0, grid, G, legacy_grid=True, fixed_point_iters=1)


def test_sdedit_starts_from_the_noised_clean_latent():
    d = model()
    grid = d.schedule.timesteps(50, strength=0.4)
    noise = torch.randn(d.mu.shape, generator=torch.Generator().manual_seed(4))
    out = sdedit(d, d.mu, grid, G, noise)
    assert d.calls == 20 and grid[0] == 381
    xt = d.schedule.add_noise(d.mu, noise, 381)
    assert torch.allclose(out, ddim_sample(d, xt, grid, G))


def test_interrupt_stops_within_one_step():
    d = model()

    class Stop(Exception):
        pass

    def interrupt():
        if d.calls >= 3:
            raise Stop

    with pytest.raises(Stop):
        ddim_sample(d, d.mu, d.schedule.timesteps(10), G, callbacks=Callbacks(interrupt=interrupt))
    assert d.calls == 3


def test_bad_grids_rejected():
    d = model()
    for bad in ([], [1, 21], [21, 21]):
        with pytest.raises(ValueError):
            ddim_sample(d, d.mu, bad, G)
