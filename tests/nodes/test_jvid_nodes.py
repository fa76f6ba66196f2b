"""JVID nodes executed in-process inside the real ComfyUI modules, on stand-ins."""
import pytest
import torch

from .test_nodes import INPAINT, MOTION, ZEROSCOPE, run

FRAMES, SIZE = 4, 64


@pytest.fixture(scope="module")
def animatediff(N, base):
    return run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)",
               image_model=base)[0]


def sample(N, base, vm, **kw):
    args = dict(image_model=base, video_model=vm, prompt="a cat", video_prompt="", negative_prompt="", seed=1,
                width=SIZE, height=SIZE, frames=FRAMES, steps=6, cfg=2.0, preset="256", t_v=-1.0, t_e=-1.0, p_e=-1.0,
                p_f=-1.0, gamma=-1.0, r_i=-1.0, r_v=-1.0, smoothing="preset", c_s=-1.0, gamma_on_all_steps=False,
                image_timesteps="nearest integer", frame_batch_size=0)
    args.update(kw)
    return run(N["VBJVIDSample"], **args)


def test_jvid_sample_is_seeded_and_reports_the_models(N, base, animatediff):
    lat, table = sample(N, base, animatediff)
    assert lat["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(lat["samples"]).all()
    assert torch.equal(lat["samples"], sample(N, base, animatediff)[0]["samples"])
    assert not torch.equal(lat["samples"], sample(N, base, animatediff, seed=2)[0]["samples"])
    rows = table.splitlines()[2:]
    assert len(rows) == 6 and rows[0].split()[1:] == ["831", "video"]        # u = 0 < t_v: always video first
    n_video = sum(r.endswith("video") for r in rows)
    assert table.startswith(f"video model {n_video}/6 steps")
    only_video = sample(N, base, animatediff, preset="custom", t_v=1.0, t_e=1.0, p_e=1.0, p_f=1.0, gamma=1.0,
                        r_i=0.0, r_v=0.0, smoothing="off")[1]
    assert only_video.startswith("video model 6/6")
    only_image = sample(N, base, animatediff, t_v=0.0, t_e=0.0, p_e=0.0, p_f=0.0)[1]
    assert only_image.startswith("video model 0/6")


def test_zeroscope_as_the_video_model_and_smoothing(N, base, comfy_env):
    zs = run(N["VBLoadVideoModel"], model_name=ZEROSCOPE, dtype="auto", sampling="model default (DDIM)")[0]
    lat, table = sample(N, base, zs, preset="128", image_timesteps="interpolated")
    assert torch.isfinite(lat["samples"]).all() and "image" in table
    from videobridge.core.jvid import temporal_latent_smoothing

    smooth = run(N["VBTemporalLatentSmoothing"], latent=lat, c_s=3.0)[0]
    core = temporal_latent_smoothing(lat["samples"].movedim(0, 1)[None], 3.0)[0].movedim(1, 0)
    assert torch.allclose(smooth["samples"], core) and not torch.equal(smooth["samples"], lat["samples"])
    static = {"samples": lat["samples"][:1].expand(FRAMES, -1, -1, -1).clone()}
    assert torch.allclose(run(N["VBTemporalLatentSmoothing"], latent=static, c_s=2.0)[0]["samples"],
                          static["samples"], atol=1e-6)


def test_bad_inputs_name_the_knob(N, base, animatediff):
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    cases = [(dict(t_v=0.9, t_e=0.5), "VBJVIDSample: t_v .*t_e"),
             (dict(preset="custom", t_v=0.1), "VBJVIDSample: preset 'custom' needs every knob.*t_e"),
             (dict(width=60), "VBJVIDSample: width/height.*multiples of 8"),
             (dict(image_model=inp), "VBJVIDSample: image_model.*inpainting")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            sample(N, base, animatediff, **kw)
    with pytest.raises(ValueError, match="c_s"):
        run(N["VBTemporalLatentSmoothing"], latent={"samples": torch.zeros(2, 4, 8, 8)}, c_s=0.0)


def test_latents_of_another_space_are_refused(N, base, comfy_env):
    import copy
    import dataclasses

    from videobridge.nodes.runtime import VideoHandle

    zs = run(N["VBLoadVideoModel"], model_name=ZEROSCOPE, dtype="auto", sampling="model default (DDIM)")[0]
    vae = copy.deepcopy(zs.model.vae)
    vae.register_to_config(scaling_factor=0.13025)                       # an SDXL-style latent scale
    other = VideoHandle(dataclasses.replace(zs.model, vae=vae))
    with pytest.raises(ValueError, match="VBJVIDSample: video_model: its latents .*0.13025"):
        sample(N, base, other)


def test_the_model_of_each_step_is_shown_while_sampling(N, base, animatediff, monkeypatch):
    """Progress text goes to ComfyUI's PromptServer (``send_progress_text(text, node_id)``, ComfyUI >= 0.3.4x) for the
    executing node, one message per step plus a summary. The server module is stubbed: importing the real one here
    would start ComfyUI's web app."""
    import sys
    import types

    from comfy_execution.utils import CurrentNodeContext

    sent = []

    class PromptServer:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    PromptServer.instance = PromptServer()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=PromptServer))
    with CurrentNodeContext("prompt-1", "17"):
        _, table = sample(N, base, animatediff)
    assert len(sent) == 7 and all(node == "17" for node, _ in sent)
    assert sent[0][1].startswith("step 1/6 (t = 831): video model") and sent[-1][1] == table.splitlines()[0]
