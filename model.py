"""
A minimal GPT whose projections are BitLinear layers, in the layout of BitNet b1.58 2B4T
(arXiv 2504.12285), which is also Hugging Face's BitNetForCausalLM. Every choice, in one place:

- token embedding, no learned positions: rotary embeddings (rotate-half pairs (i, i + d/2),
  theta = rope_theta) on queries and keys
- pre-norm residual blocks, RMSNorm with a learned weight everywhere (eps = norm_eps)
- grouped-query attention (n_kv_head divides n_head), then attn_sub_norm, then o_proj
- gated squared-ReLU MLP: down_proj(ffn_sub_norm(relu(gate_proj(x))^2 * up_proj(x)))
  (hidden_act='silu': silu(gate_proj(x)) * up_proj(x), Llama's SwiGLU)
- SubLN: the sub-norms sit in front of o_proj and down_proj, the block's own pre-norms in
  front of the other projections, so every BitLinear sees normalized input (sub_norms=False
  drops attn_sub_norm and ffn_sub_norm: the Llama layout, for importing float Llama checkpoints)
- no biases (bias=True gives the 7 projections one); a final RMSNorm; lm_head and the embedding
  stay full precision, optionally tied
- quant selects the 7 projections of every block: 'b1.58' BitLinear (ternary),
  'b1' BitLinear1b (binary), 'none' nn.Linear (the float baseline, identical otherwise);
  act_bits sets their activations' bits (8), before_nonlinear the down projection's quantizer

Module names are the Hugging Face state-dict names (model.embed_tokens, model.layers.N.
self_attn.q_proj, ..., model.norm, lm_head), so export is a rename of nothing.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bitlinear import BitLinear, BitLinear1b, BitLinearConfig, RMSNorm

QUANT_MODES = ('b1.58', 'b1', 'none')
ACTIVATIONS = {'relu2': lambda x: F.relu(x).square(), 'silu': F.silu}   # hidden_act -> the MLP's gate function
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')  # a block's linears


def projection_parent(proj):
    """The submodule of a Block that holds projection proj: 'self_attn' or 'mlp'."""
    return 'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'


def projection_name(i, proj):
    """The state-dict prefix of projection proj of layer i, e.g. model.layers.0.mlp.up_proj."""
    return f'model.layers.{i}.{projection_parent(proj)}.{proj}'


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50257
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = None           # None: same as n_head (plain multi-head attention)
    n_embd: int = 384
    intermediate_size: int = None   # None: 8/3 * n_embd rounded up to 64 (the params of a 4x MLP)
    dropout: float = 0.0
    quant: str = 'b1.58'            # 'b1.58' | 'b1' | 'none'
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    act_bits: int = 8               # bits per activation of the BitLinear projections (2..8)
    bias: bool = False              # a bias in every projection (the b1.58 architecture has none)
    before_nonlinear: bool = False  # down_proj quantizes its input over min(x)..max(x) (bitlinear.py)
    hidden_act: str = 'relu2'       # the MLP's gate: 'relu2' (relu(x)^2, BitNet b1.58 2B4T) or 'silu' (Llama)
    sub_norms: bool = True          # attn_sub_norm and ffn_sub_norm in front of o_proj and down_proj (SubLN)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {self.quant!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.quant == 'none' and (self.act_bits != 8 or self.before_nonlinear):
            raise ValueError("act_bits and before_nonlinear set the BitLinear layers' quantizer: "
                             "quant='none' has none (use quant='b1.58' or 'b1')")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")

    def nonstandard_options(self):
        """The projection options set away from BitNet b1.58's (8-bit symmetric activations, no
        bias) as text, e.g. 'act_bits=4, bias=True' ('' for none): what the packed and the
        transformers formats cannot hold."""
        return ', '.join(text for text, on in ((f'act_bits={self.act_bits}', self.act_bits != 8),
                                               ('bias=True', self.bias),
                                               ('before_nonlinear=True', self.before_nonlinear)) if on)


def make_linear(config, in_features, out_features, follows_nonlinearity=False):
    """The projection layer for config.quant, with config's act_bits and bias. follows_nonlinearity:
    the layer's input comes out of a non-linearity (down_proj's: relu(gate)^2 * up, sub-normed),
    so config.before_nonlinear applies to it."""
    options = BitLinearConfig(act_bits=config.act_bits, bias=config.bias,
                              before_nonlinear=follows_nonlinearity and config.before_nonlinear)
    if config.quant == 'b1.58':
        return BitLinear(in_features, out_features, config=options)
    if config.quant == 'b1':
        return BitLinear1b(in_features, out_features, config=options)
    return nn.Linear(in_features, out_features, bias=config.bias)


def rotary_tables(head_dim, max_positions, theta):
    """cos, sin of shape (max_positions, head_dim), each frequency repeated for both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x (B, nh, T, hs); cos, sin (T, hs). Rotate-half convention: pairs (i, i + hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated: (n_layer, B, n_kv_head, max_len, head_dim).
    pos (a Python int) counts the positions already written; generate() uses this one."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def rope(self, cos, sin, T):
        """The rotary tables of the T positions about to be written."""
        return cos[self.pos:self.pos + T], sin[self.pos:self.pos + T]

    def attend(self, layer_idx, q, k, v):
        """Write k, v (B, nkv, T, hs) at positions pos .. pos + T - 1, then attend from q
        (B, nh, T, hs) to every position up to each query's own -> (B, nh, T, hs)."""
        T, pos = k.size(2), self.pos
        self.k[layer_idx, :, :, pos:pos + T] = k
        self.v[layer_idx, :, :, pos:pos + T] = v
        k, v = self.k[layer_idx, :, :, :pos + T].to(q.dtype), self.v[layer_idx, :, :, :pos + T].to(q.dtype)
        mask = None
        if T > 1 and pos > 0:  # a chunk after a prefix: query i sees keys 0 .. pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and pos == 0,
                                              enable_gqa=q.size(1) != k.size(1))

    def decodes(self, T):
        """Whether attention for T new positions goes through self.decode(layer_idx, qkv, n_head)
        instead (a subclass's single op for a decoding step: engine.StaticKVCache). Never here."""
        return False

    def advance(self, T):
        self.pos += T


class Attention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = make_linear(config, config.n_embd, config.n_embd)
        self.k_proj = make_linear(config, config.n_embd, kv_dim)
        self.v_proj = make_linear(config, config.n_embd, kv_dim)
        self.attn_sub_norm = RMSNorm(config.n_embd, eps=config.norm_eps) if config.sub_norms else None
        self.o_proj = make_linear(config, config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, kv_cache=None):
        y = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, kv_cache)
        return self.o_proj(y if self.attn_sub_norm is None else self.attn_sub_norm(y))

    def attend(self, q, k, v, cos, sin, kv_cache=None, qkv=None):
        """Projected q (B, T, n_embd), k, v (B, T, kv_dim) -> attention output (B, T, n_embd),
        before attn_sub_norm and o_proj (the packed model shares this part, and passes qkv,
        the tensor that q, k, v are slices of, so decoding needs no copy)."""
        B, T, C = q.size()
        if kv_cache is not None and kv_cache.decodes(T):  # a cache that decodes in one op (engine.py)
            return kv_cache.decode(self.layer_idx, torch.cat((q, k, v), dim=-1) if qkv is None else qkv, self.n_head)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v)
        return y.transpose(1, 2).contiguous().view(B, T, C)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.gate_proj = make_linear(config, config.n_embd, config.intermediate_size)
        self.up_proj = make_linear(config, config.n_embd, config.intermediate_size)
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, eps=config.norm_eps) if config.sub_norms else None
        self.down_proj = make_linear(config, config.intermediate_size, config.n_embd, follows_nonlinearity=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x)   # gated: relu(gate)^2 * up, or silu(gate) * up
        return self.down_proj(h if self.ffn_sub_norm is None else self.ffn_sub_norm(h))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache))
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)  # not in the state dict: derived
        self.register_buffer('rope_sin', sin, persistent=False)
        # True: training keeps only each block's input and recomputes its activations in the backward
        # pass (torch.utils.checkpoint): activation memory of one block instead of n_layer, for about
        # one more forward pass of compute; the same losses and gradients
        self.activation_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every initialization in one place: GPT-2's N(0, 0.02) for the projections and the
        embedding, N(0, 0.02 / sqrt(2 * n_layer)) for the two projections that write into the
        residual stream (o_proj, down_proj), ones for the norm weights, zeros for the biases (bias=True).
        A BitLinear divides its latent weight by mean|W|, so this scale sets how far one
        optimizer step moves a weight relative to the rounding boundaries, not the forward."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith('norm.weight'):
                nn.init.ones_(p)
            elif name.endswith('.bias'):
                nn.init.zeros_(p)
            elif name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def set_quant_lambda(self, value):
        """Warm-up quantization (bitlinear.quant_mix) of every BitLinear: value in [0, 1], or None
        for the plain quantized layers. One 0-dim float32 tensor, shared by all layers, is created at
        the first call (on the model's device) and then updated in place, so a compiled model reads
        each new value without recompiling."""
        layers = [m for m in self.modules() if isinstance(m, (BitLinear, BitLinear1b))]
        if value is None:
            for m in layers:
                m.quant_lambda = None
            return
        shared = next((m.quant_lambda for m in layers if m.quant_lambda is not None), None)
        if shared is None:
            shared = torch.tensor(float(value), device=self.lm_head.weight.device)
            for m in layers:
                m.quant_lambda = shared
        else:
            shared.fill_(float(value))

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the token embedding (kept if it is tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), loss (or None without targets).
        With a kv_cache, idx holds the positions kv_cache.pos .. pos + T - 1, which are written
        into the cache; without targets only the last position's logits are computed."""
        x = self.hidden(idx, kv_cache)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None                      # (B, 1, vocab)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def hidden(self, idx, kv_cache=None):
        """idx (B, T) -> the final hidden states (B, T, n_embd), normed: what lm_head reads."""
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = kv_cache.rope(self.rope_cos, self.rope_sin, T)
        x = self.drop(self.model.embed_tokens(idx))                      # (B, T, n_embd)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for block in self.model.layers:
            if recompute:   # non-reentrant: replays the block's dropout masks (saved RNG state)
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature=0 is greedy.
        With the KV cache each new token costs one position; once the context passes
        block_size, the window slides and the cache is refilled from the last block_size
        tokens, so the output equals the uncached loop token for token."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos == block_size:
                cache = KVCache(self.config, idx.size(0), block_size, idx.device, self.model.norm.weight.dtype)
                logits, _ = self(idx[:, -block_size:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            idx = torch.cat((idx, sample(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on the 2-D weights only (matrices, embedding), none on norms.
        The decayed group is param_groups[0], so a schedule can change its weight decay."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6 per matmul weight (lm_head included,
        the embedding lookup is free) plus the attention scores, PaLM (arXiv 2204.02311) app. B."""
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def estimate_mfu(self, tokens_per_iter, seq_len, dt, peak_flops):
        """Model FLOPs utilization: achieved training FLOP/s over peak_flops (None when unknown)."""
        if not peak_flops:
            return None
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops


def sample(logits, temperature=0.0, top_k=None):
    """logits (B, vocab) -> next tokens (B, 1): greedy at temperature 0, else sampled from the
    top_k most likely (all when top_k is None) at that temperature."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s (no sparsity)
PEAK_BF16_FLOPS = {
    'H200': 989e12, 'H100 NVL': 835e12, 'H100 PCIe': 756e12, 'H100': 989e12,
    'A100': 312e12, 'A10G': 70e12, 'L4': 121e12, 'L40S': 362e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12,
}


def device_peak_flops(device):
    """(peak bf16 FLOP/s, device name) of a CUDA device; (None, name) elsewhere or when unknown."""
    device = torch.device(device)
    if device.type != 'cuda':
        return None, device.type
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():   # most specific names first
        if key in name:
            return flops, name
    return None, name
