"""I4VGen nodes executed in-process inside the real ComfyUI modules, on stand-ins."""
import sys
import types

import pytest
import torch

from .test_nodes import INPAINT, MOTION, run

FRAMES, SIZE, STEPS, NC = 4, 64, 4, 3


@pytest.fixture(scope="module")
def animatediff(N, base):
    return run(N["VBLoadVideoModel"], model_name=MOTION, dtype="auto", sampling="model default (DDIM)",
               image_model=base)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def one_box(N, base, vm, **kw):
    args = dict(image_model=base, video_model=vm, prompt="a cat", negative_prompt="", seed=3, width=SIZE,
                height=SIZE, frames=FRAMES, steps=STEPS, cfg=7.5, num_candidates=NC, scorer="weight-free", p_ni=0.6,
                p_re=1.0, frame_batch_size=2, step_sizes="10, 10, 10, 1", nivsds_cfg=-1.0,
                official_candidate_schedule=False, official_scheduler_config=False, candidate_index=-1)
    args.update(kw)
    return run(N["VBI4VGen"], **args)


def test_staged_graph_equals_the_one_box_node(N, base, animatediff):
    """The five stage nodes with one seed reproduce VBI4VGen (same streams, same grids, same selection)."""
    latent, anchor, ni_latent, cands, scores = one_box(N, base, animatediff)
    images, cand_lat = run(N["VBAnchorCandidates"], image_model=base, prompt="a cat", negative_prompt="", seed=3,
                           width=SIZE, height=SIZE, num_candidates=NC, steps=STEPS, cfg=7.5, frame_batch_size=0,
                           official_candidate_schedule=False)
    assert images.shape == (NC, SIZE, SIZE, 3) and torch.allclose(images, cands, atol=1e-5)
    a_img, a_lat, s_text = run(N["VBSelectAnchor"], image_model=base, candidates=images, latent=cand_lat,
                               prompt="a cat", negative_prompt="", scorer="weight-free", seed=3, candidate_index=-1)
    assert s_text == scores and s_text.startswith("scorer: weight-free; anchor: candidate ")
    assert len(s_text.splitlines()) == 2 + NC and sum(line.startswith("*") for line in s_text.splitlines()) == 1
    assert torch.allclose(a_img, anchor, atol=1e-5)
    static = run(N["VBStaticVideo"], latent=a_lat, frames=FRAMES, index=0)[0]
    assert torch.equal(static["samples"], a_lat["samples"].expand(FRAMES, -1, -1, -1))
    ni = run(N["VBNIVSDS"], video_model=animatediff, latent=static, prompt="a cat", negative_prompt="", seed=3,
             steps=STEPS, cfg=7.5, p_ni=0.6, step_sizes="10, 10, 10, 1", official_scheduler_config=False)[0]
    # LATENT sockets carry unscaled latents: the /0.18215 * 0.18215 round trip of the anchor (1e-7) is all that
    # differs; NI-VSDS with eta = 10 on random weights amplifies it to 4e-5 of the norm (measured)
    assert rel(ni["samples"], ni_latent["samples"]) < 1e-3
    assert not torch.allclose(ni["samples"], static["samples"], atol=1e-3)          # NI-VSDS moved it
    video = run(N["VBVideoDenoise"], video_model=animatediff, latent=ni, prompt="a cat", negative_prompt="", seed=3,
                steps=STEPS, cfg=7.5, strength=1.0)[0]
    assert rel(video["samples"], latent["samples"]) < 1e-3
    # another seed changes everything; a forced index overrides the scorer
    assert not torch.allclose(one_box(N, base, animatediff, seed=4)[0]["samples"], latent["samples"])
    forced = one_box(N, base, animatediff, candidate_index=2)
    assert torch.allclose(forced[1], cands[2:3], atol=1e-5) and forced[4].startswith("scorer: forced; anchor: candidate 2")


def test_anchor_image_mode_and_bad_inputs(N, base, animatediff):
    picture = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    latent, anchor, _, cands, text = one_box(N, base, animatediff, anchor_image=picture)
    assert torch.equal(anchor, picture) and torch.equal(cands, picture) and "anchor_image" in text
    assert latent["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent["samples"]).all()
    cases = [(dict(anchor_image=torch.rand(1, 32, 48, 3)), "VBI4VGen: anchor_image is 48x32 but width/height are 64x64"),
             (dict(p_ni=0.0), "VBI4VGen: p_ni must be in \\(0, 1\\]"), (dict(p_re=1.5), "VBI4VGen: p_re"),
             (dict(num_candidates=0), "VBI4VGen: num_candidates must be at least 1"),
             (dict(step_sizes="ten"), "VBI4VGen: step_sizes"),
             (dict(candidate_index=NC), "VBI4VGen: candidate_index 3 is not one of the 3 candidates")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            one_box(N, base, animatediff, **kw)
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    with pytest.raises(ValueError, match="VBAnchorCandidates: image_model: .*inpainting"):
        run(N["VBAnchorCandidates"], image_model=inp, prompt="", negative_prompt="", seed=0, width=SIZE, height=SIZE,
            num_candidates=2, steps=2, cfg=7.5, frame_batch_size=0, official_candidate_schedule=False)
    noisy = {"samples": torch.zeros(FRAMES, 4, 8, 8), "vb_timestep": 961, "vb_schedule": {}, "vb_grid": [961]}
    with pytest.raises(ValueError, match="VBNIVSDS: latent: NI-VSDS takes a clean latent"):
        run(N["VBNIVSDS"], video_model=animatediff, latent=noisy, prompt="", negative_prompt="", seed=0, steps=4,
            cfg=7.5, p_ni=0.6, step_sizes="1", official_scheduler_config=False)
    with pytest.raises(ValueError, match="VBStaticVideo: index 2 is beyond the latent's 1 frame"):
        run(N["VBStaticVideo"], latent={"samples": torch.zeros(1, 4, 8, 8)}, frames=4, index=2)


def write_tiny_clip(path, tokenizer_vocab=49408):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=tokenizer_vocab, hidden_size=64, num_attention_heads=1,
                                      intermediate_size=128, num_hidden_layers=2, max_position_embeddings=77,
                                      eos_token_id=49407, bos_token_id=49406, pad_token_id=1),
                     vision_config=dict(hidden_size=64, num_attention_heads=1, intermediate_size=128,
                                        num_hidden_layers=2, patch_size=8, image_size=32), projection_dim=16)
    model = CLIPModel(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def test_scorers_auto_clip_and_imagereward(N, base, comfy_env, tmp_path, monkeypatch):
    import folder_paths

    from videobridge.core import i4vgen
    from videobridge.core.models import load_clip_model
    from videobridge.nodes import scorers

    images = torch.rand(3, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    lat = run(N["VBEncodeFrames"], image_model=base, images=images, frames_per_chunk=8)[0]
    select = dict(image_model=base, candidates=images, latent=lat, prompt="a cat", negative_prompt="", seed=0,
                  candidate_index=-1)
    assert scorers.resolve("auto", "n") == ("weight-free", None)
    for choice, msg in [("clip", "needs a whole CLIP model"), ("imagereward", "needs the image-reward package")]:
        with pytest.raises(ValueError, match=f"VBSelectAnchor: scorer '{choice}' {msg}"):
            run(N["VBSelectAnchor"], scorer=choice, **select)
    # a whole CLIP model in clip_vision: auto takes it; scores equal transformers' own cosine
    clip_dir = tmp_path / "clip_vision"
    clip_dir.mkdir()
    ref = write_tiny_clip(str(clip_dir / "clip-tiny.safetensors"))
    vision_only = {k: v for k, v in ref.state_dict().items() if k.startswith("vision_model.")}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in vision_only.items()}, str(clip_dir / "a-vision-only.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_vision",
                        ([str(clip_dir)], folder_paths.supported_pt_extensions))
    assert scorers.resolve("auto", "n") == ("clip", str(clip_dir / "clip-tiny.safetensors"))
    _, _, text = run(N["VBSelectAnchor"], scorer="auto", **select)
    assert text.startswith("scorer: clip")
    loaded = load_clip_model(str(clip_dir / "clip-tiny.safetensors"))
    tok = base.model.tokenizer
    ours = i4vgen.clip_scores(loaded, tok, "a cat", images)["score"]
    with torch.no_grad():
        ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = ref(input_ids=ids, pixel_values=i4vgen.clip_pixels(images, 32))
    torch.testing.assert_close(ours, out.logits_per_image[:, 0] / ref.logit_scale.exp(), rtol=1e-4, atol=1e-5)
    rows = [float(r[3:].split()[0]) for r in text.splitlines()[2:]]
    assert rows == pytest.approx(ours.tolist(), abs=1e-4)
    # ImageReward: weights on disk + the package -> auto prefers it (a stand-in package records the call)
    reward_dir = tmp_path / "image_reward"
    reward_dir.mkdir()
    (reward_dir / "ImageReward.pt").write_bytes(b"x")
    (reward_dir / "med_config.json").write_text("{}")
    calls = []

    class FakeRM:
        def score(self, prompt, pil):
            calls.append((prompt, [p.size for p in pil]))
            return [0.1, 0.9, 0.5]

    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device, med_config: calls.append((name, med_config)) or FakeRM()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "image_reward", ([str(reward_dir)], set()))
    a_img, _, text = run(N["VBSelectAnchor"], scorer="auto", **select)
    assert text.startswith("scorer: imagereward; anchor: candidate 1") and torch.equal(a_img, images[1:2])
    assert calls[0] == (str(reward_dir / "ImageReward.pt"), str(reward_dir / "med_config.json"))
    assert calls[1] == ("a cat", [(SIZE, SIZE)] * 3)
