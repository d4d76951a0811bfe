"""
Packed ternary inference: the BitLinear weights held as 2-bit values, 4 per byte, and nothing
else of them (the latent float weights are dropped).

    y = (x_int @ W_t^T) * (s_w / s_x)        bitlinear.py's equation, from stored integers

In memory, the projections of a block that read the same input are fused into one matrix:
q, k, v (input_layernorm) and gate, up (post_attention_layernorm); o and down stay alone. Each
fused matrix is packed with the Hugging Face block-strided layout (bitlinear.pack_ternary):
packed row r holds rows r, r + R, r + 2R, r + 3R. For [gate; up] (out = 2I, R = I / 2) one
packed row therefore holds gate[r], gate[r + R], up[r], up[r + R], so a kernel can apply
relu(gate)^2 * up without leaving its registers (so hidden_act='silu' models are not packed). Every
packed linear also applies the RMSNorm that precedes it (none for o and down when sub_norms=False)
and quantizes the activations itself, and o and down add the residual:

    qkv     = PackedLinear(input_layernorm)             -> rope, attention, attn_sub_norm ...
    x       = x + PackedLinear(attn_sub_norm)(attn)     (epilogue 'residual')
    h       = PackedLinear(post_attention_layernorm)(x) (epilogue 'relu2': relu(gate)^2 * up)
    x       = x + PackedLinear(ffn_sub_norm)(h)         (epilogue 'residual')

One scale per output row (s_w of the projection the row came from) keeps fused rows exact.
On disk (checkpoint.save_packed) every projection is stored on its own in the Hugging Face offline
format: `weight` uint8 (ceil(out / 4), in) and `weight_scale` (1,) = s_w.

The arithmetic lives in one custom op, torch.ops.bitnet.packed_linear (ops.py): a pure-PyTorch
implementation that runs everywhere (unpack, exact integer product, rescale), on the CPU a C++
kernel that reads the 2-bit bytes as they are (cpu_kernels.py), and on CUDA a Triton kernel
(ternary_kernels.py), which torch.compile and CUDA graphs treat as one call.
"""

import ctypes
import sys

import torch
import torch.nn as nn
from tqdm import tqdm

import cpu_kernels  # registers the CPU kernel for bitnet::packed_linear (built at its first call)
from bitlinear import BitLinear, pack_ternary, quantize_weight, unpack_2bit, unpack_ternary
from model import GPT, PROJECTIONS, GPTConfig, projection_name, projection_parent, rotary_tables
from ops import EPILOGUES, packed_linear_reference

PACKED_FORMAT = 'bitnet-packed-v1'
_reference_path = False  # set by verify_packed: run every layer through packed_linear_reference


class PackedLinear(nn.Module):
    """Ternary projections that read one input, fused and packed (see the module docstring).
    weights: [(W_t int8 (out_i, in), s_w)], concatenated along the output in this order.
    Holds only the packed bytes and one scale per row; the norm comes with each call."""

    def __init__(self, weights, epilogue='none'):
        super().__init__()
        w_t = torch.cat([w for w, _ in weights])
        self.out_sizes = [w.size(0) for w, _ in weights]
        self.in_features = w_t.size(1)
        self.epilogue = EPILOGUES[epilogue]
        self.out_features = w_t.size(0) // 2 if epilogue == 'relu2' else w_t.size(0)
        if epilogue == 'relu2' and (len(weights) != 2 or self.out_sizes[0] != self.out_sizes[1] or w_t.size(0) % 4):
            raise ValueError("relu2 fuses [gate; up] of equal size, with 2 * size divisible by 4")
        self.register_buffer('packed', pack_ternary(w_t))                         # (R, in) uint8
        scale = torch.zeros(4 * self.packed.size(0), device=w_t.device)
        scale[:w_t.size(0)] = torch.cat([s.float().expand(w.size(0)) for w, s in weights])
        self.register_buffer('row_scale', scale)                                   # (4R,) float32

    def forward(self, x, norm=None, residual=None):
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        norm_weight = norm.weight if norm is not None else x.new_empty(0)
        eps = norm.eps if norm is not None else 0.0
        res = residual.reshape(-1, self.out_features) if residual is not None else x.new_empty(0)
        if _reference_path:
            op = packed_linear_reference
        elif x.device.type == 'cpu' and not torch.compiler.is_compiling():
            op = cpu_kernels.packed_linear_cpu   # the op's CPU kernel, without the dispatcher's ~10-20 us a call
        else:
            op = torch.ops.bitnet.packed_linear
        y = op(x, norm_weight, self.packed, self.row_scale, res, self.out_features, self.epilogue, eps)
        return y.view(*shape, self.out_features)

    def ternary_weights(self):
        """[(W_t int8 (out_i, in), s_w)] back from the packed bytes, one per fused projection."""
        w_t = unpack_ternary(self.packed, sum(self.out_sizes))
        out, start = [], 0
        for n in self.out_sizes:
            out.append((w_t[start:start + n], self.row_scale[start:start + 1].clone()))
            start += n
        return out


class PackedBlock(nn.Module):
    """A transformer block with packed ternary projections; the same interface as model.Block,
    and the same names for everything it keeps (norms), so its state dict reads like one."""

    def __init__(self, block, weights):
        """block: a model.Block, whose norms and attention core are kept and whose projections
        are dropped; weights: {'q_proj': (W_t, s_w), ...} for its seven projections."""
        super().__init__()
        self.input_layernorm = block.input_layernorm
        self.post_attention_layernorm = block.post_attention_layernorm
        self.self_attn, self.mlp = block.self_attn, block.mlp   # keep attn_sub_norm, ffn_sub_norm, attend()
        for name in PROJECTIONS:
            delattr(getattr(self, projection_parent(name)), name)
        self.qkv = PackedLinear([weights['q_proj'], weights['k_proj'], weights['v_proj']])
        self.o = PackedLinear([weights['o_proj']], 'residual')
        self.gate_up = PackedLinear([weights['gate_proj'], weights['up_proj']], 'relu2')
        self.down = PackedLinear([weights['down_proj']], 'residual')

    def forward(self, x, cos, sin, kv_cache=None):
        qkv = self.qkv(x, self.input_layernorm)
        q, k, v = qkv.split(self.qkv.out_sizes, dim=-1)
        y = self.self_attn.attend(q, k, v, cos, sin, kv_cache, qkv)
        x = self.o(y, self.self_attn.attn_sub_norm, residual=x)
        h = self.gate_up(x, self.post_attention_layernorm)
        return self.down(h, self.mlp.ffn_sub_norm, residual=x)

    def ternary_weights(self):
        pairs = self.qkv.ternary_weights() + self.o.ternary_weights() + self.gate_up.ternary_weights() \
            + self.down.ternary_weights()
        return dict(zip(PROJECTIONS, pairs))


@torch.no_grad()
def pack_model(model, weights=None):
    """Turn a b1.58 GPT into its packed form, in place, and return it. weights: optional
    [{'q_proj': (W_t, s_w), ...} per layer] (from a packed file); by default every BitLinear's
    latent weight is quantized. The latent weights are released."""
    if model.config.quant != 'b1.58':
        raise ValueError(f"only b1.58 models pack into ternary weights (this one is quant='{model.config.quant}')")
    options = model.config.nonstandard_options()
    if options:
        raise ValueError(f"a model with {options} cannot be packed: packed layers compute 8-bit symmetric "
                         f"activations without a bias (sample.py samples from the training checkpoint itself)")
    if model.config.hidden_act != 'relu2':
        raise ValueError(f"a model with hidden_act='{model.config.hidden_act}' cannot be packed: packed layers fuse "
                         f"relu(gate)^2 * up into the gate/up kernel (sample.py samples from the training checkpoint itself)")
    layers = tqdm(model.model.layers, desc='packing', unit='layer', leave=False,   # on a terminal only
                  disable=not sys.stderr.isatty() or len(model.model.layers) < 8)
    for i, block in enumerate(layers):
        if isinstance(block, PackedBlock):
            continue
        if weights is not None:
            w = weights[i]
        else:
            w = {}
            for name in PROJECTIONS:
                layer = getattr(getattr(block, projection_parent(name)), name)
                assert isinstance(layer, BitLinear)
                w[name] = quantize_weight(layer.weight)
        model.model.layers[i] = PackedBlock(block, w)
    model.packed = True
    return model


def is_packed(model):
    return getattr(model, 'packed', False)


def packed_state_dict(model):
    """A packed model as a flat dict in the Hugging Face offline layout: for every projection
    `<name>.weight` uint8 (ceil(out / 4), in) and `<name>.weight_scale` (1,) float32; every other
    tensor (embedding, norms, lm_head) under its usual name."""
    out = {k: v for k, v in model.state_dict().items() if not k.endswith(('.packed', '.row_scale'))}
    for i, block in enumerate(model.model.layers):
        for proj, (w_t, s_w) in block.ternary_weights().items():
            out[f'{projection_name(i, proj)}.weight'] = pack_ternary(w_t)
            out[f'{projection_name(i, proj)}.weight_scale'] = s_w.reshape(1).float()
    if model.config.tie_embeddings:
        out.pop('lm_head.weight', None)  # the same tensor as model.embed_tokens.weight
    return out


def packed_checkpoint(model, tokenizer=None, dtype=None):
    """The dict of a packed file (checkpoint.save_packed writes it): the packed state dict,
    model_args and the tokenizer meta data. dtype converts the full-precision tensors
    (embedding, norms, lm_head), e.g. torch.bfloat16; the scales stay float32."""
    state = packed_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith('weight_scale') else v
                 for k, v in state.items()}
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    return dict(format=PACKED_FORMAT, packed=state, model_args=model_args, tokenizer=tokenizer)


def check_packed_state(state, config):
    """Structural problems of a packed state dict (missing projections, wrong dtypes). The values
    themselves (codes, scales) are checked by verify_packed, which reports FAIL instead."""
    problems = []
    for i in range(config.n_layer):
        for proj in PROJECTIONS:
            name = projection_name(i, proj)
            packed, scale = state.get(f'{name}.weight'), state.get(f'{name}.weight_scale')
            if packed is None or scale is None:
                problems.append(f'{name} is missing')
            elif packed.dtype != torch.uint8:
                problems.append(f'{name}.weight is {packed.dtype}, not uint8')
            elif scale.numel() != 1:
                problems.append(f'{name}.weight_scale has {scale.numel()} values, not 1')
    return problems


@torch.no_grad()
def verify_packed(model, idx, rtol=1e-5):
    """The packed counterpart of bitlinear.verify_bitlinear:
    1. every packed code is 0, 1 or 2 (-1, 0, +1; code 3 is invalid), every scale finite > 0;
    2. the model's logits on idx (through torch.ops.bitnet.packed_linear: the Triton kernel on
       CUDA) equal the logits with every layer through packed_linear_reference (unpack, exact
       integer product, rescale), within rtol * max|logits|."""
    global _reference_path
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            n_rows = sum(m.out_sizes)
            codes = unpack_2bit(m.packed, n_rows)
            scale = m.row_scale[:n_rows]
            ok = not (codes == 3).any().item() and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
            rows.append(dict(name=name, numel=codes.numel(), zero_fraction=(codes == 1).float().mean().item(),
                             n_projections=len(m.out_sizes), bytes=m.packed.numel(), ok=ok))
    logits = model(idx)[0]
    _reference_path = True
    try:
        logits_ref = model(idx)[0]
    finally:
        _reference_path = False
    max_diff = (logits.float() - logits_ref.float()).abs().max().item()
    tol = rtol * max(1.0, logits_ref.abs().max().item())
    n_weights = sum(r['numel'] for r in rows)
    return dict(
        rows=rows,
        n_layers=sum(r['n_projections'] for r in rows),
        n_weights=n_weights,
        zero_fraction=sum(r['zero_fraction'] * r['numel'] for r in rows) / max(n_weights, 1),
        packed_bits=8 * sum(r['bytes'] for r in rows) / max(n_weights, 1),
        max_diff=max_diff,
        tol=tol,
        ok=all(r['ok'] for r in rows) and max_diff <= tol,
    )


def load_packed(checkpoint, path='packed checkpoint'):
    """A packed GPT (on the CPU) from a packed file's dict (packed_checkpoint). The model is
    built on the meta device first, so no latent weights are ever allocated, and the fused 2-bit
    buffers are built one layer at a time; the other tensors (embedding, norms, lm_head) are the
    file's own (assigned, not copied: memory-mapped where checkpoint.load_checkpoint mapped the
    file). A damaged or mismatched file raises ValueError with a one-line reason naming path."""
    config = GPTConfig(**{**checkpoint['model_args'], 'dropout': 0.0})
    state = checkpoint['packed']
    problems = check_packed_state(state, config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{path} is damaged: {problems[0]}{more}")
    with torch.device('meta'):
        model = GPT(config)
    for i, block in enumerate(model.model.layers):   # one layer's int8 weights at a time, then only its bytes
        w = {}
        for proj in PROJECTIONS:
            layer, name = getattr(getattr(block, projection_parent(proj)), proj), projection_name(i, proj)
            expected = (-(-layer.out_features // 4), layer.in_features)
            if tuple(state[f'{name}.weight'].shape) != expected:
                raise ValueError(f"{path}: {name}.weight has shape {tuple(state[f'{name}.weight'].shape)}, "
                                      f"the model needs {expected}")
            w[proj] = (unpack_ternary(state[f'{name}.weight'], layer.out_features),
                       state[f'{name}.weight_scale'].float().reshape(()))
        model.model.layers[i] = PackedBlock(block, w)
    model.packed = True
    rest = {k: v for k, v in state.items() if not k.endswith(('_proj.weight', '_proj.weight_scale'))}
    # the norms are copied (a few KB), so that the file's mapping (one for all of its tensors) lives
    # only as long as the embedding and lm_head: once a decoding model drops those
    # (cpu_kernels.half_head), the pages it read are released
    rest = {k: v.clone() if v.dim() == 1 else v for k, v in rest.items()}
    try:
        model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match its model: {str(e).splitlines()[0]}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path} is missing {left[0]}")
    release_free_heap()
    return model


def release_free_heap():
    """Give the heap's free pages back to the system: glibc keeps what the temporary int8 weights
    of load_packed freed (~50 MB for a 124M model), which would stay resident. Linux/glibc only."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


# the CUDA kernel registers itself for the op where Triton and a GPU are there
if torch.cuda.is_available():
    try:
        import ternary_kernels  # noqa: F401
    except ImportError:
        pass
