"""
Fast decoding on CUDA for any GPT of model.py: float, b1.58 training form, or packed.

    engine = Engine(model, max_len=512)               # model on a CUDA device, in eval mode
    out = engine.generate(idx, max_new_tokens=256, temperature=0)

The KV cache is preallocated (model.StaticKVCache): its position lives in a device tensor and
attention runs over the whole buffer under a mask, so one decoding step has no shapes or
Python values that change between tokens. That step (embedding, every block, the final norm
and lm_head) is compiled by torch.compile to fuse the small element-wise work, then captured
once in a CUDA graph; each new token is one graph replay, so kernel launch overhead, which
would otherwise dominate a batch-1 step of a 30-layer model, is paid once. The prompt is
prefilled by the ordinary forward pass, captured in a CUDA graph of its own per prompt length
(the last few lengths are kept), so a repeated prompt length costs one replay. The float
model and the packed model run through the same engine, so their speeds compare fairly.
"""

import torch

from model import StaticKVCache, sample

if torch.cuda.is_available():
    import ternary_kernels  # noqa: F401  (registers the CUDA kernels of the decode ops)


class Engine:

    def __init__(self, model, batch_size=1, max_len=None, dtype=torch.bfloat16, compile=True):
        """model: a GPT on a CUDA device. dtype: the activations, the KV cache and the model's
        parameters (embedding, norms, lm_head; a float model's projections too). Packed
        buffers (uint8 weights, float32 scales) and the rotary tables are left as they are."""
        self.model = model.eval()
        self.device = next(model.buffers()).device
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(dtype)
        config = model.config
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"max_len {self.max_len} is longer than the model's block_size {config.block_size}")
        self.batch_size = batch_size
        self.cache = StaticKVCache(config, batch_size, self.max_len, self.device, dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.graph = None
        self.logits = None
        self.prefills = {}  # prompt length -> (prompt buffer, CUDA graph, logits)

    def _step(self):
        """One decoding step: the token in self.tokens at position cache.pos -> logits (B, vocab)."""
        logits, _ = self.model(self.tokens, kv_cache=self.cache)
        return logits[:, -1, :]

    def _prefill(self):
        """The prompt in self.prompt (B, T), written into the cache from position 0 -> logits (B, vocab)."""
        return self.model(self.prompt, kv_cache=self.cache)[0][:, -1, :]

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

    def prefill(self, idx):
        """Write the prompt idx (B, T) into the cache from position 0 -> last logits (B, vocab)."""
        self.cache.pos.zero_()
        T = idx.size(1)
        if T not in self.prefills:
            if len(self.prefills) >= 4:
                del self.prefills[next(iter(self.prefills))]   # the oldest length
            self.prompt = idx.clone()
            self.prefills[T] = (self.prompt,) + self._capture(self._prefill)
        prompt, graph, logits = self.prefills[T]
        prompt.copy_(idx)
        graph.replay()
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None):
        """idx (B, T) on the device -> (B, T + max_new_tokens). temperature 0 is greedy."""
        B, T = idx.shape
        if B != self.batch_size:
            raise ValueError(f"this engine decodes batches of {self.batch_size}, got {B}")
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"{T} + {max_new_tokens} tokens do not fit max_len {self.max_len}")
        logits = self.prefill(idx)
        if self.graph is None:
            self.graph, self.logits = self._capture(self.step)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        for i in range(max_new_tokens):
            out[:, i] = sample(logits, temperature, top_k)[:, 0]
            if i + 1 < max_new_tokens:
                self.tokens.copy_(out[:, i:i + 1])
                self.graph.replay()
                logits = self.logits
        return torch.cat((idx, out), dim=1)
