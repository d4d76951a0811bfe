"""
Checkpoint files, shared by the scripts: training checkpoints (ckpt.pt, train.py) and packed
files (ckpt_packed.pt, pack.py), and the GPT rebuilt from either.

A training checkpoint is a dict: 'model' (the raw state dict, Hugging Face names, no '_orig_mod.' or
'module.' prefixes), 'model_args' (GPTConfig fields), 'optimizer', 'scaler', 'iter_num',
'best_val_loss', 'best_iter', 'config' (every train.py setting) and 'tokenizer' (the meta data
of the dataset, so a checkpoint decodes its own samples). When training keeps a moving average of
the weights (ema_decay), 'model' is the average (what was evaluated, and what sample.py, pack.py
and export.py use) and 'train_model' the trained weights, which a resumed run continues from.
It holds no RNG state because training needs none: every random draw (batches, dropout) is a
function of (seed, rank, iteration), so a resumed run continues exactly as the uninterrupted one
would have. A packed file is a dict too: 'format' (packed.PACKED_FORMAT), 'packed' (the 2-bit
state dict, packed.packed_state_dict), 'model_args' and 'tokenizer'.
"""

import os

import torch

from model import GPT, GPTConfig
from packed import load_packed, packed_checkpoint


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
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:
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
        model.load_state_dict(checkpoint['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match the model it describes: {first_line}") from None
    return model


def save_packed(model, path, tokenizer=None, dtype=None):
    """Write a packed model (packed.pack_model) to path, atomically: its 2-bit weights, model_args
    and tokenizer. dtype converts the embedding, norms and lm_head, e.g. torch.bfloat16."""
    save_checkpoint(packed_checkpoint(model, tokenizer, dtype), path)
