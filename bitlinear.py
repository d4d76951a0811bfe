"""
BitLinear layers: drop-in replacements for nn.Linear with ternary (1.58-bit) or binary
(1-bit) weights and 8-bit activations, trained with the straight-through estimator.

BitNet b1.58 (arXiv 2402.17764, and the "Training Tips, Code and FAQ" note). Training keeps
a latent float weight W (out, in). Every forward:

    s_w   = max(mean(|W|), 1e-5)                       one scale per weight tensor
    W_t   = clamp(round(W / s_w), -1, 1)               in {-1, 0, +1}
    s_x   = 127 / max(max(|x|), 1e-5)                  one scale per token (last dim)
    x_int = clamp(round(x * s_x), -128, 127)           int8
    y     = (x_int @ W_t^T) * (s_w / s_x)

That last line is the reference's "inference with stored integers" (packed.py runs it).
Training computes it in the dequantized form of the FAQ's code, y = x_q @ W_q^T with
x_q = x_int / s_x and W_q = W_t * s_w: the same number up to the rounding of x_q and W_q
(in float32 a layer's output agrees with the integer line to within about 1e-6 of its magnitude;
under bf16 autocast the matmul's inputs carry bf16 rounding, as a float model's do). Such a
difference can make a later layer round an activation that sits on a rounding boundary the
other way, so verify_bitlinear compares layer by layer. The
straight-through estimator treats round/clamp as the identity in the backward pass, so with the
scales detached dy/dx = W_q and dy/dW = x_q: the backward pass is a float layer's two matmuls,
with no rescaling of gradients, which keeps a b1.58 training step close to a float one
(docs/results.md). Run eagerly (the CPU default), BitLinear computes the forward and
backward with TernaryMatmul, written out by hand: the same numbers, bit for bit, in fewer
operations; under torch.compile it uses the straight-through form, which Inductor fuses.

BitNet b1 (arXiv 2310.11453), the original 1-bit layer:

    alpha = mean(W),  W_b = sign(W - alpha) in {-1, +1} (sign(0) = -1),  beta = mean(|W|)
    Q_b   = 2^(bit_width - 1),  gamma = max(max(|x|), eps)  per token
    x_q   = round(clamp(x * Q_b / gamma, -Q_b + eps, Q_b - eps))
            before_nonlinear: eta = min(x) per token,
            x_q = round(clamp((x - eta) * Q_b / gamma, eps, Q_b - eps))
    y     = (x_q @ W_b^T) * (beta * gamma / Q_b) + bias

The paper's formula has no rounding step; without one bit_width would do nothing, so we
round (with the straight-through estimator). Training computes y in the dequantized form too,
(x_q * gamma / Q_b) @ (W_b * beta)^T + bias. Its range [-Q_b, Q_b] holds 2^b + 1 integers.
gamma is per token, not per tensor: a per-tensor max over (B, T) would let a future token's
magnitude change how a past token is quantized, which breaks causal language modelling.

Helpers: quantize_weight (int8 ternary tensor + scale), pack_ternary / unpack_ternary
(the Hugging Face 2-bit layout, see below) and bitlinear_report (a check over a model).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Hugging Face's BitNet does)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * y.to(x.dtype)


def ste(x, x_quantized):
    """Forward: x_quantized, exactly. Backward: the identity (straight-through estimator).
    (x - x.detach() is zero and carries x's gradient; x + (x_quantized - x).detach() can be
    off by a rounding step when x_quantized is far from x.)"""
    return x_quantized.detach() + (x - x.detach())


# -----------------------------------------------------------------------------
# b1.58: ternary weights, 8-bit activations

def weight_scale(w):
    """s_w = mean(|W|), one scalar per tensor, clamped to >= 1e-5."""
    return w.abs().mean().clamp(min=1e-5)


def quantize_weight(w):
    """W (out, in) float -> (W_t int8 in {-1, 0, 1}, s_w float32 scalar), W ~= W_t * s_w."""
    w = w.detach().float()
    s_w = weight_scale(w)
    w_t = (w / s_w).round().clamp(-1, 1)
    return w_t.to(torch.int8), s_w


def activation_scale(x):
    """s_x = 127 / max|x| per token (last dim), shape (..., 1); max|x| clamped to >= 1e-5."""
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)


def quantize_activation(x):
    """x float (..., C) -> (x_int int8, s_x float32 (..., 1)), x ~= x_int / s_x."""
    x = x.detach().float()
    s_x = activation_scale(x)
    x_int = (x * s_x).round().clamp(-128, 127)
    return x_int.to(torch.int8), s_x


class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer: ternary weights, per-token int8 activations.

    rms_norm=True puts an RMSNorm (learned weight) in front of the quantizer, the FAQ's
    recipe for dropping the layer into any model. Our GPT keeps explicit SubLN norms
    instead (attn_sub_norm, ffn_sub_norm), so it leaves this off.
    """

    def __init__(self, in_features, out_features, bias=False, rms_norm=False, norm_eps=1e-5):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = RMSNorm(in_features, eps=norm_eps) if rms_norm else None

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        if torch.compiler.is_compiling():
            y = ternary_matmul_ste(x, self.weight)
        else:
            y = TernaryMatmul.apply(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y


def ternary_matmul_ste(x, w):
    """y = x_q @ W_q^T in the straight-through form, for torch.compile."""
    x = x.float()  # quantize in fp32 whatever autocast does around us
    s_x = activation_scale(x).detach()                            # (..., 1)
    x_q = ste(x, (x * s_x).round().clamp(-128, 127) / s_x)        # x_int / s_x, identity gradient
    s_w = weight_scale(w).detach()                                # scalar
    w_q = ste(w, (w / s_w).round().clamp(-1, 1) * s_w)            # W_t * s_w, identity gradient
    return F.linear(x_q, w_q)


class TernaryMatmul(torch.autograd.Function):
    """ternary_matmul_ste's forward and gradients written out, for eager runs.

    The operations, and their order, are the ones autograd records for the straight-through
    form, so forward and gradients are the same bit for bit (float32 and autocast), without the
    ste's additions and subtractions. Kept for backward: x_q and W_q in the matmul's dtype.
        dL/dx = dL/dy @ W_q
        dL/dW = dL/dy^T @ x_q
    Eager only: compiled code traces the straight-through form, which Inductor fuses and which
    keeps custom autograd code out of compiled graphs (Inductor can miscompile in-place
    operations inside a Function: it gave zero weight gradients for CUDA in PyTorch 2.11).
    """

    @staticmethod
    def forward(ctx, x, w):
        ctx.x_dtype = x.dtype
        x = x.float()  # quantize in fp32 whatever autocast does around us
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        s_x = activation_scale(x)                                           # (..., 1)
        x_q = (x * s_x).round_().clamp_(-128, 127).div_(s_x).to(mm_dtype)     # x_int / s_x
        s_w = weight_scale(w)                                               # scalar
        w_q = (w / s_w).round_().clamp_(-1, 1).mul_(s_w).to(mm_dtype)         # W_t * s_w
        ctx.save_for_backward(x_q, w_q)
        return F.linear(x_q, w_q)

    @staticmethod
    def backward(ctx, grad_y):
        x_q, w_q = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ w_q).float().to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:   # (out, N) @ (N, in), the product autograd's mm backward takes
            grad_w = (grad_y.reshape(-1, grad_y.size(-1)).t() @ x_q.reshape(-1, x_q.size(-1))).float()
        return grad_x, grad_w


# -----------------------------------------------------------------------------
# b1: the original binary BitNet

class BitLinear1b(nn.Linear):
    """Original BitNet linear layer: binary weights, absmax bit_width-bit activations.

    Options follow the other ports: bit_width (8), eps (1e-5), bias (True) and
    before_nonlinear (False: symmetric range; True: subtract the per-token minimum and
    scale to [0, Q_b], for activations that feed a ReLU-like non-linearity).
    rms_norm=True adds the paper's normalization in front (SubLN), as in BitLinear.
    """

    def __init__(self, in_features, out_features, bias=True, bit_width=8, eps=1e-5,
                 before_nonlinear=False, rms_norm=False, norm_eps=1e-5):
        super().__init__(in_features, out_features, bias=bias)
        self.bit_width = bit_width
        self.eps = eps
        self.before_nonlinear = before_nonlinear
        self.norm = RMSNorm(in_features, eps=norm_eps) if rms_norm else None

    def extra_repr(self):
        return (super().extra_repr() + f", bit_width={self.bit_width}, eps={self.eps}, "
                f"before_nonlinear={self.before_nonlinear}")

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        x = x.float()
        u, gamma, lo, hi = scale_activation_1b(x, self.bit_width, self.eps, self.before_nonlinear)
        x_q = ste(x, u.clamp(lo, hi).round() * (gamma / 2 ** (self.bit_width - 1)))  # x_q * gamma / Q_b
        w = self.weight
        beta = w.abs().mean().clamp(min=self.eps).detach()
        w_b = torch.where(w - w.mean().detach() > 0, 1.0, -1.0)  # sign(W - alpha), sign(0) = -1
        y = F.linear(x_q, ste(w, w_b * beta))                   # dequantized, as for b1.58
        if self.bias is not None:
            y = y + self.bias
        return y


def scale_activation_1b(x, bit_width, eps, before_nonlinear):
    """The b1 activation before rounding: (u, gamma, lo, hi) with u = x * Q_b / gamma, or
    (x - eta) * Q_b / gamma before a non-linearity; x_q = round(clamp(u, lo, hi))."""
    q_b = 2 ** (bit_width - 1)
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps).detach()   # (..., 1)
    if before_nonlinear:
        eta = x.amin(dim=-1, keepdim=True).detach()
        return (x - eta) * (q_b / gamma), gamma, eps, q_b - eps
    return x * (q_b / gamma), gamma, -q_b + eps, q_b - eps


def quantize_activation_1b(x, bit_width=8, eps=1e-5, before_nonlinear=False):
    """x float -> (x_q integer-valued float32, gamma (..., 1)), x ~= x_q * gamma / Q_b (+ eta)."""
    u, gamma, lo, hi = scale_activation_1b(x.detach().float(), bit_width, eps, before_nonlinear)
    return u.clamp(lo, hi).round(), gamma


def quantize_weight_1b(w, eps=1e-5):
    """W float -> (W_b int8 in {-1, 1}, beta float32 scalar), W ~= W_b * beta."""
    w = w.detach().float()
    w_b = torch.where(w - w.mean() > 0, 1, -1).to(torch.int8)
    return w_b, w.abs().mean().clamp(min=eps)


# -----------------------------------------------------------------------------
# 2-bit packing, the Hugging Face layout (transformers' BitNet "offline" checkpoints):
# value v in {-1, 0, 1} is stored as v + 1 in {0, 1, 2}. With R = ceil(out / 4) packed rows,
# row r + i * R of the weight lives in bits 2i..2i+1 of packed row r (i = 0..3, least
# significant pair first). Rows are block-strided, not interleaved; missing rows (out not
# divisible by 4) are zero bits.

def pack_ternary(w_t):
    """(out, in) int tensor in {-1, 0, 1} -> (ceil(out / 4), in) uint8."""
    rows = math.ceil(w_t.shape[0] / 4)
    codes = (w_t + 1).to(torch.uint8)
    packed = torch.zeros((rows,) + tuple(w_t.shape[1:]), dtype=torch.uint8, device=w_t.device)
    for i in range(4):
        block = codes[i * rows:(i + 1) * rows]     # rows i*R .. i*R+R-1 (the last block may be short)
        packed[:block.shape[0]] |= block << (2 * i)
    return packed


def unpack_2bit(packed, out_features):
    """(R, in) uint8 -> (out_features, in) uint8 codes in {0, 1, 2, 3} (3 is never valid)."""
    codes = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # (4, R, in)
    return codes.reshape(-1, *packed.shape[1:])[:out_features]


def unpack_ternary(packed, out_features):
    """(R, in) uint8 -> (out_features, in) int8 in {-1, 0, 1} (inverse of pack_ternary)."""
    return unpack_2bit(packed, out_features).to(torch.int8) - 1


# -----------------------------------------------------------------------------
# A check over a model's quantized layers

def bitlinear_layers(model):
    """[(name, module)] for every BitLinear / BitLinear1b in the model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BitLinear, BitLinear1b))]


def bitlinear_report(model):
    """One row per BitLinear layer: what the weight quantizes to, and whether that is what it
    should be (exactly ternary for b1.58, exactly binary for b1, a finite positive scale)."""
    rows = []
    for name, m in bitlinear_layers(model):
        binary = isinstance(m, BitLinear1b)
        w_q, scale = quantize_weight_1b(m.weight, m.eps) if binary else quantize_weight(m.weight)
        allowed = torch.tensor([-1, 1] if binary else [-1, 0, 1], dtype=torch.int8)
        finite = bool(torch.isfinite(m.weight).all()) and math.isfinite(scale.item()) and scale.item() > 0
        exact = finite and bool(torch.isin(w_q.cpu(), allowed).all())
        rows.append(dict(
            name=name,
            shape=tuple(m.weight.shape),
            kind='b1' if binary else 'b1.58',
            numel=m.weight.numel(),
            zero_fraction=(w_q == 0).float().mean().item(),
            scale=scale.item(),
            ok=exact,
        ))
    return rows


def integer_forward(module, x):
    """A BitLinear's output computed from stored integers: the int8 ternary (or binary)
    weight, its scale and the integer activations, with the product taken in float64 (exact
    for these integers) and rescaled in x's dtype: y = (x_int @ W_t^T) * (s_w / s_x), the line
    packed inference computes."""
    if isinstance(module, BitLinear1b):
        if module.norm is not None:
            x = module.norm(x)
        w_q, beta = quantize_weight_1b(module.weight, module.eps)
        x_q, gamma = quantize_activation_1b(x, module.bit_width, module.eps, module.before_nonlinear)
        scale = beta * gamma / 2 ** (module.bit_width - 1)
    else:
        if module.norm is not None:
            x = module.norm(x)
        w_q, s_w = quantize_weight(module.weight)
        x_q, s_x = quantize_activation(x)
        scale = s_w / s_x
    y = (x_q.double() @ w_q.double().t()).to(x.dtype)
    y = y * scale.to(x.dtype)
    if module.bias is not None:
        y = y + module.bias
    return y


@torch.no_grad()
@contextmanager
def bitlinear_hooks(model, hook):
    """Inside, hook(module, args, output) runs after the forward of every BitLinear / BitLinear1b
    of model (a value it returns replaces the layer's output, as torch's forward hooks do)."""
    handles = [m.register_forward_hook(hook) for _, m in bitlinear_layers(model)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def verify_bitlinear(model, idx, rtol=1e-5):
    """Check that a model's BitLinear layers are what they claim:
    1. every layer's weight quantizes to exactly ternary values (binary for b1), finite scale;
    2. in one forward pass on idx, every BitLinear's output equals integer_forward on the same
       input (its stored integers multiplied, then rescaled) within rtol * max(1, max|output|).
    Layer by layer: training's dequantized product differs from the integer product by float
    rounding, and a later layer may then round an activation that sits on a rounding boundary the
    other way; logits of two whole passes would measure such flips, not the layers.
    The model is called as model(idx); call it in float32.
    Returns dict(rows, n_layers, n_weights, zero_fraction, packed_bits, max_diff (the largest
    |output - integer output| / max(1, max|integer output|) over the layers), tol, ok)."""
    rows = bitlinear_report(model)
    diffs = []

    def compare(module, args, out):
        ref = integer_forward(module, args[0])
        diffs.append(((out - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item())
    with bitlinear_hooks(model, compare):
        model(idx)
    max_diff = torch.tensor(diffs or [0.0]).max().item()   # NaN if any layer gave NaN
    n_weights = sum(r['numel'] for r in rows)
    packed_bytes = sum(math.ceil(r['shape'][0] / 4) * r['shape'][1] for r in rows)
    return dict(
        rows=rows,
        n_layers=len(rows),
        n_weights=n_weights,
        zero_fraction=sum(r['zero_fraction'] * r['numel'] for r in rows) / max(n_weights, 1),
        packed_bits=8 * packed_bytes / max(n_weights, 1),
        max_diff=max_diff,
        tol=rtol,
        ok=all(r['ok'] for r in rows) and max_diff <= rtol,  # False for NaN too
    )
