"""The attention controller on tiny UNets: per-call context, capture/injection identities, keying under frame
chunking and CFG, restoration of processors, bank accounting and the errors for a bank that does not fit."""
import math

import pytest
import torch
import torch.nn.functional as F

from videobridge.core.attention import SFI_PRESETS, AttentionController, FeatureBank, attention_layers, \
    check_budget, estimate_bank_bytes, layer_table, resolve_layers, sfi_attention
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg, single
from videobridge.core.samplers import ddim_invert, ddim_sample
from videobridge.core.schedule import NoiseSchedule

from . import tiny

SD, AD = NoiseSchedule.sd15(), NoiseSchedule.animatediff()
FRAMES = 4


def latent(seed=0, frames=FRAMES, size=8):
    return torch.randn(1, 4, frames, size, size, generator=torch.Generator().manual_seed(seed))


def guidance():
    return cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 5.0)


def processors(unet):
    return dict(unet.attn_processors)


def capture(denoiser, x, t, g, layers="shallow", dtype=torch.float32, timesteps=None):
    bank = FeatureBank(x.shape[2], tuple(x.shape[-2:]), denoiser.schedule, dtype=dtype)
    with denoiser.controlled(AttentionController(resolve_layers(layer_table(denoiser.unet), layers), bank, "capture",
                                                 timesteps)):
        denoiser(x, t, g, step=0)
    return bank


def inject(denoiser, bank, x, t, g, gamma, layers=None):
    ctl = AttentionController(layers or bank.layers, bank, "inject", gamma=gamma)
    with denoiser.controlled(ctl):
        return denoiser(x, t, g, step=0)


# ------------------------------------------------------------------ the plain injection function
def test_sfi_attention_is_eq11_and_reduces_to_plain_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v, q_inv, k_inv, v_inv = (torch.randn(3, 2, 16, 4, generator=g) for _ in range(6))
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(sfi_attention(q, q_inv, k, v, 0.0), plain, atol=1e-6)        # gamma 0: own Q, K, V
    assert torch.allclose(sfi_attention(q, q, k, v, 1.0), plain, atol=1e-6)            # gamma 1, Q_inv = Q
    gamma = 0.3
    blend = gamma * q_inv + (1 - gamma) * q
    explicit = torch.softmax(blend @ k_inv.transpose(-1, -2) / math.sqrt(4), dim=-1) @ v_inv
    assert torch.allclose(sfi_attention(q, q_inv, k_inv, v_inv, gamma), explicit, atol=1e-5)
    assert not torch.allclose(sfi_attention(q, q_inv, k_inv, v_inv, 0.7), explicit, atol=1e-3)
    with pytest.raises(ValueError, match="gamma.*1.5"):
        sfi_attention(q, q_inv, k_inv, v_inv, 1.5)


# ------------------------------------------------------------------ processors
@torch.no_grad()
def test_controlled_processor_equals_the_default_and_is_installed_only_on_chosen_layers():
    unet = tiny.motion_unet()
    d, x, g = VideoDenoiser(unet, AD), latent(), guidance()
    before = processors(unet)
    ref = d(x, 499, g)
    ctl = AttentionController(resolve_layers(layer_table(unet), "deep"), FeatureBank(FRAMES, (8, 8)), "off")
    with d.controlled(ctl):
        inside = processors(unet)
        out = d(x, 499, g)
    changed = {k[: -len(".processor")] for k in before if inside[k] is not before[k]}
    assert changed == set(SFI_PRESETS["deep"][0])
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(processors(unet)[k] is p for k, p in before.items())


def test_presets_and_layer_selection():
    unet = tiny.motion_unet()
    table = layer_table(unet)
    assert len(resolve_layers(table, "shallow")) == 9 and len(resolve_layers(table, "deep")) == 6
    names = attention_layers(unet)
    assert len(names) == 74                                              # 32 spatial + 42 motion (v2 layout)
    pick = "up_blocks.2.attentions.1.transformer_blocks.0.attn1, up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    assert resolve_layers(layer_table(unet), pick) == tuple(s.strip() for s in pick.split(","))
    motion = next(n for n in names if "motion_modules" in n)
    with pytest.raises(ValueError, match="temporal"):
        resolve_layers(layer_table(unet), [motion])
    with pytest.raises(ValueError, match="not found"):
        resolve_layers(layer_table(unet), ["up_blocks.9.attentions.0.transformer_blocks.0.attn1"])
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(layer_table(unet), " , ")


# ------------------------------------------------------------------ capture / inject identities
@pytest.mark.parametrize("model", ["motion", "unet3d", "unet2d"])
@torch.no_grad()
def test_injecting_a_bank_captured_from_the_same_input_reproduces_the_output(model):
    d = {"motion": lambda: VideoDenoiser(tiny.motion_unet(), AD), "unet3d": lambda: VideoDenoiser(tiny.unet3d(), SD),
         "unet2d": lambda: UNet2DDenoiser(tiny.unet2d(), SD)}[model]()
    x, g = latent(), single(Branch(tiny.text(1)))                          # CFG 1, as the EVS T2V block runs
    ref = d(x, 499, g)
    bank = capture(d, x, 499, g)
    assert torch.equal(d(x, 499, g), ref)                                 # capturing does not change the output
    for gamma in (0.0, 0.5, 1.0):
        assert torch.allclose(inject(d, bank, x, 499, g, gamma), ref, atol=1e-5), gamma
    # a bank from another input does change it, and gamma matters
    other = capture(d, latent(seed=5), 499, g)
    far0, far1 = inject(d, other, x, 499, g, 0.0), inject(d, other, x, 499, g, 1.0)
    assert (far0 - ref).abs().max() > 1e-3 and (far1 - far0).abs().max() > 1e-4
    # a timestep the bank does not hold is not injected
    assert torch.allclose(inject(d, other, x, 374, g, 1.0), d(x, 374, g), atol=1e-6)


@torch.no_grad()
def test_capture_and_inject_do_not_depend_on_frame_chunking():
    unet = tiny.unet2d()
    x, g = latent(), guidance()
    banks, outs = [], []
    other = capture(UNet2DDenoiser(unet, SD), latent(seed=7), 301, g)
    for fbs in (1, 2, None):
        d = UNet2DDenoiser(unet, SD, frame_batch_size=fbs)
        banks.append(capture(d, x, 301, g))
        outs.append(inject(d, other, x, 301, g, 0.5))
    for b in banks[:-1]:
        assert b.entries.keys() == banks[-1].entries.keys()
        for key, tensors in b.entries.items():
            assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(tensors, banks[-1].entries[key])), key
    assert torch.allclose(outs[0], outs[2], atol=1e-5) and torch.allclose(outs[1], outs[2], atol=1e-5)


@torch.no_grad()
def test_capture_takes_the_cond_branch_and_injection_repeats_it_over_cfg_branches():
    unet = tiny.unet2d()
    d, x = UNet2DDenoiser(unet, SD), latent()
    c, u = Branch(tiny.text(1)), Branch(tiny.text(2))
    with_cfg = capture(d, x, 301, cfg(c, u, 5.0))
    cond_only = capture(d, x, 301, single(c))
    uncond_only = capture(d, x, 301, single(u))
    key = next(iter(with_cfg.entries))
    assert torch.allclose(with_cfg.entries[key][0], cond_only.entries[key][0], atol=1e-6)
    assert not torch.allclose(with_cfg.entries[key][0], uncond_only.entries[key][0], atol=1e-4)   # text reaches it


@torch.no_grad()
def test_denoiser_tells_the_controller_step_timestep_branches_and_frames():
    seen = []

    class Spy(AttentionController):
        def action(self, name):
            if name == "up_blocks.3.attentions.2.transformer_blocks.0.attn1":
                seen.append(self.context)
            return None

    unet = tiny.unet2d()
    d = UNet2DDenoiser(unet, SD, frame_batch_size=3)
    grid = SD.timesteps(4)
    with d.controlled(Spy(["up_blocks.3.attentions.2.transformer_blocks.0.attn1"], FeatureBank(FRAMES, (8, 8)))):
        ddim_sample(d, latent(), grid, guidance())
        ddim_invert(d, latent(), grid, single(Branch(tiny.text(1))))
    sample, invert = seen[:8], seen[8:]
    assert [(c.step, c.timestep, c.frames) for c in sample[:2]] == [(0, grid[0], (0, 3)), (0, grid[0], (3, 4))]
    assert [c.step for c in sample] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(c.branches == ("uncond", "cond") and c.num_frames == FRAMES for c in sample)
    assert [(c.step, c.timestep) for c in invert[::2]] == [(3, grid[3]), (2, grid[2]), (1, grid[1]), (0, grid[0])]
    assert all(c.branches == ("cond",) for c in invert)


# ------------------------------------------------------------------ restoration
@pytest.mark.parametrize("failure", ["exception", "cancel"])
def test_processors_are_restored_after_an_exception_and_after_cancel(failure):
    from videobridge.core.callbacks import Callbacks

    class Cancelled(Exception):
        pass

    unet = tiny.motion_unet()
    d = VideoDenoiser(unet, AD)
    before = processors(unet)
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Cancelled()

    ctl = AttentionController(resolve_layers(layer_table(unet), "shallow"), FeatureBank(FRAMES, (8, 8), AD), "capture")
    with torch.no_grad():
        if failure == "cancel":
            with pytest.raises(Cancelled), d.controlled(ctl):
                ddim_sample(d, latent(), AD.timesteps(8, "trailing"), guidance(), callbacks=Callbacks(interrupt=interrupt))
        else:
            with pytest.raises(RuntimeError, match="boom"), d.controlled(ctl):
                d(latent(), 499, guidance())
                raise RuntimeError("boom")
    after = processors(unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert ctl.context is None and d.controller is None


# ------------------------------------------------------------------ bank accounting and checks
@torch.no_grad()
def test_bank_holds_only_the_chosen_steps_and_its_size_matches_the_estimate():
    unet = tiny.motion_unet()
    d, g = VideoDenoiser(unet, AD), single(Branch(tiny.text(1)))
    grid = AD.timesteps(8, "trailing")[4:]                                # 499, 374, 249, 124
    layers = resolve_layers(layer_table(unet), "shallow")
    for dtype in (torch.float16, torch.float32):
        bank = FeatureBank(FRAMES, (16, 8), AD, dtype=dtype)
        with d.controlled(AttentionController(layers, bank, "capture", grid[:2])):
            ddim_invert(d, torch.randn(1, 4, FRAMES, 16, 8, generator=torch.Generator().manual_seed(0)), grid, g)
        assert bank.timesteps == (499, 374) and set(bank.layers) == set(layers)
        assert bank.nbytes == estimate_bank_bytes(layer_table(unet), layers, FRAMES, (16, 8), 2, dtype)
        assert all(x.dtype == dtype and x.device.type == "cpu" for e in bank.entries.values() for x in e)
    with pytest.raises(ValueError, match=r"GiB.*budget of 0\.5 GiB.*fewer layers"):
        check_budget(int(0.75 * 1024 ** 3), 0.5, "VBEVSRefine", 9, 4)
    check_budget(int(0.75 * 1024 ** 3), 1.0, "VBEVSRefine", 9, 4)


def test_estimate_at_real_size_matches_the_documented_figure():
    """METHODS.md §5.3: about 0.63 GiB per captured step at 512x512, 16 frames, fp16, 9 layers (real SD1.5 widths)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    per_step = estimate_bank_bytes(layer_table(unet), resolve_layers(layer_table(unet), "shallow"), 16, (64, 64), 1) / 1024 ** 3
    assert 0.6 < per_step < 0.65, per_step


@torch.no_grad()
def test_a_bank_that_does_not_fit_is_refused_with_the_input_named():
    unet = tiny.motion_unet()
    d, g = VideoDenoiser(unet, AD), guidance()
    bank = capture(d, latent(), 499, g, layers="deep")
    cases = [
        (dict(num_frames=6, latent_hw=(8, 8)), "6"),
        (dict(num_frames=FRAMES, latent_hw=(16, 16)), "128x128"),
        (dict(num_frames=FRAMES, latent_hw=(8, 8), schedule=SD), "schedule"),
        (dict(num_frames=FRAMES, latent_hw=(8, 8), layers=resolve_layers(layer_table(unet), "shallow")), "no features"),
        (dict(num_frames=FRAMES, latent_hw=(8, 8), timesteps=[374, 249]), "none of the sampled"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=f"attention_bank.*{msg}"):
            bank.check_compatible("attention_bank", **kw)
    bank.check_compatible("attention_bank", FRAMES, (8, 8), AD, resolve_layers(layer_table(unet), "deep"), [499])
    with pytest.raises(ValueError, match="empty"):
        FeatureBank(FRAMES, (8, 8)).check_compatible("attention_bank", FRAMES, (8, 8))
    # injected into a UNet of another width: refused inside the call with the layer named
    other = VideoDenoiser(tiny.UNetMotionModel.from_unet2d(
        tiny.randomize(tiny.UNet2DConditionModel(**dict(tiny.UNET, attention_head_dim=4)), 0),
        tiny.randomize(tiny.MotionAdapter(**tiny.MOTION), 1)).eval(), AD)
    with pytest.raises(ValueError, match="another resolution or model"):
        inject(other, bank, latent(), 499, g, 0.5)
