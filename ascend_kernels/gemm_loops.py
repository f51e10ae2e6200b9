"""SmoothGEMM building blocks shared by the tiled and the persistent (stream-K) primitives.

Device side: the tile order (grouped swizzle) and the two K loops, masked loads and tensor
descriptors. Host side: when tensor descriptors may be used on these operands.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile index -> (row tile, column tile) in grouped order: GROUP_M row tiles walk the
    same weight column panel one after the other while it sits in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def real_rows(num_tokens_ptr, num_rows, M_FROM_DEVICE: tl.constexpr):
    """The real M: read from the device (at most the rows the grid was sized for), or num_rows itself."""
    if M_FROM_DEVICE:
        m = tl.minimum(tl.load(num_tokens_ptr), num_rows)
    else:
        m = num_rows
    return m


@triton.jit
def masked_mainloop(x_ptr, w_ptr, acc, offs_m, offs_n, row_ok, col_ok, k_start, k_end,
                    stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    EVEN_N: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    SWAP_AB: tl.constexpr = False):
    """Portable K loop over [k_start, k_end): masked loads of the real rows only (padded rows read
    as zeros on chip). x_ptr: [M, K] activations; w_ptr: the weight through stride_wk / stride_wn.
    acc: [BLOCK_M, BLOCK_N], or its transpose [BLOCK_N, BLOCK_M] with SWAP_AB (see mma)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + (k_start + offs_k)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k + offs_k) < k_end
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_FP32, INPUT_PRECISION, SWAP_AB)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def make_descriptors(x_ptr, w_ptr, M, N, K, stride_xm, stride_wk, stride_wn, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_KN: tl.constexpr):
    """Descriptors over the real [M, K] rows: out-of-range rows are never fetched (the copy engine
    fills them with zeros on chip), so virtual padding holds on this path too."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_KN:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    return x_desc, w_desc


@triton.jit
def descriptor_mainloop(x_desc, w_desc, acc, off_m, off_n, k_start, k_end, BLOCK_K: tl.constexpr,
                        W_KN: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        SWAP_AB: tl.constexpr = False):
    """K loop over [k_start, k_end) through tensor descriptors (bulk copies on Hopper); acc as in
    masked_mainloop."""
    for k in range(k_start, k_end, BLOCK_K):
        a = x_desc.load([off_m, k])
        if W_KN:
            b = w_desc.load([k, off_n])
        else:
            b = w_desc.load([off_n, k]).T
        acc = mma(a, b, acc, DOT_FP32, INPUT_PRECISION, SWAP_AB)
    return acc


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc += a @ b for a: [BLOCK_M, BLOCK_K] activations, b: [BLOCK_K, BLOCK_N] weights.

    SWAP_AB computes the transpose, acc^T [BLOCK_N, BLOCK_M] += b^T @ a^T: the weight tile becomes
    the MMA's M side and the few token rows its N side. Hopper's wgmma needs M >= 64 but takes N
    down to 8, so 16-64 tokens still run on warpgroup MMAs reading the weight straight from shared
    memory, instead of padding the tokens up to 64 rows (or falling back to the older mma)::

        plain:    out[BM, BN] = x[BM, BK] @ W^T[BK, BN]        BM >= 64 for wgmma
        swapped:  out^T[BN, BM] = W[BN, BK] @ x^T[BK, BM]      BN >= 64, BM >= 8
    """
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if SWAP_AB:
        acc = tl.dot(b.T, a.T, acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. triton.cdiv is a constexpr_function, whose call costs
    microseconds of Python on every launch."""
    return -(-a // b)


@functools.cache
def cuda_capability(index: int) -> int:
    """The major compute capability of CUDA device `index` (cached: launch paths ask every call)."""
    return torch.cuda.get_device_capability(index)[0]


def _alloc_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for device-side tensor descriptors (Triton asks its allocator for it)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_ALLOCATOR_SET = False


def aligned_rows(*tensors: torch.Tensor) -> bool:
    """Unit inner strides, rows a multiple of 16 bytes apart and 16-byte aligned bases: what bulk
    copies and 16-byte vector loads of whole rows need."""
    return all(t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def tma_ok(x2d: torch.Tensor, *others: torch.Tensor) -> bool:
    """Descriptors need a Hopper+ GPU (or the CPU interpreter, which emulates them), unit inner
    strides and 16-byte aligned rows / bases of every 2-D operand they span (x, the weight, and the
    output where it is stored through one); otherwise the same config runs the masked loop."""
    global _ALLOCATOR_SET
    if x2d.is_cuda and cuda_capability(x2d.device.index) < 9:
        return False
    if not aligned_rows(x2d, *others):
        return False
    if x2d.is_cuda and not _ALLOCATOR_SET:
        triton.set_allocator(_alloc_scratch)
        _ALLOCATOR_SET = True
    return True


def dot_options(x2d: torch.Tensor) -> tuple[bool, str | None]:
    """(DOT_FP32, INPUT_PRECISION): the CPU interpreter gets bf16 tl.dot wrong, so operands are
    upcast there; fp32 inputs get exact fp32 products (not tf32), 16-bit ones the target default."""
    dot_fp32 = x2d.device.type == "cpu" and x2d.dtype != torch.float32
    precision = "ieee" if x2d.dtype == torch.float32 or dot_fp32 else None
    return dot_fp32, precision
