"""
Fast decoding on CUDA for any GPT of model.py: float, b1.58 training form, or packed.

    engine = Engine(model, max_len=512)               # model on a CUDA device, in eval mode
    out = engine.generate(idx, max_new_tokens=256, temperature=0)
    engine = Engine(model, batch_size=4, max_len=512, int8_head=True)
    out = engine.generate(idx, 256, lengths=[16, 9, 12, 3])   # idx (4, 16): prompts right-padded

The KV cache is preallocated (StaticKVCache, below): its position lives in a device tensor and
attention runs over the whole buffer under a mask, so one decoding step has no shapes or
Python values that change between tokens. That step (embedding, every block, the final norm
and lm_head) is compiled by torch.compile to fuse the small element-wise work, then captured
once in a CUDA graph; each new token is one graph replay, so kernel launch overhead, which
would otherwise dominate a batch-1 step of a 30-layer model, is paid once. The step ends in
one op, torch.ops.bitnet.lm_head_argmax (a Triton GEMV on CUDA), that returns the logits and the
greedy token together. Greedy decoding (temperature 0) keeps the whole loop on the GPU: a step
writes its token where the next step reads it and into an output buffer, and one graph holds
STEPS such steps, so the host only replays it. The prompt is
prefilled by the ordinary forward pass, captured in a CUDA graph of its own per prompt length
(the last few lengths are kept), so a repeated prompt length costs one replay. The float
model and the packed model run through the same engine, so their speeds compare fairly.
A batch decodes together, each sequence at its own position (prompts of different lengths);
int8_head=True reads the lm_head as int8 with a scale per row (ops.quantize_head). A float
model decoding one sequence runs its blocks as the packed model does, four Triton GEMVs with the
norms, residual adds and relu^2 folded in (float_gemv, DecodeBlock); batches run on cuBLAS.
"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops import quantize_head   # importing ops defines torch.ops.bitnet.decode_attention and lm_head_argmax
from model import ACTIVATIONS, Block, KVCache, sample

if torch.cuda.is_available():
    import ternary_kernels  # noqa: F401  (registers the CUDA kernels of the decode ops)


class StaticKVCache(KVCache):
    """The same cache with each sequence's position in a device tensor pos (B,) and attention over
    the whole buffer under a mask: no shape or Python value changes from one token to the next, so
    a decoding step can be captured once in a CUDA graph and replayed (engine.py). Sequences of a
    batch may stand at different positions (prompts of different lengths)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.arange = torch.arange(max_len, device=device)

    def rope(self, cos, sin, T):
        self.tables = (cos, sin)  # kept for decode(), which rotates inside its one op
        positions = self.pos[:, None] + self.arange[:T]                  # (B, T)
        return cos[positions][:, None], sin[positions][:, None]         # (B, 1, T, hs): broadcast over heads

    def decodes(self, T):
        """Whether attention for T new positions goes through decode() (one op per layer)."""
        return T == 1

    def decode(self, layer_idx, qkv, n_head):
        """qkv (B, 1, (nh + 2 nkv) * hs): q, k, v side by side, not yet rotated -> (B, 1, nh * hs)."""
        y = torch.ops.bitnet.decode_attention(qkv[:, 0], self.k[layer_idx], self.v[layer_idx], self.pos,
                                              *self.tables, n_head)
        return y[:, None]

    def attend(self, layer_idx, q, k, v):
        positions = self.pos[:, None] + self.arange[:k.size(2)]         # (B, T)
        b = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[layer_idx][b, :, positions] = k.transpose(1, 2).to(self.k.dtype)   # (B, T, nkv, hs)
        self.v[layer_idx][b, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        mask = self.arange <= positions[:, :, None]                     # (B, T, max_len)
        return F.scaled_dot_product_attention(q, self.k[layer_idx].to(q.dtype), self.v[layer_idx].to(q.dtype),
                                              attn_mask=mask[:, None], enable_gqa=q.size(1) != k.size(1))

    def advance(self, T):
        self.pos.add_(T)


def tensor_bytes(model, left_out=()):
    """Bytes of model's parameters and buffers, each storage once (a tied embedding and lm_head
    count once), the rotary tables and the storages of the tensors in left_out left out."""
    skip = {t.untyped_storage().data_ptr() for t in left_out}
    storages = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if 'rope_' not in name and t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def decode_linear(x, projections, norm=None, residual=None, epilogue=0):
    """x through nn.Linear projections of the same input as one torch.ops.bitnet.linear (one kernel
    reads all their weights) -> their outputs side by side. norm: a model.RMSNorm applied to x first;
    residual: added to the output (epilogue 1); epilogue 2: relu(gate)^2 * up for [gate, up]. Biases,
    if any, are concatenated here."""
    bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    return torch.ops.bitnet.linear(x, [p.weight for p in projections], bias, None if norm is None else norm.weight,
                                   residual, epilogue, 0.0 if norm is None else norm.eps)


class DecodeBlock(Block):
    """model.Block whose forward, without autograd, runs as packed.PackedBlock's does: four
    torch.ops.bitnet.linear calls and attention, each RMSNorm folded into the projection after it
    and the residual adds and relu^2 into the projection before (Engine(float_gemv=True))."""

    def forward(self, x, cos, sin, kv_cache=None):
        if torch.is_grad_enabled() or self.training:
            return super().forward(x, cos, sin, kv_cache)
        attn, mlp = self.self_attn, self.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv = decode_linear(x, projections, self.input_layernorm)
        q, k, v = qkv.split([p.out_features for p in projections], dim=-1)
        y = attn.attend(q, k, v, cos, sin, kv_cache, qkv)
        x = decode_linear(y, (attn.o_proj,), attn.attn_sub_norm, residual=x, epilogue=1)
        if mlp.act is ACTIVATIONS['relu2']:
            h = decode_linear(x, (mlp.gate_proj, mlp.up_proj), self.post_attention_layernorm, epilogue=2)
        else:
            gate_up = decode_linear(x, (mlp.gate_proj, mlp.up_proj), self.post_attention_layernorm)
            gate, up = gate_up.chunk(2, dim=-1)
            h = mlp.act(gate) * up
        return decode_linear(h, (mlp.down_proj,), mlp.ffn_sub_norm, residual=x, epilogue=1)


def use_float_gemv(model, on):
    """The float model's blocks become DecodeBlock (on: Engine(float_gemv=True)), or model.Block
    again (off). Same modules and parameters, the class changed in place; packed and BitLinear
    blocks are left as they are."""
    for block in model.model.layers:
        if type(block) in (Block, DecodeBlock) and type(block.self_attn.q_proj) is nn.Linear:
            block.__class__ = DecodeBlock if on else Block


class Engine:

    STEPS = 8   # greedy tokens per replay of the multi-step graph

    def __init__(self, model, batch_size=1, max_len=None, dtype=torch.bfloat16, compile=True, int8_head=False,
                 float_gemv=True):
        """model: a GPT on a CUDA device. dtype: the activations, the KV cache and the model's
        parameters (embedding, norms, lm_head; a float model's projections too). Packed
        buffers (uint8 weights, float32 scales) and the rotary tables are left as they are.
        int8_head: the lm_head read as int8 with a float32 scale per row (ops.quantize_head),
        half the bytes of bfloat16; the logits move a little (docs/kernels.md gives how much).
        float_gemv: at batch size 1, the float model's blocks run as DecodeBlock (use_float_gemv):
        on CUDA four Triton GEMVs a block, the norms, residual adds and relu^2 folded into them.
        False, or a batch: model.Block (cuBLAS, which reads each weight once for the whole batch).
        """
        self.model = model.eval()
        self.float_gemv = float_gemv and batch_size == 1
        use_float_gemv(model, self.float_gemv)
        self.device = next(model.buffers()).device
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(dtype)
        config = model.config
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"max_len {self.max_len} is longer than the model's block_size {config.block_size}")
        self.batch_size = batch_size
        self.head = quantize_head(model.lm_head.weight) if int8_head else (model.lm_head.weight, None)
        self.cache = StaticKVCache(config, batch_size, self.max_len, self.device, dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.lengths = torch.ones(batch_size, dtype=torch.long, device=self.device)   # the prompts' lengths
        self.out = torch.zeros(batch_size, self.max_len, dtype=torch.long, device=self.device)  # greedy tokens by position
        self.step = self._step
        if compile:
            # torch.compile keeps compiled code per code object, and each Engine compiles its own copy of
            # _step's: an engine never runs code compiled for another (with one code object, torch 2.11 ran a
            # float_gemv engine's step as compiled for the cuBLAS engine before it), and bench.py's engines
            # (one per variant) do not add up to torch's limit of 8 recompilations of one code object
            step = types.FunctionType(Engine._step.__code__.replace(), globals(), '_step')
            self.step = torch.compile(types.MethodType(step, self), fullgraph=True, dynamic=False)
        self.graph = None
        self.logits = None
        self.greedy_graphs = None   # (graph of one greedy step, graph of STEPS greedy steps)
        self.prefills = {}  # prompt length -> (prompt buffer, CUDA graph, (logits, greedy token))

    def weight_bytes(self):
        """Bytes of weights one decoding step reads at least: every other weight of the model once
        (packed codes and row scales, or float matrices; norms), the lm_head as this engine reads
        it (bfloat16, or int8 codes and row scales); of the embedding only a row per sequence, so
        it is left out (tied, it counts once, as the lm_head), as are the rotary tables."""
        model = self.model
        return tensor_bytes(model, left_out=(model.model.embed_tokens.weight, model.lm_head.weight)) + \
            sum(t.nbytes for t in self.head if t is not None)

    def _head(self, x):
        """x (B, C), final hidden states -> logits (B, vocab) and greedy token (B, 1), from one op
        (one Triton kernel on CUDA, ternary_kernels)."""
        return torch.ops.bitnet.lm_head_argmax(x, *self.head)

    def _step(self):
        """One decoding step: each sequence's token in self.tokens at its position cache.pos ->
        logits, greedy token."""
        return self._head(self.model.hidden(self.tokens, kv_cache=self.cache)[:, -1, :])

    def _greedy_steps(self, n):
        """n greedy steps: each feeds self.tokens at cache.pos, and its argmax becomes both the
        next step's token and self.out[b, new position of b]."""
        for _ in range(n):
            _, token = self.step()                                            # (B, 1)
            self.tokens.copy_(token)
            self.out.scatter_(1, self.cache.pos[:, None], token)

    def _prefill(self):
        """The prompts in self.prompt (B, T), right-padded to T, written into the cache from
        position 0 -> logits, greedy token at each prompt's last position self.lengths - 1. The
        padding's keys and values sit past each sequence's position, where attention never looks
        and decoding overwrites them."""
        x = self.model.hidden(self.prompt, kv_cache=self.cache)                   # (B, T, C)
        self.cache.pos.copy_(self.lengths)
        return self._head(x[torch.arange(x.size(0), device=x.device), self.lengths - 1])

    def _capture(self, fn):
        """Warm up fn (compile, autotune) on a side stream, then record it in a CUDA graph ->
        (graph, its output). The warm-up runs write junk into cache slots that the real runs
        overwrite before anything reads them; the position itself is restored."""
        pos = self.cache.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
                self.cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        self.cache.pos.copy_(pos)
        return graph, out

    def prefill(self, idx, lengths=None):
        """Write the prompts idx (B, T) into the cache from position 0 -> logits (B, vocab) and
        greedy token (B, 1) at each prompt's last position. lengths (B,): each prompt's length
        (right-padded to T); None: all T."""
        self.lengths.copy_(lengths if lengths is not None else torch.full_like(self.lengths, idx.size(1)))
        self.cache.pos.zero_()
        T = idx.size(1)
        if T not in self.prefills:
            if len(self.prefills) >= 4:
                del self.prefills[next(iter(self.prefills))]   # the oldest length
            self.prompt = idx.clone()
            self.prefills[T] = (self.prompt,) + self._capture(self._prefill)
        prompt, graph, head = self.prefills[T]
        prompt.copy_(idx)
        graph.replay()
        return head

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, lengths=None):
        """idx (B, T) on the device -> (B, T + max_new_tokens). temperature 0 is greedy.
        lengths (B,): prompts of different lengths, right-padded to T; each sequence decodes from
        its own position, and row b of the result holds its lengths[b] prompt tokens, its
        max_new_tokens new ones, then T - lengths[b] zeros."""
        B, T = idx.shape
        if B != self.batch_size:
            raise ValueError(f"this engine decodes batches of {self.batch_size}, got {B}")
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"{T} + {max_new_tokens} tokens do not fit max_len {self.max_len}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).to(self.device)
            if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
                raise ValueError(f"lengths must hold {B} prompt lengths from 1 to {T}, got {lengths.tolist()}")
        if temperature == 0 and self.greedy_graphs is None:
            self._capture_greedy()
        logits, token = self.prefill(idx, lengths)
        if temperature == 0:
            new = self._generate_greedy(token, max_new_tokens)
        else:
            if self.graph is None:
                self.graph, (self.logits, _) = self._capture(self.step)
            new = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
            for i in range(max_new_tokens):
                new[:, i] = sample(logits, temperature, top_k)[:, 0]
                if i + 1 < max_new_tokens:
                    self.tokens.copy_(new[:, i:i + 1])
                    self.graph.replay()
                    logits = self.logits
        if lengths is None:
            return torch.cat((idx, new), dim=1)
        out = torch.cat((idx.masked_fill(self.cache.arange[:T] >= lengths[:, None], 0), torch.zeros_like(new)), dim=1)
        return out.scatter_(1, lengths[:, None] + self.cache.arange[:max_new_tokens], new)

    def _capture_greedy(self):
        """The graphs of 1 and of `steps` greedy steps, captured from position 0, before a prompt
        is prefilled: their warm-up runs write junk into the first cache slots and tokens."""
        self.steps = max(1, min(self.STEPS, self.max_len - 1))
        self.cache.pos.zero_()
        self.greedy_graphs = [self._capture(lambda n=n: self._greedy_steps(n))[0] for n in (1, self.steps)]

    def _generate_greedy(self, token, max_new_tokens):
        """From the prefill's greedy token (B, 1) -> the max_new_tokens new tokens (B, max_new_tokens)."""
        if max_new_tokens == 0:
            return token[:, :0]
        one, many = self.greedy_graphs
        start = self.cache.pos.clone()              # the first new token's position, per sequence
        self.tokens.copy_(token)
        self.out.scatter_(1, start[:, None], token)
        left = max_new_tokens - 1
        for _ in range(left // self.steps):
            many.replay()
        for _ in range(left % self.steps):
            one.replay()
        return self.out.gather(1, start[:, None] + self.cache.arange[:max_new_tokens])
