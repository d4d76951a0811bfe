"""
Turn text into what train.py reads: data/<name>/train.bin and val.bin (token ids: uint16, or uint32
for a vocabulary of more than 65536 tokens) and meta.json (the tokenizer: train.py takes the
vocabulary size from it, and a checkpoint stores it, so sample.py encodes and decodes with it).

    python prepare_data.py shakespeare_char               # tiny Shakespeare, one token per character
    python prepare_data.py shakespeare                    # tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare_data.py shakespeare_char --input=input.txt        # from a local copy
    python prepare_data.py mybook --input=book.txt --tokenizer=char  # your own text, your own name
    python prepare_data.py mybook --input=book.txt --tokenizer=hf:DIR          # a transformers tokenizer
    python prepare_data.py web --input=corpus/ --tokenizer=hf:DIR --num_proc=8  # a folder of documents
    python prepare_data.py web --input='shards/*.jsonl' --text_field=content --tokenizer=gpt2
    python prepare_data.py stories --hf_dataset=roneneldan/TinyStories --tokenizer=hf:DIR

Tokenizers: 'char' (the characters of the text), 'gpt2' (tiktoken's GPT-2 BPE) and 'hf:DIR', the
tokenizer of a transformers model directory (a released checkpoint such as
microsoft/bitnet-b1.58-2B-4T, or an export.py directory, whose meta.json names the tokenizer its
model was trained with). The vocabulary size is the model's (config.json) where it has more rows
than the tokenizer has tokens.

One text file (--input=FILE.txt, or a built-in): the first 90% of the text (by characters) is the
training split, the rest validation, as in nanoGPT; the text is read into memory whole. The two
built-in datasets download the tiny Shakespeare text when data/<name>/input.txt is absent and no
--input is given.

A corpus of documents: --input names a folder (searched recursively), a glob or one .jsonl/.parquet
file, of .txt files (one document each), .jsonl (one per line) and .parquet files (one per row; both
take the document from --text_field), or --hf_dataset a dataset on the Hugging Face Hub. It is read
streaming with the datasets library (files in sorted order), tokenized in batches by --num_proc
processes and written to disk as it goes: at most 2 * num_proc batches of about 1 MB of text are in
memory, and the files have the same bytes for any num_proc. A document is its tokens (with the
tokenizer's BOS where it adds one, as for sample.py's prompts) followed by the end-of-text token (the
tokenizer's eos; GPT-2's <|endoftext|>). A val_fraction of the documents, spread evenly, is the
validation split: document i (from 0) when floor((i + 1) * val_fraction) > floor(i * val_fraction),
i.e. documents 9, 19, 29, ... for 0.1.

The text must be UTF-8. A folder that already holds another prepared dataset (other text or
tokenizer) is replaced only with --overwrite=True; for a corpus, any prepared dataset (checked
before the tokenizing starts), and the old files stay until the new ones are complete.
"""

import collections
import glob
import itertools
import json
import multiprocessing
import os
import re
import sys
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from configurator import check, check_ints, configure, fail

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
DATASETS = {  # name -> (tokenizer, url of the text)
    'shakespeare_char': ('char', SHAKESPEARE_URL),
    'shakespeare': ('gpt2', SHAKESPEARE_URL),
}
CORPUS_FILES = {'.txt': 'text', '.jsonl': 'json', '.parquet': 'parquet'}  # extension -> the datasets builder
BATCH_CHARS = 1 << 20  # a corpus goes to the tokenizing processes in batches of documents of about this many characters


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


def hf_tokenizer(path):
    """The transformers tokenizer (AutoTokenizer) of the model directory path."""
    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory not found: {path} (hf:DIR names a transformers model directory, "
                        f"e.g. one downloaded with hf download NAME --local-dir DIR)")
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DataError(f"could not load the tokenizer of {path} with transformers "
                        f"({type(e).__name__}): pip install transformers, or check its tokenizer files") from None
    tok.model_max_length = sys.maxsize  # documents longer than the model's context are cut into windows later: no warning
    return tok


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
    if meta['tokenizer'] == 'hf':  # the tokenizer files of a transformers directory (hf.py, --tokenizer=hf:DIR)
        tok = hf_tokenizer(meta['path'])
        return tok.encode, (lambda ids: tok.decode(ids, skip_special_tokens=True))
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} in meta data")


def dtype_for(vocab_size):
    """The type of the token ids in train.bin/val.bin: the smallest that holds ids 0 .. vocab_size - 1."""
    return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


def tokenizer_meta(tokenizer, text=''):
    """--tokenizer ('char', 'gpt2' or 'hf:DIR') -> its meta data; 'char' takes the characters of text.
    A directory that export.py wrote names its model's tokenizer in meta.json (as hf.load_hf_checkpoint
    reads it); in any other, the transformers tokenizer is the tokenizer."""
    if tokenizer == 'char':
        chars = ''.join(sorted(set(text)))
        meta = dict(tokenizer='char', vocab_size=len(chars), chars=chars)
    elif tokenizer == 'gpt2':
        meta = dict(tokenizer='gpt2', vocab_size=gpt2_encoding().n_vocab)
    elif os.path.isfile(os.path.join(tokenizer[3:], 'meta.json')):
        meta = read_json(os.path.join(tokenizer[3:], 'meta.json'))
        if not isinstance(meta.get('vocab_size'), int) or meta.get('tokenizer') not in ('char', 'gpt2', 'hf'):
            raise DataError(f"{os.path.join(tokenizer[3:], 'meta.json')} is not tokenizer meta data (as export.py "
                            f"writes it): remove it to use the directory's transformers tokenizer")
    else:
        path = tokenizer[3:]
        vocab_size = len(hf_tokenizer(path))
        if os.path.isfile(os.path.join(path, 'config.json')):  # a model: its embedding may have more rows
            vocab_size = max(vocab_size, read_json(os.path.join(path, 'config.json')).get('vocab_size') or 0)
        meta = dict(tokenizer='hf', path=os.path.abspath(path), vocab_size=vocab_size)
    meta['dtype'] = dtype_for(meta['vocab_size'])
    return meta


def document_encoder(meta):
    """meta -> encode(list of documents' texts) -> a list of token id lists, each a document's tokens
    (with the tokenizer's BOS where it adds one) followed by the end-of-text token."""
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        return lambda texts: [enc.encode_ordinary(text) + [enc.eot_token] for text in texts]
    if meta['tokenizer'] == 'hf':
        tok = hf_tokenizer(meta['path'])
        eos = tok.eos_token_id
        if eos is None:
            raise DataError(f"the tokenizer of {meta['path']} has no eos token to end each document with: "
                            f"set eos_token in its tokenizer_config.json")
        # a tokenizer whose template already ends a text with eos (e.g. '<s> $A </s>') gets no second one
        return lambda texts: [ids if ids[-1:] == [eos] else ids + [eos] for ids in tok(texts)['input_ids']]
    raise DataError("tokenizer char reads one text file (--input=FILE.txt); for a corpus of documents "
                    "use --tokenizer=gpt2 or --tokenizer=hf:DIR")


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


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as JSON ({type(e).__name__}): check the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not an object: check the file")
    return data


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


def is_corpus(input_path, hf_dataset):
    """Whether the input is a corpus of documents (see the docstring) rather than one text file."""
    if hf_dataset or os.path.isdir(input_path):
        return True
    if not os.path.isfile(input_path) and re.search(r'[*?[]', input_path):  # a glob
        return True
    return os.path.splitext(input_path)[1] in ('.jsonl', '.parquet')


def prepare(name, input_path='', tokenizer='', val_fraction=0.1, data_dir='data', overwrite=False,
            text_field='text', hf_dataset='', hf_config='', split='train', num_proc=1):
    """Write data/<name>/{train.bin, val.bin, meta.json}; returns the meta dict. Files already there
    that differ from these (another text or tokenizer) are replaced only with overwrite=True."""
    tokenizer = tokenizer or DATASETS.get(name, ('char',))[0]
    if tokenizer not in ('char', 'gpt2') and not (tokenizer.startswith('hf:') and len(tokenizer) > 3):
        raise DataError(f"tokenizer must be one of 'char', 'gpt2' or 'hf:DIR' (the tokenizer of a transformers "
                        f"model directory), got '{tokenizer}'")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if hf_dataset and input_path:
        raise DataError("give either --input (local files) or --hf_dataset (a dataset on the Hugging Face Hub), not both")
    if not hf_dataset and (hf_config or split != 'train'):
        raise DataError(f"--{'hf_config' if hf_config else 'split'} chooses from a Hugging Face dataset: "
                        f"name it with --hf_dataset=NAME")
    if is_corpus(input_path, hf_dataset):
        return prepare_corpus(name, input_path, tokenizer, val_fraction, data_dir, overwrite,
                              text_field, hf_dataset, hf_config, split, num_proc)
    text = read_input(name, input_path, data_dir)
    if len(text) < 100:
        raise DataError(f"the text for '{name}' has only {len(text)} characters; give it at least a few thousand")
    n = int(len(text) * (1 - val_fraction))
    splits = {'train': text[:n], 'val': text[n:]}
    meta = tokenizer_meta(tokenizer, text)
    if meta['tokenizer'] == 'gpt2':
        ids = {split: encode_gpt2(part, f"encoding {split}") for split, part in splits.items()}
    else:  # char: one id per character; hf: the tokenizer's ids, with its BOS where it adds one
        encode = load_tokenizer(meta)[0]
        ids = {split: encode(part) for split, part in splits.items()}
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
# a corpus of documents

def corpus_files(pattern, text_field):
    """The files of --input (a folder, searched recursively, a glob or one file), sorted, after checking
    that each is a .txt, .jsonl or .parquet file and that every .parquet file has the column text_field."""
    if os.path.isdir(pattern):
        found = sorted(os.path.join(folder, f) for folder, _, names in os.walk(pattern) for f in names
                       if os.path.splitext(f)[1] in CORPUS_FILES)
        if not found:
            raise DataError(f"input file not found: no .txt, .jsonl or .parquet file in {pattern}")
    else:
        found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not found:
            raise DataError(f"input file not found: {pattern}")
        other = [f for f in found if os.path.splitext(f)[1] not in CORPUS_FILES]
        if other:
            raise DataError(f"{other[0]} is not a .txt, .jsonl or .parquet file: narrow --input to those")
    for f in found:
        if f.endswith('.parquet'):
            import pyarrow.parquet as pq
            try:
                columns = pq.read_schema(f).names
            except Exception as e:
                raise DataError(f"cannot read {f} as parquet ({type(e).__name__}): check the file") from None
            if text_field not in columns:
                raise DataError(f"{f} has no column '{text_field}' (its columns: {', '.join(columns)}): "
                                f"name the one with the text, e.g. --text_field={columns[0] if columns else 'text'}")
    return found


def document_text(row, text_field, where):
    """The text of one row (a dict) of a dataset, or DataError naming where the row is."""
    if text_field not in row:
        raise DataError(f"{where} has no field '{text_field}' (its fields: {', '.join(row)}): "
                        f"name the one with the text, e.g. --text_field={next(iter(row), 'text')}")
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' holds {'null' if text is None else type(text).__name__}, "
                        f"not text: fix the data or choose another --text_field")
    return text


def corpus_documents(files, text_field, hf_dataset, hf_config, split):
    """(the texts of the documents, in order: an iterator; their number, where known without reading them).
    Local files are read with one load_dataset call per .jsonl or .parquet file (so an error names the
    file) and one for each run of .txt files (one row per file, so the row names the file)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors come back here as exceptions
    if hf_dataset:
        import huggingface_hub
        huggingface_hub.logging.set_verbosity_error()  # no line per retry when the Hub cannot be reached
        try:
            ds = datasets.load_dataset(hf_dataset, hf_config or None, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"could not open the dataset {hf_dataset} (config {hf_config or 'default'}, split {split}) "
                            f"on the Hugging Face Hub ({type(e).__name__}: {first_line(e)}): check the names and your "
                            f"internet connection") from None
        try:
            total = ds.info.splits[split].num_examples
        except (AttributeError, KeyError, TypeError):
            total = None

        def rows():
            done = 0
            try:
                for row in ds:
                    yield document_text(row, text_field, f"row {done + 1} of {hf_dataset}")
                    done += 1
            except DataError:
                raise
            except Exception as e:
                raise read_error(f"row {done + 1} of {hf_dataset}", e) from None
        return rows(), total

    import pyarrow.parquet as pq
    kinds = [CORPUS_FILES[os.path.splitext(f)[1]] for f in files]
    total = None if 'json' in kinds else sum(1 if k == 'text' else pq.ParquetFile(f).metadata.num_rows
                                              for f, k in zip(files, kinds))
    groups = []  # (builder, files): each .jsonl and .parquet file alone, runs of .txt files together
    for kind, run in itertools.groupby(zip(kinds, files), key=lambda kf: kf[0]):
        run = [f for _, f in run]
        groups += [(kind, run)] if kind == 'text' else [(kind, [f]) for f in run]

    def rows():
        for kind, group in groups:
            options = dict(sample_by='document') if kind == 'text' else dict(columns=[text_field]) if kind == 'parquet' else {}
            done = 0  # rows read from this group
            try:
                ds = datasets.load_dataset(kind, data_files=group, split='train', streaming=True, **options)
                for row in ds:
                    where = f"{'record' if kind == 'json' else 'row'} {done + 1} of {group[0]}"
                    yield row['text'] if kind == 'text' else document_text(row, text_field, where)
                    done += 1
            except DataError:
                raise
            except Exception as e:
                raise read_error(group[min(done, len(group) - 1)] if kind == 'text' else group[0], e) from None
    return rows(), total


def first_line(e):
    """The first line of an exception's message, at most 200 characters (the datasets library's run long)."""
    return (str(e).strip().splitlines() or [''])[0][:200]


def read_error(where, e):
    """DataError for an exception of the datasets library (or pyarrow beneath it) while reading where."""
    return DataError(f"cannot read {where} ({type(e).__name__}: {first_line(e)}): "
                     f"{'convert it to UTF-8' if isinstance(e, UnicodeDecodeError) else 'check it'}")


def batches(texts, size):
    """Lists of consecutive texts of about size characters in all (at least one text each)."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker = {}  # this process's document encoder and meta data (start_worker)


def start_worker(meta, threads=True):
    """Set up this process to encode batches of documents (encode_batch); threads=False keeps a
    transformers tokenizer to one thread (num_proc processes already share the cores)."""
    if not threads:
        os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    _worker.update(encode=document_encoder(meta), meta=meta)


def encode_batch(texts):
    """texts -> (the token ids of all the documents, one after the other: an array of meta's dtype;
    the number of tokens of each document)."""
    docs = _worker['encode'](texts)
    ids = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64)
    vocab_size = _worker['meta']['vocab_size']
    if len(ids) and ids.max() >= vocab_size:
        raise DataError(f"the tokenizer gave token id {ids.max()}, beyond the vocabulary of {vocab_size} tokens "
                        f"(meta.json): check the tokenizer directory's config.json")
    return ids.astype(_worker['meta']['dtype']), np.array([len(d) for d in docs], dtype=np.int64)


def encoded_batches(texts, meta, num_proc):
    """(ids, lengths) of encode_batch for each batch of texts, in order: encoded in this process, or by
    num_proc worker processes with at most 2 * num_proc batches in flight (the reading never runs far
    ahead of the tokenizing, so memory stays bounded)."""
    if num_proc == 1:
        yield from map(encode_batch, batches(texts, BATCH_CHARS))
        return
    context = multiprocessing.get_context('fork' if sys.platform == 'linux' else 'spawn')
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=start_worker, initargs=(meta, False)) as pool:
        pending = collections.deque()
        for batch in batches(texts, BATCH_CHARS):
            pending.append(pool.submit(encode_batch, batch))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_corpus(name, input_path, tokenizer, val_fraction, data_dir, overwrite, text_field, hf_dataset,
                   hf_config, split, num_proc):
    """prepare() for a corpus of documents (see the docstring): streamed, tokenized in parallel."""
    if num_proc < 1:
        raise DataError(f"num_proc must be an integer >= 1, got {num_proc}")
    files = [] if hf_dataset else corpus_files(input_path, text_field)
    if tokenizer == 'char':
        raise DataError("tokenizer char reads one text file (--input=FILE.txt); for a corpus of documents "
                        "use --tokenizer=gpt2 or --tokenizer=hf:DIR")
    out = os.path.join(data_dir, name)
    held = [f for f in ('train.bin', 'val.bin', 'meta.json') if os.path.exists(os.path.join(out, f))]
    if held and not overwrite:
        raise DataError(f"{out} already holds a prepared dataset ({held[0]}): choose another name, or replace it "
                        f"with python prepare_data.py {name} --overwrite=True")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"cannot write {out}: it is a file: choose another --data_dir")
    meta = tokenizer_meta(tokenizer)
    start_worker(meta)  # in this process too: a tokenizer without eos fails here, before any file is written
    texts, total = corpus_documents(files, text_field, hf_dataset, hf_config, split)
    created, folder = [], os.path.abspath(out)  # the folders this call makes (out and missing parents), deepest first
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    tmp = {f: os.path.join(out, f + '.tmp') for f in ('train.bin', 'val.bin', 'meta.json')}
    sinks, n_docs, n_val, tokens = {}, 0, 0, {'train.bin': 0, 'val.bin': 0}
    try:
        os.makedirs(out, exist_ok=True)
        sinks = {f: open(tmp[f], 'wb') for f in ('train.bin', 'val.bin')}
        with tqdm(total=total, desc=f"tokenizing {name}", unit='doc', dynamic_ncols=True) as bar:
            for ids, lengths in encoded_batches(texts, meta, num_proc):
                i = np.arange(n_docs, n_docs + len(lengths))
                val = np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)  # every 1/val_fraction-th document
                in_val = np.repeat(val, lengths)  # (tokens,) whether each token is in a val document
                for f, part in (('train.bin', ids[~in_val]), ('val.bin', ids[in_val])):
                    part.tofile(sinks[f])
                    tokens[f] += len(part)
                n_docs, n_val = n_docs + len(lengths), n_val + val.sum()
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{tokens['train.bin'] + tokens['val.bin']:,}", refresh=False)
        for sink in sinks.values():
            sink.close()
        if not tokens['val.bin'] or not tokens['train.bin']:
            raise DataError(f"{n_docs} document(s) leave the {'validation' if n_docs else 'training'} split empty "
                            f"(it takes every {1 / val_fraction:.3g}th document): give more documents, or a larger "
                            f"--val_fraction")
        with open(tmp['meta.json'], 'w') as f:
            json.dump(meta, f)
        for f, path in tmp.items():  # the old dataset (overwrite=True) stays until the new one is complete
            os.replace(path, os.path.join(out, f))
    except BaseException as e:
        for sink in sinks.values():
            sink.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        for folder in created:
            if not os.listdir(folder):
                os.rmdir(folder)
        if isinstance(e, BrokenProcessPool):
            raise DataError(f"a tokenizing process died (out of memory?): use fewer --num_proc than {num_proc}") from None
        if isinstance(e, OSError):
            raise DataError(f"cannot write {out}: {e.strerror}: choose another --data_dir") from None
        raise
    source = hf_dataset or f"{len(files)} file(s)"
    print(f"{name}: {n_docs:,} documents from {source}, vocabulary {meta['vocab_size']:,} ({tokenizer}, {meta['dtype']}), "
          f"train {tokens['train.bin']:,} tokens, val {tokens['val.bin']:,} tokens "
          f"({n_val:,} documents) -> {out}/")
    return meta


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    input = ''           # a text file ('' = data/<name>/input.txt, or download a built-in), or a corpus: a folder,
                         # a glob ('corpus/*.parquet', quoted) or one file of .txt/.jsonl/.parquet documents
    tokenizer = ''       # 'char', 'gpt2' or 'hf:DIR' ('' = the built-in's own, 'char' for your own text)
    text_field = 'text'  # the field (.jsonl, --hf_dataset) or column (.parquet) that holds each document's text
    hf_dataset = ''      # a Hugging Face dataset (Hub name or local copy) instead of --input, e.g. roneneldan/TinyStories
    hf_config = ''       # its configuration ('' = the default)
    split = 'train'      # its split to read (the validation documents are taken from it, by val_fraction)
    num_proc = 1         # processes that tokenize a corpus (1 = this one)
    val_fraction = 0.1   # held out for validation: the last part of one text, or that share of a corpus's documents
    data_dir = 'data'    # output goes to data_dir/<name>/
    overwrite = False    # replace data_dir/<name>/ when it holds a dataset prepared from another text
    args = sys.argv[1:]
    if not args or args[0].startswith('--'):
        fail(f"name the dataset first: python prepare_data.py NAME [--input=PATH] "
             f"[--tokenizer=char|gpt2|hf:DIR] (built-ins: {', '.join(DATASETS)})")
    configure(globals(), args[1:])
    check(re.fullmatch(r'[\w.-]+', args[0]) and args[0] not in ('.', '..'),
          f"the dataset name '{args[0]}' names a folder in --data_dir: use letters, digits, '_', '-' and '.'")
    check_ints(globals(), 'num_proc', 1)
    try:   # prepare checks the rest
        prepare(args[0], input, tokenizer, val_fraction, data_dir, overwrite, text_field, hf_dataset, hf_config,
                split, num_proc)
    except DataError as e:
        fail(str(e))
