"""Plain-PyTorch twins of the Triton kernels, the dispatcher between them, and the public wrappers.

Every kernel comes as a pair:

* the **twin**: a short plain-PyTorch function in this file. It is the readable definition of
  what the kernel computes, the reference the tests compare against, and the
  path used on CPU (or wherever Triton is missing, e.g. macOS).
* the **kernel**: a Triton program in model/triton_kernels.py that computes the same thing in fewer
  memory passes on the GPU. Its public wrapper here has the same signature as the twin.

A small dispatcher, :func:`use_triton`, decides which of the two runs. It reads
the environment variable ``LONGALIGN_KERNELS``:

* ``auto`` (default): the Triton kernel for CUDA tensors, the twin elsewhere.
* ``triton``: always the kernel, even for CPU tensors. On CPU this only works
  under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests
  check kernel against twin without a GPU.
* ``torch``: always the twin.

The kernels take float32, float16 and bfloat16 tensors; in auto mode anything else (and anything needing a
gradient the kernel does not give) goes to the twin.

This module never imports triton itself: it only asks whether triton is installed, and the wrappers import
model/triton_kernels.py (and with it triton) the first time a kernel is really launched. So the CPU path,
and any machine without Triton, pays nothing for it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

HAVE_TRITON = importlib.util.find_spec("triton") is not None  # asked without importing it (e.g. none on macOS)
KERNELS_ENV = "LONGALIGN_KERNELS"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    """The value of ``LONGALIGN_KERNELS`` ("auto" when unset), validated."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"{KERNELS_ENV}={mode!r} is not understood; use one of {', '.join(_MODES)}.")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on ``tensors``, False for the twin."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(
                f"{KERNELS_ENV}=triton but Triton is not installed; install triton "
                f"or set {KERNELS_ENV}=torch (or auto).")
        return True
    return HAVE_TRITON and all(t.is_cuda for t in tensors)


def _check_kernel_launch(*tensors: torch.Tensor) -> None:
    """A one-line error naming the fix, where launching a kernel on ``tensors`` would fail obscurely.

    The device check, which needs triton, is :func:`model.triton_kernels.check_kernel_device`.
    """
    if not HAVE_TRITON:
        raise ValueError(f"Triton is not installed; install triton or set {KERNELS_ENV}=torch.")
    for tensor in tensors:
        if tensor.dtype not in KERNEL_DTYPES:
            raise ValueError(f"the Triton kernels take float32, float16 or bfloat16 tensors, got {tensor.dtype}; "
                             f"set {KERNELS_ENV}=torch (or auto) to use the PyTorch twins.")


# ==== Segment concatenation (LongAlign §3) ====
#
# Every segment (sentence) of every prompt was encoded on its own as a 77-token
# block. The context for a prompt keeps a contiguous run of rows from each of its
# blocks (for the paper's variant: <sot> plus the content tokens), puts the runs
# one after another, cuts the result at `max_tokens` rows and fills the rest with
# the fixed vector <pad*>, the mean of rows 17..76 of the empty prompt's encoding.
#
# Layout of the inputs, shared by twin and kernel:
#   hidden               [S, L, D]  encoder output of all S segments, prompt by prompt
#   kept_start, kept_len [S]        segment s contributes hidden[s, start : start + len]
#   segments_per_prompt  [B]        prompt b owns the next segments_per_prompt[b] blocks
#   pad                  [D]        <pad*>
# Output: [B, max_tokens, D] in hidden's dtype.


def _check_concat_inputs(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens):
    """Raise a clear ValueError for inputs that do not describe a valid layout."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [segments, tokens, dim], got shape {tuple(hidden.shape)}.")
    n_segments, block_len, dim = hidden.shape
    if kept_start.shape != (n_segments,) or kept_len.shape != (n_segments,):
        raise ValueError(
            f"kept_start and kept_len must both have shape [{n_segments}] (one entry per segment), "
            f"got {tuple(kept_start.shape)} and {tuple(kept_len.shape)}.")
    if segments_per_prompt.dim() != 1 or int(segments_per_prompt.sum()) != n_segments:
        raise ValueError(
            f"segments_per_prompt must be a 1-D tensor summing to the {n_segments} segments in hidden, "
            f"got {segments_per_prompt.tolist()}.")
    if bool((kept_start < 0).any() or (kept_len < 0).any() or (kept_start + kept_len > block_len).any()):
        raise ValueError(f"every kept run must lie inside its {block_len}-token block.")
    if pad.shape != (dim,):
        raise ValueError(f"pad must have shape [{dim}] to match hidden, got {tuple(pad.shape)}.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")


def concat_segments_torch(hidden: torch.Tensor, kept_start: torch.Tensor, kept_len: torch.Tensor,
                          segments_per_prompt: torch.Tensor, pad: torch.Tensor,
                          max_tokens: int) -> torch.Tensor:
    """Plain-PyTorch twin of the segment concatenation: the readable definition.

    For each prompt: take the kept run of every one of its segments in order,
    concatenate, truncate to ``max_tokens`` rows, pad with ``pad``. Differentiable.
    """
    _check_concat_inputs(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens)
    pad = pad.to(hidden.dtype)
    contexts, first = [], 0
    for count in segments_per_prompt.tolist():
        runs = [hidden[s, start:start + length] for s, start, length in
                zip(range(first, first + count), kept_start[first:first + count].tolist(),
                    kept_len[first:first + count].tolist())]
        kept = torch.cat(runs + [hidden.new_zeros(0, hidden.shape[2])])[:max_tokens]
        fill = pad.expand(max_tokens - kept.shape[0], -1)
        contexts.append(torch.cat([kept, fill]))
        first += count
    return torch.stack(contexts) if contexts else hidden.new_zeros(0, max_tokens, hidden.shape[2])


def concat_segments_triton(hidden: torch.Tensor, kept_start: torch.Tensor, kept_len: torch.Tensor,
                           segments_per_prompt: torch.Tensor, pad: torch.Tensor,
                           max_tokens: int) -> torch.Tensor:
    """Triton kernel for :func:`concat_segments_torch`, same signature, no autograd.

    Gather, truncation and <pad*> fill happen in one pass: each output row is
    read from its source (or from <pad*>) and written exactly once.
    """
    _check_concat_inputs(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens)
    _check_kernel_launch(hidden)
    from model import triton_kernels  # here, not at the top: importing triton is slow and the CPU path never needs it
    triton_kernels.check_kernel_device(triton_kernels.concat_segments_kernel, hidden)
    return triton_kernels.launch_concat_segments(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens)


def concat_segments(hidden: torch.Tensor, kept_start: torch.Tensor, kept_len: torch.Tensor,
                    segments_per_prompt: torch.Tensor, pad: torch.Tensor,
                    max_tokens: int) -> torch.Tensor:
    """Build the [B, max_tokens, D] contexts from per-segment encodings (LongAlign §3).

    Runs the Triton kernel when :func:`use_triton` says so, else the twin. The
    kernel has no backward, so when gradients must flow into ``hidden`` or
    ``pad`` the twin runs; so it does in auto mode for a dtype the kernel lacks.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or pad.requires_grad)
    fits = hidden.dtype in KERNEL_DTYPES or kernel_mode() == "triton"  # forced: the kernel says what it lacks
    if not needs_grad and fits and use_triton(hidden, pad):
        return concat_segments_triton(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens)
    return concat_segments_torch(hidden, kept_start, kept_len, segments_per_prompt, pad, max_tokens)


# ==== Score projection (LongAlign §4) ====

class ScoreParts(NamedTuple):
    """Per-pair scores of LongAlign §4 (each [B], float32 or wider).

    ``score`` is the reweighted reward ``relevant + ω·irrelevant`` and is the only output that carries a
    gradient (to the raw image embedding). The other four are reported values, without gradient.
    """

    score: torch.Tensor
    original: torch.Tensor
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    eta: torch.Tensor


def segment_text_embedding(segment_embeddings: torch.Tensor, segment_mask: torch.Tensor) -> torch.Tensor:
    """C_P: the plain mean of the L2-normalized segment embeddings of each prompt (LongAlign §4).

    ``segment_embeddings`` [B, S, P] (raw projections), ``segment_mask`` [B, S] (True = a real segment).
    The mean is deliberately NOT renormalized, so C_X·C_P is the mean of the per-segment cosines.
    """
    keep = (segment_mask != 0)[..., None]  # [B, S, 1]
    unit = torch.where(keep, F.normalize(segment_embeddings, dim=-1), 0.0)  # padding slots may hold anything
    return unit.sum(dim=1) / keep.sum(dim=1)


def reweighted_text(text_embedding: torch.Tensor, direction: torch.Tensor, omega: float) -> torch.Tensor:
    """T' = T − (1−ω)(T·V)V = C_P⊥ + ω·η·V (LongAlign §4): shrink the common-direction part by ω.

    The one definition of the split along the unit common direction V: ω = 0 gives the text-relevant part
    C_P⊥ = C_P − ηV, ω = 1 gives C_P back. ``text_embedding`` is [..., P], ``direction`` [P].
    """
    eta = text_embedding @ direction
    return text_embedding - (1.0 - omega) * eta[..., None] * direction


def score_projection_torch(image_embeddings: torch.Tensor, segment_embeddings: torch.Tensor,
                           segment_mask: torch.Tensor, direction: torch.Tensor, omega: float) -> ScoreParts:
    """The readable definition of the score projection (LongAlign §4), in plain differentiable PyTorch.

    With C_X = x/|x| (x the raw image embedding), C_P the segment mean and V the unit common direction:
      η = C_P·V,  original = C_X·C_P,  relevant = C_X·(C_P − ηV),  irrelevant = η·C_X·V,
      score = relevant + ω·irrelevant = C_X·T'   (T' from :func:`reweighted_text`).
    Only ``score`` keeps its autograd graph; gradients flow to every input that requires them.
    Computes in float32 (float64 stays float64).
    """
    _check_score_inputs(image_embeddings, segment_embeddings, segment_mask, direction, omega)
    dtype = torch.promote_types(image_embeddings.dtype, torch.float32)
    image_unit = F.normalize(image_embeddings.to(dtype), dim=-1)
    text = segment_text_embedding(segment_embeddings.to(dtype), segment_mask)
    direction = F.normalize(direction.to(dtype), dim=0)
    eta = text @ direction
    relevant = (image_unit * reweighted_text(text, direction, 0.0)).sum(-1)
    irrelevant = eta * (image_unit @ direction)
    score = (image_unit * reweighted_text(text, direction, omega)).sum(-1)
    original = (image_unit * text).sum(-1)
    return ScoreParts(score, original.detach(), relevant.detach(), irrelevant.detach(), eta.detach())


def _check_score_inputs(image_embeddings, segment_embeddings, segment_mask, direction, omega) -> None:
    """Raise a clear ValueError for shapes that do not fit together (the kernel would read past a tensor)."""
    if image_embeddings.dim() != 2:
        raise ValueError(f"image embeddings must be [B, P]; got shape {tuple(image_embeddings.shape)}.")
    batch, width = image_embeddings.shape
    if segment_embeddings.dim() != 3 or segment_embeddings.shape[0] != batch or segment_embeddings.shape[2] != width:
        raise ValueError(f"segment embeddings must be [B, S, P] = [{batch}, S, {width}]; "
                         f"got {tuple(segment_embeddings.shape)}.")
    if tuple(segment_mask.shape) != tuple(segment_embeddings.shape[:2]):
        raise ValueError(f"segment mask must be [B, S] = {tuple(segment_embeddings.shape[:2])}; "
                         f"got {tuple(segment_mask.shape)}.")
    if tuple(direction.shape) != (width,):
        raise ValueError(f"the common direction must be a [{width}] vector (the scorer's embed dim); "
                         f"got {tuple(direction.shape)}. Was it fitted with another scorer?")
    if not isinstance(omega, (int, float)):
        raise ValueError(f"omega must be a Python number; got {type(omega).__name__}.")
    if not bool((segment_mask != 0).any(dim=1).all()):
        raise ValueError("every prompt needs at least one segment, but a row of the segment mask is empty.")


def score_projection(image_embeddings: torch.Tensor, segment_embeddings: torch.Tensor,
                     segment_mask: torch.Tensor, direction: torch.Tensor, omega: float = 1.0) -> ScoreParts:
    """Segment-level score with its text-relevant / text-irrelevant decomposition and ω reweighting.

    Shapes: image embeddings [B, P] (raw projections, not normalized), segment embeddings [B, S, P]
    (raw), segment mask [B, S] (bool or 0/1), direction V [P] (normalized here). The gradient that
    reaches ``image_embeddings`` is that of ``score`` = relevant + ω·irrelevant; ω = 1 gives the original
    score's gradient, ω = 0 the text-relevant part's. "ω = 0 removes the pull along V" holds for the
    gradient with respect to C_X, where the score is linear (∂score/∂C_X = T', and T'·V = ω·η); at the raw
    x the normalization's Jacobian (I − C_X C_Xᵀ)/|x| mixes directions. Runs the Triton kernel or the
    twin (see :func:`use_triton`); in auto mode the twin also takes what the kernel cannot do: a text side
    that needs a gradient, or a dtype outside ``KERNEL_DTYPES``.
    """
    text_grad = torch.is_grad_enabled() and (segment_embeddings.requires_grad or direction.requires_grad)
    fits = not text_grad and {image_embeddings.dtype, segment_embeddings.dtype} <= set(KERNEL_DTYPES)
    fits = fits or kernel_mode() == "triton"  # forced: the kernel says what it cannot do
    if fits and use_triton(image_embeddings, segment_embeddings, segment_mask, direction):
        return score_projection_triton(image_embeddings, segment_embeddings, segment_mask, direction, omega)
    return score_projection_torch(image_embeddings, segment_embeddings, segment_mask, direction, omega)


class _ScoreProjectionFunction(torch.autograd.Function):
    """Autograd wiring for the kernel: the forward pass also writes ∂score/∂x, so backward is one multiply."""

    @staticmethod
    def forward(ctx, image_embeddings, segment_embeddings, segment_mask, direction, omega):
        from model import triton_kernels  # lazy, as in score_projection_triton (which has imported it already)
        parts, grad = triton_kernels.launch_score_projection(image_embeddings, segment_embeddings, segment_mask,
                                                             direction, omega, need_grad=True)
        ctx.image_dtype = image_embeddings.dtype
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(*parts[1:])
        return tuple(parts)

    @staticmethod
    def backward(ctx, grad_score, *_reported_values):
        if torch.is_grad_enabled():  # create_graph=True: this gradient would be differentiated again
            raise RuntimeError("double backward is not supported by the fused score-projection kernel (its "
                               f"gradient is a saved constant); set {KERNELS_ENV}=torch to use the twin.")
        (grad,) = ctx.saved_tensors
        grad_image = (grad_score[:, None] * grad).to(ctx.image_dtype)
        return grad_image, None, None, None, None


def score_projection_triton(image_embeddings: torch.Tensor, segment_embeddings: torch.Tensor,
                            segment_mask: torch.Tensor, direction: torch.Tensor, omega: float) -> ScoreParts:
    """The fused kernel behind :func:`score_projection`: same values and image gradient as the twin.

    One pass reads each row's image embedding, its segments and V once, and computes the normalizations,
    the segment mean, η, the scores and ∂score/∂x (computed in float32; only when a gradient is wanted).
    Text embeddings come from a frozen scorer, so no gradient flows to them or to V: passing text that
    requires grad is an error (use :func:`score_projection_torch` if you really need that gradient).
    """
    _check_score_inputs(image_embeddings, segment_embeddings, segment_mask, direction, omega)
    _check_kernel_launch(image_embeddings, segment_embeddings)
    from model import triton_kernels  # here, not at the top: importing triton is slow and the CPU path never needs it
    triton_kernels.check_kernel_device(triton_kernels.score_projection_kernel, image_embeddings, segment_embeddings)
    if torch.is_grad_enabled() and (segment_embeddings.requires_grad or direction.requires_grad):
        raise ValueError("the score-projection kernel gives no gradient to the text side (the scorer is frozen): "
                         "detach the segment embeddings and the direction, or use score_projection_torch.")
    # One input dtype (lossless, as the kernel computes in float32), so one compiled variant per dtype.
    dtype = torch.promote_types(image_embeddings.dtype, segment_embeddings.dtype)
    image, text = image_embeddings.to(dtype), segment_embeddings.to(dtype)
    if torch.is_grad_enabled() and image.requires_grad:
        return ScoreParts(*_ScoreProjectionFunction.apply(image, text, segment_mask, direction, omega))
    parts, _ = triton_kernels.launch_score_projection(image, text, segment_mask, direction, omega, need_grad=False)
    return ScoreParts(*parts)
