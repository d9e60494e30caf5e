"""Ahead-of-time CUDA compilation of every Triton kernel in model/triton_kernels.py, for sm_80 and sm_90, no GPU.

The interpreter (TRITON_INTERPRET=1, which the other kernel tests use) runs a kernel as NumPy code and so hides
compile errors, loop-carried type changes and register spills. Here every public wrapper (in model/kernels.py)
is called once per dtype it accepts while each kernel object is replaced by a recorder: every launch it makes is
noted, and then compiled with exactly those argument types, BLOCK sizes and num_warps by triton's own compiler
and bundled ptxas. Spills are read from the cubin the way triton's driver reports ``n_spills``: the kernel's
local memory bytes / 4.

The compiling happens in a fresh Python process without TRITON_INTERPRET (this file run as a program): with
the interpreter on, triton's own ``@triton.jit`` helpers such as ``tl.sum`` are interpreted objects too, which
the compiler cannot inline (it runs them, and the interpreter's patches of ``triton.language`` then stay).
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import JITFunction, KernelInterface  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from model import clip, kernels, triton_kernels  # noqa: E402

ARCHS = (80, 90)
REPO = Path(__file__).resolve().parents[1]
KERNEL_NAMES = sorted(name for name, value in vars(triton_kernels).items() if isinstance(value, KernelInterface))


def ptxas_or_skip(arch: int) -> None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(arch)  # the ptxas triton compiles sm_{arch} with; RuntimeError when it cannot find one
    except (ImportError, RuntimeError) as missing:
        pytest.skip(f"the installed triton has no ptxas for sm_{arch} ({missing}), so nothing can be compiled")


def launch_source(kernel, args, kwargs) -> tuple[ASTSource, dict]:
    """The source and options triton's launcher would compile for ``kernel[grid](*args, **kwargs)``.

    Pointer and scalar types come from triton's own ``mangle_type``; like the launcher, a pointer whose
    address and an integer whose value is a multiple of 16 are marked divisible by 16.
    """
    fn = JITFunction(kernel.fn)  # from the Python source, whichever kind of object triton.jit made
    names = [param.name for param in fn.params]
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        signature[param.name] = mangle_type(value)
        address = value.data_ptr() if isinstance(value, torch.Tensor) else value
        if isinstance(address, int) and not isinstance(address, bool) and address % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in names}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def compile_for(arch: int, kernel, args, kwargs):
    source, options = launch_source(kernel, args, kwargs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def spilled_words(compiled) -> int:
    """Triton's ``n_spills``, read from the cubin: its CUDA driver divides the kernel's local memory by 4.

    That local memory is cuobjdump's STACK (the frame ptxas spills registers into) plus LOCAL (local arrays).
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               check=True, capture_output=True, text=True).stdout
    return sum(int(re.search(rf"\b{kind}:(\d+)", usage).group(1)) for kind in ("STACK", "LOCAL")) // 4


class Recorder:
    """Stands in for one kernel object: notes each launch instead of running it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, self.kernel, args, kwargs))


def run_every_wrapper() -> None:
    """Each wrapper in each accepted dtype, at the widths of the shipped CLIP configs (their BLOCK sizes)."""
    text_widths = sorted({config.text.width for config in clip.CONFIGS.values()})
    scorer_widths = sorted({config.projection_dim for config in clip.CONFIGS.values()})
    for dtype in kernels.KERNEL_DTYPES:
        for width in text_widths:
            hidden = torch.randn(3, 77, width).to(dtype)
            kernels.concat_segments_triton(hidden, torch.tensor([0, 0, 1]), torch.tensor([5, 9, 76]),
                                           torch.tensor([2, 1]), torch.zeros(width), 20)
        for width in scorer_widths:
            image, text = torch.randn(2, width, dtype=dtype), torch.randn(2, 3, width, dtype=dtype)
            mask, direction = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.randn(width)
            with torch.no_grad():
                kernels.score_projection_triton(image, text, mask, direction, 0.5)
            kernels.score_projection_triton(image.requires_grad_(True), text, mask, direction, 0.5)


def compile_report() -> dict:
    """Record every wrapper's launches, compile each distinct one per arch; what compiled, spilled or failed."""
    launches = []
    with pytest.MonkeyPatch.context() as patch:
        for name in KERNEL_NAMES:
            patch.setattr(triton_kernels, name, Recorder(name, getattr(triton_kernels, name), launches))
        run_every_wrapper()
    results, seen = [], set()
    for arch in ARCHS:
        for name, kernel, args, kwargs in launches:
            source, options = launch_source(kernel, args, kwargs)
            key = repr((arch, name, source.signature, source.constants, source.attrs, options))
            if key not in seen:  # e.g. two widths that specialize alike
                seen.add(key)
                results.append(dict(arch=arch, kernel=name, launch=key, **compile_outcome(arch, kernel, args, kwargs)))
    drift = compile_outcome(80, drifting_sum, (torch.zeros(1), 3), {})
    crowded = compile_outcome(80, crowded_scale, (torch.zeros(8192),), dict(BLOCK=8192, num_warps=1))
    return dict(kernels=KERNEL_NAMES, launched=sorted({name for name, *_ in launches}), results=results,
                drift=drift, crowded=crowded)


def compile_outcome(arch, kernel, args, kwargs) -> dict:
    try:
        return dict(spills=spilled_words(compile_for(arch, kernel, args, kwargs)), error=None)
    except Exception as error:  # reported, and failed on, by the tests below
        return dict(spills=None, error=f"{type(error).__name__}: {error}")


@pytest.fixture(scope="module")
def report():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_every_kernel_is_launched_by_a_wrapper(report):
    assert report["kernels"], "no Triton kernels found in model/triton_kernels.py"
    assert report["launched"] == report["kernels"] == KERNEL_NAMES
    # a kernel defined anywhere else would escape this check: model/kernels.py holds the twins and wrappers only
    assert not [name for name, value in vars(kernels).items() if isinstance(value, KernelInterface)]


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_compiles_without_spills(report, arch, name):
    ptxas_or_skip(arch)
    results = [result for result in report["results"] if result["arch"] == arch and result["kernel"] == name]
    assert results
    for result in results:
        assert result["error"] is None, f"{result['launch']}: {result['error']}"
        assert result["spills"] == 0, f"{name} spills {result['spills']} words on sm_{arch}: {result['launch']}"


@triton.jit
def drifting_sum(out_ptr, n):
    total = 0  # an int32 ...
    for _ in range(n):
        total += 0.5  # ... that becomes a float inside the loop: the interpreter does not mind, the compiler does
    tl.store(out_ptr, total)


@triton.jit
def crowded_scale(x_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))  # 8192 floats over one warp's 32 threads stay live across the sum
    tl.store(x_ptr + tl.arange(0, BLOCK), x / tl.sum(x, axis=0))


def test_the_check_catches_a_kernel_that_spills(report):
    ptxas_or_skip(80)
    assert report["crowded"]["error"] is None
    assert report["crowded"]["spills"] > 0


def test_the_check_catches_a_kernel_that_does_not_compile(report):
    ptxas_or_skip(80)
    out = torch.zeros(1)
    drifting_sum[(1,)](out, 3)
    assert out.item() == 1.5  # the interpreter ran it happily
    assert report["drift"]["spills"] is None
    assert re.search("CompilationError: .*[Ll]oop-carried variable total", report["drift"]["error"], re.S)


if __name__ == "__main__":
    print(json.dumps(compile_report()))
