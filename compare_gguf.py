"""
Run a GGUF file (export.py --format=gguf) in llama.cpp and compare it with the checkpoint it
came from, on the CPU, greedily: not part of the tests, since it needs llama.cpp built on this
machine, through llama-cpp-python's low-level API (pip install llama-cpp-python builds one; or
point LLAMA_CPP_LIB_PATH at the libllama.so of your own build, docs/gguf.md):

    python compare_gguf.py --ckpt_path=out/ckpt.pt --gguf=model.gguf --start="ROMEO:"

It prints, for the prompt and max_new_tokens greedy tokens of ours:
- tokenizer: whether llama.cpp tokenizes the prompt to our ids, and detokenizes ours to our text;
- teacher-forced: both models read the same tokens (the prompt, then our greedy continuation) one
  at a time; the largest logit difference, at how many positions the argmax agrees, and at how
  many the logits are equal up to float32 rounding (an int8 activation that sits on a rounding
  boundary can round the other way in one of them; such a flip in a key or value then changes
  every later position a little);
- free-running: llama.cpp's own greedy continuation; how many of its tokens equal ours, and
  where they first differ; then both texts.
llama.cpp runs with a float32 KV cache and without flash attention (its defaults, an F16 cache,
round keys and values to fp16, which adds to the difference).
"""

import sys

from configurator import check_ints, configure, fail

# -----------------------------------------------------------------------------
ckpt_path = 'out/ckpt.pt'  # our checkpoint (training or packed)
gguf = 'model.gguf'        # the file export.py --format=gguf wrote from it
start = '\n'               # the prompt
max_new_tokens = 200       # greedy tokens after the prompt (prompt + these must fit block_size)
threads = 2                # llama.cpp's threads
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
check_ints(globals(), 'max_new_tokens threads', 1)

import ctypes

import numpy as np
import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from model import KVCache
from prepare_data import DataError, load_tokenizer

try:
    checkpoint = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(checkpoint, ckpt_path, dropout=0.0).eval()
    encode, decode = load_tokenizer(checkpoint['tokenizer'])
    prompt = encode(start)
except (CheckpointError, DataError) as e:
    fail(str(e))
if len(prompt) + max_new_tokens > model.config.block_size:
    fail(f"the prompt ({len(prompt)} tokens) and max_new_tokens ({max_new_tokens}) exceed block_size "
         f"({model.config.block_size}): lower --max_new_tokens")

try:
    import llama_cpp as L
except Exception as e:   # not installed, or its libllama.so missing or built for another version
    fail(f"cannot load llama-cpp-python ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
         f"pip install llama-cpp-python, or set LLAMA_CPP_LIB_PATH (docs/gguf.md)")

# ours: one token at a time through the KV cache, as llama.cpp decodes ---------------
T = len(prompt) + max_new_tokens
cache = KVCache(model.config, 1, T, 'cpu', torch.float32)
ours_logits, tokens = [], list(prompt)
with torch.no_grad():
    for i in range(T - 1):
        logits, _ = model(torch.tensor([[tokens[i]]]), kv_cache=cache)   # advances the cache
        ours_logits.append(logits[0, -1].float().numpy())
        if i >= len(prompt) - 1:
            tokens.append(int(logits[0, -1].argmax()))
ours = tokens[len(prompt):]

# llama.cpp ------------------------------------------------------------------------
quiet = L.llama_log_callback(lambda level, text, data: None)   # kept: llama.cpp calls it later
L.llama_log_set(quiet, ctypes.c_void_p())
L.llama_backend_init()
lmodel = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
if not lmodel:
    fail(f"llama.cpp could not load {gguf}: run llama-cli -m {gguf} to see its log")
params = L.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = T, T, threads, threads
params.type_k = params.type_v = L.GGML_TYPE_F32
params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = L.llama_init_from_model(lmodel, params)
vocab = L.llama_model_get_vocab(lmodel)
n_vocab = L.llama_vocab_n_tokens(vocab)


def llama_step(token):
    """Decode one token at the next position; its logits (n_vocab,) float32."""
    batch = L.llama_batch_get_one((L.llama_token * 1)(token), 1)
    if L.llama_decode(ctx, batch) != 0:
        fail("llama_decode failed")
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def llama_reset():
    L.llama_memory_clear(L.llama_get_memory(ctx), True)


buf = (L.llama_token * (len(start.encode()) + 16))()
n = L.llama_tokenize(vocab, start.encode(), len(start.encode()), buf, len(buf), False, True)   # special tokens as ours
llama_prompt = list(buf[:n]) if n >= 0 else None
piece = ctypes.create_string_buffer(256)
pieces = b''
for t in ours:
    k = L.llama_token_to_piece(vocab, t, piece, len(piece), 0, False)
    pieces += piece.raw[:k]

theirs_logits = [llama_step(t) for t in tokens[:-1]]   # teacher-forced on our tokens
llama_reset()
for t in prompt[:-1]:
    llama_step(t)
theirs, t = [], prompt[-1]
for _ in range(max_new_tokens):                        # free-running greedy
    t = int(llama_step(t).argmax())
    theirs.append(t)

# report ---------------------------------------------------------------------------
a, b = np.stack(ours_logits), np.stack(theirs_logits)
diff = np.abs(a - b)
agree = int((a.argmax(-1) == b.argmax(-1)).sum())
close = diff.max(-1) <= 1e-5 * np.abs(a).max()   # positions equal up to float32 rounding
same = sum(x == y for x, y in zip(ours, theirs))
first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
print(f"llama-cpp-python {L.__version__}, {gguf}, {T - 1} positions, prompt {len(prompt)} tokens")
print(f"tokenizer: prompt ids {'equal' if llama_prompt == prompt else f'DIFFER: {llama_prompt} vs {prompt}'}, "
      f"detokenized text {'equal' if pieces.decode('utf-8', 'replace') == decode(ours) else 'DIFFERS'}")
print(f"teacher-forced logits: max |diff| {diff.max():.3g} (largest |logit| {np.abs(a).max():.3g}), "
      f"mean |diff| {diff.mean():.3g}, argmax agrees at {agree}/{len(a)} positions")
print(f"positions equal up to float rounding (max |diff| <= 1e-5 of the largest |logit|): {int(close.sum())}/{len(a)}"
      f"{'' if close.all() else f', the first other one at position {int(np.argmin(close))}'}")
print(f"free-running greedy: {same}/{max_new_tokens} tokens equal, "
      f"{'identical' if first is None else f'first difference at new token {first}'}")
print(f"--- ours:\n{decode(ours)}\n--- llama.cpp:\n{decode(theirs)}")
