"""Score projection (LongAlign §4): the Triton kernel against its plain-PyTorch twin, and the maths itself.

On the CPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py), so these tests need no GPU; with
LONGALIGN_TEST_DEVICE=cuda they run on the GPU with the kernel compiled.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model import kernels
from model.kernels import (ScoreParts, reweighted_text, score_projection, score_projection_torch,
                           score_projection_triton, segment_text_embedding)

OMEGAS = (0.0, 0.3, 1.0)
DEVICE = torch.device(os.environ.get("LONGALIGN_TEST_DEVICE", "cpu"))  # see conftest.py


def random_inputs(batch, segments, width, seed, dtype=torch.float32):
    """Raw (unnormalized) embeddings, a ragged segment mask with at least one segment per row, and a V.

    Drawn on the CPU, so every device sees the same values, then moved to the test device.
    """
    gen = torch.Generator().manual_seed(seed)
    image = (3 * torch.randn(batch, width, generator=gen)).to(dtype)
    text = torch.randn(batch, segments, width, generator=gen).to(dtype)
    counts = torch.randint(1, segments + 1, (batch,), generator=gen)
    mask = torch.arange(segments)[None, :] < counts[:, None]
    direction = torch.randn(width, generator=gen).to(dtype)
    # give the texts a shared component, as real scorers have (the paper's Figure 2(b): η of 0.3..0.95)
    text = text + 2 * direction
    return tuple(tensor.to(DEVICE) for tensor in (image, text, mask, direction))


def image_gradient(fn, image, text, mask, direction, omega, upstream):
    image = image.detach().clone().requires_grad_(True)
    parts = fn(image, text, mask, direction, omega)
    (grad,) = torch.autograd.grad((parts.score * upstream).sum(), image)
    return parts, grad


@pytest.mark.parametrize("omega", OMEGAS)
@pytest.mark.parametrize("batch,segments,width,seed", [(1, 1, 8, 0), (5, 4, 37, 1), (7, 9, 130, 2)])
def test_kernel_matches_twin_values_and_gradients(batch, segments, width, seed, omega):
    image, text, mask, direction = random_inputs(batch, segments, width, seed)
    upstream = torch.randn(batch, generator=torch.Generator().manual_seed(seed + 100)).to(DEVICE)
    fused, grad_fused = image_gradient(score_projection_triton, image, text, mask, direction, omega, upstream)
    twin, grad_twin = image_gradient(score_projection_torch, image, text, mask, direction, omega, upstream)
    for name in ScoreParts._fields:
        torch.testing.assert_close(getattr(fused, name), getattr(twin, name), atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(grad_fused, grad_twin, atol=1e-6, rtol=1e-5)


def test_only_the_reweighted_score_carries_a_gradient():
    image, text, mask, direction = random_inputs(3, 2, 16, 3)
    image.requires_grad_(True)
    for fn in (score_projection_torch, score_projection_triton):
        parts = fn(image, text, mask, direction, 0.3)
        assert parts.score.requires_grad
        assert not any(getattr(parts, name).requires_grad for name in ScoreParts._fields[1:])


def test_twin_gradcheck_float64():
    """The twin is plain autograd; gradcheck confirms it is differentiable in image AND text (float64)."""
    image, text, mask, direction = random_inputs(3, 3, 6, 4, dtype=torch.float64)
    image.requires_grad_(True)
    text.requires_grad_(True)
    for omega in OMEGAS:
        assert torch.autograd.gradcheck(
            lambda x, t: score_projection_torch(x, t, mask, direction, omega).score, (image, text))


@pytest.mark.parametrize("fn", [score_projection_torch, score_projection_triton])
def test_decomposition_identities(fn):
    image, text, mask, direction = random_inputs(6, 5, 40, 5)
    for omega in OMEGAS:
        parts = fn(image, text, mask, direction, omega)
        torch.testing.assert_close(parts.original, parts.relevant + parts.irrelevant, atol=1e-6, rtol=0)
        torch.testing.assert_close(parts.score, parts.relevant + omega * parts.irrelevant, atol=1e-6, rtol=0)


def test_original_is_mean_of_per_segment_cosines():
    """LongAlign §4: with the un-renormalized mean, C_X·C_P equals the mean per-sentence cosine."""
    image, text, mask, direction = random_inputs(4, 3, 24, 6)
    cosines = F.cosine_similarity(image[:, None, :], text, dim=-1)  # [B, S]
    expected = (cosines * mask).sum(1) / mask.sum(1)
    for fn in (score_projection_torch, score_projection_triton):
        torch.testing.assert_close(fn(image, text, mask, direction, 1.0).original, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fn", [score_projection_torch, score_projection_triton])
def test_omega_one_reproduces_the_original_gradient(fn):
    """The reference gradient is taken through an independent formula: the masked mean of cosines."""
    image, text, mask, direction = random_inputs(5, 4, 33, 7)
    x = image.clone().requires_grad_(True)
    reference = (F.cosine_similarity(x[:, None, :], text, dim=-1) * mask).sum(1) / mask.sum(1)
    (expected,) = torch.autograd.grad(reference.sum(), x)
    _, grad = image_gradient(fn, image, text, mask, direction, 1.0, torch.ones(5, device=DEVICE))
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def gradient_at_unit_embedding(image, grad_raw, score):
    """∂score/∂C_X recovered from the gradient at the raw embedding x.

    "Along V" is measured in the space of the normalized image embedding C_X, where the score is linear:
    score = C_X·T'. At the raw x the normalization's Jacobian (I − C_X C_Xᵀ)/|x| mixes directions, so the
    raw gradient is not orthogonal to V even when T' is. Undo it: the Jacobian keeps |x|·grad_raw =
    (I − C_X C_Xᵀ) ∂score/∂C_X, and the component along C_X is C_X·∂score/∂C_X = score (a linear function
    of C_X), so ∂score/∂C_X = |x|·grad_raw + score·C_X.
    """
    norm = image.norm(dim=-1, keepdim=True)
    return norm * grad_raw + score[:, None] * image / norm


@pytest.mark.parametrize("fn", [score_projection_torch, score_projection_triton])
def test_omega_zero_removes_the_gradient_along_v(fn):
    image, text, mask, direction = random_inputs(6, 4, 48, 8)
    unit_v = F.normalize(direction, dim=0)
    along_v = {}
    for omega in (0.0, 1.0):
        parts, grad = image_gradient(fn, image, text, mask, direction, omega, torch.ones(6, device=DEVICE))
        along_v[omega] = gradient_at_unit_embedding(image, grad, parts.score) @ unit_v
    torch.testing.assert_close(along_v[0.0], torch.zeros(6, device=DEVICE), atol=1e-5, rtol=0)
    # the control: at ω = 1 the component along V is η itself, far from zero for these texts
    torch.testing.assert_close(along_v[1.0], parts.eta, atol=1e-5, rtol=1e-4)
    assert parts.eta.abs().min() > 0.3


def test_reweighted_text_matches_paper_formula():
    """T' = T − (1−ω)(T·V)V has η' = ω·η along V and leaves the orthogonal part unchanged."""
    image, text, mask, direction = random_inputs(4, 3, 20, 9)
    prompt = segment_text_embedding(text, mask)
    unit_v = F.normalize(direction, dim=0)
    reweighted = reweighted_text(prompt, unit_v, 0.3)
    torch.testing.assert_close(reweighted @ unit_v, 0.3 * (prompt @ unit_v))
    torch.testing.assert_close(reweighted - (reweighted @ unit_v)[:, None] * unit_v,
                               prompt - (prompt @ unit_v)[:, None] * unit_v)


def test_masked_out_slots_are_ignored_even_when_garbage():
    image, text, mask, direction = random_inputs(4, 5, 24, 10)
    dirty = text.masked_fill(~mask[..., None], float("nan"))
    for fn in (score_projection_torch, score_projection_triton):
        clean_parts = fn(image, text, mask, direction, 0.3)
        dirty_parts = fn(image, dirty, mask, direction, 0.3)
        for name in ScoreParts._fields:
            torch.testing.assert_close(getattr(dirty_parts, name), getattr(clean_parts, name), msg=name)


def test_half_precision_inputs_keep_their_dtype_for_the_gradient():
    image, text, mask, direction = random_inputs(3, 2, 64, 11)
    half = [t.half() if t.is_floating_point() else t for t in (image, text, mask, direction)]
    upstream = torch.ones(3, device=DEVICE)
    parts, grad = image_gradient(score_projection_triton, *half, 0.3, upstream)
    twin, grad_twin = image_gradient(score_projection_torch, *half, 0.3, upstream)
    assert grad.dtype == torch.float16 and parts.score.dtype == torch.float32
    torch.testing.assert_close(parts.score, twin.score, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, grad_twin, atol=1e-3, rtol=1e-2)


def test_dispatcher_follows_the_environment(monkeypatch):
    image, text, mask, direction = random_inputs(2, 2, 8, 12)
    text.requires_grad_(True)  # only the kernel refuses this, so it tells us which path ran
    monkeypatch.setenv("LONGALIGN_KERNELS", "torch")
    score_projection(image, text, mask, direction, 0.3)
    monkeypatch.setenv("LONGALIGN_KERNELS", "triton")
    with pytest.raises(ValueError, match="no gradient to the text side"):
        score_projection(image, text, mask, direction, 0.3)
    monkeypatch.setenv("LONGALIGN_KERNELS", "auto")  # the twin: for CPU tensors, or for text with grad
    score_projection(image, text, mask, direction, 0.3)


@pytest.mark.parametrize("change,message", [
    (lambda i, t, m, v: (i, t, m, v[:-1]), "common direction must be a \\[8\\] vector"),
    (lambda i, t, m, v: (i, t, torch.zeros_like(m), v), "at least one segment"),
    (lambda i, t, m, v: (i, t[:, :, :4], m, v), "segment embeddings must be"),
    (lambda i, t, m, v: (i, t, m[:, :1], v), "segment mask must be"),
    (lambda i, t, m, v: (i[0], t, m, v), "image embeddings must be"),
])
@pytest.mark.parametrize("fn", [score_projection, score_projection_torch, score_projection_triton])
def test_bad_inputs_get_clear_errors(fn, change, message):
    """The kernel checks as the twin does: a wrong shape would otherwise read past the end of a tensor."""
    inputs = change(*random_inputs(2, 3, 8, 13))
    with pytest.raises(ValueError, match=message):
        fn(*inputs, 0.3)


def test_offsets_past_two_to_the_31_elements():
    """Row 1's last segment starts (1·1025 + 1024)·2²⁰ > 2³¹ elements in: an int32 offset would wrap.

    On the CPU ``torch.empty`` only reserves address space, and the kernel skips masked-out segments, so the
    8 GiB storage costs a few MiB of real memory (on a GPU it is a real 8 GiB allocation). The text starts 2³¹
    elements into it: a wrapped offset then reads (zeros on the CPU, leftovers on a GPU) from inside our own
    allocation instead of crashing the test.
    """
    batch, segments, width = 2, 1025, 2 ** 20
    try:
        storage = torch.empty(2 ** 31 + batch * segments * width, dtype=torch.float16, device=DEVICE)
    except RuntimeError as refused:  # a machine that will not overcommit memory
        pytest.skip(f"cannot reserve 8 GiB of address space here: {refused}")
    text = storage[2 ** 31:].view(batch, segments, width)
    small_image, small_text, _, direction = random_inputs(batch, 1, width, 14, dtype=torch.float16)
    text[0, 0], text[1, -1] = small_text[0, 0], small_text[1, 0]
    mask = torch.zeros(batch, segments, dtype=torch.bool, device=DEVICE)
    mask[0, 0] = mask[1, -1] = True
    fused = score_projection_triton(small_image, text, mask, direction, 0.3)
    one_segment = torch.ones(batch, 1, dtype=torch.bool, device=DEVICE)
    twin = score_projection_torch(small_image, small_text, one_segment, direction, 0.3)
    for name in ScoreParts._fields:
        torch.testing.assert_close(getattr(fused, name), getattr(twin, name), atol=1e-4, rtol=1e-3, msg=name)


class FloatMatrices(TorchFunctionMode):
    """Records the shape of every float32 matrix a torch call returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 2:
            self.shapes.append(tuple(out.shape))
        return out


def test_no_grad_computes_no_image_gradient():
    image, text, mask, direction = (t.half() for t in random_inputs(3, 2, 40, 15))
    image.requires_grad_(True)
    for grad_enabled, made in ((True, True), (False, False)):  # with grad as the control: the [B, P] buffer
        with torch.set_grad_enabled(grad_enabled), FloatMatrices() as record:
            parts = score_projection_triton(image, text, mask, direction, 0.3)
        assert ((3, 40) in record.shapes) == made, record.shapes
        assert parts.score.requires_grad == grad_enabled


def test_the_five_outputs_are_independent_tensors():
    image, text, mask, direction = random_inputs(3, 2, 16, 16)
    image.requires_grad_(True)
    parts = score_projection_triton(image, text, mask, direction, 0.3)
    for name in ScoreParts._fields[1:]:
        getattr(parts, name).mul_(2)  # e.g. a caller rescaling a reported value in place
    parts.score.sum().backward()
    _, expected = image_gradient(score_projection_torch, image, text, mask, direction, 0.3,
                                 torch.ones(3, device=DEVICE))
    torch.testing.assert_close(image.grad, expected, atol=1e-6, rtol=1e-5)


def test_double_backward_names_the_twin():
    image, text, mask, direction = random_inputs(2, 2, 8, 17)
    image.requires_grad_(True)
    score = score_projection_triton(image, text, mask, direction, 0.3).score.sum()
    with pytest.raises(RuntimeError, match="double backward.*LONGALIGN_KERNELS=torch"):
        (grad,) = torch.autograd.grad(score, image, create_graph=True)
        grad.sum().backward()


def test_auto_mode_gives_text_that_requires_grad_to_the_twin(monkeypatch):
    image, text, mask, direction = random_inputs(2, 2, 8, 18)
    text.requires_grad_(True)
    monkeypatch.setenv("LONGALIGN_KERNELS", "auto")
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)  # as for CUDA tensors in auto mode
    score_projection(image, text, mask, direction, 0.3).score.sum().backward()
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_float64_takes_the_twin_in_auto_mode_and_is_refused_by_the_kernel(monkeypatch):
    image, text, mask, direction = random_inputs(2, 2, 8, 19, dtype=torch.float64)
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)
    assert score_projection(image, text, mask, direction, 0.3).score.dtype == torch.float64
    with pytest.raises(ValueError, match="float32, float16 or bfloat16.*LONGALIGN_KERNELS=torch"):
        score_projection_triton(image, text, mask, direction, 0.3)
