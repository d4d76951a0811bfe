"""
Export a checkpoint as a directory that Hugging Face transformers loads as BitNetForCausalLM
(model_type 'bitnet', the format of BitNet b1.58 2B4T; a model without sub-norms as
LlamaForCausalLM with the same bitnet quantization), so the model runs in transformers:

    python export.py --out_dir=out-shakespeare-char --to=hf-shakespeare-char
    python export.py --ckpt_path=out/ckpt.pt --to=hf-packed --variant=packed
    python export.py --ckpt_path=out/ckpt_packed.pt --to=hf-packed --variant=packed   # pack.py's file

and in transformers: AutoModelForCausalLM.from_pretrained('hf-packed'). --format=gguf writes one
file that llama.cpp runs instead (gguf_export.py says what it holds and how llama.cpp computes it):

    python export.py --out_dir=out --to=model.gguf --format=gguf

variant 'master' stores the latent float weights (quantization_mode 'online': transformers
quantizes them every forward, as our BitLinear does, and can fine-tune them); 'packed' stores the
ternary weights, 2 bits each instead of 32 (or 16), and one weight_scale per layer ('offline',
inference only). A float baseline (quant='none') becomes a plain BitNetForCausalLM. hf.py holds
the conversion and what transformers does with each variant.

The directory gets config.json, model.safetensors, the tokenizer (GPT-2 BPE: vocab.json,
merges.txt and tokenizer_config.json for AutoTokenizer; a transformers tokenizer: its files,
copied; character-level: vocab.json, character -> id), meta.json (our tokenizer meta data, for importing it back with hf:DIR) and
export.json (what was written, from which checkpoint). An existing directory is written into
only when it is empty or holds an earlier export (export.json); nothing else in it is touched.
"""

import json
import os
import sys

from safetensors.torch import save_file

from bitlinear import quantize_weight
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from configurator import check_new_file, configure, fail
from hf import (DTYPES, VARIANTS, HFError, gpt2_tokenizer_files, gpt_state_dict_from_hf, hf_config, hf_state_dict,
                is_projection, progress)
from prepare_data import DataError

FORMATS = ('hf', 'gguf')

HF_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
                      'tokenizer.model')   # a transformers tokenizer's files, copied from its directory
EXPORT_FILES = {'model.safetensors', 'config.json', 'meta.json', 'export.json',
                *HF_TOKENIZER_FILES}  # every file export.py may write; it never deletes any other

# -----------------------------------------------------------------------------
out_dir = 'out'            # reads out_dir/ckpt.pt ...
ckpt_path = ''             # ... unless a checkpoint file is named here
to = ''                    # hf: the directory to write (new, empty, or an earlier export); gguf: the file
format = 'hf'              # 'hf' (a transformers BitNetForCausalLM directory) or 'gguf' (one file for llama.cpp)
variant = 'master'         # hf: 'master' (latent float weights, quantized online) or 'packed' (2-bit, weight_scale)
dtype = 'float32'          # 'float32' (exact copy) or 'bfloat16' (half the size, as the 2B4T bf16 release);
                           # gguf: of the embedding only (its norms and scales stay float32)
overwrite = False          # gguf: replace a --to file that export.py did not write
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
if format not in FORMATS:
    fail(f"format must be hf or gguf, got '{format}'")
if not to:
    fail(f"name the {'directory' if format == 'hf' else 'file'} to write: --to={'DIR' if format == 'hf' else 'FILE.gguf'}")
if variant not in VARIANTS:
    fail(f"variant must be 'master' or 'packed', got '{variant}'")
if format == 'gguf' and variant != 'master':
    fail("--variant is a setting of --format=hf: a GGUF file always holds the 2-bit ternary weights")
if dtype not in DTYPES:
    fail(f"dtype must be float32 or bfloat16, got '{dtype}'")
path = ckpt_path or os.path.join(out_dir, 'ckpt.pt')

# --format=gguf: one file for llama.cpp (gguf_export.py); everything after this block writes --format=hf
if format == 'gguf':
    from gguf_export import gguf_refusal, is_gguf_export, write_gguf
    check_new_file(to, 'to', overwrite, is_gguf_export)
    try:
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path, dropout=0.0)   # a packed file stays packed: its own codes
    except CheckpointError as e:
        fail(str(e))
    refusal = gguf_refusal(model.config, checkpoint.get('tokenizer'))
    if refusal:
        fail(f"{path}: {refusal}")
    tmp = to + '.tmp'   # written, then renamed over --to: a failed export leaves no half-written file
    try:
        size = write_gguf(model, checkpoint.get('tokenizer'), tmp, dtype, os.path.basename(path))
        os.replace(tmp, to)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    c = model.config
    print(f"wrote {to}: llama.cpp architecture bitnet, {c.n_layer} x {c.n_embd}, TQ2_0 projections, "
          f"{dtype} embedding, {checkpoint['tokenizer']['tokenizer']} tokenizer, {size / 1e6:.2f} MB")
    print("llama.cpp's bitnet graph computes silu(gate) * up where this model has relu(gate)^2 * up: "
          "docs/gguf.md has the one-line change to llama.cpp that runs it as trained")
    sys.exit(0)

# the target: never overwrite what export.py did not write ------------------------
record_path = os.path.join(to, 'export.json')
if os.path.exists(to) and not os.path.isdir(to):
    fail(f"{to} is a file, not a directory: choose another --to")
if os.path.isdir(to) and os.listdir(to) and not os.path.isfile(record_path):
    fail(f"{to} holds files that export.py did not write (or an export that did not finish): "
         f"choose a new or empty --to")
previous = []  # files of an earlier export into the same directory
if os.path.isfile(record_path):
    try:
        with open(record_path) as f:
            previous = json.load(f)['files']
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"{record_path} is damaged: choose a new or empty --to")

# the model ------------------------------------------------------------------------
try:
    checkpoint = load_checkpoint(path)
    if 'packed' in checkpoint:  # pack.py's file holds ternary weights only: latent weights that quantize to them
        checkpoint = dict(model=gpt_state_dict_from_hf(checkpoint['packed'], checkpoint['model_args'],
                                                       'autobitlinear', path),
                          model_args=checkpoint['model_args'], tokenizer=checkpoint.get('tokenizer'))
    model = model_from_checkpoint(checkpoint, path, dropout=0.0)
except CheckpointError as e:   # HFError included
    fail(str(e))
meta = checkpoint.get('tokenizer')
try:
    config = hf_config(checkpoint['model_args'], variant, dtype, meta)
    tensors = hf_state_dict(model, variant, dtype)
except HFError as e:
    fail(f"{path}: {e}")

# the files: everything else first, export.json last, so a crash leaves no export.json --
files = {'config.json': json.dumps(config, indent=2) + '\n'}
if meta is None:
    print(f"{path} has no tokenizer meta data: the export has no tokenizer files")
elif meta['tokenizer'] == 'gpt2':
    try:
        files.update(gpt2_tokenizer_files(model.config.block_size))
    except DataError as e:
        fail(str(e))
elif meta['tokenizer'] == 'hf':   # a transformers tokenizer (a released model's, prepare_data.py --tokenizer=hf:DIR)
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(meta['path'], name)):
            with open(os.path.join(meta['path'], name), 'rb') as f:
                files[name] = f.read()
    if not files.keys() & {'tokenizer.json', 'tokenizer_config.json'}:
        fail(f"{path}'s tokenizer directory {meta['path']} holds no tokenizer files: the export would have no tokenizer")
elif meta['tokenizer'] == 'char':  # transformers has no character tokenizer: id i is meta['chars'][i]
    files['vocab.json'] = json.dumps({c: i for i, c in enumerate(meta['chars'])}, ensure_ascii=False, indent=0)
if meta is not None:
    files['meta.json'] = json.dumps(meta)
os.makedirs(to, exist_ok=True)
save_file(tensors, os.path.join(to, 'model.safetensors'), metadata={'format': 'pt'})
for name, text in files.items():
    with open(os.path.join(to, name), 'wb') as f:
        f.write(text if isinstance(text, bytes) else text.encode('utf-8'))
written = ['model.safetensors', *files, 'export.json']
for name in (set(previous) & EXPORT_FILES) - set(written):   # left by the earlier export (e.g. GPT-2's merges.txt)
    if os.path.isfile(os.path.join(to, name)):
        os.remove(os.path.join(to, name))
record = dict(written_by='export.py', checkpoint=os.path.abspath(path), iter_num=checkpoint.get('iter_num'),
              variant=variant, dtype=dtype, quant=model.config.quant, files=written)
with open(record_path, 'w') as f:
    json.dump(record, f, indent=2)

# report ---------------------------------------------------------------------------
size = os.path.getsize(os.path.join(to, 'model.safetensors'))
mode = config.get('quantization_config', {}).get('quantization_mode')
print(f"wrote {to}/: {config['architectures'][0]}, quant={model.config.quant}, variant {variant}"
      f"{f' (quantization_mode {mode})' if mode else ' (plain float)'}, {dtype}, "
      f"model.safetensors {size / 1e6:.2f} MB, files: {', '.join(written)}")
if variant == 'master' and dtype == 'bfloat16' and model.config.quant == 'b1.58':
    # rounding the latent weights to bf16 can move a few across a rounding boundary
    moved = total = 0
    for name, w in progress(model.state_dict().items(), 'comparing'):
        if is_projection(name):
            moved += (quantize_weight(w)[0] != quantize_weight(tensors[name])[0]).sum().item()
            total += w.numel()
    print(f"bfloat16 rounding changed {moved:,} of {total:,} ternary weights ({100 * moved / total:.3f}%); "
          f"--dtype=float32 keeps them all")
if meta is not None and meta['tokenizer'] == 'char':
    print(f"character-level vocabulary of {len(meta['chars'])}: token id i is character i of "
          f"meta.json's 'chars' (vocab.json maps character -> id); transformers has no tokenizer for it")
print(f"load it with transformers.AutoModelForCausalLM.from_pretrained('{to}'), "
      f"or here with --init_from=hf:{to} (train.py) or --ckpt_path=hf:{to} (sample.py)")
