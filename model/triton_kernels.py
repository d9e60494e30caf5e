"""The Triton programs behind model/kernels.py, and the code that launches them (grid, BLOCK sizes, num_warps).

model/kernels.py holds each kernel's plain-PyTorch twin (the readable definition), the input checks, the
dispatcher and the public wrappers; it imports this module only when a kernel is really launched, because
importing triton takes a noticeable part of a script's start and the CPU path never needs it. The launchers
here take inputs those wrappers have already checked.

Under ``TRITON_INTERPRET=1`` ``triton.jit`` makes interpreted kernels that run on any machine (how the tests
compare kernel and twin without a GPU); otherwise it makes compiled ones, which need CUDA tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels import KERNELS_ENV


def check_kernel_device(kernel, *tensors: torch.Tensor) -> None:
    """A one-line error naming the fix where a compiled ``kernel`` is given tensors that are not on CUDA."""
    # triton.jit makes a compiled JITFunction, or under TRITON_INTERPRET=1 an interpreted kernel that runs on any
    # machine. Triton's own message for a compiled one on a CPU-only machine, "0 active drivers", names no fix.
    if isinstance(kernel, triton.runtime.JITFunction) and not all(t.is_cuda for t in tensors):
        found = "a GPU was found" if torch.cuda.is_available() else "no GPU was found"
        raise ValueError(f"the compiled Triton kernels need CUDA tensors, got {tensors[0].device} ones and {found}: "
                         f"set TRITON_INTERPRET=1 to run them in Triton's interpreter, or {KERNELS_ENV}=torch "
                         f"for the PyTorch twins.")


def _index(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Index data as the kernels read it: int32 and contiguous (``.to`` keeps the strides of a strided view)."""
    return values.to(device=device, dtype=torch.int32).contiguous()


# ==== Segment concatenation (LongAlign §3); the input layout is described in model/kernels.py ====

@triton.jit
def concat_segments_kernel(hidden_ptr, kept_start_ptr, kept_len_ptr, first_segment_ptr,
                           segment_count_ptr, pad_ptr, out_ptr, max_tokens, dim, block_len,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program writes a BLOCK_T x BLOCK_D tile of one prompt's context, once.
    prompt = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)   # output rows of the tile
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)   # feature columns of the tile
    first = tl.load(first_segment_ptr + prompt)
    count = tl.load(segment_count_ptr + prompt)

    # Walk the prompt's segments to find, for every output row, the source row
    # in hidden viewed as [S * block_len, D]; -1 means "past the text: <pad*>".
    source_row = tl.full([BLOCK_T], -1, tl.int64)
    offset = tl.full([], 0, tl.int32)                        # rows filled by earlier segments
    for k in range(0, count):
        segment = first + k
        start = tl.load(kept_start_ptr + segment)
        length = tl.load(kept_len_ptr + segment)
        inside = (t >= offset) & (t < offset + length)
        row = segment.to(tl.int64) * block_len + start + (t - offset)
        source_row = tl.where(inside, row, source_row)
        offset += length

    row_ok = t < max_tokens
    col_ok = d < dim
    from_text = source_row >= 0
    text = tl.load(hidden_ptr + source_row[:, None] * dim + d[None, :],
                   mask=(from_text & row_ok)[:, None] & col_ok[None, :], other=0.0)
    pad = tl.load(pad_ptr + d, mask=col_ok, other=0.0)
    tile = tl.where(from_text[:, None], text, pad[None, :])
    out_row = prompt.to(tl.int64) * max_tokens + t
    tl.store(out_ptr + out_row[:, None] * dim + d[None, :], tile,
             mask=row_ok[:, None] & col_ok[None, :])


def launch_concat_segments(hidden: torch.Tensor, kept_start: torch.Tensor, kept_len: torch.Tensor,
                           segments_per_prompt: torch.Tensor, pad: torch.Tensor,
                           max_tokens: int) -> torch.Tensor:
    """Run :func:`concat_segments_kernel` on a checked layout: the [B, max_tokens, D] contexts, in hidden's dtype."""
    n_prompts = segments_per_prompt.shape[0]
    dim, block_len = hidden.shape[2], hidden.shape[1]
    out = torch.empty(n_prompts, max_tokens, dim, dtype=hidden.dtype, device=hidden.device)
    if n_prompts == 0:
        return out
    counts = _index(segments_per_prompt, hidden.device)
    first_segment = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    block_t, block_d = 16, 256
    grid = (n_prompts, triton.cdiv(max_tokens, block_t), triton.cdiv(dim, block_d))
    concat_segments_kernel[grid](
        hidden.contiguous(), _index(kept_start, hidden.device), _index(kept_len, hidden.device), first_segment,
        counts, pad.to(hidden.dtype).contiguous(), out, max_tokens, dim, block_len,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


# ==== Score projection (LongAlign §4) ====

@triton.jit
def score_projection_kernel(image_ptr, text_ptr, mask_ptr, direction_ptr, scores_ptr, grad_ptr,
                            batch, segments, width, omega,
                            NEED_GRAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per prompt: read x [P], its S segments [S, P] and V once; write 5 scores (and ∂score/∂x)."""
    row = tl.program_id(0).to(tl.int64)  # int64: (row·S + s)·P passes 2³¹ for a long batch of wide rows
    cols = tl.arange(0, BLOCK_P)
    inside = cols < width
    eps = 1e-12  # as F.normalize: divide by max(|v|, eps)

    x = tl.load(image_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
    x_norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
    image_unit = x / x_norm
    v = tl.load(direction_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), eps)

    text = tl.zeros([BLOCK_P], dtype=tl.float32)
    count = 0.0
    for s in range(segments):
        if tl.load(mask_ptr + row * segments + s) != 0:  # a padding slot costs no reads and no maths
            t = tl.load(text_ptr + (row * segments + s) * width + cols, mask=inside, other=0.0).to(tl.float32)
            text += t / tl.maximum(tl.sqrt(tl.sum(t * t, axis=0)), eps)
            count += 1.0
    text = text / count  # C_P, the un-renormalized segment mean

    eta = tl.sum(text * v, axis=0)
    along_v = tl.sum(image_unit * v, axis=0)
    original = tl.sum(image_unit * text, axis=0)
    relevant = tl.sum(image_unit * (text - eta * v), axis=0)
    irrelevant = eta * along_v
    text_omega = text - (1.0 - omega) * eta * v  # T'
    score = tl.sum(image_unit * text_omega, axis=0)

    tl.store(scores_ptr + 0 * batch + row, score)
    tl.store(scores_ptr + 1 * batch + row, original)
    tl.store(scores_ptr + 2 * batch + row, relevant)
    tl.store(scores_ptr + 3 * batch + row, irrelevant)
    tl.store(scores_ptr + 4 * batch + row, eta)
    if NEED_GRAD:
        # ∂(C_X·T')/∂x = (I − C_X C_Xᵀ) T' / |x| = (T' − score·C_X) / |x|
        tl.store(grad_ptr + row * width + cols, (text_omega - score * image_unit) / x_norm, mask=inside)


def launch_score_projection(image, text, mask, direction, omega, need_grad):
    """Five separate [B] float32 scores, and ∂score/∂x [B, P] when ``need_grad`` (else None)."""
    batch, segments, width = text.shape
    scores = torch.empty(5, batch, device=image.device, dtype=torch.float32)
    grad = torch.empty(batch, width, device=image.device, dtype=torch.float32) if need_grad else None
    score_projection_kernel[(batch,)](
        image.contiguous(), text.contiguous(), _index(mask != 0, image.device),
        direction.to(image.device, torch.float32).contiguous(), scores,
        scores if grad is None else grad,  # without NEED_GRAD the kernel writes no gradient: any pointer will do
        batch, segments, width, float(omega),
        NEED_GRAD=need_grad, BLOCK_P=triton.next_power_of_2(width), num_warps=4)
    # clones, not views of one buffer: an in-place change to one output then cannot affect another's autograd
    return [part.clone() for part in scores], grad
