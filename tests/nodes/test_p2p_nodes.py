"""VBPrompt2PromptEdit in-process in real ComfyUI on the stand-in SD1.5 (real SD1 tokenizer): identical prompts give
the source back exactly, an edit with LocalBlend changes the frames and chains into BIVDiff's inversion, and bad
inputs get errors that name the input."""
import pytest
import torch

from .test_nodes import FRAMES, INPAINT, SIZE, STEPS, invert, run, video


def p2p(N, vb, **kw):
    args = dict(image_model=vb, source_prompt="a cat sitting on grass", edit_prompt="a dog sitting on grass",
                mode="replace", negative_prompt="", seed=0, steps=STEPS, cfg=7.5, n_cross=0.4, n_self=0.4,
                reweight="", blend_source_words="", blend_edit_words="", width=SIZE, height=SIZE, frames=FRAMES,
                frame_batch_size=0, images=video())
    args.update(kw)
    return run(N["VBPrompt2PromptEdit"], **args)


def test_identical_prompts_return_the_source_copy_exactly(N, base):
    for mode in ("replace", "refine"):
        edited, latent, source = p2p(N, base, edit_prompt="a cat sitting on grass", mode=mode, n_cross=1.0,
                                     n_self=1.0, blend_source_words="cat", blend_edit_words="cat")
        assert torch.equal(edited, source) and edited.shape == (FRAMES, SIZE, SIZE, 3)


def test_an_edit_changes_the_frames_and_feeds_the_mixed_inversion(N, base):
    edited, latent, source = p2p(N, base, steps=4, reweight="dog:2", blend_source_words="cat",
                                 blend_edit_words="dog", frame_batch_size=3)
    assert float((edited - source).abs().max()) > 1e-3
    assert latent["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    z = invert(N, latent, "image model (frame-wise)", image_model=base)
    assert z["vb_timestep"] > 0 and torch.isfinite(z["samples"]).all()
    generated, _, gen_source = p2p(N, base, images=None, frames=2)    # generated frames: both copies from one noise
    assert generated.shape == (2, SIZE, SIZE, 3) and not torch.equal(generated, gen_source)


@pytest.mark.parametrize("kw, match", [
    (dict(edit_prompt="a big dog sitting on grass"), "edit_prompt: replace swaps words one for one.*5.*6"),
    (dict(reweight="hat:2"), "reweight: 'hat' is not a word"),
    (dict(reweight="dog=2"), "reweight: expected 'word:strength'"),
    (dict(blend_source_words="cat"), "blend_edit_words is empty"),
    (dict(blend_source_words="cat", blend_edit_words="cat"), "blend_edit_words: 'cat' is not a word"),
    (dict(source_prompt=" "), "source_prompt is empty"),
])
def test_bad_inputs_name_the_input(N, base, kw, match):
    with pytest.raises(ValueError, match="VBPrompt2PromptEdit: " + match):
        p2p(N, base, **kw)


def test_a_task_model_is_refused(N):
    inp = run(N["VBLoadImageModel"], model_name=INPAINT, dtype="auto", vae_dtype="auto")[0]
    with pytest.raises(ValueError, match="VBPrompt2PromptEdit: image_model: .*base SD1.5.*inpainting"):
        p2p(N, inp)
