"""EVS (METHODS.md §5) against oracle denoisers with an exact eps, and the SFI block on a tiny AnimateDiff UNet."""
import pytest
import torch

from videobridge.core import evs
from videobridge.core.denoisers import Branch, VideoDenoiser, single
from videobridge.core.samplers import ddim_sample, initial_noise, predict_clean, sdedit
from videobridge.core.schedule import NoiseSchedule

from . import tiny

SD, AD = NoiseSchedule.sd15(), NoiseSchedule.animatediff()
SHAPE = (1, 4, 3, 4, 4)
G = single(Branch(torch.zeros(1, 77, 8)))


class Oracle:
    """Knows the clean latent: eps(x, t) = (x - sqrt(ab) z) / sqrt(1 - ab), so x0_hat is always z. Records calls."""

    def __init__(self, kind, schedule, z):
        self.kind, self.schedule, self.z, self.log, self.inputs = kind, schedule, z, [], []

    def __call__(self, x, t, g, step=None):
        self.log.append(t)
        self.inputs.append(x.clone())
        a = self.schedule.alpha_bar(t)
        return (x - a.sqrt() * self.z) / (1 - a).sqrt()


def lat(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_bridge_predicts_the_data_and_renoises_with_q():
    z = lat(0)
    eps = lat(1)
    x = SD.add_noise(z, eps, 201)
    assert torch.allclose(predict_clean(Oracle("image", SD, z), x, 201, G), z, atol=1e-5)
    assert torch.allclose(x, SD.alpha_bar(201).sqrt() * z + (1 - SD.alpha_bar(201)).sqrt() * eps)


class ConstantEps(Oracle):
    """eps independent of x: DDIM then keeps x0_hat constant along the trajectory, so each stage is closed-form."""

    def __call__(self, x, t, g, step=None):
        self.log.append(t)
        return self.z


@pytest.mark.parametrize("renoise", ["initial", "fresh"])
def test_refine_bridges_through_x0_and_renoises_at_t_T2V(renoise):
    z0, z_video, seed = lat(0), lat(9), 3
    eps = initial_noise(SHAPE, seed + evs.STREAMS["sdedit"])
    image = ConstantEps("image", SD, eps)                          # its x0_hat of q(z, t, eps) is z, at every t
    video = Oracle("video", AD, z_video)                            # always predicts z_video
    params = evs.EVSParams(renoise=renoise)
    out = evs.evs_refine(image, video, z0, G, G, seed=seed, params=params)
    # the block received z_I = z0 noised to t_V with its own stream: q_V(z0, 499, eps')
    eps_v = initial_noise(SHAPE, seed + evs.STREAMS["t2v"])
    assert torch.allclose(video.inputs[0], AD.add_noise(z0, eps_v, 499), atol=1e-5)
    # the T2I loop restarts from q_I(z_video, t_T2V, eps_r) and, with constant eps, ends at its x0_hat
    eps_r = eps if renoise == "initial" else initial_noise(SHAPE, seed + evs.STREAMS["renoise"])
    x0_hat = SD.predict_x0(SD.add_noise(z_video, eps_r, 201), eps, 201)
    assert torch.allclose(out, SD.add_noise(x0_hat, eps, None), atol=1e-4)
    if renoise == "initial":
        assert torch.allclose(x0_hat, z_video, atol=1e-5)
    else:
        assert not torch.allclose(x0_hat, z_video, atol=1e-2)
    # T2I: 381 ... 221, 201 (bridge), then 201 again (re-evaluation) ... 1; T2V: n_V = 4 steps from t_V = 499
    grid = SD.timesteps(50)[30:]
    assert grid[0] == 381 and image.log == grid[:10] + [201] + grid[10:]
    assert video.log == [499, 374, 249, 124]
    assert len(image.log) + len(video.log) == evs.unet_calls(params, video.log) == 20 + 1 + 4


def test_block_returns_the_x0_of_its_last_evaluation():
    z_i = lat(0)
    video = Oracle("video", AD, lat(4))
    grid_v = evs.t2v_grid(AD, 8, "trailing", 499, 2)
    assert grid_v == [499, 374, 249, 124]
    out = evs.t2v_block(video, z_i, grid_v, 2, G, noise=lat(2))
    assert video.log == [499, 374] and torch.allclose(out, lat(4), atol=1e-5)


def test_the_t2i_loop_split_at_t_T2V_is_plain_sdedit():
    """With the block taken out, the two T2I halves are exactly T2I SDEdit at s1 = 0.4 (METHODS.md §8)."""
    from .test_samplers import model

    d = model(SD)
    z0, eps = lat(0)[:, :, :3], lat(1)[:, :, :3]
    grid = evs.t2i_grid(SD, 50, 0.4)
    before, after = evs.split_at(grid, 201)
    x = ddim_sample(d, SD.add_noise(z0, eps, grid[0]), before, G, end=201)
    assert torch.allclose(ddim_sample(d, x, after, G), sdedit(d, z0, grid, G, eps), atol=1e-5)


def test_settings_off_the_grids_are_refused():
    z0 = lat(0)
    image, video = Oracle("image", SD, z0), Oracle("video", AD, z0)
    cases = [
        (dict(t_T2V=200), r"t_T2V = 200 .*choose one of \[361"),
        (dict(t_T2V=381), "t_T2V = 381"),
        (dict(t_V=500), r"t_V = 500 .*\[999, 874"),
        (dict(n_V=5), r"n_V = 5 .*1\.\.4"),
        (dict(s1=0.0), "s1"),
        (dict(sfi_gamma=1.2), "gamma"),
        (dict(renoise="other"), "renoise"),
        (dict(block="other"), "block"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            evs.evs_refine(image, video, z0, G, G, 0, evs.EVSParams(**kw))
        assert not image.log and not video.log                           # refused before any sampling
    with pytest.raises(ValueError, match="image.*video"):
        evs.evs_refine(video, image, z0, G, G, 0)


def test_upscale_in_pixel_space_rounds_to_multiples_of_8():
    px = torch.rand(1, 3, 2, 40, 24) * 2 - 1
    up = evs.upscale_pixels(px, 2.0)
    assert up.shape == (1, 3, 2, 80, 48) and up.abs().max() <= 1
    assert evs.upscale_pixels(px, 1.5).shape[-2:] == (56, 32)
    assert evs.upscale_pixels(px, 1.0) is px
    assert torch.allclose(evs.upscale_pixels(torch.zeros(1, 3, 1, 8, 8) + 0.3, 2.0), torch.tensor(0.3), atol=1e-6)
    with pytest.raises(ValueError, match="upscale"):
        evs.upscale_pixels(px, 0.1)


# ------------------------------------------------------------------ the SFI block on a tiny AnimateDiff UNet
def smooth_motion_unet():
    """Weights std 0.02: eps varies smoothly enough with x for fixed-point inversion to converge."""
    unet = tiny.randomize(tiny.UNet2DConditionModel(**tiny.UNET), 4, std=0.02)
    adapter = tiny.randomize(tiny.MotionAdapter(**tiny.MOTION), 5, std=0.02)
    return tiny.UNetMotionModel.from_unet2d(unet, adapter).eval()


@torch.no_grad()
def test_inversion_sfi_block_at_K3_reproduces_its_input_and_plain_inversion_does_not():
    d = VideoDenoiser(smooth_motion_unet(), AD)
    g = single(Branch(tiny.text(1)))
    z_i = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid_v = evs.t2v_grid(AD, 8, "trailing", 499, 4)
    before = {k: p for k, p in d.unet.attn_processors.items()}
    exact = evs.t2v_block(d, z_i, grid_v, 4, g, mode="inversion_sfi", fixed_point_iters=3)
    plain = evs.t2v_block(d, z_i, grid_v, 4, g, mode="inversion_sfi", fixed_point_iters=0)
    rel = lambda a: float((a - z_i).norm() / z_i.norm())
    assert rel(exact) < 1e-3 and rel(plain) > 10 * rel(exact), (rel(exact), rel(plain))
    assert all(d.unet.attn_processors[k] is p for k, p in before.items())


@torch.no_grad()
def test_injection_pulls_the_block_towards_the_inversion():
    """With K = 0, injecting the inversion's features (gamma 1, all 9 layers) reconstructs z_i better than no
    injection (gamma 0 still injects K/V; a bank from another latent is refused for no reason)."""
    d = VideoDenoiser(tiny.motion_unet(), AD)
    g = single(Branch(tiny.text(1)))
    z_i = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid_v = evs.t2v_grid(AD, 8, "trailing", 499, 4)
    y, bank = evs.sfi_invert(d, z_i, grid_v, g, "shallow", grid_v)
    assert bank.timesteps == tuple(grid_v) and len(bank.layers) == 9
    free = evs.denoise_to_x0(d, y, grid_v, g)
    with evs.injecting(d, bank, bank.layers, 1.0):
        injected = evs.denoise_to_x0(d, y, grid_v, g)
    assert not torch.allclose(free, injected, atol=1e-4)
    # an external bank is injected by the block, in SDEdit mode too; its layers must cover the request
    out = evs.t2v_block(d, z_i, grid_v, 4, g, mode="sdedit", noise=lat(1)[:, :, :1].expand(1, 4, 4, 4, 4)
                        .repeat(1, 1, 1, 2, 2), bank=bank, sfi_layers=None, sfi_gamma=0.8)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="attention_bank.*frames"):
        evs.t2v_block(d, z_i[:, :, :2], grid_v, 4, g, noise=lat(1), bank=bank)
