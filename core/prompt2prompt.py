"""Prompt2Prompt: edit a picture by editing its prompt, with the source's cross- and self-attention maps carried into
the edited prompt's denoising. BIVDiff's frame-wise editing model (METHODS.md §2.2, §6.1).

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023 (official code
google/prompt-to-prompt: ``ptp_utils.py``, ``seq_aligner.py``, the notebooks' ``AttentionReplace`` /
``AttentionRefine`` / ``AttentionReweight`` / ``LocalBlend``); BIVDiff uses it with n_cross = n_self = 0.4.

Each frame is denoised twice in one batch, once with the source prompt and once with the edit prompt, from the
same noisy latent. Frames are interleaved ``(frame prompt)``: the latent is ``[1, 4, 2F, h, w]`` with frame f's
source copy at 2f and its edit copy at 2f+1, so a frame chunk always holds both copies and the image denoiser's
rows are ``[branch, frame, prompt]`` = ``[uncond_src, uncond_edit, cond_src, cond_edit] x F`` reordered per frame.
Only the conditional edit rows are changed:

  - cross-attention (attn2), steps ``i < floor(n_cross (N+1))``: ``A_edit <- A'`` where A' is
      replace   ``A'[q, j] = sum_i A_src[q, i] M[i, j]`` (``replace_mapper``),
      refine    ``A'[q, j] = a_j A_src[q, m(j)] + (1 - a_j) A_edit[q, j]`` (``refine_mapper``),
    and reweight multiplies A' (or A_src) by ``e_j`` (``reweight_vector``);
  - self-attention (attn1), steps ``i < floor(n_self N)``, only layers with ``L_q <= 256``: ``A_edit <- A_src``;
  - LocalBlend (optional): after every step ``x_edit <- x_src + mask (x_edit - x_src)``, the mask from the chosen
    words' cross-attention at 1/4 of the latent size (``local_blend_mask``).

Every decision is a function of (layer name, step, L_q) from the controller's ``CallContext``; the maths are plain
functions of tensors (``edit_cross_attention``, ``local_blend_mask``). Self-attention maps are only ever built for
layers with at most 256 query tokens; SDPA computes everything else.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import CallContext, layer_kind
from .callbacks import NO_CALLBACKS, Callbacks
from .denoisers import Branch, Guidance, cfg
from .samplers import ddim_invert, ddim_sample

MAX_TOKENS = 77
MODES = ("replace", "refine")
SELF_MAX_TOKENS = 16 * 16
"""Self-attention is replaced only on layers with at most this many query tokens (16x16 at 512x512; METHODS §6.1)."""
BLEND_LAYERS = ("down_blocks.2.attentions.", "up_blocks.1.attentions.")
"""LocalBlend reads the cross-attention of these blocks: the five layers at 1/4 of the latent size (16x16 at 512)."""
DEFAULT_THRESHOLD = 0.3


# ------------------------------------------------------------------ words and tokens
def _clean(word: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", word.lower())


def word_tokens(tokenizer, prompt: str) -> list:
    """The prompt's words (split on whitespace, as the official code splits on spaces) with the positions of their
    tokens in the padded 77-token sequence (the start token is position 0): ``[(word, [positions]), ...]``. A word
    may have several tokens ("photorealistic" -> 3 with SD1.5's CLIP tokenizer). Words past the 75-token limit get
    no positions. Raises ValueError if the word-by-word tokens do not add up to the prompt's tokens."""
    out, pos = [], 1
    for w in prompt.split():
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        out.append((w, [p for p in range(pos, pos + n) if p < MAX_TOKENS - 1]))
        pos += n
    whole = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(whole) != pos - 1:
        raise ValueError(f"prompt {prompt!r}: its words tokenize to {pos - 1} tokens one by one but to {len(whole)} "
                         "together; separate punctuation from words with spaces")
    return out


def _core(tokenizer, word: str, positions: list) -> list:
    """The positions of ``word``'s own tokens without the punctuation tokens around it ("cat," -> "cat")."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    core = tokenizer(_clean(word), add_special_tokens=False).input_ids
    for i in range(len(ids) - len(core) + 1):
        if ids[i:i + len(core)] == core:
            return positions[i:i + len(core)]
    return positions


def positions_of(tokenizer, prompt: str, words: Sequence[str], name: str) -> list:
    """Token positions of every occurrence of each of ``words`` (case and surrounding punctuation ignored) in
    ``prompt``. Raises ValueError naming input ``name`` for a word the prompt does not contain."""
    tokens = word_tokens(tokenizer, prompt)
    out = []
    for word in words:
        hits = [p for w, ps in tokens if _clean(w) == _clean(word) for p in _core(tokenizer, w, ps)]
        if not hits:
            raise ValueError(f"{name}: {word!r} is not a word of the prompt {prompt!r}; words: "
                             f"{[w for w, _ in tokens]}")
        out += hits
    return sorted(set(out))


def replace_mapper(tokenizer, source: str, edit: str) -> torch.Tensor:
    """Token mapper ``M`` ``[77, 77]`` of a word swap (official ``seq_aligner.get_replacement_mapper_``):
    ``A'[q, j] = sum_i A_src[q, i] M[i, j]``. The prompts have the same number of words; where a word differs, its
    source tokens map to its edit tokens one to one when they have as many tokens, otherwise every source token
    spreads ``1 / (edit tokens)`` over each edit token; every other token maps to its counterpart. After the last
    swap the two sequences stay aligned (the official code maps position j to j there, which shifts the tail when
    token counts differ); edit positions past the source's 77 read the source's last (padding) token.

    Raises ValueError (naming edit_prompt) for prompts with different word counts."""
    src, dst = word_tokens(tokenizer, source), word_tokens(tokenizer, edit)
    if len(src) != len(dst):
        raise ValueError(f"edit_prompt: replace swaps words one for one, so both prompts need the same number of "
                         f"words; the source has {len(src)}, the edit {len(dst)}. Use mode 'refine' to add or "
                         "remove words")
    m = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    i = j = 0
    swaps = {ps[0]: (ps, pd) for (ws, ps), (wd, pd) in zip(src, dst) if ws != wd and ps and pd}
    while i < MAX_TOKENS and j < MAX_TOKENS:
        if i in swaps:
            ps, pd = swaps[i]
            if len(ps) == len(pd):
                m[ps, pd] = 1.0
            else:
                m[torch.tensor(ps)[:, None], torch.tensor(pd)[None, :]] = 1.0 / len(pd)
            i, j = i + len(ps), j + len(pd)
        else:
            m[i, j] = 1.0
            i, j = i + 1, j + 1
    while j < MAX_TOKENS:                                              # the edit is longer: pad from the last token
        m[MAX_TOKENS - 1, j] = 1.0
        j += 1
    return m


def _global_align(x: Sequence[int], y: Sequence[int]) -> list:
    """Needleman-Wunsch alignment of token sequences with match +1, mismatch -1, gap 0 and the official tie order
    (gap in x, then gap in y, then diagonal; ``seq_aligner.global_align``). Returns, for each token of y, the index
    of its aligned token in x or -1."""
    n, k = len(x), len(y)
    score = [[0] * (k + 1) for _ in range(n + 1)]
    trace = [[0] * (k + 1) for _ in range(n + 1)]
    for j in range(1, k + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
        for j in range(1, k + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else (2 if score[i][j] == up else 3)
    i, j, mapping = n, k, []
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            mapping.append(i)
        elif trace[i][j] == 1:
            j -= 1
            mapping.append(-1)
        else:
            i -= 1
    return mapping[::-1]


def refine_mapper(tokenizer, source: str, edit: str) -> tuple:
    """Refinement alignment (official ``seq_aligner.get_refinement_mapper``): ``(index [77] long, alpha [77])`` with
    ``A'[q, j] = alpha_j A_src[q, index_j] + (1 - alpha_j) A_edit[q, j]``. The token sequences (start and end tokens
    included) are aligned globally; an edit token with a source counterpart takes its attention (alpha 1), a new one
    keeps its own (alpha 0); padding maps to itself."""
    x = tokenizer(source, truncation=True, max_length=MAX_TOKENS).input_ids
    y = tokenizer(edit, truncation=True, max_length=MAX_TOKENS).input_ids
    aligned = _global_align(x, y)
    index = torch.arange(MAX_TOKENS)
    alpha = torch.ones(MAX_TOKENS)
    for j, i in enumerate(aligned):
        index[j] = max(i, 0)
        alpha[j] = float(i >= 0)
    return index, alpha


def reweight_vector(tokenizer, prompt: str, strengths: Dict[str, float]) -> torch.Tensor:
    """Per-token factors ``e`` ``[77]``: the strength of each chosen word on its tokens, 1 elsewhere (official
    ``get_equalizer``). Raises ValueError naming reweight for a word the prompt lacks."""
    e = torch.ones(MAX_TOKENS)
    for word, s in strengths.items():
        e[positions_of(tokenizer, prompt, [word], "reweight")] = float(s)
    return e


def parse_reweight(text: str) -> Dict[str, float]:
    """``"dog:2, red:0.5"`` -> ``{"dog": 2.0, "red": 0.5}``; empty -> {}. Raises ValueError naming reweight for
    an entry that is not ``word:number``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        word, sep, value = part.rpartition(":")
        try:
            if not sep or not word.strip():
                raise ValueError
            out[word.strip()] = float(value)
        except ValueError:
            raise ValueError(f"reweight: expected 'word:strength' entries separated by commas (e.g. 'dog:2, "
                             f"red:0.5'), got {part!r}") from None
    return out


def parse_words(text: str) -> list:
    """``"cat, hat"`` -> ``["cat", "hat"]``."""
    return [w for w in (p.strip() for p in text.replace("\n", ",").split(",")) if w]


# ------------------------------------------------------------------ the edit and its maths
@dataclass(frozen=True)
class Prompt2PromptEdit:
    """One source -> edit prompt pair, everything the attention edits need (``make_edit``).

    mode: "replace" or "refine". cross_steps / self_steps: cross-attention is edited at steps ``i < cross_steps``,
    self-attention at ``i < self_steps``. mapper ``[77, 77]`` (replace) or index ``[77]`` long + alpha ``[77]``
    (refine); reweight ``[77]`` or None; blend_tokens ``[2, 77]`` (0/1 masks of the LocalBlend words in the source
    and the edit prompt) or None; blend_threshold (0.3).
    """
    mode: str
    cross_steps: int
    self_steps: int
    mapper: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    alpha: Optional[torch.Tensor] = None
    reweight: Optional[torch.Tensor] = None
    blend_tokens: Optional[torch.Tensor] = None
    blend_threshold: float = DEFAULT_THRESHOLD


def make_edit(tokenizer, source: str, edit: str, mode: str, steps: int, n_cross: float = 0.4, n_self: float = 0.4,
              reweight: Optional[Dict[str, float]] = None, blend_words: Optional[tuple] = None,
              blend_threshold: float = DEFAULT_THRESHOLD) -> Prompt2PromptEdit:
    """Build a ``Prompt2PromptEdit`` for ``steps`` sampling steps (official step counts: cross-attention for
    ``floor(n_cross (steps+1))`` steps, self-attention for ``floor(n_self steps)``; 20 and 20 at 50 steps, 0.4).

    reweight: {word of the EDIT prompt: strength}; blend_words: (source words, edit words) for LocalBlend, or None.
    Raises ValueError naming the input: unknown mode, n_cross/n_self outside [0, 1], replace prompts of different
    word counts, a reweight or LocalBlend word absent from its prompt, a threshold outside (0, 1).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("n_cross", n_cross), ("n_self", n_self)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} (the share of steps whose attention is edited) must be in [0, 1], got {v}")
    if not 0.0 < blend_threshold < 1.0:
        raise ValueError(f"blend_threshold must be in (0, 1), got {blend_threshold}")
    kw = {}
    if mode == "replace":
        kw["mapper"] = replace_mapper(tokenizer, source, edit)
    else:
        kw["index"], kw["alpha"] = refine_mapper(tokenizer, source, edit)
    if reweight:
        kw["reweight"] = reweight_vector(tokenizer, edit, reweight)
    if blend_words is not None:
        masks = torch.zeros(2, MAX_TOKENS)
        for row, (prompt, words, name) in enumerate(((source, blend_words[0], "blend_source_words"),
                                                     (edit, blend_words[1], "blend_edit_words"))):
            if not words:
                raise ValueError(f"{name}: LocalBlend needs at least one word of each prompt (the object that "
                                 "changes), e.g. 'cat' in the source and 'dog' in the edit")
            masks[row, positions_of(tokenizer, prompt, words, name)] = 1.0
        kw["blend_tokens"] = masks
    return Prompt2PromptEdit(mode, int(math.floor(n_cross * (steps + 1))), int(math.floor(n_self * steps)),
                             blend_threshold=float(blend_threshold), **kw)


def edit_cross_attention(a_src: torch.Tensor, a_edit: torch.Tensor, edit: Prompt2PromptEdit) -> torch.Tensor:
    """The edited cross-attention probabilities A' of the edit prompt (METHODS.md §6.1; official AttentionReplace /
    AttentionRefine / AttentionReweight chained).

    a_src, a_edit: probabilities ``[..., L_q, 77]`` (softmax over the last axis) of the source and the edit prompt
    for the same queries' positions. Returns ``[..., L_q, 77]``: replace ``a_src @ M``, refine
    ``alpha * a_src[..., index] + (1 - alpha) * a_edit``, then times ``reweight`` when set.
    """
    if edit.mode == "replace":
        base = a_src @ edit.mapper.to(a_src)
    else:
        alpha = edit.alpha.to(a_src)
        base = a_src[..., edit.index.to(a_src.device)] * alpha + a_edit * (1 - alpha)
    if edit.reweight is not None:
        base = base * edit.reweight.to(a_src)
    return base


def local_blend_mask(maps: torch.Tensor, latent_hw: tuple, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """LocalBlend's mask (official ``LocalBlend.__call__``, METHODS.md §6.1 steps 2-3).

    maps: ``[2, F, h', w']`` the chosen words' cross-attention of the source (0) and edit (1) prompt per frame
    (summed over the words' tokens, averaged over heads and layers, summed over steps). Each map is max-pooled 3x3
    (stride 1, padding 1), resized (nearest) to ``latent_hw`` and divided by its maximum; the mask is
    ``(source > threshold) or (edit > threshold)``. Returns ``[F, 1, h, w]`` float 0/1 (all 0 for an all-zero map).
    """
    two, n = maps.shape[:2]
    m = F.max_pool2d(maps.reshape(two * n, 1, *maps.shape[2:]).float(), 3, stride=1, padding=1)
    m = F.interpolate(m, size=tuple(latent_hw), mode="nearest")
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    m = (m > threshold).view(two, n, 1, *latent_hw)
    return (m[0] | m[1]).float()


# ------------------------------------------------------------------ the controller
class Prompt2PromptController:
    """Attention controller of a Prompt2Prompt run (same protocol as ``core.attention.AttentionController``:
    ``layers``, ``context``, ``attend``). Installed on every spatial attention layer. Unconditional rows are always
    plain SDPA; on the layers and steps that edit (or record LocalBlend maps) the conditional source rows are
    recomputed from their explicit probabilities (the same map, up to rounding) and the conditional edit rows from
    the edited ones: only the edit rows change.

    num_frames: frames of the clip (the batch holds 2 per frame). latent_hw: (h, w) of the latent.
    """
    layers = "spatial"

    def __init__(self, edit: Prompt2PromptEdit, num_frames: int, latent_hw: tuple):
        self.edit, self.num_frames, self.latent_hw = edit, int(num_frames), tuple(latent_hw)
        self.context: Optional[CallContext] = None
        self.maps: dict = {}                 # (layer, step) -> [2, F, L] LocalBlend word attention

    @property
    def blend_hw(self) -> tuple:
        """Size of the LocalBlend maps: the latent size downsampled twice (16x16 at 512x512)."""
        h, w = self.latent_hw
        return math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)

    def _is_blend_layer(self, name: str) -> bool:
        return self.edit.blend_tokens is not None and name.startswith(BLEND_LAYERS) and layer_kind(name) == "cross"

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output ``[B, heads, L_q, d]``; rows ``B = (branch frame prompt)``. Plain SDPA, except where this
        layer and step edit: there the conditional rows come from explicit probabilities (the source's own, the
        edit's edited) and only the other branches' rows from SDPA. LocalBlend layers also keep the conditional
        rows' word maps (explicit probabilities, the output stays SDPA's)."""
        ctx, e = self.context, self.edit
        if ctx is None or ctx.step is None or "cond" not in ctx.branches:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        kind, lq = layer_kind(name), q.shape[2]
        cross = kind == "cross" and ctx.step < e.cross_steps
        self_ = kind == "self" and ctx.step < e.self_steps and lq <= SELF_MAX_TOKENS
        blend = self._is_blend_layer(name)
        if not (cross or self_ or blend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        nb, nf = len(ctx.branches), ctx.chunk_frames
        if q.shape[0] != nb * nf or nf % 2 or ctx.frames[0] % 2:
            raise RuntimeError(f"Prompt2Prompt: layer {name} got {q.shape[0]} rows for {nb} branches x frames "
                               f"{ctx.frames}; source and edit copies must be interleaved and chunked in pairs")
        if attention_mask is not None:
            raise ValueError(f"Prompt2Prompt: layer {name} got an attention mask, which SD1.5 UNets never pass; "
                             "this model is not supported")
        c = ctx.branches.index("cond")
        qc, kc, vc = (x.view(nb, nf // 2, 2, *x.shape[1:])[c] for x in (q, k, v))     # [n, 2, heads, L, d]
        probs = ((qc @ kc.transpose(-1, -2)) * qc.shape[-1] ** -0.5).softmax(-1)         # [n, 2, heads, Lq, Lk]
        if blend:
            words = (probs * e.blend_tokens.to(probs)[None, :, None, None, :]).sum(-1).mean(2)   # [n, 2, Lq]
            f0 = ctx.frames[0] // 2
            store = self.maps.setdefault((name, ctx.step), torch.zeros(2, self.num_frames, lq))
            store[:, f0:f0 + nf // 2] = words.transpose(0, 1).float().cpu()
        if not (cross or self_):
            return F.scaled_dot_product_attention(q, k, v)
        a_edit = edit_cross_attention(probs[:, 0], probs[:, 1], e) if cross else probs[:, 0]
        cond = torch.stack([probs[:, 0], a_edit], 1).to(vc.dtype) @ vc                 # [n, 2, heads, Lq, d]
        rows = lambda x: x.view(nb, nf, *x.shape[1:])                                     # noqa: E731
        out = torch.empty_like(q)
        others = [b for b in range(nb) if b != c]
        if others:
            rows(out)[others] = F.scaled_dot_product_attention(
                *(rows(x)[others].flatten(0, 1) for x in (q, k, v))).view(len(others), nf, *q.shape[1:])
        rows(out)[c] = cond.reshape(nf, *cond.shape[2:])
        return out

    def local_blend(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """LocalBlend after sampling step ``step`` (``ddim_sample``'s ``after_step``): ``x`` is the interleaved
        latent ``[1, C, 2F, h, w]``; returns it with the edit copies set to ``x_src + mask (x_edit - x_src)``, the
        mask from the word maps of steps ``<= step`` (``local_blend_mask``). Raises RuntimeError when no LocalBlend
        layer was called (the UNet has no cross-attention at 1/4 of the latent size)."""
        keys = [key for key in self.maps if key[1] <= step]
        if not keys:
            raise RuntimeError("LocalBlend: the UNet has no cross-attention layers in down_blocks.2 / up_blocks.1 "
                               "(1/4 of the latent size); leave the LocalBlend words empty for this model")
        n_layers = len({key[0] for key in keys})
        maps = sum(self.maps[key] for key in keys) / n_layers                            # [2, F, L]
        mask = local_blend_mask(maps.view(2, self.num_frames, *self.blend_hw), x.shape[-2:],
                                self.edit.blend_threshold)                               # [F, 1, h, w]
        mask = mask.permute(1, 0, 2, 3)[None].to(x)                                      # [1, 1, F, h, w]
        src, dst = x[:, :, 0::2], x[:, :, 1::2]
        out = x.clone()
        out[:, :, 1::2] = src + mask * (dst - src)
        return out


# ------------------------------------------------------------------ sampling
def interleave(x: torch.Tensor) -> torch.Tensor:
    """``[1, C, F, h, w]`` -> ``[1, C, 2F, h, w]``: every frame twice (source copy, edit copy)."""
    return x.repeat_interleave(2, dim=2)


def pair_guidance(source_text: torch.Tensor, edit_text: torch.Tensor, null_text: torch.Tensor, cfg_scale: float,
                  num_frames: int) -> Guidance:
    """Classifier-free guidance over the interleaved rows: the conditional branch gives the source prompt to every
    source copy and the edit prompt to every edit copy (``[2F, 77, D]``: source, edit, source, ...); the negative
    prompt is the unconditional one. Embeddings ``[1, 77, D]``. (A native backend gets the same rows from a
    ``[2, 77, D]`` cond that ComfyUI repeats to the batch.)"""
    return cfg(Branch(torch.cat([source_text, edit_text]).repeat(num_frames, 1, 1)), Branch(null_text), cfg_scale)


def prompt2prompt(image_denoiser, x_t: torch.Tensor, timesteps: Sequence[int], edit: Prompt2PromptEdit,
                  guidance: Guidance, callbacks: Callbacks = NO_CALLBACKS) -> tuple:
    """Frame-wise Prompt2Prompt (METHODS.md §2.2 step 3): DDIM-sample ``[x_T, x_T]`` of every frame with the source
    and the edit prompt under the P2P controller; LocalBlend after each step when ``edit.blend_tokens`` is set.

    image_denoiser: a frame-wise image denoiser over the base SD1.5 UNet (``frame_group``: its frame chunks are made
    whole pairs). x_t: ``[1, 4, F, h, w]`` scaled latent at ``timesteps[0]`` (a DDIM inversion of the source frames,
    or noise). guidance: over the interleaved ``2F`` rows, the source prompt on even rows and the edit prompt on odd
    ones (``pair_guidance``). Returns ``(z_source, z_edit)``, clean latents ``[1, 4, F, h, w]`` float32: the source
    reconstruction and the edited frames. Raises ValueError for a video denoiser.
    """
    if image_denoiser.kind != "image" or not hasattr(image_denoiser, "frame_group"):
        raise ValueError("Prompt2Prompt needs a frame-wise image denoiser (base SD1.5)")
    n, hw = x_t.shape[2], tuple(x_t.shape[-2:])
    controller = Prompt2PromptController(edit, n, hw)
    if callbacks.progress is not None:                              # previews show the edit copies
        progress = callbacks.progress
        callbacks = replace(callbacks, progress=lambda x0: progress(None if x0 is None else x0[:, :, 1::2]))
    group = image_denoiser.frame_group
    image_denoiser.frame_group = 2
    try:
        with image_denoiser.controlled(controller):
            x = ddim_sample(image_denoiser, interleave(x_t.float()), timesteps, guidance,
                            after_step=controller.local_blend if edit.blend_tokens is not None else None,
                            callbacks=callbacks)
    finally:
        image_denoiser.frame_group = group
    return x[:, :, 0::2], x[:, :, 1::2]


def invert_and_edit(image_denoiser, z0: torch.Tensor, timesteps: Sequence[int], edit: Prompt2PromptEdit,
                    guidance: Guidance, inversion_guidance: Guidance, callbacks: Callbacks = NO_CALLBACKS) -> tuple:
    """BIVDiff's Prompt2Prompt image model on a video (METHODS.md §2.2, steps 2-4): DDIM-invert the source frames'
    clean latent ``z0`` ``[1, 4, F, h, w]`` frame-wise with ``inversion_guidance`` (one branch, the prompt ``""``
    by default, §7.1 B5; no guidance), then ``prompt2prompt`` with ``guidance`` from the result. Returns
    ``(z_source, z_edit)`` clean latents, float32."""
    x_t = ddim_invert(image_denoiser, z0, timesteps, inversion_guidance, callbacks=callbacks)
    return prompt2prompt(image_denoiser, x_t, timesteps, edit, guidance, callbacks=callbacks)
