"""
Sample from a trained model, after checking that its weights really are ternary.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --ckpt_path=out/ckpt.pt --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out --start=FILE:prompt.txt

The check (bitlinear.verify_bitlinear) prints how many BitLinear layers and weights the
model has, the fraction of zeros, the size of the 2-bit packed weights, and PASS or FAIL;
FAIL exits with code 1 before any text is generated.
"""

import os
import sys
from contextlib import nullcontext

import torch

from bitlinear import verify_bitlinear
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from configurator import configure, fail
from prepare_data import DataError, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'            # reads out_dir/ckpt.pt ...
ckpt_path = ''             # ... unless a checkpoint file is named here
start = '\n'               # the prompt, or FILE:path to read it from a file
num_samples = 10
max_new_tokens = 500
temperature = 0.8          # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
top_k = 200                # sample among the top_k most likely tokens (None: all)
seed = 1337
device = 'auto'            # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'             # 'auto' (bfloat16 on CUDA where supported, else float32), 'float32', 'bfloat16', 'float16'
verify = True              # check the ternary weights first (FAIL exits with code 1)
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = device.split(':')[0]
if device_type == 'cuda' and not torch.cuda.is_available():
    fail("device is cuda but torch sees no CUDA GPU: use --device=cpu")
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
if dtype not in ('float32', 'bfloat16', 'float16'):
    fail(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)

path = ckpt_path or os.path.join(out_dir, 'ckpt.pt')
try:
    checkpoint = load_checkpoint(path, map_location='cpu')
    model = model_from_checkpoint(checkpoint, path, dropout=0.0)
except CheckpointError as e:
    fail(str(e))
model.eval().to(device)
if 'tokenizer' not in checkpoint:
    fail(f"{path} has no tokenizer meta data, so its samples cannot be decoded")
try:
    encode, decode = load_tokenizer(checkpoint['tokenizer'])
except DataError as e:
    fail(str(e))
checkpoint = None

# verify -------------------------------------------------------------------------
if verify:
    quant = model.config.quant
    if quant == 'none':
        print(f"{path}: float model (quant='none'): it has no BitLinear layers, there is nothing to verify")
    else:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(model.config.vocab_size, (2, min(64, model.config.block_size)), generator=g)
        with torch.no_grad():
            report = verify_bitlinear(model, probe.to(device))  # float32, no autocast
        bad = [r['name'] for r in report['rows'] if not r['ok']]
        values = '{-1, +1}' if quant == 'b1' else '{-1, 0, +1}'
        print(f"verify {path} (quant={quant}):")
        print(f"  {report['n_layers']} BitLinear layers, {report['n_weights']:,} weights, "
              f"{report['n_layers'] - len(bad)} of them exactly {values}")
        print(f"  zero fraction {report['zero_fraction']:.3f}, packed size {report['packed_bits']:.3f} "
              f"bits per weight (2-bit packing) plus one float32 scale per layer")
        print(f"  logits, training form vs integer weights and scales: max |diff| {report['max_diff']:.3g} "
              f"(tolerance {report['tol']:.3g})")
        if bad:
            print(f"  not {values}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        if not report['ok']:
            print("FAIL")
            sys.exit(1)
        print("PASS")

# generate -----------------------------------------------------------------------
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError:
        fail(f"prompt file not found: {start[5:]}")
try:
    start_ids = encode(start)
except DataError as e:
    fail(str(e))
if not start_ids:
    fail("the prompt is empty: give at least one token with --start=TEXT")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
with torch.no_grad(), autocast:
    for k in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
        print(decode(y[0].tolist()))
        print('---------------')
