"""
Checkpoint files, shared by the scripts: training checkpoints (ckpt.pt, train.py) and packed
files (ckpt_packed.pt, pack.py), and the GPT rebuilt from either.

A training checkpoint is a dict: 'model' (the raw state dict, Hugging Face names, no '_orig_mod.' or
'module.' prefixes), 'model_args' (GPTConfig fields), 'optimizer', 'scaler', 'iter_num',
'best_val_loss', 'best_iter', 'config' (every train.py setting), 'tokenizer' (the meta data
of the dataset, so a checkpoint decodes its own samples) and 'wandb_run_id' (None without wandb;
a resumed run logs on in that run). When training keeps a moving average of
the weights (ema_decay), 'model' is the average (what was evaluated, and what sample.py, pack.py
and export.py use) and 'train_model' the trained weights, which a resumed run continues from.
It holds no RNG state because training needs none: every random draw (batches, dropout) is a
function of (seed, rank, iteration), so a resumed run continues exactly as the uninterrupted one
would have. A packed file is a dict too: 'format' (packed.PACKED_FORMAT), 'packed' (the 2-bit
state dict, packed.packed_state_dict), 'model_args' and 'tokenizer'.
"""

import os
import re
import warnings

import torch

from model import GPT, GPTConfig
from packed import PACKED_FORMAT, load_packed, packed_checkpoint


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not ours; the message says what to do."""


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary file, then rename it over path. The rename is atomic, so a
    crash or an exception while saving leaves the previous checkpoint as it was."""
    tmp = path + '.tmp'
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location='cpu'):
    """The checkpoint dict at path, or CheckpointError with a one-line reason. The file is
    memory-mapped: a tensor's pages are read when used, and a model that keeps the file's
    tensors (packed.load_packed) stays about as resident as the file is large."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py CONFIG), "
                              f"or point --out_dir (or --ckpt_path) at one")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a plain pickle's protocol: the error says it all
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:
        # weights_only=True unpickles tensors and plain containers only; anything else is a GLOBAL:
        # a class or function that unpickling would import and call, i.e. code
        code = re.search(r'GLOBAL ([\w.]+)', str(e))
        if code:
            raise CheckpointError(f"{path} was refused: it holds Python code (a pickled {code.group(1)}), not only "
                                  f"tensors, and loading it could run that code; a checkpoint of this repo holds "
                                  f"none: use only files you made or trust") from None
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({type(e).__name__}); "
                              f"retrain, or restore it from a copy") from None
    if not isinstance(checkpoint, dict) or 'model_args' not in checkpoint or \
            ('model' not in checkpoint and 'packed' not in checkpoint):
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no 'model_args' and weights)")
    return checkpoint


def model_from_checkpoint(checkpoint, path='checkpoint', **overrides):
    """Rebuild the GPT of a checkpoint (overrides change settings such as dropout); a packed
    checkpoint (pack.py) comes back in its packed form."""
    if 'packed' in checkpoint:
        try:
            return load_packed(checkpoint, path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **overrides}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} describes a model that cannot be built: {str(e).strip().splitlines()[0]}") from None
    state, own = checkpoint['model'], model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged: its 'model' is a {type(state).__name__}, not a state dict")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in own if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)]
    if missing or unexpected or misshaped:
        more = len(missing) + len(unexpected) + len(misshaped) - 1
        more = f" (and {more} more mismatches)" if more else ""
        if missing:
            what = f"{missing[0]} is missing"
        elif misshaped:
            k = misshaped[0]
            shape = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            what = f"{k} has shape {shape}, the model needs {tuple(own[k].shape)}"
        else:
            what = f"{unexpected[0]} is not a weight of the model"
        raise CheckpointError(f"{path} does not match the model it describes: {what}{more}; "
                              f"it is damaged or was edited: retrain, or restore it from a copy")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model it describes: {str(e).strip().splitlines()[-1]}") from None
    return model


def is_packed_file(path):
    """True when path holds a packed model of this repo (pack.py, bench.py), one that those scripts
    may replace with a newer one; False for anything else (a training checkpoint, the user's files)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(checkpoint, dict) and checkpoint.get('format') == PACKED_FORMAT


def save_packed(model, path, tokenizer=None, dtype=None):
    """Write a packed model (packed.pack_model) to path, atomically: its 2-bit weights, model_args
    and tokenizer. dtype converts the embedding, norms and lm_head, e.g. torch.bfloat16."""
    save_checkpoint(packed_checkpoint(model, tokenizer, dtype), path)
