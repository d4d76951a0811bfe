"""
The inference ops: each a torch custom op with a pure-PyTorch implementation that runs on any
device, so torch.compile and CUDA graphs see one call, and faster kernels can register for a
device without this file knowing them (ternary_kernels.py does so for CUDA).

    bitnet::packed_linear     a packed ternary layer: RMSNorm, int8 activations, the exact
                              integer product with 2-bit weights, rescale, epilogue (packed.py)
    bitnet::decode_attention  one decoding step of attention: rotary, cache write, attend
    bitnet::lm_head_argmax    the decoding head: logits and the greedy token together (bfloat16
                              weights, or int8 with a float32 scale per row: quantize_head)
    bitnet::linear            F.linear with one or more weights side by side, an RMSNorm before and
                              a residual or relu^2 after: a float model's projections as the engine
                              decodes them (a GEMV for one row of x on CUDA)

Each op's reference function (`*_reference`) is what the op computes; tests compare every
kernel with it.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from bitlinear import quantize_activation, rms_norm, unpack_ternary
from model import apply_rotary

EPILOGUES = {'none': 0, 'residual': 1, 'relu2': 2}


def float_matmul(x_int, packed, rows):
    """int8 activations (M, K) x the first `rows` rows of packed 2-bit weights (R, K)
    -> (M, rows) float32 holding the exact integer sums."""
    return F.linear(x_int.float(), unpack_ternary(packed, rows).float())


def packed_linear_reference(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps,
                            matmul=float_matmul):
    """x (M, K) -> (M, out) in x's dtype. norm_weight (K,): the RMSNorm applied first, as
    bitlinear.RMSNorm computes it (empty: no norm). packed (R, K) uint8, row_scale (4R,) float32.
    epilogue 0: y; 1: y + residual (M, out); 2: relu(y[:, :out])^2 * y[:, out:2 out] ([gate; up])."""
    dtype = x.dtype
    if norm_weight.numel():
        x = rms_norm(x, norm_weight, eps)
    x_int, s_x = quantize_activation(x)                                  # int8, (M, 1)
    y = matmul(x_int, packed, 4 * packed.size(0)) * (row_scale / s_x)    # exact integers, rescaled
    if epilogue == 2:
        y = F.relu(y[:, :out_features]).square() * y[:, out_features:2 * out_features]
    else:
        y = y[:, :out_features]
    if epilogue == 1:
        y = y + residual
    return y.to(dtype)


@torch.library.custom_op('bitnet::packed_linear', mutates_args=())
def packed_linear(x: torch.Tensor, norm_weight: torch.Tensor, packed: torch.Tensor, row_scale: torch.Tensor,
                  residual: torch.Tensor, out_features: int, epilogue: int, eps: float) -> torch.Tensor:
    """The packed layer as one op (see packed_linear_reference); CUDA has its own kernel."""
    return packed_linear_reference(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps)


@packed_linear.register_fake
def _(x, norm_weight, packed, row_scale, residual, out_features, epilogue, eps):
    return x.new_empty(x.size(0), out_features)


def decode_attention_reference(qkv, k_cache, v_cache, pos, cos, sin, n_head):
    """One decoding step of attention, for one new position per sequence: qkv (B, (nh + 2 nkv) hs)
    is the projected q, k, v; pos holds each sequence's position, (B,) (or one for all, 0-d);
    rotate q and k (cos, sin: the (max_positions, hs) tables), write k and v into the caches
    (B, nkv, max_len, hs) at each sequence's position, and attend from q to its positions
    0 .. pos -> (B, nh * hs)."""
    B, nkv, max_len, hs = k_cache.shape
    pos = pos.expand(B)
    q, k, v = qkv.split([n_head * hs, nkv * hs, nkv * hs], dim=-1)
    q, k, v = q.view(B, n_head, 1, hs), k.view(B, nkv, 1, hs), v.view(B, nkv, 1, hs)
    c, s = cos[pos].view(B, 1, 1, hs), sin[pos].view(B, 1, 1, hs)
    q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
    b = torch.arange(B, device=q.device)
    k_cache[b, :, pos] = k[:, :, 0].to(k_cache.dtype)                      # (B, nkv, hs) at (b, :, pos[b])
    v_cache[b, :, pos] = v[:, :, 0].to(v_cache.dtype)
    mask = (torch.arange(max_len, device=q.device) <= pos[:, None])[:, None, None, :]   # (B, 1, 1, max_len)
    y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask,
                                       enable_gqa=n_head != nkv)
    return y.reshape(B, n_head * hs).to(qkv.dtype)


@torch.library.custom_op('bitnet::decode_attention', mutates_args=('k_cache', 'v_cache'))
def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, n_head: int) -> torch.Tensor:
    """decode_attention_reference as one op; on CUDA one Triton kernel (ternary_kernels.py)."""
    return decode_attention_reference(qkv, k_cache, v_cache, pos, cos, sin, n_head)


@decode_attention.register_fake
def _(qkv, k_cache, v_cache, pos, cos, sin, n_head):
    return qkv.new_empty(qkv.size(0), n_head * k_cache.size(3))


def lm_head_argmax_reference(x, weight, scale=None):
    """The decoding head: x (B, C), the final hidden states -> logits (B, vocab) in x's dtype and
    the greedy token (B, 1), the index of each row's first maximum (as argmax picks it).
    scale (vocab,) float32, given for an int8 weight: logits = (x @ weight^T) * scale, in float32
    before rounding to x's dtype (quantize_head makes such a weight)."""
    if scale is None:
        logits = F.linear(x, weight)
    else:
        logits = (F.linear(x.float(), weight.float()) * scale).to(x.dtype)
    return logits, logits.argmax(dim=-1, keepdim=True)


@torch.library.custom_op('bitnet::lm_head_argmax', mutates_args=())
def lm_head_argmax(x: torch.Tensor, weight: torch.Tensor,
                   scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_head_argmax_reference as one op; on CUDA one Triton kernel (ternary_kernels.py)."""
    return lm_head_argmax_reference(x, weight, scale)


@lm_head_argmax.register_fake
def _(x, weight, scale=None):
    return x.new_empty(x.size(0), weight.size(0)), x.new_empty(x.size(0), 1, dtype=torch.long)


def linear_reference(x, weights, bias=None, norm_weight=None, residual=None, epilogue=0, eps=0.0):
    """x (..., K) -> the RMSNorm of x with norm_weight (None: none), as model.RMSNorm computes it, then
    through weights (N_i, K) side by side, each its own F.linear (bias: theirs, concatenated), then
    epilogue 0: y; 1: y + residual; 2: relu(gate)^2 * up, for weights [gate, up], as model.MLP."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps).to(x.dtype)
    biases = [None] * len(weights) if bias is None else bias.split([w.size(0) for w in weights])
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    if epilogue == 2:
        return F.relu(ys[0]).square() * ys[1]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return y + residual if epilogue == 1 else y


@torch.library.custom_op('bitnet::linear', mutates_args=())
def linear(x: torch.Tensor, weights: List[torch.Tensor], bias: Optional[torch.Tensor] = None,
           norm_weight: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, epilogue: int = 0,
           eps: float = 0.0) -> torch.Tensor:
    """linear_reference as one op: a float model's block as the engine decodes it (engine.DecodeBlock:
    RMSNorm, q, k, v together; sub-norm, o, residual; RMSNorm, gate and up, relu^2; sub-norm, down,
    residual); on CUDA a Triton GEMV for one row of x and up to three weights (ternary_kernels.py)."""
    return linear_reference(x, weights, bias, norm_weight, residual, epilogue, eps)


@linear.register_fake
def _(x, weights, bias=None, norm_weight=None, residual=None, epilogue=0, eps=0.0):
    return x.new_empty(*x.shape[:-1], weights[0].size(0) if epilogue == 2 else sum(w.size(0) for w in weights))


def quantize_head(weight):
    """An lm_head weight (vocab, C) -> int8 (vocab, C) and float32 scales (vocab,): each row
    rounded to 127 levels of its own absmax, w ~= w_int8 * scale. Half the bytes of bfloat16, for
    Engine(head='int8'); every logit moves by at most sum_k |x_k| * scale / 2."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
