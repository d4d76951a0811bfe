"""
The CPU kernel of the packed ternary layer: csrc/ternary_cpu.cpp, a small C++ extension compiled
at its first use through torch.utils.cpp_extension (about a minute; needs a C++ compiler and
ninja) and cached in .build/ under the repo, then registered for bitnet::packed_linear on the CPU.

What it computes is ops.packed_linear_reference, bit for bit: the same RMSNorm (through ATen),
the same int8 activations, the exact integer product, the same float32 rescale and epilogue.
How: int8 activations against the 2-bit codes of packed.py's layout as they are (no unpacking,
no per-call work that depends on the weights), four output rows per pass over a packed row,
AVX-512 VNNI / AVX2 / NEON / scalar chosen at compile time (-march=native), threads over the
packed rows (at::parallel_for, torch's thread count), prefill rows four at a time per pass.

Importing this file also gives eval-cached BitLinear layers (training-form models in eval mode,
bitlinear.py) the same kernel on the CPU: bitlinear.cpu_kernel = ternary_linear_cpu.

Where the build fails (no compiler), one line on stderr says so and the op keeps its
pure-PyTorch reference. `enabled = False` (sample.py --cpu_kernel=False) forces the reference.

The lm_head stays full precision, and is the largest matrix a small model reads per token
(vocab x n_embd, 154 MB in float32 for GPT-2's vocabulary at 768 wide): half_head gives a
decoding model a float16 copy of it (HalfLinear, float32 sums), half the bytes per token, which
a tied embedding reads too (HalfEmbedding).
"""

import os
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import bitlinear
from ops import packed_linear, packed_linear_reference

REPO = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(REPO, 'csrc', 'ternary_cpu.cpp')
BUILD_DIR = os.path.join(REPO, '.build', 'ternary_cpu')   # .gitignored
enabled = True   # False: every CPU call takes ops.packed_linear_reference
_ext = None      # the built module once loaded; False once a build failed


def build():
    """Compile (or load the cached build of) csrc/ternary_cpu.cpp -> the Python module."""
    from torch.utils.cpp_extension import load
    arm = platform.machine().lower() in ('arm64', 'aarch64')
    flags = ['-O3', '-mcpu=native' if arm else '-march=native', '-ffp-contract=off']  # no FMA the reference lacks
    openmp = [] if sys.platform == 'darwin' else ['-fopenmp']   # at::parallel_for's threads (Apple clang has none)
    os.makedirs(BUILD_DIR, exist_ok=True)
    built = os.path.join(BUILD_DIR, 'ternary_cpu.so')
    if not os.path.exists(built) or os.path.getmtime(built) < os.path.getmtime(SOURCE):
        print("compiling csrc/ternary_cpu.cpp, the CPU kernel (once; about a minute)", file=sys.stderr)
    return load(name='ternary_cpu', sources=[SOURCE], extra_cflags=flags + openmp, extra_ldflags=openmp,
                build_directory=BUILD_DIR, verbose=False)


def extension():
    """The compiled kernels, built at the first call; None where the build failed (said once)."""
    global _ext
    if _ext is None:
        try:
            _ext = build()
        except Exception as e:   # no compiler, no ninja, a compile error: the reference still runs
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"note: the CPU ternary kernel could not be built ({reason}); "
                  f"packed layers use the pure-PyTorch path", file=sys.stderr)
            _ext = False
    return _ext or None


def available():
    """Whether CPU packed layers run the compiled kernel (builds it if needed)."""
    return enabled and extension() is not None


@packed_linear.register_kernel('cpu')
def packed_linear_cpu(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps):
    """The op's CPU kernel: the compiled one, or the reference where it did not build or is off.
    packed.PackedLinear calls it directly in eager CPU runs (the dispatcher costs ~10-20 us a call)."""
    ext = extension() if enabled else None
    if ext is None:
        return packed_linear_reference(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps)
    return ext.packed_linear(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps)


def ternary_linear_cpu(x, packed, row_scale, out_features):
    """bitlinear.ternary_linear_reference through the same kernel (no norm, no epilogue): what an
    eval-cached BitLinear calls on the CPU."""
    ext = (_ext or extension()) if enabled else None
    if ext is None:
        return bitlinear.ternary_linear_reference(x, packed, row_scale, out_features)
    return ext.packed_linear(x, _EMPTY, packed, row_scale, _EMPTY, out_features, 0, 0.0)


_EMPTY = torch.empty(0)
bitlinear.cpu_kernel = ternary_linear_cpu


class HalfLinear(nn.Module):
    """y = x @ W^T with W (out, in) held in float16 and the sums in float32 (linear_f16 of the
    extension; F.linear in float32 where it did not build); y in x's dtype."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer('weight_f16', weight.detach().to(torch.float16))

    def forward(self, x):
        ext = extension() if enabled else None
        x2 = x.reshape(-1, x.size(-1))
        y = ext.linear_f16(x2, self.weight_f16) if ext is not None else F.linear(x2.float(), self.weight_f16.float())
        return y.view(*x.shape[:-1], -1).to(x.dtype)


class HalfEmbedding(nn.Module):
    """The token embedding read from a float16 table (a tied lm_head's HalfLinear shares it),
    rows widened to float32."""

    def __init__(self, weight_f16):
        super().__init__()
        self.register_buffer('weight_f16', weight_f16)

    def forward(self, idx):
        return F.embedding(idx, self.weight_f16).float()


def half_head(model):
    """A GPT for decoding on the CPU: its lm_head becomes a HalfLinear (a float16 copy of the
    weight); a tied embedding reads the same float16 table (HalfEmbedding), so the float32 tensor
    is no longer referenced (a memory-mapped file's pages are released with it)."""
    head = HalfLinear(model.lm_head.weight)
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.model.embed_tokens = HalfEmbedding(head.weight_f16)
    model.lm_head = head
    return model
