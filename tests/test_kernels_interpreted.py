"""The Triton kernels' arithmetic checked on the CPU: tests/kernels_on_cpu.py under Triton's
interpreter, in a subprocess (the interpreter is chosen when triton is first imported)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip('triton')


def test_triton_kernels_under_the_interpreter():
    result = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'kernels_on_cpu.py')],
                            env={**os.environ, 'TRITON_INTERPRET': '1'}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    assert result.stdout.count('ok ') == 2 * 9 + 8 + 8 + 4   # 9 GEMV cases x 2 kernels, 8 lm_head, 8 float GEMV, 4 attention


def ptx(kernel, signature, constants, divisible=(), **options):
    """kernel compiled for an H100/H200 (sm_90) by Triton's own compiler, no GPU needed -> its PTX.
    divisible: the arguments known to be multiples of 16, as Triton specializes a launch whose
    pointers and integers are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {**signature, **{k: 'constexpr' for k in constants}}
    names = list(signature)
    attrs = {(names.index(n),): [['tt.divisibility', 16]] for n in divisible}
    src = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options=options).asm['ptx']


def memory_ops(code):
    """The PTX's global loads, stores and atomics and its griddepcontrol instructions, in order."""
    ops = []
    for line in code.splitlines():
        words = line.replace('@', ' ').split()
        op = next((w for w in words if w.startswith(('ld.global', 'st.global', 'atom.global', 'griddepcontrol'))), None)
        if op:
            ops.append(op)
    return ops


@pytest.mark.parametrize('pdl', [False, True])
def test_kernels_read_what_the_previous_kernel_writes_only_after_waiting_for_it(pdl):
    """Under programmatic dependent launch (ternary_kernels.PDL) a kernel starts while the previous
    one still runs: the GEMVs may read their first tile of weights before griddepcontrol.wait,
    nothing else (the bfloat16 activations and residual come from the previous
    kernel, and nothing may be stored before it finishes); attention and the lm_head kernels wait first."""
    import ternary_kernels as kernels
    ptrs = {f'{name}_ptr': '*bf16' for name in ('x', 'norm', 'res', 'y')}
    gemv = memory_ops(ptx(kernels.packed_gemv_row_kernel.fn,
                          {**ptrs, 'w_ptr': '*i32', 'scale_ptr': '*fp32', 'K': 'i32', 'R': 'i32', 'N': 'i32',
                           'eps': 'fp32', 'X_ROWS': 'i32'},
                          dict(HAS_NORM=True, X_LOWP=True, NORM_LOWP=True, EPILOGUE=1, CH=128, J=5, ASM=True,
                               BLOCK_R=2, WAVES=1, PDL=pdl, DEPTH=1), num_warps=4, launch_pdl=pdl))
    head = memory_ops(ptx(kernels.lm_head_kernel,
                          {'x_ptr': '*bf16', 'w_ptr': '*bf16', 'scale_ptr': '*bf16', 'y_ptr': '*bf16', 'best_ptr': '*fp32',
                           'at_ptr': '*i32', 'count_ptr': '*i32', 'token_ptr': '*i64', 'V': 'i32', 'C': 'i32',
                           'BLOCKS': 'i32'},
                          dict(HAS_SCALE=False, BLOCK_V=64, BLOCK_C=256, BLOCK_B=2048, PDL=pdl), num_warps=4))
    head_rows = memory_ops(ptx(kernels.lm_head_rows_kernel,
                               {'x_ptr': '*bf16', 'w_ptr': '*bf16', 'scale_ptr': '*bf16', 'y_ptr': '*bf16',
                                'best_ptr': '*fp32', 'at_ptr': '*i32', 'count_ptr': '*i32', 'token_ptr': '*i64',
                                'B': 'i32', 'V': 'i32', 'C': 'i32', 'BLOCKS': 'i32'},
                               dict(HAS_SCALE=False, IEEE=False, BLOCK_M=16, BLOCK_V=64, BLOCK_C=256, BLOCK_B=256,
                                    PDL=pdl), num_warps=4))
    attention = memory_ops(ptx(kernels.decode_attention_kernel,
                               {'qkv_ptr': '*bf16', 'k_ptr': '*bf16', 'v_ptr': '*bf16', 'o_ptr': '*bf16',
                                'pos_ptr': '*i64', 'cos_ptr': '*fp32', 'sin_ptr': '*fp32', 'scale': 'fp32',
                                'stride_pos': 'i32', 'stride_kb': 'i32', 'stride_kh': 'i32', 'stride_kl': 'i32'},
                               dict(NH=20, NKV=5, G=4, HD=128, BLOCK_G=16, BLOCK_N=128, IEEE=False, PDL=pdl),
                               num_warps=8))
    float_ptrs = {f'{name}_ptr': '*bf16' for name in ('x', 'norm', 'w0', 'w1', 'w2', 'b', 'res', 'y')}
    float_gemv, float_relu2 = (memory_ops(ptx(kernels.float_gemv_kernel,
                                              {**float_ptrs, 'N0': 'i32', 'N1': 'i32', 'N': 'i32', 'K': 'i32',
                                               'eps': 'fp32'},
                                              dict(HAS_BIAS=True, HAS_NORM=True, LOWP=True, EPILOGUE=epilogue, CH=256,
                                                   J=10, PDL=pdl, BLOCK_N=block_n),
                                              divisible=(*float_ptrs, 'K'), num_warps=4, launch_pdl=pdl))
                               for epilogue, block_n in ((1, 8), (2, 4)))
    if not pdl:
        assert not [op for op in gemv + head + head_rows + attention + float_gemv + float_relu2
                    if op.startswith('griddepcontrol')]
        return
    for ops in (gemv, head, head_rows, attention, float_gemv, float_relu2):
        assert ops.count('griddepcontrol.wait') == 1 and ops.count('griddepcontrol.launch_dependents') == 1
        assert ops.index('griddepcontrol.wait') < ops.index('griddepcontrol.launch_dependents')
    before = gemv[:gemv.index('griddepcontrol.wait')]
    assert before == ['ld.global.b32'] * 10   # BLOCK_R x J words of 128 lanes, two to a thread of 4 warps
    # the float GEMV: its first tile of weights (8 rows x 2560 bfloat16, or 4 rows of gate and 4 of up; 16 bytes a
    # load: 20 per thread), then x, the norm weight, b and the residual
    for ops in (float_gemv, float_relu2):
        assert ops[:ops.index('griddepcontrol.wait')] == ['ld.global.L1::evict_first.L2::cache_hint.v4.b32'] * 20
    assert head[0] == head_rows[0] == attention[0] == 'griddepcontrol.wait'
