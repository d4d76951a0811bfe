"""
Turn a text file into what train.py reads: data/<name>/train.bin and val.bin (token ids,
uint16) and meta.json (the tokenizer, so a checkpoint can decode its own samples).

    python prepare_data.py shakespeare_char               # tiny Shakespeare, one token per character
    python prepare_data.py shakespeare                    # tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare_data.py shakespeare_char --input=input.txt        # from a local copy
    python prepare_data.py mybook --input=book.txt --tokenizer=char  # your own text, your own name

The two built-in datasets download the tiny Shakespeare text when data/<name>/input.txt is
absent and no --input is given. The first 90% of the text (by characters) is the training
split, the rest validation, as in nanoGPT. The text must be UTF-8. A folder that already holds
another prepared dataset (other text or tokenizer) is replaced only with --overwrite=True.
"""

import json
import os
import re
import sys
import urllib.request

import numpy as np
from tqdm import tqdm

from configurator import check, configure, fail

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
DATASETS = {  # name -> (tokenizer, url of the text)
    'shakespeare_char': ('char', SHAKESPEARE_URL),
    'shakespeare': ('gpt2', SHAKESPEARE_URL),
}
TOKENIZERS = ('char', 'gpt2')


class DataError(Exception):
    """A problem the user can fix; the message says how."""


# -----------------------------------------------------------------------------
# tokenizers

def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise DataError(f"could not load tiktoken's GPT-2 files ({type(e).__name__}): connect to the "
                        "internet once, or set TIKTOKEN_CACHE_DIR to a folder that holds them") from None


def load_tokenizer(meta):
    """meta (the dict in meta.json, also stored in checkpoints) -> (encode, decode).
    encode raises DataError for a character outside a character-level vocabulary."""
    if meta['tokenizer'] == 'char':
        chars = meta['chars']
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(text):
            missing = sorted(set(text) - stoi.keys())
            if missing:
                raise DataError(f"character {missing[0]!r} is not in this model's vocabulary of "
                                f"{len(chars)} characters; use only characters from its training text")
            return [stoi[c] for c in text]

        def decode(ids):
            return ''.join(chars[i] for i in ids)
        return encode, decode
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        return (lambda text: enc.encode(text, allowed_special={'<|endoftext|>'})), enc.decode
    if meta['tokenizer'] == 'hf':  # the tokenizer files of a transformers directory (hf.py)
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(meta['path'])
        except Exception as e:
            raise DataError(f"could not load the tokenizer of {meta['path']} with transformers "
                            f"({type(e).__name__}): pip install transformers, or check its tokenizer files") from None
        return tok.encode, (lambda ids: tok.decode(ids, skip_special_tokens=True))
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} in meta data")


def text_chunks(text, size=1 << 20):
    """Split text into pieces of about size characters, cutting only after a lone newline
    between two non-space characters ("x\ny"): GPT-2's pre-tokenizer makes that newline a token
    of its own, so encoding the pieces one by one gives the same ids as the whole text.
    (After "\n\n" it would not: at the end of a piece the pair becomes one token.)"""
    start = 0
    while start < len(text):
        end = start + size
        while end < len(text) and not (text[end - 1] == '\n' and not text[end - 2].isspace()
                                       and not text[end].isspace()):
            end += 1
        yield text[start:end]
        start = end


def encode_gpt2(text, desc):
    enc = gpt2_encoding()
    ids = []
    chunks = list(text_chunks(text))
    for chunk in tqdm(chunks, desc=desc, unit='MB', disable=len(chunks) < 4):
        ids.extend(enc.encode_ordinary(chunk))
    return ids


# -----------------------------------------------------------------------------

def read_text(path):
    """The text of a UTF-8 file, or DataError saying where it is not UTF-8."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {path} > converted.txt") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def read_input(name, input_path, data_dir):
    """The raw text: --input, else data/<name>/input.txt, else downloaded for built-ins."""
    if input_path:
        if not os.path.isfile(input_path):
            raise DataError(f"input file not found: {input_path}")
        return read_text(input_path)
    local = os.path.join(data_dir, name, 'input.txt')
    if os.path.isfile(local):
        return read_text(local)
    if name not in DATASETS:
        raise DataError(f"no text for dataset '{name}': give your file with "
                        f"python prepare_data.py {name} --input=PATH")
    url = DATASETS[name][1]
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            text = r.read().decode('utf-8')
    except Exception as e:
        raise DataError(f"could not download {url} ({type(e).__name__}): either give a local copy with "
                        f"python prepare_data.py {name} --input=PATH, or save that file as {local} yourself") from None
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, 'w', encoding='utf-8') as f:
        f.write(text)
    return text


def prepare(name, input_path='', tokenizer='', val_fraction=0.1, data_dir='data', overwrite=False):
    """Write data/<name>/{train.bin, val.bin, meta.json}; returns the meta dict. Files already there
    that differ from these (another text or tokenizer) are replaced only with overwrite=True."""
    tokenizer = tokenizer or DATASETS.get(name, ('char',))[0]
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer must be one of {TOKENIZERS}, got '{tokenizer}'")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text = read_input(name, input_path, data_dir)
    if len(text) < 100:
        raise DataError(f"the text for '{name}' has only {len(text)} characters; give it at least a few thousand")
    n = int(len(text) * (1 - val_fraction))
    splits = {'train': text[:n], 'val': text[n:]}
    if tokenizer == 'char':
        chars = ''.join(sorted(set(text)))
        meta = dict(tokenizer='char', vocab_size=len(chars), chars=chars)
        lookup = {c: i for i, c in enumerate(chars)}
        ids = {split: [lookup[c] for c in part] for split, part in splits.items()}
    else:
        meta = dict(tokenizer='gpt2', vocab_size=gpt2_encoding().n_vocab)
        ids = {split: encode_gpt2(part, f"encoding {split}") for split, part in splits.items()}
    meta['dtype'] = 'uint16' if meta['vocab_size'] <= 1 << 16 else 'uint32'
    out = os.path.join(data_dir, name)
    files = {f'{split}.bin': np.array(arr, dtype=meta['dtype']).tobytes() for split, arr in ids.items()}
    files['meta.json'] = json.dumps(meta).encode()
    differ = [f for f in files if os.path.isfile(os.path.join(out, f))
              and open(os.path.join(out, f), 'rb').read() != files[f]]
    if differ and not overwrite:
        raise DataError(f"{out} holds another prepared dataset ({differ[0]} differs from this one): choose another "
                        f"name, or replace it with python prepare_data.py {name} --overwrite=True")
    try:
        os.makedirs(out, exist_ok=True)
        for f, data in files.items():
            with open(os.path.join(out, f), 'wb') as fh:
                fh.write(data)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror}: choose another --data_dir") from None
    print(f"{name}: {len(text):,} characters, vocabulary {meta['vocab_size']:,} ({tokenizer}), "
          f"train {len(ids['train']):,} tokens, val {len(ids['val']):,} tokens -> {out}/")
    return meta


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    input = ''           # path of a local text file ('' = data/<name>/input.txt, or download a built-in)
    tokenizer = ''       # 'char' or 'gpt2' ('' = the built-in's own, 'char' for your own text)
    val_fraction = 0.1   # last part of the text held out for validation
    data_dir = 'data'    # output goes to data_dir/<name>/
    overwrite = False    # replace data_dir/<name>/ when it holds a dataset prepared from another text
    args = sys.argv[1:]
    if not args or args[0].startswith('--'):
        fail(f"name the dataset first: python prepare_data.py NAME [--input=PATH] "
             f"[--tokenizer=char|gpt2] (built-ins: {', '.join(DATASETS)})")
    configure(globals(), args[1:])
    check(re.fullmatch(r'[\w.-]+', args[0]) and args[0] not in ('.', '..'),
          f"the dataset name '{args[0]}' names a folder in --data_dir: use letters, digits, '_', '-' and '.'")
    try:   # prepare checks tokenizer and val_fraction
        prepare(args[0], input, tokenizer, val_fraction, data_dir, overwrite)
    except DataError as e:
        fail(str(e))
