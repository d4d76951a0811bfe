"""
Benchmarks, every variant in one process on one device, reported as ratios to float.

Training step (forward, backward, clip, AdamW step) for quant = none, b1.58, b1:

    python bench.py                                  # the shakespeare_char model (6 x 384, block 256, batch 64)
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8   # GPT-2 small size
    python bench.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --vocab_size=65

Warm-up steps are not counted (they include compilation); the timed steps of the variants are
interleaved in rounds, so drift of the clock or the temperature hits all of them alike, and
the median step time is reported. Peak memory is what a variant adds to the device's
allocated memory while it trains (CUDA only).
"""

import statistics
import sys
import time
from contextlib import nullcontext

import torch

from configurator import configure, fail
from model import GPT, QUANT_MODES, GPTConfig, device_peak_flops

# -----------------------------------------------------------------------------
mode = 'train'             # 'train': training step time
quants = 'none,b1.58,b1'   # variants to compare, the first one is the reference
n_layer = 6
n_head = 6
n_kv_head = None
n_embd = 384
intermediate_size = None
vocab_size = 65
block_size = 256
batch_size = 64
device = 'auto'
dtype = 'auto'             # 'auto': bfloat16 on CUDA, float32 elsewhere
compile = None             # None: on for CUDA
warmup = 10                # untimed steps per variant
rounds = 5                 # timing rounds; each round times steps_per_round steps of every variant
steps_per_round = 10
seed = 1337
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
quant_list = quants.split(',')
if any(q not in QUANT_MODES for q in quant_list):
    fail(f"quants must be a comma-separated list of {', '.join(QUANT_MODES)}, got '{quants}'")
if mode != 'train':
    fail(f"mode must be 'train', got '{mode}'")
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = device.split(':')[0]
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
if compile is None:
    compile = device_type == 'cuda'
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
cuda = device_type == 'cuda'


def sync():
    if cuda:
        torch.cuda.synchronize()


torch.manual_seed(seed)
batches = [(torch.randint(vocab_size, (batch_size, block_size), device=device),
            torch.randint(vocab_size, (batch_size, block_size), device=device)) for _ in range(4)]
variants = {}
for quant in quant_list:
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size, quant=quant)
    raw = GPT(config).to(device)
    optimizer = raw.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device_type)
    model = torch.compile(raw) if compile else raw

    def step(model=model, optimizer=optimizer, i=[0]):
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
    variants[quant] = dict(step=step, raw=raw, times=[], peak=peak)
    print(f"{quant}: built, compiled={compile}, warmed up ({warmup} steps)", file=sys.stderr)

for r in range(rounds):
    for quant, v in variants.items():
        if cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps_per_round + 1)]
            events[0].record()
            for k in range(steps_per_round):
                v['step']()
                events[k + 1].record()
            torch.cuda.synchronize()
            v['times'] += [events[k].elapsed_time(events[k + 1]) / 1000 for k in range(steps_per_round)]
        else:
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                v['step']()
                v['times'].append(time.perf_counter() - t0)

peak_flops, device_name = device_peak_flops(device)
tokens = batch_size * block_size
ref = statistics.median(variants[quant_list[0]]['times'])
first = variants[quant_list[0]]['raw']
print(f"device: {device_name}; torch {torch.__version__}; dtype {dtype}; compile {compile}")
print(f"model: {n_layer} layers, {n_head} heads, {n_embd} wide, block {block_size}, batch {batch_size}, "
      f"vocab {vocab_size}, {first.get_num_params() / 1e6:.1f}M non-embedding parameters; "
      f"median of {rounds * steps_per_round} timed steps after {warmup} warm-up steps")
print(f"{'quant':<7} {'step ms':>9} {'vs ' + quant_list[0]:>8} {'tokens/s':>11} {'MFU':>7} {'peak mem':>10}")
for quant, v in variants.items():
    t = statistics.median(v['times'])
    mfu = v['raw'].estimate_mfu(tokens, block_size, t, peak_flops)
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else 'n/a'
    mem_text = f"{v['peak'] / 2**30:.2f} GiB" if v['peak'] is not None else 'n/a'
    print(f"{quant:<7} {t * 1000:9.2f} {t / ref:7.3f}x {tokens / t:11,.0f} {mfu_text:>7} {mem_text:>10}")
if peak_flops:
    print(f"MFU against {peak_flops / 1e12:.0f} TFLOP/s, the dense bf16 peak of the {device_name} datasheet")
