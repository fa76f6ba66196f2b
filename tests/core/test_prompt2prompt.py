"""Prompt2Prompt: token mappers on SD1.5's real CLIP tokenizer (ComfyUI's files), the attention edits as plain
tensor maths, LocalBlend against a hand-computed mask, and whole runs on a tiny UNet: identical prompts give an
edit identical to the source, only the conditional edit rows ever change, frame chunking changes nothing."""
import os

import pytest
import torch
import torch.nn.functional as F

from videobridge.core import prompt2prompt as P
from videobridge.core.attention import CallContext
from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg
from videobridge.core.models import load_tokenizer
from videobridge.core.samplers import ddim_sample
from videobridge.core.schedule import NoiseSchedule

from . import tiny

SD = NoiseSchedule.sd15()
COMFY = os.environ.get("VIDEOBRIDGE_COMFYUI")


@pytest.fixture(scope="module")
def tok():
    folder = os.path.join(COMFY or "", "comfy", "sd1_tokenizer")
    if not os.path.isdir(folder):
        pytest.skip("needs ComfyUI's comfy/sd1_tokenizer: run the tests through tools/run_tests.py")
    return load_tokenizer(folder)


def probs(seed, *shape):
    return torch.randn(*shape, 77, generator=torch.Generator().manual_seed(seed)).softmax(-1)


# ------------------------------------------------------------------ tokens and mappers (real CLIP tokenizer)
def test_word_tokens_follow_the_real_tokenizer_for_words_of_several_tokens(tok):
    words = P.word_tokens(tok, "a photorealistic capybara sitting")
    assert [w for w, _ in words] == ["a", "photorealistic", "capybara", "sitting"]
    assert [len(p) for _, p in words] == [1, 2, 3, 1]                  # BPE splits the two rare words
    assert [p for _, ps in words for p in ps] == list(range(1, 8))     # contiguous after the start token
    assert P.positions_of(tok, "a capybara, a Capybara", ["capybara"], "x") == [2, 3, 4, 7, 8, 9]


def test_replace_mapper_swaps_words_and_spreads_a_word_over_its_new_tokens(tok):
    src, dst = "a cat sitting on grass", "a capybara sitting on grass"
    m = P.replace_mapper(tok, src, dst)
    a = probs(0, 3, 5)                                                  # [heads, Lq, 77]
    out = a @ m
    cat, capy = 2, [2, 3, 4]                                            # "capybara" is 3 tokens
    assert torch.allclose(out[..., capy], a[..., cat:cat + 1].expand(-1, -1, 3) / 3)
    assert torch.allclose(out[..., capy].sum(-1), a[..., cat])          # the word's weight is kept, spread
    assert torch.equal(out[..., :2], a[..., :2])                        # start token and "a"
    assert torch.equal(out[..., 5:8], a[..., 3:6])                      # "sitting on grass" and the end token, shifted
    back = a @ P.replace_mapper(tok, dst, src)                          # three tokens gather into one
    assert torch.allclose(back[..., cat], a[..., capy].sum(-1) / 1)
    assert torch.equal(P.replace_mapper(tok, src, src), torch.eye(77))


def test_refine_mapper_aligns_the_token_sequences(tok):
    index, alpha = P.refine_mapper(tok, "a cat on grass", "a fluffy cat on green grass")
    # edit tokens: <s> a fluffy cat on green grass </s>; source: <s> a cat on grass </s>
    assert index[:8].tolist() == [0, 1, 0, 2, 3, 0, 4, 5]
    assert alpha[:8].tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    assert index[8:].tolist() == list(range(8, 77)) and bool((alpha[8:] == 1).all())
    same_i, same_a = P.refine_mapper(tok, "a cat", "a cat")
    assert torch.equal(same_i, torch.arange(77)) and bool((same_a == 1).all())


def test_reweight_and_blend_words_are_found_on_their_tokens(tok):
    e = P.reweight_vector(tok, "a photorealistic dog", {"photorealistic": 2.0, "dog": 0.5})
    assert e[2:4].tolist() == [2.0, 2.0] and e[4] == 0.5 and e[1] == 1.0 and float(e.sum()) == 77 + 2 - 0.5
    edit = P.make_edit(tok, "a cat", "a dog", "replace", 50, blend_words=(["cat"], ["dog"]))
    assert edit.blend_tokens[:, 2].tolist() == [1.0, 1.0] and float(edit.blend_tokens.sum()) == 2
    assert (edit.cross_steps, edit.self_steps) == (20, 20)             # floor(0.4 * 51), floor(0.4 * 50)


def test_bad_inputs_name_the_input(tok):
    with pytest.raises(ValueError, match="edit_prompt.*same number of words.*3.*4"):
        P.make_edit(tok, "a cat sitting", "a big dog sitting", "replace", 10)
    with pytest.raises(ValueError, match="reweight: 'hat' is not a word"):
        P.make_edit(tok, "a cat", "a dog", "replace", 10, reweight={"hat": 2.0})
    with pytest.raises(ValueError, match="blend_edit_words: 'cat' is not a word"):
        P.make_edit(tok, "a cat", "a dog", "replace", 10, blend_words=(["cat"], ["cat"]))
    with pytest.raises(ValueError, match="reweight: expected 'word:strength'"):
        P.parse_reweight("dog=2")
    with pytest.raises(ValueError, match="n_cross"):
        P.make_edit(tok, "a cat", "a dog", "replace", 10, n_cross=1.5)
    with pytest.raises(ValueError, match="mode"):
        P.make_edit(tok, "a cat", "a dog", "swap", 10)
    assert P.parse_reweight("dog: 2, big red:0.5") == {"dog": 2.0, "big red": 0.5}


# ------------------------------------------------------------------ the attention maths on plain tensors
def test_edit_cross_attention_replace_refine_and_reweight():
    a_src, a_edit = probs(1, 2, 6), probs(2, 2, 6)
    m = torch.zeros(77, 77)
    m[torch.arange(77), torch.arange(77).roll(1)] = 1
    e = P.Prompt2PromptEdit("replace", 1, 1, mapper=m)
    assert torch.equal(P.edit_cross_attention(a_src, a_edit, e), a_src.roll(-1, -1))          # m[i, i-1] = 1: A'[j] = A[j+1]
    index, alpha = torch.arange(77), torch.ones(77)
    index[3], alpha[3] = 0, 0.0
    r = P.edit_cross_attention(a_src, a_edit, P.Prompt2PromptEdit("refine", 1, 1, index=index, alpha=alpha))
    assert torch.equal(r[..., 3], a_edit[..., 3]) and torch.equal(r[..., 4:], a_src[..., 4:])
    w = torch.ones(77)
    w[5] = 3.0
    rw = P.edit_cross_attention(a_src, a_edit, P.Prompt2PromptEdit("replace", 1, 1, mapper=torch.eye(77),
                                                                      reweight=w))
    assert torch.allclose(rw[..., 5], 3 * a_src[..., 5]) and torch.equal(rw[..., :5], a_src[..., :5])


def test_local_blend_mask_equals_a_hand_computed_one():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 1, 1] = 2.0                      # source: pooled to rows/cols 0..2, then x2 nearest: 0..5
    maps[1, 0, 3, 3] = 0.5                      # edit: pooled to rows/cols 2..3 -> 4..7
    maps[1, 0, 0, 3] = 0.1                      # 0.1 / 0.5 = 0.2 < 0.3: dropped
    expected = torch.zeros(8, 8)
    expected[0:6, 0:6] = 1
    expected[4:8, 4:8] = 1
    mask = P.local_blend_mask(maps, (8, 8), 0.3)
    assert mask.shape == (1, 1, 8, 8) and torch.equal(mask[0, 0], expected)
    assert float(P.local_blend_mask(torch.zeros(2, 1, 4, 4), (8, 8)).sum()) == 0      # nothing chosen: no edit


def _controller(edit, frames=1, hw=(16, 16), step=0, branches=("uncond", "cond")):
    c = P.Prompt2PromptController(edit, frames, hw)
    c.context = CallContext(step, 981, branches, (0, 2 * frames), 2 * frames)
    return c


def _qkv(lq, lk, seed=0, rows=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, n, 4, generator=g) for n in (lq, lk, lk)]


def test_self_attention_is_replaced_only_on_small_layers_and_only_in_the_edit_rows():
    edit = P.Prompt2PromptEdit("replace", 0, 5, mapper=torch.eye(77))
    c = _controller(edit)
    for lq, replaced in ((256, True), (1024, False)):
        q, k, v = _qkv(lq, lq)
        plain = F.scaled_dot_product_attention(q, k, v)
        out = c.attend("up_blocks.1.attentions.0.transformer_blocks.0.attn1", q, k, v)
        assert torch.equal(out[:2], plain[:2])                          # uncond rows: SDPA untouched
        assert torch.allclose(out[2], plain[2], atol=1e-6)              # cond source: explicit softmax, same map
        a_src = (q[2] @ k[2].transpose(-1, -2) * 0.5).softmax(-1)
        if replaced:
            assert torch.allclose(out[3], a_src @ v[3], atol=1e-6)      # source map on the edit's values
            assert not torch.allclose(out[3], plain[3], atol=1e-3)
        else:
            assert torch.equal(out[3], plain[3])
    late = _controller(edit, step=5)
    q, k, v = _qkv(64, 64)
    assert torch.equal(late.attend("mid_block.attentions.0.transformer_blocks.0.attn1", q, k, v),
                       F.scaled_dot_product_attention(q, k, v))         # after n_self: untouched


def test_cross_attention_edit_reaches_only_the_conditional_edit_rows():
    m = torch.zeros(77, 77)
    m[torch.arange(77), torch.arange(77).roll(1)] = 1
    c = _controller(P.Prompt2PromptEdit("replace", 3, 0, mapper=m), step=2)
    q, k, v = _qkv(64, 77, seed=1)
    out = c.attend("down_blocks.0.attentions.0.transformer_blocks.0.attn2", q, k, v)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out[:2], plain[:2]) and torch.allclose(out[2], plain[2], atol=1e-6)
    a_src = (q[2] @ k[2].transpose(-1, -2) * 0.5).softmax(-1)
    assert torch.allclose(out[3], a_src.roll(-1, -1) @ v[3], atol=1e-6)
    with pytest.raises(RuntimeError, match="interleaved and chunked in pairs"):
        odd = _controller(c.edit, step=2)
        odd.context = CallContext(2, 981, ("uncond", "cond"), (1, 3), 4)
        odd.attend("down_blocks.0.attentions.0.transformer_blocks.0.attn2", q, k, v)


# ------------------------------------------------------------------ whole runs on a tiny UNet
def _run(edit, source, target, frames=4, chunk=None, seed=0, steps=4):
    unet = tiny.unet2d(seed=3)
    d = UNet2DDenoiser(unet, SD, frame_batch_size=chunk)
    x = torch.randn(1, 4, frames, 16, 16, generator=torch.Generator().manual_seed(seed))
    grid = SD.timesteps(steps)
    return P.prompt2prompt(d, x, grid, edit, P.pair_guidance(source, target, tiny.text(9), 7.5, frames))


def _edit(mode="replace", cross=3, self_=3, blend=None, reweight=None, thr=0.3):
    kw = dict(mapper=torch.eye(77)) if mode == "replace" else dict(index=torch.arange(77), alpha=torch.ones(77))
    return P.Prompt2PromptEdit(mode, cross, self_, reweight=reweight, blend_tokens=blend, blend_threshold=thr, **kw)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_identical_prompts_give_an_edit_identical_to_the_source(mode):
    blend = torch.zeros(2, 77)
    blend[:, 2] = 1
    src = tiny.text(1)
    z_src, z_edit = _run(_edit(mode, blend=blend, reweight=torch.ones(77)), src, src.clone())
    assert torch.equal(z_src, z_edit)
    unet = tiny.unet2d(seed=3)
    x = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = ddim_sample(UNet2DDenoiser(unet, SD), x, SD.timesteps(4), cfg(Branch(src), Branch(tiny.text(9)), 7.5))
    assert float((z_src - plain).abs().max() / plain.abs().max()) < 1e-5         # explicit softmax vs SDPA rounding


@torch.no_grad()
def test_only_the_edit_branch_changes_and_the_edits_act():
    src, dog, hat = tiny.text(1), tiny.text(2), tiny.text(3)
    blend = torch.zeros(2, 77)
    blend[:, 2] = 1
    z_src1, z_dog = _run(_edit(blend=blend), src, dog)
    z_src2, z_hat = _run(_edit(), src, hat)
    assert torch.equal(z_src1, z_src2)                                  # the source copy never sees the edit
    z_src0, z_free = _run(_edit(cross=0, self_=0), src, dog)           # no attention edits: a plain edit-prompt run
    unet = tiny.unet2d(seed=3)
    x = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain_dog = ddim_sample(UNet2DDenoiser(unet, SD), x, SD.timesteps(4), cfg(Branch(dog), Branch(tiny.text(9)), 7.5))
    assert float((z_free - plain_dog).abs().max() / plain_dog.abs().max()) < 1e-5
    assert float((z_dog - z_free).abs().max()) > 1e-3                  # the edits change the edit copy
    # with source attention, the edit stays closer to the source than a free run does
    assert float((z_dog - z_src1).norm()) < float((z_free - z_src0).norm())


@torch.no_grad()
def test_frame_chunking_and_an_odd_chunk_give_the_same_edit():
    src, dog = tiny.text(1), tiny.text(2)
    blend = torch.zeros(2, 77)
    blend[:, 2] = 1
    whole = _run(_edit(blend=blend), src, dog)
    for chunk in (2, 3):                                                # 3 frames round down to a pair
        parts = _run(_edit(blend=blend), src, dog, chunk=chunk)
        for a, b in zip(whole, parts):
            assert float((a - b).abs().max()) < 1e-5


@torch.no_grad()
def test_local_blend_keeps_the_source_outside_the_mask():
    src, dog = tiny.text(1), tiny.text(2)
    blend = torch.zeros(2, 77)
    blend[:, 2] = 1
    z_src, z_edit = _run(_edit(blend=blend, thr=0.999), src, dog, steps=3)
    same = (z_src == z_edit).all(1)                                     # [1, F, h, w]: where the blend kept the source
    assert 0 < float(same.float().mean()) < 1                           # the mask is neither empty nor everything
    _, z_open = _run(_edit(blend=None), src, dog, steps=3)
    assert float((z_open == z_src).all(1).float().mean()) == 0
