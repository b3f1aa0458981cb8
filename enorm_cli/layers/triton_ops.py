"""EN's passes over X as Triton kernels, for CUDA: what the tensor ops do in several launches
and temporaries, each in one pass.

EN's node touches X (N x C x H x W) in four places, all per (sample, channel) row: the
instance moments (``statistics.moments``), ``Y = A X + B`` (``fused_affine.affine_apply``),
and in backward the row sums of dY and dY X (``fused_affine.affine_grads``) and
``dX = A dY + alpha X + beta`` (``fused_affine.input_grad``). Here each is one kernel:

- ``row_sums``: per-row sums of (x - shift) and (x - shift)^2, or of dY and dY X, in float32,
  as a two-stage reduction (partial sums over chunks of H x W, then their sum; no atomics),
  the shift (each row's first value) against cancellation;
- ``affine``: ``A X + B`` (and ``A dY + alpha X + beta``) in one pass, in X's dtype.

Contiguous (NCHW) and channels_last (NHWC) inputs, float32 / bfloat16 / float16 with float32
statistics. The N x C math between the passes stays tensor ops. The tensor ops remain the
definition: the tests check these kernels against them under ``TRITON_INTERPRET=1`` on CPU
tensors. Triton is imported on first use; ``available()`` says whether it can run here.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
from torch import Tensor

BLOCK_C = 16
BLOCK_L = 128
CHUNKS_MAX = 64
"""Stage one splits each row's H x W into at most this many chunks (partial sums)."""


def interpreted() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def available() -> bool:
    """Whether Triton can run the kernels here: importable, and CUDA present (or the
    interpreter on)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreted() or torch.cuda.is_available()


def eligible(x: Tensor) -> bool:
    """A 4-D CUDA tensor (any CPU tensor under the interpreter) in NCHW or NHWC layout."""
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x.is_cuda or interpreted()):
        return False
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The @triton.jit kernels, defined on first use (``TRITON_INTERPRET`` is read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_sums_kernel(
        a_ptr,
        b_ptr,
        shift_ptr,
        out1_ptr,
        out2_ptr,
        C,
        L,
        chunk,
        sn,
        sc,
        sl,
        PRODUCT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Stage one: for BLOCK_C channels of sample n, over one chunk of the H x W axis,
        sum(a - shift) and sum((a - shift)^2), or with PRODUCT sum(a) and sum(a * b)."""
        n = tl.program_id(0)
        cb = tl.program_id(1)
        part = tl.program_id(2)
        chunks = tl.num_programs(2)
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        base = n * sn + cs * sc
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if not PRODUCT:
            shift = tl.load(shift_ptr + n * C + cs, mask=cmask, other=0.0)
        acc1 = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        start = part * chunk
        for offset in range(0, chunk, BLOCK_L):
            ls = start + offset + tl.arange(0, BLOCK_L)
            lmask = (ls < L) & (ls < start + chunk)
            mask = cmask[:, None] & lmask[None, :]
            idx = base[:, None] + ls[None, :] * sl
            va = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if PRODUCT:
                vb = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                acc1 += va
                acc2 += va * vb
            else:
                d = tl.where(mask, va - shift[:, None], 0.0)
                acc1 += d
                acc2 += d * d
        out = (n * chunks + part) * C + cs
        tl.store(out1_ptr + out, tl.sum(acc1, axis=1), mask=cmask)
        tl.store(out2_ptr + out, tl.sum(acc2, axis=1), mask=cmask)

    @triton.jit
    def affine_kernel(
        x_ptr,
        s_ptr,
        y_ptr,
        a_ptr,
        alpha_ptr,
        b_ptr,
        C,
        L,
        sn,
        sc,
        sl,
        HAS_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """y = a * s + alpha * x + b per (n, c) row (HAS_S), or y = alpha * x + b."""
        n = tl.program_id(0)
        cb = tl.program_id(1)
        lb = tl.program_id(2)
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        cmask = cs < C
        mask = cmask[:, None] & (ls < L)[None, :]
        idx = n * sn + cs[:, None] * sc + ls[None, :] * sl
        alpha = tl.load(alpha_ptr + n * C + cs, mask=cmask, other=0.0)
        b = tl.load(b_ptr + n * C + cs, mask=cmask, other=0.0)
        y = alpha[:, None] * tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) + b[:, None]
        if HAS_S:
            a = tl.load(a_ptr + n * C + cs, mask=cmask, other=0.0)
            y += a[:, None] * tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(row_sums=row_sums_kernel, affine=affine_kernel, triton=triton)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(sample, channel, position) strides of a 4-D NCHW or NHWC tensor, H x W as one axis."""
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    return x.stride(0), 1, x.stride(3)  # channels_last: C innermost, a position every C


def _row_sums(a: Tensor, b: Tensor | None, shift: Tensor | None) -> tuple[Tensor, Tensor]:
    """Two-stage per-row sums (see ``row_sums_kernel``): stage one's partials, then their sum."""
    k = _kernels()
    n, c, h, w = a.shape
    length = h * w
    chunks = max(1, min(CHUNKS_MAX, length // (4 * BLOCK_L)))
    chunk = -(-length // chunks)
    part1 = torch.empty(n, chunks, c, device=a.device, dtype=torch.float32)
    part2 = torch.empty_like(part1)
    grid = (n, k.triton.cdiv(c, BLOCK_C), chunks)
    product = b is not None
    k.row_sums[grid](
        a,
        b if product else a,
        shift if shift is not None else part1,
        part1,
        part2,
        c,
        length,
        chunk,
        *_strides(a),
        PRODUCT=product,
        BLOCK_C=BLOCK_C,
        BLOCK_L=BLOCK_L,
    )
    return part1.sum(1), part2.sum(1)


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (float32, N x C) of every (sample, channel) row of x, in one
    pass: sums shifted by each row's first value, so E[d^2] - E[d]^2 does not cancel."""
    length = x.shape[2] * x.shape[3]
    shift = x[:, :, 0, 0].float().contiguous()
    s1, s2 = _row_sums(x, None, shift)
    d = s1 / length
    return shift + d, (s2 / length - d * d).clamp_(min=0.0)


def grad_sums(x: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor]:
    """dL/dA = sum(dY X) and dL/dB = sum(dY) per row (float32, N x C), in one pass."""
    if grad_y.stride() != x.stride():
        grad_y = grad_y.contiguous(memory_format=_format(x))
    s1, s2 = _row_sums(grad_y, x, None)
    return s2, s1


def _format(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _affine(x: Tensor, s: Tensor | None, a: Tensor | None, alpha: Tensor, b: Tensor) -> Tensor:
    k = _kernels()
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    grid = (n, k.triton.cdiv(c, BLOCK_C), k.triton.cdiv(h * w, BLOCK_L))
    f32 = {"dtype": torch.float32}
    k.affine[grid](
        x,
        s if s is not None else x,
        y,
        a.to(**f32).contiguous() if a is not None else alpha,
        alpha.to(**f32).contiguous(),
        b.to(**f32).contiguous(),
        c,
        h * w,
        *_strides(x),
        HAS_S=s is not None,
        BLOCK_C=BLOCK_C,
        BLOCK_L=BLOCK_L,
    )
    return y


def affine_apply(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Y = A X + B with per-(sample, channel) A, B (N x C), in X's dtype and layout."""
    return _affine(x, None, None, a, b)


def input_grad(x: Tensor, grad_y: Tensor, a: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """dX = A dY + alpha X + beta (``fused_affine.input_grad``'s form), in X's dtype."""
    if grad_y.stride() != x.stride():
        grad_y = grad_y.contiguous(memory_format=_format(x))
    return _affine(x, grad_y, a, alpha, beta)
