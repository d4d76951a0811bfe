"""
CUDA implementations of the inference ops (ops.py), registered for them when this module is
imported (packed.py and engine.py do so when a GPU and Triton are there).

Decode (M <= 16 rows): one Triton kernel does the whole layer for each row of x:
  1. RMSNorm of the row (optional), its absmax and its int8 quantization: every program reads
     the full input row, which is at most a few KB and sits in L2, so no separate kernel or
     global sync is needed;
  2. the int8 activations times the 2-bit weights: a program owns tiles of BLOCK_R packed
     rows, i.e. 4 * BLOCK_R outputs (rows r, r + R, r + 2R, r + 3R), reads their bytes once
     as int32 words, and accumulates exact integer sums with dp4a (four int8 products per
     instruction): the 2-bit codes c = w + 1 of one row sit in a word's bytes after a shift
     and a mask, and sum(x * w) = sum(x * c) - sum(x), so each sum starts from minus the
     activations; the four rows' sums are reduced together, as one (BLOCK_R, 2, 2) tile;
  3. the epilogue: rescale by row_scale / s_x, then add the residual or apply relu(gate)^2 * up.
packed_gemv_row_kernel holds a whole row (K <= 8192) in registers, in chunks of 128 words, and
is persistent (a few programs per SM walk over the tiles, the next tile always in flight);
packed_gemv_kernel loops over K for wider rows. The weight bytes are read exactly once per row
of x.

Decode attention (torch.ops.bitnet.decode_attention, ops.py): one program per (kv head,
sequence) streams the cached keys and values of positions 0 .. pos once, for all the query
heads that share them (grouped-query attention), with an online softmax.

The decoding head (torch.ops.bitnet.lm_head_argmax, ops.py): logits = x @ lm_head^T as a
product over blocks of vocabulary rows, each block also leaving its first maximum, and the last
block to finish picking the greedy token, so greedy decoding needs no separate argmax kernels.
lm_head_rows_kernel reads each block of weights once for up to 16 rows of x, on the tensor
cores; in bfloat16 or float16 it takes one row too, as it streams the weights faster than a GEMV on the
CUDA cores does. A row of float32 goes through lm_head_kernel, that GEMV, as float32 tensor-core
products would be emulated. The weights may be int8 with a float32 scale per row
(Engine(int8_head=True)).

The float model's blocks (torch.ops.bitnet.linear, Engine(float_gemv=True)): for one row of x,
float_gemv_kernel, a bfloat16 GEMV built like the packed row kernel, over up to three weight matrices
side by side (q, k, v; gate, up), with the RMSNorm before and the residual add or relu^2 after
folded in; more rows go to cuBLAS.

On Hopper and newer (PDL), the GEMVs, decode attention and the lm_head kernels launch with
programmatic dependent launch: each may start while the kernel before it still runs, reads only
its own weights until that kernel has finished (_wait_for_previous_kernel), then lets the next
one start.

Prefill (M > 16): the weights are unpacked to int8 once per call and multiplied on the int8
tensor cores (torch._int_mm, int32 accumulation, exact), then rescaled; bench.py compares it
with unpacking to bfloat16 and a bfloat16 matmul.
"""

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bitlinear import unpack_ternary
from ops import (decode_attention, decode_attention_reference, linear, linear_reference, lm_head_argmax,
                 lm_head_argmax_reference, packed_linear, packed_linear_reference)


@triton.jit
def _normalize(xk, nw, rstd, out_ty, HAS_NORM: tl.constexpr, X_LOWP: tl.constexpr, NORM_LOWP: tl.constexpr):
    """x (float32) RMS-normalized the way bitlinear.RMSNorm rounds it: nw the norm weight
    (float32), rstd 1 / rms(x), out_ty x's own dtype."""
    if HAS_NORM:
        xk = xk * rstd
        if X_LOWP:  # F.rms_norm(x.float()).to(x.dtype)
            xk = xk.to(out_ty).to(tl.float32)
        xk = xk * nw
        if NORM_LOWP:  # weight * normed, both bfloat16 / float16
            xk = xk.to(out_ty).to(tl.float32)
    return xk


@triton.jit
def _load_input(x_row, norm_ptr, kk, K, rstd,
                HAS_NORM: tl.constexpr, X_LOWP: tl.constexpr, NORM_LOWP: tl.constexpr):
    """x[kk] in float32, RMS-normalized (_normalize)."""
    xk = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
    nw = 1.0
    if HAS_NORM:
        nw = tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    return _normalize(xk, nw, rstd, x_row.dtype.element_ty, HAS_NORM, X_LOWP, NORM_LOWP)


@triton.jit
def _dp4a(a, b, acc, ASM: tl.constexpr):
    """acc + the dot product of the 4 bytes of a (unsigned) and of b (signed), word by word:
    one dp4a instruction on the GPU; the same sum spelled out for Triton's CPU interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for j in tl.static_range(4):
            acc += ((a >> (8 * j)) & 255) * ((b << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def _quantize_words(xk, s_x):
    """Normalized activations (n, 4) in float32 -> their int8 values four to a word (n,) and minus
    each word's sum, the start of its dot product with 2-bit codes c = w + 1:
    sum(x * w) = sum(x * c) - sum(x)."""
    xq = tl.minimum(tl.maximum(libdevice.rint(xk * s_x), -128.0), 127.0).to(tl.int32)
    return tl.sum((xq & 255) << (8 * tl.arange(0, 4))[None, :], axis=1), -tl.sum(xq, axis=1)


@triton.jit
def _outputs(t, R, BLOCK_R: tl.constexpr):
    """The outputs held by tile t (packed rows t * BLOCK_R ...), as a (BLOCK_R, 2, 2) tensor:
    [b, i, k] is output r + (i + 2k) R of packed row r = t * BLOCK_R + b, and whether r < R."""
    rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, 2)[None, :, None] + 2 * tl.arange(0, 2)[None, None, :]
    return rows[:, None, None] + j * R, (rows < R)[:, None, None] & (j < 4)   # (j < 4: to the tile's shape)


@triton.jit
def _tile_scales(scale_ptr, res_row, t, R, N, EPILOGUE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile t's row scales and (EPILOGUE 1) residuals, (BLOCK_R, 2, 2) in float32."""
    outs, omask = _outputs(t, R, BLOCK_R)
    s = tl.load(scale_ptr + outs, mask=omask, other=0.0)
    r = s * 0.0
    if EPILOGUE == 1:
        r = tl.load(res_row + outs, mask=omask & (outs < N), other=0.0).to(tl.float32)
    return s, r


@triton.jit
def _finish_tile(c, s_x, s, r, y_row, t, R, N, EPILOGUE: tl.constexpr, BLOCK_R: tl.constexpr):
    """c (BLOCK_R, 2, 2): tile t's exact sums x . w -> rescaled by row_scale / s_x (the order of
    the integer line, bitlinear.integer_forward), then the epilogue (+ residual r, or
    relu(gate)^2 * up), stored."""
    y = c.to(tl.float32) * (s / s_x)
    outs, omask = _outputs(t, R, BLOCK_R)
    if EPILOGUE == 2:  # fused [gate; up], N = 2R: outputs r + iR are gate (k = 0) and up (k = 1)
        gate, up = tl.split(y)
        gate = tl.maximum(gate, 0.0)
        o, _ = tl.split(outs)
        om, _ = tl.split(omask)
        tl.store(y_row + o, (gate * gate * up).to(y_row.dtype.element_ty), mask=om)
    else:
        if EPILOGUE == 1:
            y = y + r
        tl.store(y_row + outs, y.to(y_row.dtype.element_ty), mask=omask & (outs < N))


@triton.jit
def _wait_for_previous_kernel(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper and newer, launch_pdl=True): a kernel may start while
    the previous one in the stream still runs, and reads nothing that kernel writes before this wait,
    which returns once it has finished and its writes are visible. Right after it, this kernel lets
    the next one start in turn, to read its own weights while this one works."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _row_chunks(ptr, t, ROWS, COLS, BLOCK: tl.constexpr, CH: tl.constexpr, J: tl.constexpr, EVICT: tl.constexpr):
    """Rows t * BLOCK ... of a (ROWS, COLS) matrix as J chunks of (BLOCK, CH): columns j * CH ..., zeros
    past its edges. EVICT: the loads' eviction policy ('' or 'evict_first')."""
    rows = t * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, CH)
    chunks = ()
    for j in tl.static_range(J):
        chunks = chunks + (tl.load(ptr + rows[:, None] * COLS + j * CH + offs[None, :],
                                   mask=(rows[:, None] < ROWS) & (j * CH + offs[None, :] < COLS), other=0,
                                   eviction_policy=EVICT),)
    return chunks


@triton.autotune(
    configs=[triton.Config({'BLOCK_R': r, 'WAVES': v}, num_warps=w)
             for r in (1, 2, 4) for w in (4, 8) for v in (1, 2, 4)],
    key=['R', 'K', 'X_ROWS'],
)
@triton.jit
def packed_gemv_row_kernel(x_ptr, norm_ptr, w_ptr, scale_ptr, res_ptr, y_ptr,
                           K, R, N, eps, X_ROWS,
                           HAS_NORM: tl.constexpr, X_LOWP: tl.constexpr, NORM_LOWP: tl.constexpr,
                           EPILOGUE: tl.constexpr, CH: tl.constexpr, J: tl.constexpr, ASM: tl.constexpr,
                           PDL: tl.constexpr, DEPTH: tl.constexpr, BLOCK_R: tl.constexpr, WAVES: tl.constexpr):
    """packed_gemv_kernel for rows held in registers (K <= 4 * ROW_WORDS), persistent: a
    few programs per SM (WAVES) each quantize the row once and then walk over tiles of BLOCK_R
    packed rows, tile t, t + programs, ... The next tile's words, scales and residuals are always
    in flight while the current one is multiplied, and the first tile's while the activations are
    prepared: a decoding step is a chain of such small kernels, so their latency is what counts.
    The row is cut into J chunks of CH words (CH a power of two, J * CH >= K / 4), not padded to a
    power of two as a whole (2560 inputs: 640 words, not 1024), and each chunk's dp4a adds onto the
    previous chunk's sums, so a tile's exact sums take one reduction over CH lanes at the end.
    DEPTH 2: the two next tiles in flight, the first two loaded before waiting (ROW_CONFIGS)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    programs = tl.num_programs(0)
    K4 = K // 4
    y_row = y_ptr + m * N
    res_row = res_ptr + m * N
    # the first tile's weights before waiting for the previous kernel: no kernel writes them
    p_next = _row_chunks(w_ptr, pid, R, K4, BLOCK_R, CH, J, '')
    if DEPTH == 2:
        p_after = _row_chunks(w_ptr, pid + programs, R, K4, BLOCK_R, CH, J, '')
    _wait_for_previous_kernel(PDL)
    s_next, r_next = _tile_scales(scale_ptr, res_row, pid, R, N, EPILOGUE, BLOCK_R)
    # the activations, read once: RMSNorm, absmax, int8, four to a word, chunk by chunk
    x_row = x_ptr + m * K
    kk = 4 * tl.arange(0, CH)[:, None] + tl.arange(0, 4)[None, :]                     # (CH, 4)
    xs = ()
    nws = ()
    ss = tl.zeros([CH, 4], dtype=tl.float32)
    for j in tl.static_range(J):
        xk = tl.load(x_row + 4 * j * CH + kk, mask=4 * j * CH + kk < K, other=0.0).to(tl.float32)
        xs = xs + (xk,)
        ss += xk * xk
        if HAS_NORM:
            nws = nws + (tl.load(norm_ptr + 4 * j * CH + kk, mask=4 * j * CH + kk < K, other=0.0).to(tl.float32),)
    rstd = 1.0
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(ss, axis=1), axis=0) / K + eps)
    amax = tl.zeros([CH, 4], dtype=tl.float32)
    xn = ()
    for j in tl.static_range(J):
        nw = 1.0
        if HAS_NORM:
            nw = nws[j]
        xk = _normalize(xs[j], nw, rstd, x_row.dtype.element_ty, HAS_NORM, X_LOWP, NORM_LOWP)
        xn = xn + (xk,)
        amax = tl.maximum(amax, tl.abs(xk))
    s_x = 127.0 / tl.maximum(tl.max(tl.max(amax, axis=1), axis=0), 1e-5)
    xw = ()
    neg = tl.zeros([CH], dtype=tl.int32)
    for j in tl.static_range(J):
        w_j, n_j = _quantize_words(xn[j], s_x)
        xw = xw + (tl.broadcast_to(w_j[None, :], (BLOCK_R, CH)),)
        neg += n_j
    neg = tl.broadcast_to(neg[None, :], (BLOCK_R, CH))   # each lane's dp4a sums start from minus its activations
    for t in range(pid, tl.cdiv(R, BLOCK_R), programs):
        p, s, r = p_next, s_next, r_next
        if DEPTH == 2:
            p_next = p_after
            p_after = _row_chunks(w_ptr, t + 2 * programs, R, K4, BLOCK_R, CH, J, '')
        else:
            p_next = _row_chunks(w_ptr, t + programs, R, K4, BLOCK_R, CH, J, '')
        s_next, r_next = _tile_scales(scale_ptr, res_row, t + programs, R, N, EPILOGUE, BLOCK_R)
        a0, a1, a2, a3 = neg, neg, neg, neg
        for j in tl.static_range(J):
            a0 = _dp4a(p[j] & 0x03030303, xw[j], a0, ASM)            # rows r
            a1 = _dp4a((p[j] >> 2) & 0x03030303, xw[j], a1, ASM)     # rows r + R
            a2 = _dp4a((p[j] >> 4) & 0x03030303, xw[j], a2, ASM)     # rows r + 2R
            a3 = _dp4a((p[j] >> 6) & 0x03030303, xw[j], a3, ASM)     # rows r + 3R
        d = tl.join(tl.join(a0, a1), tl.join(a2, a3))                # (BLOCK_R, CH, 2, 2)
        _finish_tile(tl.sum(d, axis=1), s_x, s, r, y_row, t, R, N, EPILOGUE, BLOCK_R)


@triton.autotune(
    configs=[
        triton.Config({'BLOCK_R': 2, 'BLOCK_W': 256}, num_warps=4),
        triton.Config({'BLOCK_R': 4, 'BLOCK_W': 128}, num_warps=4),
        triton.Config({'BLOCK_R': 4, 'BLOCK_W': 256}, num_warps=4),
        triton.Config({'BLOCK_R': 8, 'BLOCK_W': 64}, num_warps=4),
        triton.Config({'BLOCK_R': 8, 'BLOCK_W': 128}, num_warps=4),
        triton.Config({'BLOCK_R': 16, 'BLOCK_W': 64}, num_warps=4),
        triton.Config({'BLOCK_R': 16, 'BLOCK_W': 128}, num_warps=8),
        triton.Config({'BLOCK_R': 32, 'BLOCK_W': 32}, num_warps=4),
    ],
    key=['R', 'K', 'X_ROWS'],
)
@triton.jit
def packed_gemv_kernel(x_ptr, norm_ptr, w_ptr, scale_ptr, res_ptr, y_ptr,
                       K, R, N, eps, X_ROWS,
                       HAS_NORM: tl.constexpr, X_LOWP: tl.constexpr, NORM_LOWP: tl.constexpr,
                       EPILOGUE: tl.constexpr, BLOCK_X: tl.constexpr, ASM: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """w_ptr: the packed bytes (R, K) read as int32 words (K % 4 == 0): word (r, j) holds the
    2-bit codes (w + 1) of rows r, r + R, r + 2R, r + 3R at k = 4j .. 4j + 3, byte by byte.
    X_ROWS (M rounded up to a power of two) only keys the autotuner: the grid holds a set of programs
    per row of x, so the best tiles depend on the rows, and 1, 2, 4, 8 and 16 rows are tuned apart."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    x_row = x_ptr + m * K
    offs_x = tl.arange(0, BLOCK_X)

    # 1. RMSNorm statistics and the activation scale, over the whole row
    rstd = 1.0
    if HAS_NORM:
        ss = tl.zeros([BLOCK_X], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_X):
            xk = tl.load(x_row + k0 + offs_x, mask=k0 + offs_x < K, other=0.0).to(tl.float32)
            ss += xk * xk
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    amax = tl.zeros([BLOCK_X], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_X):
        xk = _load_input(x_row, norm_ptr, k0 + offs_x, K, rstd, HAS_NORM, X_LOWP, NORM_LOWP)
        amax = tl.maximum(amax, tl.abs(xk))
    s_x = 127.0 / tl.maximum(tl.max(amax, axis=0), 1e-5)

    # 2. int8 activations, 4 to a word, against the words of 2-bit codes: with codes c = w + 1,
    #    sum(x * w) = sum(x * c) - sum(x), so each byte of codes goes into dp4a as it is
    K4 = K // 4
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.arange(0, BLOCK_W)
    acc0 = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for w0 in range(0, K4, BLOCK_W):
        ww = w0 + offs_w
        kk = 4 * ww[:, None] + tl.arange(0, 4)[None, :]                              # (BLOCK_W, 4)
        xk = _load_input(x_row, norm_ptr, kk, K, rstd, HAS_NORM, X_LOWP, NORM_LOWP)
        xw, neg = _quantize_words(xk, s_x)
        xw = tl.broadcast_to(xw[None, :], (BLOCK_R, BLOCK_W))
        neg = tl.broadcast_to(neg[None, :], (BLOCK_R, BLOCK_W))
        p = tl.load(w_ptr + offs_r[:, None] * K4 + ww[None, :],
                    mask=(offs_r[:, None] < R) & (ww[None, :] < K4), other=0)
        acc0 = _dp4a(p & 0x03030303, xw, acc0 + neg, ASM)            # rows r
        acc1 = _dp4a((p >> 2) & 0x03030303, xw, acc1 + neg, ASM)     # rows r + R
        acc2 = _dp4a((p >> 4) & 0x03030303, xw, acc2 + neg, ASM)     # rows r + 2R
        acc3 = _dp4a((p >> 6) & 0x03030303, xw, acc3 + neg, ASM)     # rows r + 3R
    s, r = _tile_scales(scale_ptr, res_ptr + m * N, pid, R, N, EPILOGUE, BLOCK_R)
    c = tl.sum(tl.join(tl.join(acc0, acc1), tl.join(acc2, acc3)), axis=1)
    _finish_tile(c, s_x, s, r, y_ptr + m * N, pid, R, N, EPILOGUE, BLOCK_R)


@triton.jit
def unpack_kernel(p_ptr, out_ptr, R, K, ROWS, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(R, K) packed bytes -> (ROWS, K) int8 in {-1, 0, 1}: byte (r, k) holds rows r + i * R."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k[None, :] < K
    p = tl.load(p_ptr + offs_r[:, None] * K + offs_k[None, :], mask=(offs_r[:, None] < R) & kmask, other=0).to(tl.int32)
    for i in tl.static_range(4):
        rows = offs_r + i * R
        tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], (((p >> (2 * i)) & 3) - 1).to(tl.int8),
                 mask=(offs_r[:, None] < R) & (rows[:, None] < ROWS) & kmask)


def unpack_int8(packed, rows):
    """unpack_ternary in one kernel: (R, K) uint8 -> (rows, K) int8."""
    R, K = packed.shape
    out = torch.empty(rows, K, dtype=torch.int8, device=packed.device)
    unpack_kernel[(triton.cdiv(R, 32), triton.cdiv(K, 256))](packed, out, R, K, rows, BLOCK_R=32, BLOCK_K=256)
    return out


def int8_matmul(x_int, packed, rows):
    """int8 activations (M, K) x unpacked int8 weights on the int8 tensor cores (exact int32 sums)."""
    w_t = unpack_int8(packed, rows)
    if x_int.size(1) % 8 == 0 and rows % 8 == 0:
        return torch._int_mm(x_int, w_t.t()).float()
    return F.linear(x_int.float(), w_t.float())


def bf16_matmul(x_int, packed, rows):
    """Unpack-then-matmul, the plain way: the weights unpacked to bfloat16 and a bfloat16 matmul
    (float32 accumulation, the result rounded to bfloat16). bench.py's baseline for prefill."""
    return F.linear(x_int.to(torch.bfloat16), unpack_ternary(packed, rows).to(torch.bfloat16)).float()


@functools.cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _hopper(device):
    return torch.cuda.get_device_capability(device)[0] >= 9


PDL = True   # on Hopper and newer, the decoding kernels launch with programmatic dependent launch (read at
             # each launch: a CUDA graph keeps what it was captured with; bench.py --pdl=False,True times both)


def _launch_pdl(device):
    """Whether the decoding kernels launch with programmatic dependent launch (_wait_for_previous_kernel)."""
    return PDL and _hopper(device)


ROW_WORDS = 2048   # rows of up to 4 * ROW_WORDS inputs go through packed_gemv_row_kernel ...
ROW_CONFIGS = {    # (R, K) -> BLOCK_R, WAVES, num_warps, DEPTH for one row of x, instead of the autotuner's pick
                   # (which times each kernel alone, changes between processes and has no 8-row tiles); timed
                   # in CUDA graphs of 30 such kernels on an H200 (docs/kernels.md, section 5), us per kernel:
    (960, 2560): (8, 1, 4, 1),    # 2B4T qkv: 2.49 against the autotuner's 2.63
    (640, 2560): (8, 1, 8, 1),    # 2B4T o: 2.44 against 3.08
    (3456, 2560): (8, 2, 4, 1),   # 2B4T gate+up: 4.65 against 5.05
    (640, 6912): (8, 1, 8, 2),    # 2B4T down: 4.40 against 5.03 (two tiles in flight)
}
CHUNK_WORDS = 128  # ... in chunks of this many words (measured on an H100: 128 beat 64 and the whole row)
DECODE_ROWS = 16   # x with up to this many rows goes through the GEMV kernels (one pass over the
                   # weights per row; in a graph, 16 rows of a 2B4T projection take 5-8x one row's
                   # time, 1.3-2.5x less than int8_matmul with its element-wise steps), more rows
                   # through int8_matmul


@packed_linear.register_kernel('cuda')
def packed_linear_cuda(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps):
    M, K = x.shape
    if M > DECODE_ROWS:
        return packed_linear_reference(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps,
                                       matmul=int8_matmul)
    if K % 4 or not packed.is_contiguous() or packed.data_ptr() % 4:   # the kernel reads int32 words
        return packed_linear_reference(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps)
    x = x.contiguous()
    R = packed.size(0)
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    has_norm = norm_weight.numel() > 0
    lowp = x.dtype in (torch.bfloat16, torch.float16)
    grid = lambda meta: (triton.cdiv(R, meta['BLOCK_R']), M)
    persistent = lambda meta: (min(triton.cdiv(R, meta['BLOCK_R']), meta['WAVES'] * _sm_count(x.device)), M)
    args = (x, norm_weight if has_norm else x, packed.view(torch.int32), row_scale,
            residual.contiguous() if epilogue == 1 else y, y, K, R, out_features, eps, triton.next_power_of_2(M))
    flags = dict(HAS_NORM=has_norm, X_LOWP=lowp, NORM_LOWP=lowp and has_norm and norm_weight.dtype == x.dtype,
                 EPILOGUE=epilogue, ASM=True)
    if K <= 4 * ROW_WORDS:
        ch = min(CHUNK_WORDS, triton.next_power_of_2(K // 4))
        pdl = _launch_pdl(x.device)
        chunks = dict(CH=ch, J=triton.cdiv(K // 4, ch), PDL=pdl, launch_pdl=pdl, **flags)
        if M == 1 and (R, K) in ROW_CONFIGS:
            block_r, waves, warps, depth = ROW_CONFIGS[R, K]
            tiles = dict(BLOCK_R=block_r, WAVES=waves)
            packed_gemv_row_kernel.fn[persistent(tiles)](*args, DEPTH=depth, num_warps=warps, **tiles, **chunks)
        else:
            packed_gemv_row_kernel[persistent](*args, DEPTH=1, **chunks)
    else:
        packed_gemv_kernel[grid](*args, BLOCK_X=min(triton.next_power_of_2(K), 8192), **flags)
    return y


@triton.jit
def decode_attention_kernel(qkv_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, cos_ptr, sin_ptr, scale,
                            stride_pos, stride_kb, stride_kh, stride_kl,
                            NH: tl.constexpr, NKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
                            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    _wait_for_previous_kernel(PDL)
    HALF: tl.constexpr = HD // 2
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    pos = tl.load(pos_ptr + b * stride_pos)     # this sequence's position (stride 0: one for all)
    cache_ty = k_ptr.dtype.element_ty
    row = qkv_ptr + b * (NH + 2 * NKV) * HD
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HD)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    c = tl.load(cos_ptr + pos * HD + offs_h)       # the tables repeat each frequency in both halves
    s = tl.load(sin_ptr + pos * HD + offs_h)

    # the new key (rotated) and value, written into the cache at pos
    k_row = row + (NH + kvh) * HD
    k1 = tl.load(k_row + offs_h).to(tl.float32)
    k2 = tl.load(k_row + HALF + offs_h).to(tl.float32)
    k1, k2 = (k1 * c - k2 * s).to(cache_ty), (k2 * c + k1 * s).to(cache_ty)
    v_new = tl.load(row + (NH + NKV + kvh) * HD + offs_d).to(cache_ty)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_kb + kvh * stride_kh
    tl.store(k_base + pos * stride_kl + offs_h, k1)
    tl.store(k_base + pos * stride_kl + HALF + offs_h, k2)
    tl.store(v_base + pos * stride_kl + offs_d, v_new)

    # the G query heads of this kv head, rotated
    q_rows = row + (kvh * G + offs_g)[:, None] * HD
    q1 = tl.load(q_rows + offs_h[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + offs_h[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q1, q2 = (q1 * c[None, :] - q2 * s[None, :]).to(cache_ty), (q2 * c[None, :] + q1 * s[None, :]).to(cache_ty)

    # attention over the cached positions 0 .. pos - 1 (online softmax), then the new one
    m_i = tl.full([BLOCK_G], float('-inf'), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HD], dtype=tl.float32)
    for n0 in range(0, pos, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < pos
        kc1 = tl.load(k_base + offs_n[:, None] * stride_kl + offs_h[None, :], mask=nmask[:, None], other=0.0)
        kc2 = tl.load(k_base + offs_n[:, None] * stride_kl + HALF + offs_h[None, :], mask=nmask[:, None], other=0.0)
        vc = tl.load(v_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=nmask[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q1, tl.trans(kc1), input_precision='ieee') + tl.dot(q2, tl.trans(kc2), input_precision='ieee')
        else:
            sc = tl.dot(q1, tl.trans(kc1)) + tl.dot(q2, tl.trans(kc2))
        sc = tl.where(nmask[None, :], sc * scale, float('-inf'))             # (BLOCK_G, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vc.to(tl.float32), input_precision='ieee')
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(cache_ty), vc)
        m_i = m_new
    s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
             + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scale
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    p_new = tl.exp(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    out = acc / l_i[:, None]
    o_rows = o_ptr + b * NH * HD + (kvh * G + offs_g)[:, None] * HD + offs_d[None, :]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])


@decode_attention.register_kernel('cuda')
def decode_attention_cuda(qkv, k_cache, v_cache, pos, cos, sin, n_head):
    B = qkv.size(0)
    NKV, HD = k_cache.size(1), k_cache.size(3)
    if HD & (HD - 1) or HD < 32 or k_cache.stride(3) != 1 or pos.numel() not in (1, B) or v_cache.stride() != k_cache.stride() \
            or not qkv.is_contiguous() or not cos.is_contiguous():
        return decode_attention_reference(qkv, k_cache, v_cache, pos, cos, sin, n_head)
    out = torch.empty(B, n_head * HD, device=qkv.device, dtype=qkv.dtype)
    G = n_head // NKV
    pdl = _launch_pdl(qkv.device)
    ieee = k_cache.dtype == torch.float32   # float32 tiles of 128 positions need too much shared memory
    decode_attention_kernel[(NKV, B)](
        qkv, k_cache, v_cache, out, pos, cos, sin, HD ** -0.5,
        pos.stride(0) if pos.dim() else 0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=n_head, NKV=NKV, G=G, HD=HD, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=64 if ieee else 128, IEEE=ieee, PDL=pdl, num_warps=4 if ieee else 8, launch_pdl=pdl)
    return out


LM_HEAD_MAX_ROWS = 4096   # rows of x the kernel takes (one done-counter each); more go to the reference


@functools.cache
def _lm_head_counts(device):
    """lm_head_kernel's done-counters, one per row of x, zero between calls (the program that
    finishes a row sets its count back). Allocated once per device, at the first call (the
    engine's warm-up, before any CUDA graph is captured)."""
    return torch.zeros(LM_HEAD_MAX_ROWS, dtype=torch.int32, device=device)


@triton.jit
def lm_head_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, best_ptr, at_ptr, count_ptr, token_ptr, V, C, BLOCKS,
                   HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                   PDL: tl.constexpr):
    """logits = x @ w^T for decoding in float32, and the greedy token: program (block, m) computes the
    logits of rows block * BLOCK_V ... of w for row m of x, stores them in y's dtype, and leaves
    the first of their maxima (value and index, of the stored values) in best_ptr / at_ptr (an int8
    w (HAS_SCALE): each row's float32 sum times its scale before the rounding to y's dtype); the
    last program of row m to finish finds the first maximum over the blocks, writes its index
    to token_ptr and sets the row's count back to 0."""
    _wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < V
    acc = tl.zeros([BLOCK_V, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + m * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & (cols[None, :] < C), other=0.0,
                    eviction_policy='evict_first')   # read once: keep L2 for the rest
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m * V + rows, y, mask=rmask)
    yf = tl.where(rmask, y.to(tl.float32), float('-inf'))
    tl.store(best_ptr + m * BLOCKS + pid, tl.max(yf, axis=0))
    tl.store(at_ptr + m * BLOCKS + pid, pid * BLOCK_V + tl.argmax(yf, axis=0, tie_break_left=True))
    tl.debug_barrier()                                           # every thread's stores before the count
    done = tl.atomic_add(count_ptr + m, 1, sem='acq_rel')
    if done == BLOCKS - 1:
        tl.atomic_xchg(count_ptr + m, 0, sem='relaxed')
        # lane j keeps the first maximum of blocks j, j + BLOCK_B, ...; then the first lane's of the largest
        best = tl.full([BLOCK_B], float('-inf'), dtype=tl.float32)
        first = tl.zeros([BLOCK_B], dtype=tl.int32)
        for b0 in range(0, BLOCKS, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            v = tl.load(best_ptr + m * BLOCKS + blocks, mask=blocks < BLOCKS, other=float('-inf'), cache_modifier='.cg')
            take = v > best
            best = tl.where(take, v, best)
            first = tl.where(take, blocks, first)
        top = tl.max(best, axis=0)
        block = tl.min(tl.where(best == top, first, BLOCKS), axis=0)
        tl.store(token_ptr + m, tl.load(at_ptr + m * BLOCKS + block, cache_modifier='.cg').to(tl.int64))


@triton.jit
def lm_head_rows_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, best_ptr, at_ptr, count_ptr, token_ptr, B, V, C, BLOCKS,
                        HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """lm_head_kernel for several rows of x (a batch of sequences): program (block, mt) multiplies
    its BLOCK_V rows of w, read once, with rows mt * BLOCK_M ... of x on the tensor cores (float32
    sums; IEEE: float32 operands), so a step of a batch reads the weights once, not once per
    sequence. Logits, the blocks' maxima and the greedy tokens as lm_head_kernel leaves them; one
    done-counter per tile of BLOCK_M rows."""
    _wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    mt = tl.program_id(1)
    ms = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = ms < B
    rows = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < V
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        x = tl.load(x_ptr + ms[:, None] * C + cols[None, :], mask=mmask[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0,
                    eviction_policy='evict_first')
        w = w.to(x.dtype)   # int8 codes are exact in bfloat16 and float32
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision='ieee')
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)                                          # (BLOCK_M, BLOCK_V)
    tl.store(y_ptr + ms[:, None] * V + rows[None, :], y, mask=mmask[:, None] & rmask[None, :])
    yf = tl.where(rmask[None, :], y.to(tl.float32), float('-inf'))
    tl.store(best_ptr + ms * BLOCKS + pid, tl.max(yf, axis=1), mask=mmask)
    tl.store(at_ptr + ms * BLOCKS + pid, pid * BLOCK_V + tl.argmax(yf, axis=1, tie_break_left=True), mask=mmask)
    tl.debug_barrier()                                           # every thread's stores before the count
    done = tl.atomic_add(count_ptr + mt, 1, sem='acq_rel')
    if done == BLOCKS - 1:
        tl.atomic_xchg(count_ptr + mt, 0, sem='relaxed')
        # per row: lane j keeps the first maximum of blocks j, j + BLOCK_B, ...; then the first lane's of the largest
        best = tl.full([BLOCK_M, BLOCK_B], float('-inf'), dtype=tl.float32)
        first = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.int32)
        for b0 in range(0, BLOCKS, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            v = tl.load(best_ptr + ms[:, None] * BLOCKS + blocks[None, :], mask=mmask[:, None] & (blocks < BLOCKS)[None, :],
                        other=float('-inf'), cache_modifier='.cg')
            take = v > best
            best = tl.where(take, v, best)
            first = tl.where(take, blocks[None, :], first)
        top = tl.max(best, axis=1)
        block = tl.min(tl.where(best == top[:, None], first, BLOCKS), axis=1)
        block = tl.where(mmask, block, 0)
        token = tl.load(at_ptr + ms * BLOCKS + block, mask=mmask, other=0, cache_modifier='.cg')
        tl.store(token_ptr + ms, token.to(tl.int64), mask=mmask)


LM_HEAD_BLOCK_V, LM_HEAD_BLOCK_C, LM_HEAD_WARPS = 64, 256, 4   # fixed (not autotuned): the float sums' order with them
LM_HEAD_ROWS = 16   # rows of x per program in lm_head_rows_kernel (batches of 2 or more; tl.dot needs 16)


@lm_head_argmax.register_kernel('cuda')
def lm_head_argmax_cuda(x, weight, scale=None):
    B, C = x.shape
    V = weight.size(0)
    if not weight.is_contiguous() or B > LM_HEAD_MAX_ROWS:
        return lm_head_argmax_reference(x, weight, scale)
    x = x.contiguous()
    blocks = triton.cdiv(V, LM_HEAD_BLOCK_V)
    logits = torch.empty(B, V, device=x.device, dtype=x.dtype)
    best = torch.empty(B, blocks, device=x.device, dtype=torch.float32)
    at = torch.empty(B, blocks, device=x.device, dtype=torch.int32)
    token = torch.empty(B, 1, device=x.device, dtype=torch.long)
    pdl = _launch_pdl(x.device)
    if B > 1 or x.dtype != torch.float32:   # each block of weights read once for all rows, on the tensor cores
        lm_head_rows_kernel[(blocks, triton.cdiv(B, LM_HEAD_ROWS))](
            x, weight, weight if scale is None else scale, logits, best, at, _lm_head_counts(x.device), token,
            B, V, C, blocks, HAS_SCALE=scale is not None, IEEE=x.dtype == torch.float32, BLOCK_M=LM_HEAD_ROWS,
            BLOCK_V=LM_HEAD_BLOCK_V, BLOCK_C=64 if x.dtype == torch.float32 else LM_HEAD_BLOCK_C,   # float32: shared memory
            BLOCK_B=256, PDL=pdl, num_warps=LM_HEAD_WARPS, launch_pdl=pdl)
        return logits, token
    lm_head_kernel[(blocks, B)](x, weight, weight if scale is None else scale, logits, best, at,
                                _lm_head_counts(x.device), token, V, C, blocks, HAS_SCALE=scale is not None,
                                BLOCK_V=LM_HEAD_BLOCK_V, BLOCK_C=LM_HEAD_BLOCK_C,
                                BLOCK_B=min(4096, triton.next_power_of_2(blocks)), PDL=pdl,
                                num_warps=LM_HEAD_WARPS, launch_pdl=pdl)
    return logits, token


@triton.jit
def _weight_tile(w0_ptr, w1_ptr, w2_ptr, t, N0, N1, N, BLOCK_N: tl.constexpr):
    """Tile t of BLOCK_N rows of [w0; w1; w2] (N0, N1 and N - N0 - N1 rows; N0 and N1 multiples of
    BLOCK_N, so that no tile spans two) -> the matrix it lies in, its tile index and rows there."""
    r = t * BLOCK_N
    ptr, first, rows = w0_ptr, r, N0
    if r >= N0 + N1:
        ptr, first, rows = w2_ptr, r - N0 - N1, N - N0 - N1
    elif r >= N0:
        ptr, first, rows = w1_ptr, r - N0, N1
    return ptr, first // BLOCK_N, rows


@triton.jit
def _float_tile_sums(w, xs, FIRST: tl.constexpr, J: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr):
    """Chunks w[FIRST] .. w[FIRST + J - 1] of a tile (BLOCK_N, CH) each, against the row's chunks xs
    -> the tile's BLOCK_N sums in float32: per lane chunk by chunk, then over the CH lanes."""
    acc = tl.zeros([BLOCK_N, CH], dtype=tl.float32)
    for j in tl.static_range(J):
        acc += w[FIRST + j].to(tl.float32) * xs[j][None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _float_tile_weights(w0_ptr, w1_ptr, w2_ptr, t, N0, N1, N, K, EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr,
                        CH: tl.constexpr, J: tl.constexpr):
    """Tile t's weights as chunks (_row_chunks): rows t * BLOCK_N ... of [w0; w1; w2], or, for
    EPILOGUE 2, those rows of w0 (gate) followed by the same rows of w1 (up)."""
    if EPILOGUE == 2:
        w = _row_chunks(w0_ptr, t, N0, K, BLOCK_N, CH, J, 'evict_first') + \
            _row_chunks(w1_ptr, t, N0, K, BLOCK_N, CH, J, 'evict_first')
    else:
        ptr, tw, rows_w = _weight_tile(w0_ptr, w1_ptr, w2_ptr, t, N0, N1, N, BLOCK_N)
        w = _row_chunks(ptr, tw, rows_w, K, BLOCK_N, CH, J, 'evict_first')
    return w


@triton.jit
def float_gemv_kernel(x_ptr, norm_ptr, w0_ptr, w1_ptr, w2_ptr, b_ptr, res_ptr, y_ptr, N0, N1, N, K, eps,
                      HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, LOWP: tl.constexpr, EPILOGUE: tl.constexpr,
                      CH: tl.constexpr, J: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr):
    """ops.linear_reference for one row x (K,), K <= CH * J, and up to three float weight matrices
    of K columns side by side (N outputs): RMSNorm first (HAS_NORM), then y = x @ [w0; w1; w2]^T + b,
    then EPILOGUE 0: y; 1: y + residual; 2: relu(gate)^2 * up for w0, w1 = gate, up (N0 rows each,
    N0 outputs), each step rounded to x's dtype (LOWP) where model.py's modules round it.
    Persistent, as packed_gemv_row_kernel is: a few programs per SM walk over tiles of BLOCK_N rows,
    each tile's rows held in registers in J chunks of CH, the next tile's always in flight (the
    first one's before waiting for the previous kernel); float32 sums."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    out_ty = y_ptr.dtype.element_ty
    w_next = _float_tile_weights(w0_ptr, w1_ptr, w2_ptr, pid, N0, N1, N, K, EPILOGUE, BLOCK_N, CH, J)
    _wait_for_previous_kernel(PDL)
    offs = tl.arange(0, CH)
    xs = ()
    nws = ()
    ss = tl.zeros([CH], dtype=tl.float32)
    for j in tl.static_range(J):
        xk = tl.load(x_ptr + j * CH + offs, mask=j * CH + offs < K, other=0.0).to(tl.float32)
        xs = xs + (xk,)
        ss += xk * xk
        if HAS_NORM:
            nws = nws + (tl.load(norm_ptr + j * CH + offs, mask=j * CH + offs < K, other=0.0).to(tl.float32),)
    if HAS_NORM:   # as model.RMSNorm: weight * rms_norm(x in float32) rounded to x's dtype, then rounded again
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        xn = ()
        for j in tl.static_range(J):
            xn = xn + (_normalize(xs[j], nws[j], rstd, out_ty, True, LOWP, LOWP),)
        xs = xn
    rows_out = N0 if EPILOGUE == 2 else N
    for t in range(pid, tl.cdiv(rows_out, BLOCK_N), programs):
        w = w_next
        w_next = _float_tile_weights(w0_ptr, w1_ptr, w2_ptr, t + programs, N0, N1, N, K, EPILOGUE, BLOCK_N, CH, J)
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = rows < rows_out
        y = _float_tile_sums(w, xs, 0, J, BLOCK_N, CH)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        y = y.to(out_ty).to(tl.float32)   # the projection's output, as F.linear returns it
        if EPILOGUE == 2:   # model.MLP: relu(gate).square() * up, each step in x's dtype
            up = _float_tile_sums(w, xs, J, J, BLOCK_N, CH)
            if HAS_BIAS:
                up += tl.load(b_ptr + N0 + rows, mask=mask, other=0.0).to(tl.float32)
            gate = tl.maximum(y, 0.0)
            y = (gate * gate).to(out_ty).to(tl.float32) * up.to(out_ty).to(tl.float32)
        if EPILOGUE == 1:
            y += tl.load(res_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(out_ty), mask=mask)


FLOAT_CHUNK = 256          # float_gemv_kernel: a row in chunks of this many inputs ...
FLOAT_ROW_CHUNKS = 32      # ... up to this many (8192 inputs); wider rows go to F.linear
FLOAT_TILE = 20480         # inputs per tile (rows x K), rounded down to a power of two of rows, 1 to 8 rows: of 12
                           # settings measured (H200), the best or within 5% at the 2B4T shapes, within 14% at two
                           # ~125M shapes; fixed, not autotuned, so the float sums run in the same order every run


@linear.register_kernel('cuda')
def linear_cuda(x, weights, bias=None, norm_weight=None, residual=None, epilogue=0, eps=0.0):
    K = x.size(-1)
    sizes = [w.size(0) for w in weights]
    if x.numel() != K or K > FLOAT_CHUNK * FLOAT_ROW_CHUNKS or len(weights) > 3 \
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or any(not w.is_contiguous() or w.dtype != x.dtype or w.size(1) != K for w in weights):
        return linear_reference(x, weights, bias, norm_weight, residual, epilogue, eps)   # more rows: cuBLAS
    x = x.contiguous()
    out = sizes[0] if epilogue == 2 else sum(sizes)
    y = torch.empty(*x.shape[:-1], out, device=x.device, dtype=x.dtype)
    pair = 2 if epilogue == 2 else 1   # relu2: a tile holds its rows of gate and of up
    block_n = min(8, max(1, triton.next_power_of_2(FLOAT_TILE // (pair * K) + 1) // 2))   # <= FLOAT_TILE inputs
    for n in sizes[:-1]:   # halved until no tile spans two matrices
        block_n = math.gcd(block_n, n)
    w0, w1, w2 = (weights + [weights[0]] * 2)[:3]
    n0, n1 = (sizes + [0])[:2]
    pdl = _launch_pdl(x.device)
    float_gemv_kernel[(min(triton.cdiv(out, block_n), 2 * _sm_count(x.device)),)](   # two programs per SM
        x, x if norm_weight is None else norm_weight, w0, w1, w2, x if bias is None else bias,
        y if residual is None else residual.contiguous(), y, n0, n1, sum(sizes), K, eps,
        HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None, LOWP=x.dtype != torch.float32,
        EPILOGUE=epilogue, CH=FLOAT_CHUNK, J=triton.cdiv(K, FLOAT_CHUNK), PDL=pdl, BLOCK_N=block_n, num_warps=4,
        launch_pdl=pdl)
    return y
