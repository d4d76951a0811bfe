"""
BitLinear layers: drop-in replacements for nn.Linear with ternary (1.58-bit) or binary
(1-bit) weights and low-bit activations, trained with the straight-through estimator.

Both kinds take the same options, BitLinearConfig, under the names the other BitNet ports use:
act_bits (8), eps (1e-5), bias (False) and before_nonlinear (False); see its docstring.

BitNet b1.58 (arXiv 2402.17764, and the "Training Tips, Code and FAQ" note). Training keeps
a latent float weight W (out, in). Every forward, with Q = 2^(act_bits - 1) - 1 (127 for 8 bits):

    s_w   = max(mean(|W|), eps)                        one scale per weight tensor
    W_t   = clamp(round(W / s_w), -1, 1)               in {-1, 0, +1}
    s_x   = Q / max(max(|x|), eps)                     one scale per token (last dim)
    x_int = clamp(round(x * s_x), -Q - 1, Q)           a signed act_bits-bit integer (int8 for 8 bits)
    y     = (x_int @ W_t^T) * (s_w / s_x)

x * s_x lies in [-Q, Q], so the clamp never reaches -Q - 1: it is the range of the integer type
(-128..127 for 8 bits, as in the FAQ's code and transformers), a guard that changes no value.

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

    alpha = mean(W),  W_b = sign(W - alpha) in {-1, +1} (sign(0) = -1),  beta = max(mean(|W|), eps)
    Q_b   = 2^(act_bits - 1),  gamma = max(max(|x|), eps)  per token
    x_q   = round(clamp(x * Q_b / gamma, -Q_b + eps, Q_b - eps))
    y     = (x_q @ W_b^T) * (beta * gamma / Q_b) + bias

The paper's formula has no rounding step; without one act_bits would do nothing, so we
round (with the straight-through estimator). Training computes y in the dequantized form too,
(x_q * gamma / Q_b) @ (W_b * beta)^T + bias. Its range [-Q_b, Q_b] holds 2^b + 1 integers (the
paper's Q_b; b1.58 uses the b-bit integer range instead).
gamma is per token, not per tensor: a per-tensor max over (B, T) would let a future token's
magnitude change how a past token is quantized, which breaks causal language modelling.

before_nonlinear (both kinds): the input is quantized over the range it actually spans, per token,
to unsigned integers with an integer zero point z (asymmetric quantization), so that 0, most of a
ReLU's output, stays exact; the shift is added back, so the layer still approximates W_q x:

    L     = 2^act_bits - 1 (255 for 8 bits),  s_x = L / max(max(x) - min(x), eps)
    z     = round(-min(x) * s_x)                       an integer, the code of 0
    x_int = clamp(round(x * s_x) + z, 0, L)            an unsigned act_bits-bit integer
    y     = (x_int @ W_i^T - z * rowsum(W_i)) * (s / s_x) + bias

with W_i, s the layer's integer weights and scale (W_t, s_w or W_b, beta). x ~= x_int / s_x + eta
with eta = -z / s_x (min(x), on the grid), and -z * rowsum(W_i) * s / s_x = eta * s * rowsum(W_i)
is W_q applied to eta times a ones vector: one (out,) vector of row sums per layer, one integer
multiply-add per output. Shifted values have no sign, so all 2^b codes hold them:
for a non-negative input (min(x) = 0) the step max(x) / L is about half the symmetric form's, and
for any input (max(x) - min(x) <= 2 max|x|) about as fine or finer. Training uses
x_q = (x_int - z) / s_x with the straight-through estimator, whose identity backward is consistent
with a forward that is ~ x. The paper's own formula, read literally
(x_q = clamp((x - eta) Q_b / gamma, eps, Q_b - eps) with gamma = max|x|, and eta never added
back), computes W_b (x - eta), not W_b x: on Gaussian input its error is about 2.4 times the size
of W_b x itself, and about 40% of the entries clip at Q_b. Nothing in this repo, and no format it
reads or writes, needs that form, so it is not offered.

Warm-up quantization (Hugging Face, "Fine-tuning LLMs to 1.58bit: extreme quantization made easy",
2024), for turning a float model ternary: with lambda in [0, 1] a layer multiplies
x + lambda * (x_q - x) and W + lambda * (W_q - W) (quant_mix), straight-through as above, so lambda = 0
is the float layer and lambda = 1 the quantized one, bit for bit.

Helpers: quantize_weight (int8 ternary tensor + scale), pack_ternary / unpack_ternary
(the Hugging Face 2-bit layout, see below) and bitlinear_report (a check over a model).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps), computed in float32 and rounded to x's dtype, times weight."""
    return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Hugging Face's BitNet does)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def ste(x, x_quantized):
    """Forward: x_quantized, exactly. Backward: the identity (straight-through estimator).
    (x - x.detach() is zero and carries x's gradient; x + (x_quantized - x).detach() can be
    off by a rounding step when x_quantized is far from x.)"""
    return x_quantized.detach() + (x - x.detach())


# -----------------------------------------------------------------------------
# The options of a layer, shared by both kinds

@dataclass(frozen=True)
class BitLinearConfig:
    """The options of a BitLinear / BitLinear1b layer (the names the other BitNet ports use).

    act_bits          bits per activation, 2..8 (default 8: W1.58A8, as b1.58 and 2B4T;
                      4 gives W1.58A4). b1.58 quantizes to [-Q - 1, Q], Q = 2^(act_bits - 1) - 1;
                      b1 to the paper's [-Q_b, Q_b], Q_b = 2^(act_bits - 1)
    eps               the floor of the scales' denominators (1e-5): max|x| (per token), mean|W|,
                      and for b1 the margin of the clamp (-Q_b + eps, Q_b - eps), as in the paper
    bias              an additive bias, as nn.Linear has (False: the b1.58 architecture has none)
    before_nonlinear  quantize the input over the range it spans, min(x) .. max(x), to unsigned
                      integers, and add the shift back (module docstring); the paper's variant
                      for activations at a ReLU-like non-linearity (our GPT: down_proj's input)
    """
    act_bits: int = 8
    eps: float = 1e-5
    bias: bool = False
    before_nonlinear: bool = False

    def __post_init__(self):
        if not (isinstance(self.act_bits, int) and 2 <= self.act_bits <= 8):
            raise ValueError(f"act_bits must be an integer from 2 to 8, got {self.act_bits!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")


class BitLinearBase(nn.Linear):
    """What both layer kinds share: the constructor and the options. Called as nn.Linear is,
    BitLinear(in, out, bias=None, device=None, dtype=None), plus config= (a BitLinearConfig,
    default BitLinearConfig()) and keyword overrides of its fields (act_bits=4, ...); bias=None
    takes config.bias. rms_norm=True puts an RMSNorm (learned weight) in front of the quantizer,
    the b1.58 FAQ's recipe for dropping the layer into any model (the 1-bit paper puts a LayerNorm
    there). Our GPT keeps explicit SubLN norms instead (attn_sub_norm, ffn_sub_norm), so it leaves
    this off."""

    def __init__(self, in_features, out_features, bias=None, device=None, dtype=None, *,
                 config=None, rms_norm=False, norm_eps=1e-5, **options):
        if bias is not None:
            options['bias'] = bias
        config = replace(config or BitLinearConfig(), **options)
        super().__init__(in_features, out_features, bias=config.bias, device=device, dtype=dtype)
        self.config = config
        self.norm = RMSNorm(in_features, eps=norm_eps).to(device=device, dtype=dtype) if rms_norm else None

    def extra_repr(self):
        c = self.config
        return super().extra_repr() + f", act_bits={c.act_bits}, eps={c.eps}, before_nonlinear={c.before_nonlinear}"


def quantize_activation_shifted(x, act_bits=8, eps=1e-5):
    """before_nonlinear's quantizer: x float (..., C) -> (x_int integer-valued float32 in
    [0, 2^act_bits - 1], s_x (..., 1), z (..., 1) integer-valued), x ~= (x_int - z) / s_x."""
    x = x.detach().float()
    levels = 2 ** act_bits - 1
    eta = x.amin(dim=-1, keepdim=True)
    s_x = levels / (x.amax(dim=-1, keepdim=True) - eta).clamp(min=eps)
    z = (-eta * s_x).round()                                   # the code of 0
    return ((x * s_x).round() + z).clamp(0, levels), s_x, z


def dequantize_shifted(x, act_bits, eps):
    """(x_int - z) / s_x (quantize_activation_shifted), the value before_nonlinear layers multiply."""
    x_int, s_x, z = quantize_activation_shifted(x, act_bits, eps)
    return (x_int - z) / s_x


# -----------------------------------------------------------------------------
# b1.58: ternary weights, act_bits-bit (8) activations

def weight_scale(w, eps=1e-5):
    """s_w = mean(|W|), one scalar per tensor, clamped to >= eps."""
    return w.abs().mean().clamp(min=eps)


def quantize_weight(w, eps=1e-5):
    """W (out, in) float -> (W_t int8 in {-1, 0, 1}, s_w float32 scalar), W ~= W_t * s_w.
    256 rows at a time, so a float32 weight needs no float copy of the whole matrix."""
    w = w.detach().float()
    s_w = weight_scale(w, eps)
    w_t = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.size(0), 256):
        w_t[i:i + 256] = (w[i:i + 256] / s_w).round_().clamp_(-1, 1)
    return w_t, s_w


def activation_scale(x, act_bits=8, eps=1e-5):
    """s_x = Q / max|x| per token (last dim), Q = 2^(act_bits - 1) - 1 (127), shape (..., 1);
    max|x| clamped to >= eps."""
    return (2 ** (act_bits - 1) - 1) / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)


def quantize_activation(x, act_bits=8, eps=1e-5):
    """x float (..., C) -> (x_int int8 in [-Q - 1, Q], s_x float32 (..., 1)), x ~= x_int / s_x."""
    x = x.detach().float()
    q = 2 ** (act_bits - 1) - 1
    s_x = activation_scale(x, act_bits, eps)
    x_int = (x * s_x).round().clamp(-q - 1, q)
    return x_int.to(torch.int8), s_x


def dequantize_activation(x, config):
    """x float32 -> x_q, the activation a b1.58 layer multiplies (taken without its gradient, by ste
    or TernaryMatmul): x_int / s_x, or (x_int - z) / s_x before a non-linearity."""
    if config.before_nonlinear:
        return dequantize_shifted(x, config.act_bits, config.eps)
    q = 2 ** (config.act_bits - 1) - 1
    s_x = activation_scale(x, config.act_bits, config.eps)                # (..., 1)
    return (x * s_x).round().clamp(-q - 1, q) / s_x


def quant_mix(x, x_quantized, quant_lambda):
    """The value a layer multiplies during warm-up quantization (Hugging Face, "Fine-tuning LLMs to
    1.58bit: extreme quantization made easy", 2024): x + lambda * (quant(x) - x), computed as
    torch.lerp, which returns x exactly at lambda = 0 and x_quantized exactly at lambda = 1, so both
    ends are bit for bit the float and the quantized layer. quant_lambda: a 0-dim float32 tensor, or
    None for x_quantized itself (no warm-up)."""
    return x_quantized if quant_lambda is None else torch.lerp(x, x_quantized, quant_lambda.to(x.dtype))


class BitLinear(BitLinearBase):
    """BitNet b1.58 linear layer: ternary weights, per-token act_bits-bit (int8) activations.
    Options: BitLinearConfig (see BitLinearBase for the constructor).

    quant_lambda (None, or a 0-dim float32 tensor in [0, 1] on the layer's device): warm-up
    quantization, quant_mix of the weights and of the activations (straight-through in both), for
    turning a float model ternary; the trainer updates the tensor in place (train.py,
    quant_warmup_iters), so a compiled graph reads the new value without recompiling.

    The eval cache: on the CPU, in eval mode with gradients off (and no autocast), a layer with
    the default options quantizes its weight once, packs the codes 2 bits each (pack_ternary) and
    from then on computes the integer line y = (x_int @ W_t^T) * (s_w / s_x) with cpu_kernel, the
    float weight untouched. The cache is keyed on the weight's storage and version counter, so an
    optimizer step, load_state_dict or any in-place change rebuilds it, and train()/eval() drop it
    (a change through weight.data bypasses the version counter: call train() or eval() after one;
    a weight made under torch.inference_mode has none, and keeps the uncached forward)."""

    quant_lambda = None
    eval_cache = None   # (key, packed, row_scale) once built (packed_weight)

    def train(self, mode=True):
        self.eval_cache = None
        return super().train(mode)

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        if (not (self.training or torch.is_grad_enabled()) and not torch.compiler.is_compiling() and x.is_cpu
                and self.config == DEFAULT_CONFIG and not torch.is_autocast_enabled('cpu')
                and self.quant_lambda is None
                and not self.weight.is_inference()):   # inference-mode tensors have no version counter
            packed, row_scale = self.packed_weight()
            x2 = x.reshape(-1, x.size(-1))
            y = cpu_kernel(x2 if x2.dtype == torch.float32 else x2.float(), packed, row_scale, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if torch.compiler.is_compiling() or self.quant_lambda is not None:
            y = ternary_matmul_ste(x, self.weight, self.config, self.quant_lambda)
        else:
            y = TernaryMatmul.apply(x, self.weight, self.config)
        if self.bias is not None:
            y = y + self.bias
        return y

    def packed_weight(self):
        """(packed (ceil(out / 4), in) uint8, row_scale (4 ceil(out / 4),) float32): the weight's
        codes in pack_ternary's layout and s_w for every row (0 for the padding rows), quantized as
        TernaryMatmul quantizes, built at the first call after the weight changed."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        cache = self.eval_cache
        if cache is None or cache[0] != key:
            self.eval_cache = None   # the old codes go before the new ones are built
            w_t, s_w = quantize_weight(w, self.config.eps)
            packed = pack_ternary(w_t)
            del w_t
            row_scale = torch.zeros(4 * packed.size(0), device=w.device)
            row_scale[:w.size(0)] = s_w
            self.eval_cache = cache = (key, packed, row_scale)
        return cache[1], cache[2]


DEFAULT_CONFIG = BitLinearConfig()


def ternary_linear_reference(x, packed, row_scale, out_features):
    """The integer line of a packed layer: x (M, K) float32, packed (R, K) uint8 (pack_ternary),
    row_scale (4R,) float32 -> (M, out_features) float32 = (x_int @ W_t^T) * (row_scale / s_x).
    The sums of integers are exact in float32 (|sum| <= 128 K < 2^24), so any kernel that sums
    exactly and rescales the same way gives the same bits (integer_forward too)."""
    x_int, s_x = quantize_activation(x)                                        # int8, (M, 1)
    w_t = unpack_ternary(packed, 4 * packed.size(0)).float()                 # (4R, K)
    return (F.linear(x_int.float(), w_t) * (row_scale / s_x))[:, :out_features]


# What an eval-cached BitLinear calls on the CPU (the signature of ternary_linear_reference);
# cpu_kernels.py puts its compiled kernel here when it is imported.
cpu_kernel = ternary_linear_reference


def ternary_matmul_ste(x, w, config, quant_lambda=None):
    """y = x_q @ W_q^T in the straight-through form, for torch.compile (and for warm-up
    quantization, which multiplies quant_mix(x, x_q) and quant_mix(W, W_q) instead)."""
    x = x.float()  # quantize in fp32 whatever autocast does around us
    x_q = ste(x, quant_mix(x, dequantize_activation(x, config), quant_lambda))    # x_int / s_x, identity gradient
    s_w = weight_scale(w, config.eps).detach()                                      # scalar
    w_q = ste(w, quant_mix(w, (w / s_w).round().clamp(-1, 1) * s_w, quant_lambda))  # W_t * s_w, identity gradient
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
    def forward(ctx, x, w, config):
        ctx.x_dtype = x.dtype
        x = x.float()  # quantize in fp32 whatever autocast does around us
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        x_q = dequantize_activation(x, config).to(mm_dtype)                 # x_int / s_x
        s_w = weight_scale(w, config.eps)                                   # scalar
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
        return grad_x, grad_w, None


# -----------------------------------------------------------------------------
# b1: the original binary BitNet

class BitLinear1b(BitLinearBase):
    """Original BitNet linear layer: binary weights, absmax act_bits-bit activations.
    Options: BitLinearConfig (see BitLinearBase for the constructor); quant_lambda as BitLinear's."""
    quant_lambda = None

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        x = x.float()
        lam = self.quant_lambda
        x_q = ste(x, quant_mix(x, dequantize_activation_1b(x, self.config), lam))  # x_q * gamma / Q_b, identity gradient
        w = self.weight
        beta = w.abs().mean().clamp(min=self.config.eps).detach()
        w_b = torch.where(w - w.mean().detach() > 0, 1.0, -1.0)  # sign(W - alpha), sign(0) = -1
        y = F.linear(x_q, ste(w, quant_mix(w, w_b * beta, lam)))  # dequantized, as for b1.58
        if self.bias is not None:
            y = y + self.bias
        return y


def quantize_activation_1b(x, act_bits=8, eps=1e-5):
    """x float -> (x_q integer-valued float32 in [-Q_b, Q_b], gamma (..., 1)), x ~= x_q * gamma / Q_b."""
    x = x.detach().float()
    q_b = 2 ** (act_bits - 1)
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)   # (..., 1)
    return (x * (q_b / gamma)).clamp(-q_b + eps, q_b - eps).round(), gamma


def dequantize_activation_1b(x, config):
    """x float32 -> the activation a b1 layer multiplies (taken without its gradient, by ste):
    x_q * gamma / Q_b, or (x_int - z) / s_x before a non-linearity."""
    if config.before_nonlinear:
        return dequantize_shifted(x, config.act_bits, config.eps)
    x_q, gamma = quantize_activation_1b(x, config.act_bits, config.eps)
    return x_q * (gamma / 2 ** (config.act_bits - 1))


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
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinearBase)]


def integer_weight(module):
    """(W_i int8 (out, in), scale float32 scalar) of a layer: (W_t, s_w) for b1.58, (W_b, beta) for b1."""
    quantize = quantize_weight_1b if isinstance(module, BitLinear1b) else quantize_weight
    return quantize(module.weight, module.config.eps)


def bitlinear_report(model):
    """One row per BitLinear layer: what the weight quantizes to, and whether that is what it
    should be (exactly ternary for b1.58, exactly binary for b1, a finite positive scale)."""
    rows = []
    for name, m in bitlinear_layers(model):
        binary = isinstance(m, BitLinear1b)
        w_q, scale = integer_weight(m)
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
    packed inference computes; before a non-linearity ((x_int @ W_t^T) - z * rowsum(W_t)) * (s_w / s_x)
    (module docstring); then the bias."""
    if module.norm is not None:
        x = module.norm(x)
    cfg = module.config
    w_q, w_scale = integer_weight(module)
    if cfg.before_nonlinear:
        x_q, s_x, z = quantize_activation_shifted(x, cfg.act_bits, cfg.eps)
        scale = w_scale / s_x
    elif isinstance(module, BitLinear1b):
        x_q, gamma = quantize_activation_1b(x, cfg.act_bits, cfg.eps)
        scale = w_scale * gamma / 2 ** (cfg.act_bits - 1)
    else:
        x_q, s_x = quantize_activation(x, cfg.act_bits, cfg.eps)
        scale = w_scale / s_x
    y = x_q.double() @ w_q.double().t()
    if cfg.before_nonlinear:   # W_q applied to eta * ones, eta = -z / s_x: (..., 1) * (out,) row sums
        y = y - z.double() * w_q.double().sum(dim=1)
    y = y.to(x.dtype) * scale.to(x.dtype)
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
    The model is called as model(idx) with gradients on, so every layer computes its training form
    (not the CPU eval cache, which is the integer line itself); call it in float32.
    Returns dict(rows, n_layers, n_weights, zero_fraction, packed_bits, max_diff (the largest
    |output - integer output| / max(1, max|integer output|) over the layers), tol, ok)."""
    rows = bitlinear_report(model)
    diffs = []

    def compare(module, args, out):
        ref = integer_forward(module, args[0])
        diffs.append(((out - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item())
    with bitlinear_hooks(model, compare), torch.enable_grad():
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
