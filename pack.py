"""
Write the packed form of a trained b1.58 checkpoint next to it: 2-bit ternary weights (4 per
byte, the Hugging Face offline layout) and one scale per projection, no latent float weights.

    python pack.py --out_dir=out-shakespeare-char            # -> out-shakespeare-char/ckpt_packed.pt
    python sample.py --ckpt_path=out-shakespeare-char/ckpt_packed.pt

The file is about an eighth of the training checkpoint's model weights for the projections;
the embedding, norms and lm_head are kept as they are (--dtype=bfloat16 halves them). An existing
file at the packed path is replaced only when it is an earlier packed file (or --overwrite=True).
"""

import os
import sys

from configurator import check, check_choice, check_new_file, configure, fail

# -----------------------------------------------------------------------------
out_dir = 'out'          # reads out_dir/ckpt.pt, writes out_dir/ckpt_packed.pt ...
ckpt_path = ''           # ... or reads this checkpoint file
packed_path = ''         # ... and writes here
dtype = 'float32'        # of the embedding, norms and lm_head in the file: 'float32' or 'bfloat16'
overwrite = False        # replace a file at the packed path even when it is not a packed file
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
check_choice(globals(), 'dtype', ('float32', 'bfloat16'))
src = ckpt_path or os.path.join(out_dir, 'ckpt.pt')
dst = packed_path or os.path.join(os.path.dirname(src) or '.', 'ckpt_packed.pt')
check(os.path.abspath(dst) != os.path.abspath(src),
      f"the packed file would replace its source {src}: choose another --packed_path")

# torch and the model, after the settings are checked ----------------------------
import torch

from checkpoint import CheckpointError, is_packed_file, load_checkpoint, model_from_checkpoint, save_packed
from packed import is_packed, pack_model

try:
    checkpoint = load_checkpoint(src)
    model = model_from_checkpoint(checkpoint, src, dropout=0.0)
except CheckpointError as e:
    fail(str(e))
check_new_file(dst, 'packed_path', overwrite, replaceable=is_packed_file)
if is_packed(model):
    fail(f"{src} is already packed")
if model.config.quant != 'b1.58':
    fail(f"{src} has quant='{model.config.quant}': only b1.58 (ternary) models pack into 2-bit weights")
try:
    pack_model(model)
except ValueError as e:   # options the packed format cannot hold
    fail(f"{src}: {e}")
save_packed(model, dst, tokenizer=checkpoint.get('tokenizer'), dtype=getattr(torch, dtype))
n = sum(m.packed.numel() for m in model.modules() if hasattr(m, 'row_scale')) * 4
print(f"wrote {dst}: {os.path.getsize(dst) / 1e6:.2f} MB (training checkpoint {os.path.getsize(src) / 1e6:.2f} MB), "
      f"{n:,} ternary weights at 2 bits")
