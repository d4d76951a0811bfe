"""The Triton kernels of ternary_kernels.py run on the CPU by Triton's interpreter, against their
PyTorch references: the packed GEMV kernels (the row held in registers, and the one looping over
K; every epilogue, with and without the RMSNorm, float32 and bfloat16), the lm_head kernels, the
float GEMV of bitnet::linear and decode attention.
The interpreter runs a kernel's programs one after another as numpy code, so this checks the
kernels' arithmetic and indexing, not their speed. tests/test_kernels_interpreted.py runs it:

    TRITON_INTERPRET=1 python tests/kernels_on_cpu.py
"""

import os
import sys

assert os.environ.get('TRITON_INTERPRET') == '1', "run with TRITON_INTERPRET=1 (set before triton is imported)"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import ternary_kernels as kernels  # noqa: E402
from bitlinear import pack_ternary  # noqa: E402
from model import rotary_tables  # noqa: E402
from ops import (decode_attention_reference, linear_reference, lm_head_argmax_reference,  # noqa: E402
                 packed_linear_reference, quantize_head)


class RoundHalfEven:
    """libdevice.rint for the interpreter, which has no libdevice: round half to even."""
    @staticmethod
    def rint(x):
        r = tl.floor(x + 0.5)
        half = r * 0.5
        return tl.where(((r - x) == 0.5) & (tl.floor(half) != half), r - 1.0, r)


kernels.libdevice = RoundHalfEven


def gemv_case(M, K, out, epilogue, norm, dtype, block_r, kernel):
    g = torch.Generator().manual_seed(M * K + out + epilogue)
    rows = 2 * out if epilogue == 2 else out
    packed = pack_ternary(torch.randint(-1, 2, (rows, K), generator=g, dtype=torch.int8))
    scale = torch.zeros(4 * packed.size(0))
    scale[:rows] = torch.rand(rows, generator=g) * 0.05 + 0.01
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    norm_weight = (torch.rand(K, generator=g) + 0.5).to(dtype) if norm else torch.empty(0)
    residual = torch.randn(M, out, generator=g).to(dtype) if epilogue == 1 else torch.empty(0)
    R = packed.size(0)
    y = torch.empty(M, out, dtype=dtype)
    lowp = dtype != torch.float32
    args = (x, norm_weight if norm else x, packed.view(torch.int32), scale, residual if epilogue == 1 else y, y,
            K, R, out, 1e-5, triton.next_power_of_2(M))
    flags = dict(HAS_NORM=norm, X_LOWP=lowp, NORM_LOWP=lowp and norm, EPILOGUE=epilogue, ASM=False, BLOCK_R=block_r)
    if kernel == 'row':   # 3 programs walk over the tiles, as the persistent grid does; the row in
        # chunks of 32 words (the last one partly masked where K / 4 is no multiple of 32)
        kernels.packed_gemv_row_kernel.fn[(min(3, triton.cdiv(R, block_r)), M)](
            *args, CH=32, J=triton.cdiv(K // 4, 32), WAVES=1, PDL=False, DEPTH=1 + M % 2, **flags)
    else:            # chunks of 32 words: several trips through the loop over K
        kernels.packed_gemv_kernel.fn[(triton.cdiv(R, block_r), M)](*args, BLOCK_X=256, BLOCK_W=32, **flags)
    ref = packed_linear_reference(x, norm_weight, packed, scale, residual, out, epilogue, 1e-5)
    if dtype == torch.float32:   # the same int8 activations and exact integer sums: float rounding only
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:   # bfloat16: the kernel's rsqrt may move an activation across a rounding boundary
        assert (y.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def new_key_scores_highest(qkv, nh, nkv, hd):
    """The new key of each kv head := the query of its first head: that head's score for the new position,
    |q|^2 / sqrt(hd), about sqrt(hd), is then almost surely its highest (rotating both by the same angle keeps
    their product; the other scores of random keys are about N(0, 1))."""
    for kvh in range(nkv):
        qkv[:, (nh + kvh) * hd:(nh + kvh + 1) * hd] = qkv[:, kvh * (nh // nkv) * hd:(kvh * (nh // nkv) + 1) * hd]


def attention_case(nh, nkv, hd, pos, pos1=None):
    """pos1: the second sequence's position, when the two differ (a (2,) tensor of positions)."""
    g = torch.Generator().manual_seed(pos + nh)
    qkv = torch.randn(2, (nh + 2 * nkv) * hd, generator=g)
    new_key_scores_highest(qkv, nh, nkv, hd)
    k = torch.randn(2, nkv, 96, hd, generator=g)
    v = torch.randn(2, nkv, 96, hd, generator=g)
    p = torch.tensor(pos) if pos1 is None else torch.tensor([pos, pos1])
    for b, pb in enumerate(p.expand(2).tolist()):
        k[b, :, pb + 1:] = float('nan')   # positions past a sequence's own must not be read
        v[b, :, pb + 1:] = float('nan')
    cos, sin = rotary_tables(hd, 96, 10000.0)
    k_ref, v_ref = k.nan_to_num(), v.nan_to_num()
    o = torch.empty(2, nh * hd)
    kernels.decode_attention_kernel[(nkv, 2)](
        qkv, k, v, o, p, cos, sin, hd ** -0.5, p.stride(0) if p.dim() else 0, k.stride(0), k.stride(1), k.stride(2),
        NH=nh, NKV=nkv, G=nh // nkv, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(nh // nkv)), BLOCK_N=32, IEEE=True,
        PDL=False)
    ref = decode_attention_reference(qkv, k_ref, v_ref, p, cos, sin, nh)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for b, pb in enumerate(p.expand(2).tolist()):   # the rotated key written at each sequence's position
        torch.testing.assert_close(k[b, :, pb], k_ref[b, :, pb], rtol=1e-5, atol=1e-5)


def lm_head_case(B, V, C, ties, block_b, int8=False, rows=False):
    """ties: rows of the weight that all give the largest logit of every row of x. int8: the
    weight as ops.quantize_head stores it, with its scales. rows: lm_head_rows_kernel, 16 rows
    of x per program (the grid's second axis over tiles of 16 rows)."""
    g = torch.Generator().manual_seed(V + C)
    x = torch.randn(B, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.1
    for r in ties:
        w[r] = x.sum(0)   # the same row, the largest logit of every row of x
    scale = None
    if int8:
        w, scale = quantize_head(w)
    blocks = triton.cdiv(V, 16)
    logits = torch.empty(B, V)
    best, at = torch.full((B, blocks), float('nan')), torch.full((B, blocks), -1, dtype=torch.int32)
    count, token = torch.zeros(B, dtype=torch.int32), torch.full((B, 1), -1)
    if rows:
        kernels.lm_head_rows_kernel[(blocks, triton.cdiv(B, 16))](
            x, w, w if scale is None else scale, logits, best, at, count, token, B, V, C, blocks, HAS_SCALE=int8,
            IEEE=True, BLOCK_M=16, BLOCK_V=16, BLOCK_C=32, BLOCK_B=block_b, PDL=False)
    else:
        kernels.lm_head_kernel[(blocks, B)](x, w, w if scale is None else scale, logits, best, at, count, token, V, C,
                                            blocks, HAS_SCALE=int8, BLOCK_V=16, BLOCK_C=32, BLOCK_B=block_b,
                                            PDL=False)
    ref_logits, ref_token = lm_head_argmax_reference(x, w, scale)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(token, logits.argmax(-1, keepdim=True))   # the first maximum of its own logits
    if ties:
        assert token.flatten().tolist() == [min(ties)] * B and torch.equal(token, ref_token)
    assert count.eq(0).all()   # the finishing program set its count back


def float_gemv_case(sizes, K, block_n, dtype, bias, norm=False, epilogue=0):
    """float_gemv_kernel over weights of `sizes` rows side by side (an RMSNorm first, an epilogue
    after), 3 programs walking over tiles of block_n rows, the row in chunks of 128, against
    ops.linear_reference."""
    g = torch.Generator().manual_seed(sum(sizes) + K + epilogue)
    x = torch.randn(1, K, generator=g).to(dtype)
    ws = [(torch.randn(n, K, generator=g) / K ** 0.5).to(dtype) for n in sizes]
    N = sum(sizes)
    out = sizes[0] if epilogue == 2 else N
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    nw = (1 + torch.randn(K, generator=g) / 4).to(dtype) if norm else None
    res = torch.randn(1, out, generator=g).to(dtype) if epilogue == 1 else None
    y = torch.full((1, out), float('nan'), dtype=dtype)
    w0, w1, w2 = (ws + [ws[0]] * 2)[:3]
    kernels.float_gemv_kernel[(3,)](x, x if nw is None else nw, w0, w1, w2, x if b is None else b,
                                    y if res is None else res, y, *(sizes + [0])[:2], N, K, 1e-5,
                                    HAS_BIAS=bias, HAS_NORM=norm, LOWP=dtype != torch.float32, EPILOGUE=epilogue,
                                    CH=128, J=triton.cdiv(K, 128), PDL=False, BLOCK_N=block_n)
    b, nw, res = (None if t is None else t.double() for t in (b, nw, res))
    ref = linear_reference(x.double(), [w.double() for w in ws], b, nw, res, epilogue=epilogue, eps=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    else:   # rounded to bfloat16 or float16 (the interpreter rounds toward zero), a step or two of it
        assert ((y.double() - ref).abs() <= 4 * torch.finfo(dtype).eps * ref.abs() + 2e-2).all()


GEMV_CASES = [  # M, K, out, epilogue, norm, dtype, block_r
    (1, 64, 64, 0, False, torch.float32, 2),
    (3, 200, 13, 1, False, torch.float32, 2),
    (2, 300, 10, 2, False, torch.float32, 1),
    (1, 512, 96, 0, True, torch.float32, 4),
    (1, 300, 72, 2, True, torch.float32, 8),   # a partial last tile and chunk, two tiles in flight
    (2, 512, 40, 1, True, torch.float32, 2),
    (1, 256, 64, 2, True, torch.float32, 2),
    (1, 512, 64, 1, True, torch.bfloat16, 4),
    (3, 256, 40, 2, True, torch.bfloat16, 1),
]

if __name__ == '__main__':
    for case in GEMV_CASES:
        for kernel in ('row', 'loop'):
            gemv_case(*case, kernel=kernel)
            print('ok', kernel, 'kernel', *case[:5], case[5], flush=True)
    # 7 blocks of 16 rows (the last one partial), C = 48 in steps of 32; the final argmax walks
    # the blocks 2 or 8 at a time; tied maxima in different blocks, in one block, in the last one
    for case in [(2, 100, 48, [], 2), (2, 100, 48, [40, 90, 5], 2), (1, 100, 48, [33, 34], 8), (3, 100, 48, [99], 2),
                 (2, 100, 48, [40, 90, 5], 2, True),    # the int8 weight with its row scales
                 (3, 100, 48, [40, 90, 5], 2, False, True), (18, 100, 48, [], 4, True, True),   # 16 rows a program
                 (1, 100, 48, [33, 34], 8, True, True)]:   # one row (bfloat16 on the GPU)
        lm_head_case(*case)
        print('ok lm_head', *case, flush=True)
    # tiles past N, a partial last chunk, more tiles than programs; two and three weights side by side;
    # an RMSNorm first, then + residual, or relu(gate)^2 * up
    for case in [([37], 300, 4, torch.float32, True), ([64], 512, 8, torch.bfloat16, False),
                 ([5], 1000, 2, torch.float16, True), ([8, 12, 5], 200, 4, torch.float32, True, True),
                 ([16, 16], 130, 8, torch.bfloat16, False, True), ([24], 300, 8, torch.float32, True, True, 1),
                 ([20, 20], 256, 4, torch.float32, True, True, 2), ([40, 40], 256, 8, torch.bfloat16, False, True, 2)]:
        float_gemv_case(*case)
        print('ok float_gemv', *case, flush=True)
    for case in [(4, 4, 32, 0), (4, 2, 64, 40), (6, 1, 32, 95), (4, 2, 64, 40, 7)]:   # the last: a position per sequence
        attention_case(*case)
        print('ok attention', *case, flush=True)
