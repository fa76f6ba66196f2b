"""Native ComfyUI models (nodes/native.py) on the same SD1.5 weights as the VB image model: the same guided eps to
float32 rounding, the same frame-wise inversion with the same latent metadata, the user's MODEL left as it was (also
after a Cancel), and models of other families refused."""
import re

import pytest
import torch

from .test_nodes import FRAMES, SIZE, STEPS, invert, run, video, zeroscope  # noqa: F401 (fixture)

FULL = "dreamshaper_8.safetensors"


@pytest.fixture(scope="module")
def model(native_sd15):
    """The native MODEL of the full-attention stand-in (CheckpointLoaderSimple)."""
    return native_sd15[0]


@pytest.fixture(scope="module")
def vb_full(N):
    return run(N["VBLoadImageModel"], model_name=FULL, dtype="fp32", vae_dtype="fp32")[0]


def conds(vb, *prompts):
    from videobridge.nodes import runtime

    return [[[e[None], {}]] for e in runtime.encode(vb, list(prompts))]


def model_device():
    """Where the models run: the CPU here, the GPU on the GPU check (benchmarks/README.md)."""
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def diff(a, b):
    """max |a - b|, on the CPU whatever device each came from."""
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def rel(a, b, scale=None):
    """max |a - b| / max |scale| (scale = a)."""
    return diff(a, b) / float((a if scale is None else scale).float().abs().max())


def state(model):
    """What a run must leave as it was: the patcher's patches and options, and the weights."""
    return (dict(model.patches), repr(model.model_options), {k: v.clone() for k, v in
                                                            model.model.diffusion_model.state_dict().items()})


def same_state(a, b):
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@torch.no_grad()
def test_clip_text_encode_equals_the_vb_text_encoder(native_sd15, vb_full):
    """ComfyUI's CLIP (CheckpointLoaderSimple + CLIPTextEncode) and the VB text encoder read the same checkpoint into
    the same prompt embedding: the tokenizers, padding and final layer norm agree, so native CONDITIONING and VB
    prompts guide alike."""
    import nodes
    from videobridge.nodes import runtime

    for prompt in ("a red fox running through fresh snow, photograph", ""):
        theirs = nodes.CLIPTextEncode().encode(native_sd15[1], prompt)[0][0][0]
        ours = runtime.encode(vb_full, [prompt])
        assert theirs.shape == ours.shape == (1, 77, 32)
        assert rel(ours, theirs) < 1e-4, prompt


@torch.no_grad()
def test_native_eps_equals_the_diffusers_backend(model, vb_full):
    from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg
    from videobridge.nodes import native, runtime

    sched = native.schedule_of(model, "model")
    x = torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0)).to(model_device())
    text, null = runtime.encode(vb_full, ["a cat", ""]).split(1)
    positive, negative = conds(vb_full, "a cat", "")
    for t in (981, 501, 21):
        ours = UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule)(x, t, cfg(Branch(text), Branch(null), 7.5))
        theirs = native.run(model, {"positive": positive, "negative": negative}, x, [t], sched,
                            lambda d: d(x, t, native.guidance(7.5)))
        # float32 rounding: 1.4e-5 relative at t = 981 (7.8e-5 on an H200 without TF32), where the k-diffusion
        # round trip x_k = x_t / sqrt(abar), eps = (x_k - D) / sigma works at sigma = 14.6; a wrong sigma, timestep
        # or scaling is off by > 1e-2
        assert rel(ours, theirs) < 2e-4, t


def test_native_inversion_matches_the_vb_inversion_and_its_metadata(N, model, vb_full):
    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    before = state(model)
    ours = invert(N, lat, "image model (frame-wise)", image_model=vb_full)
    theirs = invert(N, lat, "image model (frame-wise)", model=model, conditioning=conds(vb_full, "")[0])
    assert {k: theirs[k] for k in ("vb_timestep", "vb_schedule", "vb_grid")} == \
        {k: ours[k] for k in ("vb_timestep", "vb_schedule", "vb_grid")}
    a, b = ours["samples"], theirs["samples"]
    assert rel(a, b) < 1e-4
    assert same_state(before, state(model))


def test_a_cancel_leaves_the_model_as_it_was(N, model, vb_full, monkeypatch):
    import comfy.model_management as mm

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    before = state(model)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        invert(N, lat, "image model (frame-wise)", model=model, conditioning=conds(vb_full, "")[0], steps=4)
    assert same_state(before, state(model))


def test_bad_native_inputs_name_the_input(N, model, vb_full):
    import comfy.latent_formats

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    c = conds(vb_full, "")[0]
    with pytest.raises(ValueError, match="VBDDIMInvert: conditioning: a native model needs"):
        invert(N, lat, "image model (frame-wise)", model=model)
    with pytest.raises(ValueError, match="VBDDIMInvert: model and image_model are both connected"):
        invert(N, lat, "image model (frame-wise)", model=model, conditioning=c, image_model=vb_full)
    with pytest.raises(ValueError, match="VBDDIMInvert: model and video_model are both connected"):
        invert(N, lat, "video model (whole clip)", model=model, conditioning=c, video_model=object())
    with pytest.raises(ValueError, match="VBDDIMInvert: capture_attention: features are captured from a video-model"):
        invert(N, lat, "image model (frame-wise)", model=model, conditioning=c, capture_attention="shallow")
    with pytest.raises(ValueError, match="VBDDIMInvert: custom_layers: .* not found in this model"):
        invert(N, lat, "video model (whole clip)", model=model, conditioning=c, capture_attention="custom",
               custom_layers="up_blocks.7.attentions.0.transformer_blocks.0.attn1")
    sdxl = model.clone()
    sdxl.model = type("Fake", (), {"latent_format": comfy.latent_formats.SDXL(), "model_config": object()})()
    with pytest.raises(ValueError, match="VBDDIMInvert: model: this MODEL is object \\(SDXL latents\\); only SD1.5"):
        invert(N, lat, "image model (frame-wise)", model=sdxl, conditioning=c)


def test_a_lora_changes_the_inversion_and_leaves_the_base_model_untouched(N, model, vb_full):
    """LoraLoader with the kohya-layout stand-in LoRA file (``loras/add_detail.safetensors``): its patched clone
    changes the output; the MODEL it was applied to still gives the original output bit for bit afterwards, with its
    patches and weights as before."""
    import nodes

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    c = conds(vb_full, "")[0]
    before = state(model)
    plain = invert(N, lat, "image model (frame-wise)", model=model, conditioning=c)["samples"]
    lora_model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "add_detail.safetensors", 1.0)[0]
    with_lora = invert(N, lat, "image model (frame-wise)", model=lora_model, conditioning=c)["samples"]
    again = invert(N, lat, "image model (frame-wise)", model=model, conditioning=c)["samples"]
    assert diff(with_lora, plain) > 1e-3
    assert torch.equal(again, plain)
    assert same_state(before, state(model)) and lora_model.patches is not model.patches


@torch.no_grad()
def test_native_controlnet_conds_and_separate_branches_equal_the_vb_backend(N, model, vb_full):
    """A ControlNet applied the ComfyUI way (ControlNetLoader + ControlNetApplyAdvanced on the conds) gives the same
    eps as the VB ControlNet on the same file, hint and strength; and ``combine=False`` returns each branch's eps
    (I4VGen's scorer reads them separately), in branch order."""
    import nodes
    from videobridge.core.denoisers import Branch, Guidance, UNet2DDenoiser, cfg
    from videobridge.nodes import native, runtime

    from .test_nodes import CANNY

    sched = native.schedule_of(model, "model")
    x = torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1)).to(model_device())
    hint = torch.rand(FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    text, null = runtime.encode(vb_full, ["a cat", ""]).split(1)
    positive, negative = conds(vb_full, "a cat", "")
    cn = nodes.ControlNetLoader().load_controlnet(CANNY)[0]
    pos_c, neg_c = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cn, hint, 0.8, 0.0, 1.0)
    vb_cn = run(N["VBLoadControlNet"], control_net_name=CANNY, dtype="fp32")[0]
    control = runtime.hints_to_core(hint, "hints", FRAMES, (SIZE, SIZE))
    runtime.load(vb_full.unet, vb_cn.patcher)                  # as VBFramewiseGenerate does (the GPU check)
    ours = UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule, controlnet=vb_cn.model, control_scale=0.8)(
        x, 501, cfg(Branch(text, control=control), Branch(null, control=control), 7.5))
    plain = UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule)(x, 501, cfg(Branch(text), Branch(null), 7.5))
    theirs, apart = native.run(model, {"positive": pos_c, "negative": neg_c}, x, [501], sched, lambda d: (
        d(x, 501, native.guidance(7.5)),
        d(x, 501, Guidance([Branch("negative"), Branch("positive")], [0.0, 1.0], combine=False))))
    assert rel(ours, plain) > 1e-2          # the ControlNet acts
    assert rel(ours, theirs) < 5e-5
    assert apart.shape == (2, 4, FRAMES, SIZE // 8, SIZE // 8)
    assert torch.allclose(apart[0] + 7.5 * (apart[1] - apart[0]), theirs[0], rtol=1e-4, atol=1e-4)


def smooth(N, latent, **kw):
    args = dict(latent=latent, prompt="a cat", negative_prompt="", seed=0, steps=STEPS, cfg=7.5, strength=1.0)
    args.update(kw)
    return run(N["VBVideoDenoise"], **args)[0]


def test_native_inversion_smooths_like_the_vb_inversion(N, model, vb_full, zeroscope):
    """Mixed backends: the frame-wise inversion on the native MODEL, on ZeroScope's grid, carries the metadata
    ZeroScope's smoothing checks, and smoothing it gives what smoothing the VB inversion gives, to rounding."""
    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    ours = invert(N, lat, "image model (frame-wise)", image_model=vb_full, video_model=zeroscope)
    theirs = invert(N, lat, "image model (frame-wise)", model=model, conditioning=conds(vb_full, "")[0],
                    video_model=zeroscope)
    a, b = smooth(N, ours, video_model=zeroscope)["samples"], smooth(N, theirs, video_model=zeroscope)["samples"]
    assert rel(a, b) < 1e-4            # measured 9.9e-6


def motion_injected(model, mix=0.5):
    """An AnimateDiff-Evolved-style MODEL: a clone whose UNet call is wrapped (as motion modules are injected through
    the patcher, never into the user's model) with a toy temporal layer that mixes every frame's output with the
    clip mean, per cond/uncond chunk of the batch."""
    m = model.clone()

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        clip = out.view(len(args["cond_or_uncond"]), -1, *out.shape[1:])
        return ((1 - mix) * clip + mix * clip.mean(1, keepdim=True)).view(out.shape)

    m.set_model_unet_function_wrapper(wrapper)
    return m


@torch.no_grad()
def test_a_native_motion_model_smooths_the_whole_clip(N, model, vb_full):
    """VBVideoDenoise on a native MODEL: without a motion module it equals the core smoothing with the VB UNet on the
    same weights (so grid, scaling and guidance are wired alike); with a motion module injected the clip goes
    through it as one batch (a change to frame 0 reaches the other frames); the models are left as they were."""
    from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg
    from videobridge.core.samplers import ddim_sample
    from videobridge.nodes import runtime

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    noisy = invert(N, lat, "image model (frame-wise)", model=model, conditioning=conds(vb_full, "")[0])
    positive, negative = conds(vb_full, "a cat", "")
    plain = smooth(N, noisy, model=model, positive=positive, negative=negative)["samples"]
    text, null = runtime.encode(vb_full, ["a cat", ""]).split(1)
    z = runtime.from_latent(noisy, "latent", 0.18215, model_device())
    ref = ddim_sample(UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule), z, noisy["vb_grid"],
                      cfg(Branch(text), Branch(null), 7.5))          # what temporal smoothing runs, frame-wise
    ref = runtime.to_latent(ref, 0.18215)["samples"]
    assert rel(plain, ref, ref) < 1e-4

    before = state(model)
    motion = motion_injected(model)
    moved = smooth(N, noisy, model=motion, positive=positive, negative=negative)["samples"]
    assert rel(plain, moved) > 1e-2
    poked = dict(noisy, samples=noisy["samples"].clone())
    poked["samples"][0] += 1.0                                          # frame 0 only ([F, 4, h, w] batch layout)
    frame_wise = smooth(N, poked, model=model, positive=positive, negative=negative)["samples"]
    coupled = smooth(N, poked, model=motion, positive=positive, negative=negative)["samples"]
    assert torch.equal(frame_wise[1:], plain[1:])                       # frame-wise: other frames untouched
    assert diff(coupled[1:], moved[1:]) > 1e-3          # motion module: they move too
    assert same_state(before, state(model))


@torch.no_grad()
def test_sfi_capture_and_injection_on_a_native_video_model(N, model, vb_full):
    """BIVDiff/EVS feature capture (VBDDIMInvert, invert_with video model) and Selective Feature Injection
    (VBVideoDenoise with the bank) on a native MODEL as the video model: the same bank and latents as the core
    samplers with the diffusers processor on the same weights; the injection changes the smoothing; the MODEL keeps
    no patch."""
    from videobridge.core import evs
    from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg, single
    from videobridge.core.samplers import ddim_sample
    from videobridge.nodes import runtime

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    before = state(model)
    noisy, bank = run(N["VBDDIMInvert"], latent=lat, invert_with="video model (whole clip)", prompt="", steps=STEPS,
                      fixed_point_iterations=0, frame_batch_size=0, legacy_grid=False, inflated_groupnorm=False,
                      model=model, conditioning=conds(vb_full, "")[0], capture_attention="shallow")[:2]
    den = UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule)
    z0 = runtime.from_latent(lat, "latent", 0.18215, model_device())
    grid = noisy["vb_grid"]
    empty, text, null = runtime.encode(vb_full, ["", "a cat", ""]).split(1)
    z_ref, bank_ref = evs.sfi_invert(den, z0, grid, single(Branch(empty)), "shallow", grid)
    z = runtime.from_latent(noisy, "latent", 0.18215, model_device())
    assert rel(z, z_ref, z_ref) < 1e-4
    assert set(bank.entries) == set(bank_ref.entries) and len(bank.entries) == 9 * STEPS
    worst = max(rel(a, b, b) for key in bank.entries
                for a, b in zip(bank.entries[key], bank_ref.entries[key]))
    assert worst < 2e-3                                                  # fp16 storage: 1 ulp is 9.8e-4

    positive, negative = conds(vb_full, "a cat", "")
    kw = dict(model=model, positive=positive, negative=negative)
    plain = smooth(N, noisy, **kw)["samples"]
    injected = smooth(N, noisy, attention_bank=bank, sfi_gamma=0.8, sfi_layers="deep", **kw)["samples"]
    with evs.injecting(den, bank_ref, "deep", 0.8):
        ref = ddim_sample(den, z_ref, grid, cfg(Branch(text), Branch(null), 7.5))
    ref = runtime.to_latent(ref, 0.18215)["samples"]
    assert rel(injected, ref, ref) < 1e-4
    assert rel(injected, plain, plain) > 1e-2
    assert same_state(before, state(model))

    pieces = model.clone()                       # evaluates the clip in two halves, as context windows do

    def in_halves(apply_model, args):
        x, n = args["input"], args["input"].shape[0]
        halves = [{k: v[i:i + n // 2] if torch.is_tensor(v) and v.shape[0] == n else v for k, v in args["c"].items()}
                  for i in (0, n // 2)]
        return torch.cat([apply_model(x[i:i + n // 2], args["timestep"][i:i + n // 2], **c)
                          for i, c in zip((0, n // 2), halves)])

    pieces.set_model_unet_function_wrapper(in_halves)
    with pytest.raises(ValueError, match="model: layer .* this MODEL evaluates the clip in pieces"):
        smooth(N, noisy, attention_bank=bank, sfi_gamma=0.8, sfi_layers="deep", **dict(kw, model=pieces))


@torch.no_grad()
def test_encapsulated_block_and_nivsds_on_a_native_video_model(N, model, vb_full):
    """VBEncapsulatedT2V (both block modes: SDEdit, and inversion + SFI through the attention patches) and VBNIVSDS
    with a native MODEL as the video model equal the core block and NI-VSDS run by the diffusers UNet on the same
    weights: same grid, noise stream, scaling, guidance and injection."""
    from videobridge.core import evs, i4vgen
    from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg
    from videobridge.core.samplers import initial_noise
    from videobridge.nodes import runtime

    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    z = runtime.from_latent(lat, "latent", 0.18215, model_device())
    positive, negative = conds(vb_full, "a cat", "")
    kw = dict(model=model, positive=positive, negative=negative)
    den = UNet2DDenoiser(vb_full.model.unet, vb_full.model.schedule)
    text, null = runtime.encode(vb_full, ["a cat", ""]).split(1)
    guide = cfg(Branch(text), Branch(null), 7.5)
    before = state(model)
    grid_v = evs.t2v_grid(den.schedule, 8, "leading", 501, 2)
    for mode, name in (("sdedit", "sdedit"), ("inversion_sfi", "inversion + SFI")):
        ours = run(N["VBEncapsulatedT2V"], latent=lat, prompt="a cat", negative_prompt="", seed=0, t2v_steps=8,
                   t_V=501, n_V=2, cfg=7.5, block=name, sfi_layers="shallow", sfi_gamma=0.5,
                   fixed_point_iterations=0, bank_storage="cpu (fp16)", bank_budget_gb=8.0, **kw)[0]["samples"]
        ref = evs.t2v_block(den, z, grid_v, 2, guide, mode=mode,
                            noise=initial_noise(z.shape, evs.STREAMS["t2v"]).to(z.device),
                            sfi_layers="shallow", sfi_gamma=0.5)
        ref = runtime.to_latent(ref, 0.18215)["samples"]
        # sdedit: 4.2e-6. inversion + SFI: 5.3e-4 (2.3e-3 on an H200), because the bank is stored in fp16 and an ulp
        # there (1e-3) moves the injected attention: on the diffusers path alone, z scaled by 1 + 1e-6 moves the
        # result by 2.2e-3. An injection that does not happen moves eps by 0.5 (the attention-control test)
        assert rel(ours, ref, ref) < (1e-4 if mode == "sdedit" else 5e-3), mode

    params = i4vgen.I4VGenParams(steps=STEPS, cfg=7.5, p_ni=0.6, step_sizes=[10.0, 1.0]).checked()
    ours = run(N["VBNIVSDS"], latent=lat, prompt="a cat", negative_prompt="", seed=3, steps=STEPS, cfg=7.5, p_ni=0.6,
               step_sizes="10, 1", official_scheduler_config=False, **kw)[0]["samples"]
    den.kind = "video"                     # the same frame-wise UNet in the video role, as the MODEL without motion
    den_v, grid, _ = i4vgen.video_stages(den, params)
    ref = i4vgen.ni_vsds(den_v, z, i4vgen.stream_noise(z.shape, 3, "nivsds").to(z.device), grid, guide,
                         params.step_sizes)
    ref = runtime.to_latent(ref, 0.18215)["samples"]
    assert rel(ours, ref, ref) < 1e-4
    assert diff(ours, lat["samples"]) > 1e-3                # NI-VSDS moved it
    assert same_state(before, state(model))
    with pytest.raises(ValueError, match="VBNIVSDS: video_model / model: .* neither is connected"):
        run(N["VBNIVSDS"], latent=lat, prompt="", negative_prompt="", seed=3, steps=STEPS, cfg=7.5, p_ni=0.6,
            step_sizes="1", official_scheduler_config=False)
    with pytest.raises(ValueError, match="VBEncapsulatedT2V: negative: a native model takes its prompts"):
        run(N["VBEncapsulatedT2V"], latent=lat, prompt="", negative_prompt="", seed=0, t2v_steps=8, t_V=501, n_V=2,
            cfg=7.5, block="sdedit", sfi_layers="shallow", sfi_gamma=0.5, fixed_point_iterations=0,
            bank_storage="cpu (fp16)", bank_budget_gb=8.0, model=model, positive=positive)


def test_bad_native_video_inputs_name_the_input(N, model, vb_full, zeroscope):
    lat = run(N["VBEncodeFrames"], image_model=vb_full, images=video(), frames_per_chunk=8)[0]
    noisy = invert(N, lat, "image model (frame-wise)", model=model, conditioning=conds(vb_full, "")[0])
    positive, negative = conds(vb_full, "a cat", "")
    with pytest.raises(ValueError, match="VBVideoDenoise: video_model / model: .* both are connected"):
        smooth(N, noisy, model=model, video_model=zeroscope, positive=positive, negative=negative)
    with pytest.raises(ValueError, match="VBVideoDenoise: video_model / model: .* neither is connected"):
        smooth(N, noisy)
    with pytest.raises(ValueError, match="VBVideoDenoise: negative: a native model takes its prompts"):
        smooth(N, noisy, model=model, positive=positive)
    with pytest.raises(ValueError, match="VBVideoDenoise: latent: .* steps = 3 starts at"):
        smooth(N, noisy, model=model, positive=positive, negative=negative, steps=3)


def test_jvid_on_a_native_image_model_equals_the_vb_image_model(N, model, vb_full, zeroscope):
    """The mixture-of-denoisers sampler with the native MODEL as its image model gives the VB result on the same
    weights (same steps chosen, latent to rounding); the image steps really use the native model (a LoRA on it
    changes the result)."""
    import nodes

    from .test_jvid_nodes import sample

    positive, negative = conds(vb_full, "a cat", "")
    ours = sample(N, vb_full, zeroscope, steps=4, t_v=0.25, t_e=0.5, p_e=0.5, p_f=0.0)
    native_kw = dict(image_model=None, model=model, positive=positive, negative=negative, steps=4, t_v=0.25,
                     t_e=0.5, p_e=0.5, p_f=0.0)
    theirs = sample(N, None, zeroscope, **native_kw)
    assert theirs[1] == ours[1] and int(re.search(r"image model (\d+)", ours[1]).group(1)) > 0
    a, b = ours[0]["samples"], theirs[0]["samples"]
    assert rel(a, b) < 1e-4
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "add_detail.safetensors", 1.0)[0]
    with_lora = sample(N, None, zeroscope, **dict(native_kw, model=lora))[0]["samples"]
    assert diff(with_lora, b) > 1e-3
    with pytest.raises(ValueError, match="VBJVIDSample: image_timesteps: a native MODEL"):
        sample(N, None, zeroscope, **dict(native_kw, image_timesteps="interpolated"))
    with pytest.raises(ValueError, match="VBJVIDSample: image_model / model: .* both are connected"):
        sample(N, vb_full, zeroscope, **dict(native_kw, image_model=vb_full))


def test_evs_on_a_native_image_model_and_vae_equals_the_vb_image_model(N, native_sd15, vb_full, zeroscope):
    """EVS refinement with the native MODEL + VAE (CheckpointLoaderSimple) as its T2I model gives the VB result on
    the same weights: the latent and the decoded frames to rounding, so ComfyUI's VAE encodes and decodes as the VB
    VAE does; bad native inputs name the input."""
    from .test_evs_nodes import refine

    model, _, vae = native_sd15
    positive, negative = conds(vb_full, "a cat", "")
    grid_v = zeroscope.model.schedule.timesteps(8, zeroscope.model.spacing)
    kw = dict(t_V=grid_v[4], n_V=2, t2i_steps=10, t_T2V=201)
    ours = refine(N, vb_full, zeroscope, **kw)
    native_kw = dict(kw, image_model=None, model=model, positive=positive, negative=negative, vae=vae)
    theirs = refine(N, None, zeroscope, **native_kw)
    a, b = ours[1]["samples"], theirs[1]["samples"]
    # measured 2.4e-4: ten T2I steps and two T2V calls on random weights carry the 1e-5 per-call rounding (the VAEs
    # alone agree to 4e-7); a wrong timestep, sigma or latent scaling is off by more than 1e-2
    assert rel(a, b) < 1e-3
    assert diff(ours[0], theirs[0]) < 1e-3                 # pixels in 0..1
    assert theirs[0].shape == ours[0].shape
    with pytest.raises(ValueError, match="VBEVSRefine: vae: a native model needs its VAE"):
        refine(N, None, zeroscope, **dict(native_kw, vae=None))
    with pytest.raises(ValueError, match="VBEVSRefine: t_T2V = 200 "):
        refine(N, None, zeroscope, **dict(native_kw, t_T2V=200))


def test_i4vgen_on_a_native_image_model_equals_the_vb_image_model(N, native_sd15, vb_full, zeroscope):
    """I4VGen with the native MODEL + VAE as its image model, staged and in one box, gives the VB result on the same
    weights: the same candidates (also on the official candidate schedule, where the sampler's schedule is not the
    model's), the same weight-free scores and anchor, the same video; missing inputs are named."""
    from .test_i4vgen_nodes import NC, SIZE, STEPS, one_box, rel

    model, _, vae = native_sd15
    positive, negative = conds(vb_full, "a cat", "")
    nat = dict(image_model=None, model=model, positive=positive, negative=negative)
    cand = dict(prompt="a cat", negative_prompt="", seed=3, width=SIZE, height=SIZE, num_candidates=NC, steps=STEPS,
                cfg=7.5, frame_batch_size=0, official_candidate_schedule=False)
    for official in (False, True):
        ours = run(N["VBAnchorCandidates"], image_model=vb_full, **dict(cand, official_candidate_schedule=official))
        theirs = run(N["VBAnchorCandidates"], **nat, vae=vae, **dict(cand, official_candidate_schedule=official))
        # measured 4.4e-6, and 1.7e-4 on the official grid, whose last step (t = 0, sigma 0.029) divides the rounding
        # by sigma; taking sigma from the sampler's (linear) schedule instead of the model's gives 0.98
        assert rel(theirs[1]["samples"], ours[1]["samples"]) < 1e-3, official
        assert diff(theirs[0], ours[0]) < 1e-3
    select = dict(candidates=ours[0], latent=ours[1], prompt="a cat", negative_prompt="", scorer="weight-free", seed=3,
                  candidate_index=-1)
    s_ours = run(N["VBSelectAnchor"], image_model=vb_full, **select)[2]
    s_theirs = run(N["VBSelectAnchor"], **nat, **select)[2]
    assert s_theirs.splitlines()[0] == s_ours.splitlines()[0]                      # the same anchor
    score = lambda text: torch.tensor([float(x) for x in re.findall(r"-?\d+\.\d+", text)])  # noqa: E731
    assert torch.allclose(score(s_theirs), score(s_ours), atol=2e-3)               # printed to 4 decimals
    a, b = one_box(N, vb_full, zeroscope), one_box(N, None, zeroscope, **nat, vae=vae)
    assert b[4].splitlines()[0] == a[4].splitlines()[0]
    assert rel(b[0]["samples"], a[0]["samples"]) < 1e-3
    assert diff(b[3], a[3]) < 1e-3                               # the decoded candidates
    with pytest.raises(ValueError, match="VBSelectAnchor: negative: .* needed for the weight-free scorer"):
        run(N["VBSelectAnchor"], **dict(nat, negative=None), **select)
    with pytest.raises(ValueError, match="VBI4VGen: vae: a native model needs its VAE"):
        one_box(N, None, zeroscope, **nat)


@torch.no_grad()
def test_native_attention_control_equals_the_diffusers_processor(model, vb_full):
    """SFI capture and injection through ComfyUI's attention replace patches: the same layer names, sizes, captured
    Q/K/V and injected eps as the diffusers processor on the same weights, with the branch roles read per call; the
    patches live only in the run's options (the MODEL keeps none); a layer the MODEL already replaces is refused."""
    from videobridge.core.attention import AttentionController, FeatureBank, layer_kind, layer_table
    from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg
    from videobridge.nodes import native, runtime

    sched = native.schedule_of(model, "model")
    unet = vb_full.model.unet
    plan = native.NativeDenoiser(model, sched)
    spatial = {n: v for n, v in layer_table(unet).items() if layer_kind(n) != "temporal"}
    assert plan.table == spatial
    assert plan.layers["up_blocks.1.attentions.0.transformer_blocks.0.attn1"][0] == ("output", 3, 0)
    layers = plan.attention_layers("shallow")
    assert plan.bank_bytes(layers, FRAMES, (8, 8), 1) == UNet2DDenoiser(unet, sched).bank_bytes(layers, FRAMES,
                                                                                                 (8, 8), 1)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8, generator=g).to(model_device()) for _ in range(2))
    text, null = runtime.encode(vb_full, ["a cat", ""]).split(1)
    positive, negative = conds(vb_full, "a cat", "")
    t = 501
    before = state(model)

    def both(x, ctl, guide):
        vb = UNet2DDenoiser(unet, sched)
        with vb.controlled(ctl[0]):
            ours = vb(x, t, guide)

        def loop(den):
            with den.controlled(ctl[1]):
                return den(x, t, native.guidance(7.5))
        return ours, native.run(model, {"positive": positive, "negative": negative}, x, [t], sched, loop)

    banks = [FeatureBank(FRAMES, (SIZE // 8,) * 2, sched, torch.float32) for _ in range(2)]
    guide = cfg(Branch(text), Branch(null), 7.5)
    both(x, [AttentionController(layers, b, "capture") for b in banks], guide)
    assert set(banks[0].entries) == set(banks[1].entries) == {(n, t) for n in layers}
    for key, ours in banks[0].entries.items():
        for a, b in zip(ours, banks[1].entries[key]):      # the cond branch's Q/K/V, not the uncond one
            assert rel(a, b) < 1e-4, key
    plain = native.run(model, {"positive": positive, "negative": negative}, y, [t], sched,
                       lambda den: den(y, t, native.guidance(7.5)))
    ours, theirs = both(y, [AttentionController(layers, b, "inject", gamma=0.8) for b in banks], guide)
    assert rel(ours, theirs) < 1e-4
    assert rel(theirs, plain, plain) > 1e-2      # the injection does something
    assert same_state(before, state(model))

    class Failing(AttentionController):                   # an error inside a patched layer, mid-run
        def attend(self, *args):
            raise RuntimeError("boom")

    def failing(den):
        with den.controlled(Failing(layers, banks[0], "inject")):
            return den(y, t, native.guidance(7.5))

    with pytest.raises(RuntimeError, match="boom"):
        native.run(model, {"positive": positive, "negative": negative}, y, [t], sched, failing)
    assert same_state(before, state(model))
    assert torch.equal(plain, native.run(model, {"positive": positive, "negative": negative}, y, [t], sched,
                                         lambda den: den(y, t, native.guidance(7.5))))     # no patch left behind

    patched = model.clone()
    patched.set_model_attn1_replace(lambda q, k, v, extra: q, "output", 3, 0)
    with pytest.raises(ValueError, match=r"model: this MODEL already replaces the attention of "
                                         r"up_blocks.1.attentions.0.transformer_blocks.0.attn1"):
        native.run(patched, {"positive": positive}, y, [t], sched,
                   lambda den: den.controlled(AttentionController(layers, banks[0], "inject")).__enter__())
    assert list(patched.model_options["transformer_options"]["patches_replace"]["attn1"]) == [("output", 3, 0)]


@torch.no_grad()
def test_prompt2prompt_on_a_native_model_equals_the_vb_model(N, native_sd15, vb_full):
    """VBPrompt2PromptEdit on CheckpointLoaderSimple's MODEL, CLIP and VAE gives the VB result on the same weights
    (edited frames, source copy and re-encoded latent to rounding), for replace with reweight and LocalBlend (every
    spatial attention layer through ComfyUI's patches, the [2, 77, D] pair cond repeated over the interleaved rows)
    and for refine on generated frames; identical prompts give the source copy back exactly; the edit needs the
    attention edits (without them the copies differ only by their prompt); weighting syntax is refused."""
    from .test_p2p_nodes import p2p

    model, clip, vae = native_sd15
    before = state(model)
    nat = dict(image_model=None, model=model, clip=clip, vae=vae)
    for kw in (dict(reweight="dog:2", blend_source_words="cat", blend_edit_words="dog", steps=4),
               dict(mode="refine", edit_prompt="a fluffy dog sitting on grass", images=None, frames=2)):
        ours, theirs = p2p(N, vb_full, **kw), p2p(N, None, **kw, **nat)
        for name, a, b in zip(("images", "latent", "source_images"), ours, theirs):
            a, b = (x["samples"] if isinstance(x, dict) else x for x in (a, b))
            assert rel(a, b) < 1e-3, (kw, name)
        assert diff(ours[0], ours[2]) > 1e-2
    same, _, source = p2p(N, None, edit_prompt="a cat sitting on grass", n_cross=1.0, n_self=1.0, **nat)
    assert torch.equal(same, source)
    no_edit, _, _ = p2p(N, None, n_cross=0.0, n_self=0.0, **nat)
    edited = p2p(N, None, **nat)[0]
    assert diff(edited, no_edit) > 1e-3
    assert same_state(before, state(model))
    with pytest.raises(ValueError, match="VBPrompt2PromptEdit: edit_prompt: ComfyUI reads this prompt as other "
                                         "tokens"):
        p2p(N, None, edit_prompt="a (dog:1.3) sitting on grass", **nat)
    with pytest.raises(ValueError, match="VBPrompt2PromptEdit: clip: a native model needs its CLIP"):
        p2p(N, None, **dict(nat, clip=None))
    with pytest.raises(ValueError, match="VBPrompt2PromptEdit: clip: this CLIP is object; an SD1.5 CLIP"):
        p2p(N, None, **dict(nat, clip=type("OtherCLIP", (), {"tokenizer": object()})()))
