"""
Benchmarks, every variant in one process on one device, reported as ratios to float.

Training step (forward, backward, clip, AdamW step) for quant = none, b1.58, b1:

    python bench.py                                  # the shakespeare_char model (6 x 384, block 256, batch 64)
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8   # GPT-2 small size
    python bench.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --vocab_size=65

The same step under DDP or FSDP2 (as train.py wraps the model) and with activation checkpointing,
every combination of --quants x --wrappers x --activation_checkpointing, launched by torchrun
(one process measures the wrappers' overhead; each of N processes reports its own step):

    torchrun --standalone --nproc_per_node=1 bench.py --quants=b1.58 --wrappers=none,ddp,fsdp \
        --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8 --vocab_size=50257
    python bench.py --quants=b1.58 --activation_checkpointing=False,True --n_layer=30 --n_head=20 --n_kv_head=5 \
        --n_embd=2560 --intermediate_size=6912 --vocab_size=128256 --tie_embeddings=True --block_size=2048 --batch_size=4

A variant that runs out of GPU memory is reported as such and the others go on.
Warm-up steps are not counted (they include compilation); the timed steps of the variants are
interleaved in rounds, so drift of the clock or the temperature hits all of them alike, and
the median step time is reported. Peak memory is what a variant adds to the device's
allocated memory while it trains (CUDA only). On CUDA the compiled forward and backward run as
CUDA graphs, as in train.py (--cuda_graphs=False: kernel by kernel, launched from Python).

Decoding (a short prompt, then greedy tokens; batch 1 unless --batch_sizes says more) for the
packed ternary model and the float model of the same shape with random weights:

    python bench.py --mode=decode --n_layer=30 --n_head=20 --n_kv_head=5 --n_embd=2560 \
        --intermediate_size=6912 --vocab_size=128256 --tie_embeddings=True --rope_theta=500000.0   # BitNet b1.58 2B4T
    python bench.py --mode=decode --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50257 --tie_embeddings=True  # ~125M
    python bench.py --mode=decode ... --compile=False --batch_sizes=1,2,4,8,16 --int8_head=False,True  # batches
    python bench.py --mode=decode ... --pdl=False,True   # with and without programmatic dependent launch
    python bench.py --mode=decode ... --float_gemv=False,True   # the float projections on cuBLAS too, not only our GEMV

On CUDA both run in engine.py (static KV cache, one CUDA graph per token) in bfloat16.
Reported: tokens per second and ms per step (the prompt's prefill included), weight bytes, peak
memory, and the fraction of the memory bandwidth limit reached: the weight bytes a step reads
(Engine.weight_bytes: the lm_head as the engine reads it, the embedding only a row) x steps/s over
the copy bandwidth measured in the same run.

On the CPU three models of the same shape and the same random weights run model.generate in
float32: the training form (b1.58 BitLinear layers, eval mode: its first forward packs every weight
into the eval cache, bitlinear.py, and the compiled kernel runs from then on), the packed model
(the compiled kernel, cpu_kernels.py) and the float model (quant='none'); each lm_head as --cpu_head says.
Reported: tokens/s with and without the prompt's prefill, ms per token, bits per projection
weight held, resident memory (RSS) over the baseline of this process (Python, torch, our modules
and the compiled kernel, measured before any model), and with --packed_file the same for a
fresh process that loads the packed file (memory-mapped), as sample.py does:

    python bench.py --mode=decode --device=cpu --threads=2 --n_layer=12 --n_head=12 --n_embd=768 \
        --vocab_size=50257 --tie_embeddings=True --prompt_len=64 --new_tokens=128 --packed_file=/tmp/p.pt

One layer's projections (CUDA), each alone in CUDA graphs, for rows of x (tokens x sequences):
the packed op (the dp4a GEMV up to 16 rows, the int8 tensor cores beyond), unpacking the same
bytes to bfloat16 and a bfloat16 matmul, and the float model's bfloat16 matmul:

    python bench.py --mode=layer --rows=1,2,4,8,16,512 --n_head=20 --n_kv_head=5 --n_embd=2560 --intermediate_size=6912
"""

import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

from configurator import (bool_list, check, check_choice, check_device, check_device_present, check_floats, check_heads,
                          check_ints, check_new_file, check_optional_bools, configure, fail)

# -----------------------------------------------------------------------------
mode = 'train'             # 'train': training step time; 'decode': greedy generation speed;
                           # 'layer': one layer's projections, packed against bfloat16, alone (CUDA)
quants = 'none,b1.58,b1'   # train: variants to compare, the first one is the reference
wrappers = 'none'          # train: 'none', 'ddp', 'fsdp', comma-separated: the model as it is, in DDP, or sharded by
                           # FSDP2 as train.py does (these two under torchrun)
activation_checkpointing = 'False'  # train: 'False', 'True' or 'False,True': recompute each block in the backward
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
cuda_graphs = None         # train: the compiled step as CUDA graphs (mode='reduce-overhead'); None: on for CUDA
                           # (decode: the engine always captures its step in CUDA graphs)
warmup = 10                # untimed steps per variant
rounds = 5                 # timing rounds; each round times steps_per_round steps of every variant
steps_per_round = 10
tie_embeddings = False
rope_theta = 10000.0
prompt_len = 16            # decode: prompt tokens (prefilled), then new_tokens greedy tokens
batch_sizes = '1'          # decode on CUDA: sequences decoded together, comma-separated to compare several
int8_head = 'False'        # decode on CUDA: the packed model's lm_head in dtype ('False'), int8 with row scales
                           # ('True', Engine(int8_head=True)), or both ('False,True')
pdl = 'True'               # decode on CUDA, Hopper or newer: the decoding kernels launched with programmatic dependent
                           # launch ('True', ternary_kernels.PDL), without ('False'), or both ('False,True')
float_gemv = 'True'        # decode on CUDA: the float model's blocks at batch 1 as Triton GEMVs with the norms folded in
                           # ('True', Engine(float_gemv=True)), on cuBLAS ('False', the 'float cuBLAS' rows), or both
                           # ('False,True'); batches always go through cuBLAS
new_tokens = 256
repeats = 3                # decode: timed generations per variant (median)
rows = '1,16,512'          # layer: rows of the input (tokens x sequences), comma-separated
packed_file = ''           # decode: also write the packed model here and report its size (CPU: and time a
                           # fresh process that loads it, for the resident memory of the file alone)
variants = 'training,packed,float'  # decode on the CPU: the models to time, on the same random weights
threads = 0                # CPU: torch's threads (0: torch's default, one per core)
cpu_head = 'float16'       # decode on the CPU: every variant's lm_head weights ('float16' as sample.py, or 'float32')
overwrite = False          # replace a file at packed_file even when it is not a packed file
profile = False            # CUDA: print the kernels of one step (train) / one decoding step (decode)
seed = 1337
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
# every setting's range, checked before torch is imported (2 s) and before minutes of benchmarking
quant_list = quants.split(',')
check(all(q in ('b1.58', 'b1', 'none') for q in quant_list),   # model.QUANT_MODES
      f"quants must be a comma-separated list of b1.58, b1, none, got '{quants}'")
check_choice(globals(), 'mode', ('train', 'decode', 'layer'))
check_choice(globals(), 'dtype', ('auto', 'float32', 'bfloat16', 'float16'))
check_choice(globals(), 'cpu_head', ('float16', 'float32'))
check(all(v in ('training', 'packed', 'float') for v in variants.split(',')),
      f"variants must be a comma-separated list of training, packed, float, got '{variants}'")
check_device(device)
check_ints(globals(), 'n_layer n_head n_embd vocab_size block_size batch_size rounds steps_per_round prompt_len '
                      'new_tokens repeats', 1)
check_ints(globals(), 'n_kv_head intermediate_size', 1, allow_none=True)
check_ints(globals(), 'warmup seed threads', 0)
check_floats(globals(), 'rope_theta', 0, low_open=True)
check_optional_bools(globals(), 'compile cuda_graphs')
check_heads(n_embd, n_head, n_kv_head)
check(not packed_file or mode == 'decode', "packed_file is written by --mode=decode only: add it, or drop --packed_file")
row_list = [int(r) for r in rows.split(',') if r.isdigit() and int(r) > 0]
check(len(row_list) == len(rows.split(',')), f"rows must be a comma-separated list of positive integers, got '{rows}'")
batch_size_list = [int(b) for b in batch_sizes.split(',') if b.isdigit() and 0 < int(b) <= 4096]
check(len(batch_size_list) == len(batch_sizes.split(',')),
      f"batch_sizes must be a comma-separated list of positive integers, got '{batch_sizes}'")
int8_head_list = bool_list(globals(), 'int8_head')
pdl_list = bool_list(globals(), 'pdl')
float_gemv_list = bool_list(globals(), 'float_gemv')
wrapper_list = wrappers.split(',')
if any(w not in ('none', 'ddp', 'fsdp') for w in wrapper_list):
    fail(f"wrappers must be a comma-separated list of none, ddp, fsdp, got '{wrappers}'")
checkpointing_list = bool_list(globals(), 'activation_checkpointing')
distributed = 'RANK' in os.environ  # under torchrun
if wrapper_list != ['none'] and not distributed:
    fail("wrappers ddp and fsdp need a process group: torchrun --standalone --nproc_per_node=1 bench.py ...")

# torch and the model, after the settings are checked ----------------------------
import torch

from model import GPT, PROJECTIONS, GPTConfig, device_peak_flops, projection_parent, rotary_tables

torch.manual_seed(seed)  # the random weights and batches
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = device.split(':')[0]
check_device_present(device)
if packed_file:
    from checkpoint import is_packed_file
    check_new_file(packed_file, 'packed_file', overwrite, replaceable=is_packed_file)
if threads:
    torch.set_num_threads(threads)
if device_type != 'cuda' and (batch_size_list != [1] or int8_head_list != [False] or pdl_list != [True]
                              or float_gemv_list != [True]):
    fail("batch_sizes, int8_head, pdl and float_gemv time the CUDA engine: drop them on the CPU, or run on a CUDA GPU")
if mode == 'layer' and device_type != 'cuda':
    fail("mode=layer times the CUDA kernels of the packed layer and needs a CUDA GPU "
         "(--mode=decode --device=cpu times the CPU kernel in a model)")
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
compile_arg = compile      # decode on CUDA: None measures the engine both with and without torch.compile
if compile is None:
    compile = device_type == 'cuda'
if cuda_graphs is None:
    cuda_graphs = compile and device_type == 'cuda'
elif cuda_graphs and not (compile and device_type == 'cuda'):
    fail("cuda_graphs=True needs compile=True on a CUDA GPU: drop --cuda_graphs=True")
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
cuda = device_type == 'cuda'
rank = 0
if distributed:
    import torch.distributed as dist
    rank = int(os.environ['RANK'])
    if cuda:
        device = f'cuda:{os.environ["LOCAL_RANK"]}'
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if cuda else 'gloo')


def sync():
    if cuda:
        torch.cuda.synchronize()



def bench_train():
    """Training step time of each quant mode (see the module docstring)."""
    batches = [(torch.randint(vocab_size, (batch_size, block_size), device=device),
                torch.randint(vocab_size, (batch_size, block_size), device=device)) for _ in range(4)]
    variants = {}
    for quant, wrapper, checkpointing in [(q, w, a) for q in quant_list for w in wrapper_list for a in checkpointing_list]:
        name = quant + ('' if wrapper == 'none' else f' {wrapper}') + (' ac' if checkpointing else '')
        graphs = cuda_graphs and wrapper == 'none'  # a wrapper's hooks and collectives stay outside graphs
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                           n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size, quant=quant,
                           tie_embeddings=tie_embeddings, rope_theta=rope_theta)
        try:
            raw = GPT(config)  # built on the CPU, as train.py does: FSDP moves it to the GPU block by block
            raw.activation_checkpointing = checkpointing
            if wrapper == 'fsdp':
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == 'bfloat16' else None,
                                              reduce_dtype=torch.float32)
                for block in raw.model.layers:
                    fully_shard(block, mp_policy=policy)
                fully_shard(raw, mp_policy=policy)
            else:
                raw.to(device)
            optimizer = raw.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device_type)
            model = torch.compile(raw, mode='reduce-overhead' if graphs else None) if compile else raw
            if wrapper == 'ddp':
                from torch.nn.parallel import DistributedDataParallel as DDP
                model = DDP(model, device_ids=[torch.device(device).index] if cuda else None)

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
        except torch.cuda.OutOfMemoryError:
            raw = model = optimizer = step = None
            print(f"{name}: out of memory at batch {batch_size} x block {block_size}", file=sys.stderr)
            variants[name] = None
            continue
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
        variants[name] = dict(step=step, raw=raw, times=[], peak=peak, graphs=graphs)
        print(f"{name}: built, compiled={compile}, cuda_graphs={graphs}, warmed up ({warmup} steps)", file=sys.stderr)

    for r in range(rounds):
        for v in variants.values():
            if v is None:
                continue
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

    if profile and cuda:
        for name, v in variants.items():
            if v is not None:
                profile_kernels(v['step'], f"training step, {name}", 3)
    if rank != 0:  # every rank timed its own steps; rank 0 reports
        return
    peak_flops, device_name = device_peak_flops(device)
    tokens = batch_size * block_size
    measured = [v for v in variants.values() if v is not None]
    if not measured:
        fail(f"every variant ran out of memory at batch {batch_size} x block {block_size}: lower --batch_size")
    ref_name = next(name for name, v in variants.items() if v is not None)
    ref = statistics.median(variants[ref_name]['times'])
    print(f"device: {device_name}; torch {torch.__version__}; dtype {dtype}; compile {compile}; "
          f"CUDA graphs {cuda_graphs} (without a wrapper){f'; {dist.get_world_size()} process(es)' if distributed else ''}")
    print(f"model: {n_layer} layers, {n_head} heads, {n_embd} wide, block {block_size}, batch {batch_size}, "
          f"vocab {vocab_size}, {measured[0]['raw'].get_num_params() / 1e6:.1f}M non-embedding parameters; "
          f"median of {rounds * steps_per_round} timed steps after {warmup} warm-up steps")
    width = max(len(name) for name in variants)
    print(f"{'variant':<{width}} {'step ms':>9} {'vs ' + ref_name:>{max(9, len(ref_name) + 4)}} {'tokens/s':>11} "
          f"{'MFU':>7} {'peak mem':>10}")
    for name, v in variants.items():
        if v is None:
            print(f"{name:<{width}} out of memory")
            continue
        t = statistics.median(v['times'])
        mfu = v['raw'].estimate_mfu(tokens, block_size, t, peak_flops)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else 'n/a'
        mem_text = f"{v['peak'] / 2**30:.2f} GiB" if v['peak'] is not None else 'n/a'
        print(f"{name:<{width}} {t * 1000:9.2f} {t / ref:{max(9, len(ref_name) + 4) - 1}.3f}x {tokens / t:11,.0f} "
              f"{mfu_text:>7} {mem_text:>10}")
    if peak_flops:
        print(f"MFU against {peak_flops / 1e12:.0f} TFLOP/s, the dense bf16 peak of the {device_name} datasheet")


def profile_kernels(fn, title, steps, top=25):
    """Print the GPU kernels that fn launches: calls per run of fn and time, the largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    sync()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) / steps
    print(f"\n{title}: {sum(e.count for e in kernels) / steps:.0f} kernels, {total / 1000:.3f} ms of GPU time per run")
    for e in kernels[:top]:
        print(f"  {e.count / steps:6.1f} x {e.device_time_total / e.count:9.2f} us  {e.key[:110]}")


def random_model(quant, packed):
    """A GPT of the benchmark's shape with random weights, built on the device without ever
    allocating latent weights for the packed form."""
    from packed import pack_model
    config = GPTConfig(block_size=max(block_size, prompt_len + new_tokens), vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size,
                       quant=quant, tie_embeddings=tie_embeddings, rope_theta=rope_theta)
    with torch.device('meta'):
        model = GPT(config)
    if packed:
        weights = []
        for block in model.model.layers:
            w = {}
            for name in PROJECTIONS:
                layer = getattr(getattr(block, projection_parent(name)), name)
                w_t = torch.randint(-1, 2, (layer.out_features, layer.in_features), dtype=torch.int8, device=device)
                w[name] = (w_t, torch.rand((), device=device) * 0.02 + 0.01)
            weights.append(w)
        pack_model(model, weights)
        del weights
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            module_name, _, attr = name.rpartition('.')
            value = torch.ones(p.shape, device=device) if name.endswith('norm.weight') else \
                torch.randn(p.shape, device=device) * 0.02
            # in dtype, as the engine holds them (so engine.tensor_bytes counts what a step reads)
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value.to(ptdtype)))
    if tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = [t.to(device) for t in rotary_tables(
        config.n_embd // config.n_head, config.block_size, config.rope_theta)]
    return model.eval()


def bench_decode():
    """Greedy decoding on CUDA, packed ternary vs float, same engine (see the module docstring)."""
    import os
    import statistics
    import ternary_kernels
    from engine import Engine, tensor_bytes
    from checkpoint import save_packed
    results = []
    modes = [False, True] if compile_arg is None else [compile_arg]
    for variant in ('packed', 'float'):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = random_model('b1.58' if variant == 'packed' else 'none', variant == 'packed')
        n_bitlinear = sum(m.packed.numel() for m in model.modules() if hasattr(m, 'row_scale'))
        weight_bytes = tensor_bytes(model)
        heads = int8_head_list if variant == 'packed' else [False]
        gemvs = float_gemv_list if variant == 'float' else [False]
        for mode, int8, gemv, B, launch in [(m, h, g, b, p) for m in modes for h in heads for g in gemvs
                                            for b in batch_size_list for p in pdl_list if b == 1 or g == gemvs[0]]:
            prompt = torch.randint(vocab_size, (B, prompt_len), device=device)
            ternary_kernels.PDL = launch   # read as the engine's graphs are captured
            runner = Engine(model, batch_size=B, max_len=prompt_len + new_tokens, dtype=ptdtype, compile=mode,
                            int8_head=int8, float_gemv=gemv)
            with torch.no_grad():
                first = runner.generate(prompt, new_tokens)   # warm-up: compilation, autotuning, graph capture
            times = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = runner.generate(prompt, new_tokens)
                sync()
                times.append(time.perf_counter() - t0)
            # random weights leave near-ties among the logits, where bf16 rounding can pick another token
            same = (out[0, prompt_len:] == first[0, prompt_len:]).tolist()
            stable = same.index(False) if False in same else new_tokens
            t = statistics.median(times)
            cublas = variant == 'float' and not runner.float_gemv and B == 1
            name = variant + (' int8-head' if int8 else '') + (' cuBLAS' if cublas else '') + \
                (' compiled' if mode else ' eager') + ('' if launch else ' no-PDL')
            if profile and B == 1:
                runner.cache.pos.fill_(prompt_len)   # a position inside the cache
                with torch.no_grad():
                    profile_kernels(runner.step, f"decode step, {name} (no CUDA graph)", 1)
            row = dict(variant=variant, name=name, batch=B, tok_s=B * new_tokens / t, ms=1000 * t / new_tokens,
                       weight_bytes=weight_bytes, step_bytes=runner.weight_bytes(),   # what a step reads at least
                       peak=torch.cuda.max_memory_allocated() - base, stable=stable)
            if variant == 'packed':
                row['bits'] = 8 * sum(m.packed.numel() + 4 * m.row_scale.numel()
                                      for m in model.modules() if hasattr(m, 'row_scale')) / (4 * n_bitlinear) \
                    if n_bitlinear else None
            results.append(row)
            print(f"measured: {name} batch {B}: {row['tok_s']:.1f} tokens/s, {row['ms']:.3f} ms/step", flush=True)
            del runner
        if variant == 'packed' and packed_file:
            save_packed(model, packed_file, dtype=torch.bfloat16)
            results[-1]['file_bytes'] = os.path.getsize(packed_file)
        del model
    a = torch.empty(2**30, dtype=torch.uint8, device=device)   # device-to-device copy, bytes read + written
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    bandwidth = 2 * a.numel() * 10 / (time.perf_counter() - t0)
    del a, b
    _, device_name = device_peak_flops(device)
    print(f"device: {device_name}; torch {torch.__version__}; dtype {dtype}; compile {compile}")
    print(f"model: {n_layer} layers, {n_head} heads ({n_kv_head or n_head} kv), {n_embd} wide, MLP "
          f"{GPTConfig(n_embd=n_embd, n_head=n_head, intermediate_size=intermediate_size).intermediate_size}, "
          f"vocab {vocab_size}, tied {tie_embeddings}; prompt {prompt_len}, {new_tokens} new tokens per sequence, "
          f"median of {repeats}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("(tokens/s: all sequences of the batch; ms/step: one token of each sequence; of BW limit: bytes a step "
          "reads at least x steps/s over the copy bandwidth; repeat: how many greedy tokens of the first sequence a "
          "timed run shares with the first run before they differ)")
    print(f"{'variant':<32} {'batch':>5} {'tokens/s':>9} {'ms/step':>8} {'vs float':>9} {'weights':>12} "
          f"{'peak mem':>12} {'of BW limit':>12} {'repeat':>7}")
    for r in results:
        floats = [f['tok_s'] for f in results if f['variant'] == 'float' and f['batch'] == r['batch']]
        frac = f"{r['step_bytes'] * r['tok_s'] / r['batch'] / bandwidth * 100:.1f}%"
        mem = f"{r['peak'] / 2**20:,.1f} MiB"
        weights = f"{r['weight_bytes'] / 2**20:,.1f} MiB"
        vs = f"{r['tok_s'] / max(floats):8.2f}x" if floats else f"{'n/a':>9}"
        print(f"{r['name']:<32} {r['batch']:5d} {r['tok_s']:9.1f} {r['ms']:8.3f} {vs} {weights:>12} {mem:>12} "
              f"{frac:>12} {r['stable']:>7}")
    print("vs float: against the faster float row of the same batch size")
    packed_row = [r for r in results if r['variant'] == 'packed'][-1]
    if packed_row.get('bits'):
        print(f"packed BitLinear weights in memory: {packed_row['bits']:.3f} bits per weight (2-bit codes + a float32 scale per row)")
    if packed_row.get('file_bytes'):
        print(f"packed file {packed_file}: {packed_row['file_bytes'] / 1e9:.4f} GB")


def rss(field='VmRSS'):
    """This process's resident memory in bytes (VmRSS), or its peak (VmHWM) since reset_peak_rss;
    None where /proc is not there (not Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def reset_peak_rss():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')   # VmHWM := VmRSS
    except OSError:
        pass


def cpu_model(variant):
    """The benchmark's GPT as `variant` ('training': b1.58 BitLinear layers; 'packed'; 'float':
    quant='none'), with the same random weights whatever the variant: parameter `name` is drawn
    from a generator seeded with its index among the parameter names. The packed model is built
    layer by layer, so its latent weights never exist all at once."""
    from packed import PackedBlock
    from bitlinear import quantize_weight
    from model import projection_name
    config = GPTConfig(block_size=max(block_size, prompt_len + new_tokens), vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size,
                       quant='none' if variant == 'float' else 'b1.58', tie_embeddings=tie_embeddings,
                       rope_theta=rope_theta)
    with torch.device('meta'):
        model = GPT(config)
    names = [n for n, _ in model.named_parameters()]

    def draw(name, shape):
        if name.endswith('norm.weight'):
            return torch.ones(shape)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100003 + names.index(name))) * 0.02
    if variant == 'packed':
        for i, block in enumerate(model.model.layers):
            weights = {}
            for proj in PROJECTIONS:
                layer = getattr(getattr(block, projection_parent(proj)), proj)
                weights[proj] = quantize_weight(draw(f'{projection_name(i, proj)}.weight', layer.weight.shape))
            model.model.layers[i] = PackedBlock(block, weights)
        model.packed = True
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition('.')
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(draw(name, p.shape)))
    if tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
    return model.eval()


PACKED_FILE_RUN = """
import json, sys, time, torch
sys.path.insert(0, {repo!r})
import cpu_kernels
from checkpoint import load_checkpoint, model_from_checkpoint
{rss_source}
from model import GPT, GPTConfig
from packed import pack_model
torch.set_num_threads({threads})
cpu_kernels.extension()
with torch.no_grad():   # torch's first-use allocations and meta-device code, as in the parent's baseline
    tiny = GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=64)
    pack_model(GPT(tiny).eval()).generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0)
    with torch.device('meta'):
        GPT(tiny)
base = rss()
model = model_from_checkpoint(load_checkpoint({path!r}), {path!r})
if {half}:
    cpu_kernels.half_head(model)
loaded = rss()
prompt = torch.randint({vocab}, (1, {prompt_len}), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(prompt, {new_tokens}, temperature=0)
    t0 = time.perf_counter()
    model.generate(prompt, {new_tokens}, temperature=0)
    t = time.perf_counter() - t0
print(json.dumps(dict(base=base, loaded=loaded, rss=rss(), peak=rss('VmHWM'), tok_s={new_tokens} / t)))
"""


def bench_decode_cpu():
    """Batch-1 greedy decoding on the CPU: training form, packed, float (see the module docstring)."""
    import gc
    import os
    import cpu_kernels
    from checkpoint import save_packed
    from packed import pack_model, release_free_heap
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cpu_kernels.extension()   # built (or loaded) before the baseline
    with torch.no_grad():     # torch's first-use allocations (thread pools, BLAS buffers) before the baseline too
        tiny = lambda quant: GPT(GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=64, quant=quant)).eval()
        for warm in (tiny('b1.58'), pack_model(tiny('b1.58')), tiny('none')):
            warm.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0)
        with torch.device('meta'):   # torch's meta-device code, which cpu_model and load_packed use (~150 MB of it)
            tiny('b1.58')
    del warm
    gc.collect()
    base = rss()
    results = []
    for variant in variants.split(','):
        model = cpu_model(variant)
        release_free_heap()   # what building from latent weights freed
        if variant == 'packed' and packed_file:
            save_packed(model, packed_file)
        if cpu_head == 'float16':
            cpu_kernels.half_head(model)
        n_proj = sum(math.prod(w.shape) for name, w in model.named_parameters() if name.endswith('_proj.weight'))
        if variant == 'packed':
            n_proj = sum(4 * m.packed.numel() for m in model.modules() if hasattr(m, 'row_scale'))
            bits = 8 * sum(m.packed.numel() + 4 * m.row_scale.numel()
                           for m in model.modules() if hasattr(m, 'row_scale')) / n_proj
        else:
            bits = 32.0
        built = rss()
        reset_peak_rss()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(prompt[:, :1])   # a training form's first forward quantizes and packs every weight (eval cache)
            first_ms = 1000 * (time.perf_counter() - t0)
            first = model.generate(prompt, new_tokens, temperature=0)   # warm-up
            prefill, total = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.generate(prompt, 1, temperature=0)
                t1 = time.perf_counter()
                out = model.generate(prompt, new_tokens, temperature=0)
                t2 = time.perf_counter()
                prefill.append(t1 - t0)
                total.append(t2 - t1)
        t, tp = statistics.median(total), statistics.median(prefill)
        if variant == 'training':   # the float weights and the eval cache's codes and row scales
            bits += 8 * sum(m.eval_cache[1].numel() + 4 * m.eval_cache[2].numel()
                            for m in model.modules() if getattr(m, 'eval_cache', None)) / n_proj
        results.append(dict(variant=variant, tok_s=new_tokens / t, decode_tok_s=(new_tokens - 1) / (t - tp),
                            ms=1000 * (t - tp) / (new_tokens - 1), prefill_ms=1000 * tp, bits=bits,
                            rss=built - base if base else None, peak=rss('VmHWM') - base if base else None,
                            same=torch.equal(out, first), tokens=out[0, prompt_len:], first_ms=first_ms))
        if variant == 'packed' and packed_file:
            results[-1]['file_bytes'] = os.path.getsize(packed_file)
        del model
        gc.collect()
    print(f"device: cpu, {torch.get_num_threads()} threads, kernel {cpu_kernels.extension().isa() if cpu_kernels.available() else 'none (reference path)'}; "
          f"torch {torch.__version__}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: {n_layer} layers, {n_head} heads ({n_kv_head or n_head} kv), {n_embd} wide, MLP "
          f"{GPTConfig(n_embd=n_embd, n_head=n_head, intermediate_size=intermediate_size).intermediate_size}, "
          f"vocab {vocab_size}, tied {tie_embeddings}, lm_head {cpu_head}; batch 1, prompt {prompt_len}, "
          f"{new_tokens} greedy tokens, median of {repeats} after a warm-up run")
    print(f"baseline RSS (Python, torch after a first tiny model and its meta-device code, our modules, the kernel): {base / 2**20:.0f} MiB" if base else "RSS: n/a")
    print(f"{'variant':<9} {'tokens/s':>9} {'decode/s':>9} {'ms/token':>9} {'prefill ms':>11} {'bits/w':>7} "
          f"{'RSS+':>10} {'peak RSS+':>10} {'repeat':>7}")
    for r in results:
        mem = lambda b: f"{b / 2**20:,.0f} MiB" if b is not None else 'n/a'
        print(f"{r['variant']:<9} {r['tok_s']:9.1f} {r['decode_tok_s']:9.1f} {r['ms']:9.2f} {r['prefill_ms']:11.1f} "
              f"{r['bits']:7.3f} {mem(r['rss']):>10} {mem(r['peak']):>10} {str(r['same']):>7}")
    print("tokens/s: new tokens over the whole generate call; decode/s and ms/token: without the prefill; "
          "RSS+: resident after building, over the baseline; peak: while generating; "
          "repeat: the timed runs gave the warm-up's tokens")
    for r in results:
        if r['variant'] == 'training':
            print(f"training form: its first forward (one token, quantizing and packing every weight into the "
                  f"eval cache) took {r['first_ms']:.0f} ms; bits/w counts the float weights and the cache")
    agree = [r for r in results if r['variant'] != 'float']
    if len(agree) == 2:
        same = (agree[0]['tokens'] == agree[1]['tokens']).tolist()
        print(f"training form and packed: the same greedy tokens for the first "
              f"{same.index(False) if False in same else len(same)} of {len(same)}")
    packed_row = [r for r in results if r.get('file_bytes')]
    if packed_row:
        import json
        import subprocess
        import inspect
        code = PACKED_FILE_RUN.format(rss_source=inspect.getsource(rss), repo=os.path.dirname(os.path.abspath(__file__)), threads=torch.get_num_threads(),
                                      path=os.path.abspath(packed_file), half=cpu_head == 'float16', vocab=vocab_size,
                                      prompt_len=prompt_len, new_tokens=new_tokens)
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
        if r.returncode:
            print(f"the packed file's process failed: {r.stderr.strip().splitlines()[-1]}")
        else:
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"packed file {packed_file}: {packed_row[0]['file_bytes'] / 2**20:.0f} MiB; a fresh process "
                  f"(baseline {m['base'] / 2**20:.0f} MiB) loads it memory-mapped: +{(m['loaded'] - m['base']) / 2**20:.0f} MiB "
                  f"resident, +{(m['rss'] - m['base']) / 2**20:.0f} MiB after generating (peak +{(m['peak'] - m['base']) / 2**20:.0f} MiB), "
                  f"{m['tok_s']:.1f} tokens/s")


def bench_layer():
    """One layer's projections, each alone, for every M in --rows (rows of x: tokens x sequences),
    in CUDA graphs (triton.testing.do_bench_cudagraph, as the engine runs them), median us per
    call: the packed op (up to 16 rows the dp4a GEMV, beyond that the weights unpacked to int8 by
    one kernel and the int8 tensor cores), the plain way to compute the same layer from the packed
    bytes (unpack to bfloat16, then a bfloat16 matmul), and the float model's matmul (bfloat16
    weights as stored, cuBLAS). Each timed call goes over enough copies of the weights to fill
    twice the L2 cache, so the weights come from memory, as they do in a model."""
    import math
    import torch.nn.functional as F
    import triton.testing
    from bitlinear import pack_ternary
    from ternary_kernels import bf16_matmul
    from ops import packed_linear, packed_linear_reference
    config = GPTConfig(n_layer=1, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size)
    head_dim = n_embd // n_head
    shapes = (('q,k,v', n_embd + 2 * config.n_kv_head * head_dim, n_embd), ('o', n_embd, n_embd),
              ('gate+up', 2 * config.intermediate_size, n_embd), ('down', n_embd, config.intermediate_size))
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    graph = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode='median') * 1000
    print(f"one layer's projections, CUDA graphs, median us per call (the weights cycled through "
          f"{2 * l2 / 2**20:.0f} MiB, twice the L2 cache); packed: this repo's op; unpack+bf16: the same "
          f"packed bytes unpacked to bfloat16, then a bfloat16 matmul; bf16: the float model's matmul")
    print(f"{'rows':>5} {'projection':>10} {'shape':>12} {'packed':>9} {'unpack+bf16':>12} {'bf16':>9} "
          f"{'packed GB/s':>12} {'bf16 GB/s':>10} {'vs bf16':>8}")
    for M in row_list:
        totals = [0.0, 0.0, 0.0]
        for name, out_f, in_f in shapes:
            w_t = torch.randint(-1, 2, (out_f, in_f), dtype=torch.int8, device=device)
            packed = pack_ternary(w_t)
            copies = [packed] + [packed.clone() for _ in range(min(4096, math.ceil(2 * l2 / packed.nbytes)) - 1)]
            floats = [w_t.to(torch.bfloat16) for _ in range(math.ceil(2 * l2 / (2 * w_t.numel())))]
            scale = torch.full((packed.size(0) * 4,), 0.02, device=device)
            x = torch.randn(M, in_f, device=device, dtype=torch.bfloat16)
            args = lambda p: (x, x.new_empty(0), p, scale, x.new_empty(0), out_f, 0, 1e-5)
            torch.testing.assert_close(packed_linear(*args(packed)),
                                       packed_linear_reference(*args(packed), matmul=bf16_matmul), rtol=1e-2, atol=1e-2)
            times = [graph(lambda: [packed_linear(*args(p)) for p in copies]) / len(copies),
                     graph(lambda: [packed_linear_reference(*args(p), matmul=bf16_matmul) for p in copies]) / len(copies),
                     graph(lambda: [F.linear(x, w) for w in floats]) / len(floats)]
            totals = [a + b for a, b in zip(totals, times)]
            print(f"{M:5d} {name:>10} {f'{out_f}x{in_f}':>12} {times[0]:9.2f} {times[1]:12.2f} {times[2]:9.2f} "
                  f"{packed.nbytes / times[0] / 1e3:12.0f} {2 * w_t.numel() / times[2] / 1e3:10.0f} "
                  f"{times[2] / times[0]:7.2f}x", flush=True)
            del copies, floats
        print(f"{M:5d} {'layer':>10} {'':>12} {totals[0]:9.2f} {totals[1]:12.2f} {totals[2]:9.2f} {'':>12} {'':>10} "
              f"{totals[2] / totals[0]:7.2f}x", flush=True)


if mode == 'train':
    bench_train()
elif mode == 'decode' and not cuda:
    bench_decode_cpu()
elif mode == 'decode':
    bench_decode()
else:
    bench_layer()
if distributed:
    dist.barrier()   # as in train.py: no rank tears its connections down while another still uses them
    dist.destroy_process_group()
