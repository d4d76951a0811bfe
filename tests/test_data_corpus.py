"""prepare_data.py on a corpus of documents (.txt, .jsonl, .parquet files) and with a transformers
tokenizer (--tokenizer=hf:DIR): the tokenizers are built here, offline, with the tokenizers library
(a byte-level BPE as Llama-3's, trained on a few sentences, and a word-level vocabulary of 70000 for
uint32 ids) and saved as transformers directories."""

import json
import os
import shutil

import numpy as np
import pytest

import prepare_data
from conftest import TINY, run, synthetic_text
from prepare_data import DataError, prepare
from test_bad_inputs import tree_state

pytest.importorskip('datasets')
pytest.importorskip('tokenizers')
WORDS = 'the king and queen of love shall speak to thee my lord good night sweet ROMEO JULIET NURSE FRIAR : .'.split()


def save_tokenizer(tk, path, **special):
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
    """A byte-level BPE of 300 tokens that starts every text with <s> (id 0) and has eos </s> (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(synthetic_text(200).splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 0)])
    return save_tokenizer(tk, tmp_path_factory.mktemp('tok') / 'bpe', bos_token='<s>', eos_token='</s>')


@pytest.fixture(scope='module')
def wide(tmp_path_factory):
    """A word-level vocabulary of 70000 tokens whose words have the ids from 69978 up (uint32 data)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
    vocab.update({f'x{i}': i for i in range(3, 70000 - len(WORDS))})
    vocab.update({w: 70000 - len(WORDS) + i for i, w in enumerate(WORDS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    return save_tokenizer(tk, tmp_path_factory.mktemp('tok') / 'wide', bos_token='<s>', eos_token='</s>',
                          unk_token='<unk>')


def auto(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def make_corpus(root, n_rows=30):
    """A folder of .txt, .jsonl and .parquet files (and a README that is not read); returns the texts of
    its documents in the order prepare_data reads them (the files' sorted paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    lines = synthetic_text(3 * n_rows + 3, seed=2).split('\n\n')
    os.makedirs(root / 'shards', exist_ok=True)
    docs = []
    for name, text in (('a.txt', lines[0] + '\n'), ('b.txt', 'caf\u00e9 \u00fcber ' + lines[1])):
        (root / name).write_text(text, encoding='utf-8')
        docs.append(text)
    rows = lines[2:2 + n_rows]
    (root / 'shards' / 'c.jsonl').write_text(''.join(json.dumps({'id': i, 'text': t}) + '\n' for i, t in enumerate(rows)))
    docs += rows
    rows = lines[2 + n_rows:2 + 2 * n_rows]   # row groups of 7 rows: read group by group
    pq.write_table(pa.table({'text': rows, 'n': list(range(n_rows))}), root / 'shards' / 'd.parquet', row_group_size=7)
    docs += rows
    (root / 'shards' / 'e.txt').write_text(lines[-1])
    docs.append(lines[-1])
    (root / 'README.md').write_text('not a document')
    return docs


def test_dtype_rule():
    assert [prepare_data.dtype_for(v) for v in (65, 50257, 65536, 65537, 128256)] == \
        ['uint16', 'uint16', 'uint16', 'uint32', 'uint32']


def test_corpus_serial_and_parallel_write_the_same_tokens(tmp_path, bpe, monkeypatch):
    """Every document becomes tokenizer(text) + [eos]; documents 9, 19, 29, ... go to val.bin; two worker
    processes (batches of about 200 characters: many of them) write the same bytes as one process."""
    docs = make_corpus(tmp_path / 'corpus')
    monkeypatch.setattr(prepare_data, 'BATCH_CHARS', 200)
    metas = [prepare('c', str(tmp_path / 'corpus'), f'hf:{bpe}', 0.1, str(tmp_path / f'out{n}'), num_proc=n)
             for n in (1, 2)]
    assert metas[0] == metas[1] == dict(tokenizer='hf', path=bpe, vocab_size=300, dtype='uint16')
    for f in ('train.bin', 'val.bin', 'meta.json'):
        assert (tmp_path / 'out1' / 'c' / f).read_bytes() == (tmp_path / 'out2' / 'c' / f).read_bytes()
    assert sorted(os.listdir(tmp_path / 'out2' / 'c')) == ['meta.json', 'train.bin', 'val.bin']
    tok = auto(bpe)
    expected = [tok(text)['input_ids'] + [1] for text in docs]
    assert all(ids[0] == 0 for ids in expected) and len(docs) == 63
    val = [i for i in range(len(docs)) if i % 10 == 9]
    train_ids = np.fromfile(tmp_path / 'out1' / 'c' / 'train.bin', dtype=np.uint16).tolist()
    val_ids = np.fromfile(tmp_path / 'out1' / 'c' / 'val.bin', dtype=np.uint16).tolist()
    assert train_ids == sum((expected[i] for i in range(len(docs)) if i not in val), [])
    assert val_ids == sum((expected[i] for i in val), [])
    # the text comes back: the first document, and the non-ASCII one
    encode, decode = prepare_data.load_tokenizer(metas[0])
    ends = [i for i, t in enumerate(train_ids) if t == 1]
    assert decode(train_ids[:ends[0] + 1]) == docs[0]
    assert decode(train_ids[ends[0] + 1:ends[1] + 1]) == docs[1] and docs[1].startswith('caf\u00e9 \u00fcber')


def test_gpt2_corpus_ends_documents_with_endoftext(tmp_path):
    try:
        enc = prepare_data.gpt2_encoding()
    except DataError:
        pytest.skip("tiktoken's GPT-2 files are not available offline")
    docs = make_corpus(tmp_path / 'corpus', n_rows=5)
    meta = prepare('g', str(tmp_path / 'corpus' / 'shards' / '*.jsonl'), 'gpt2', 0.2, str(tmp_path))
    assert meta == dict(tokenizer='gpt2', vocab_size=50257, dtype='uint16')
    rows = docs[2:7]   # the .jsonl file's five documents; with val_fraction 0.2 the fifth is val's
    read = lambda f: np.fromfile(tmp_path / 'g' / f, dtype=np.uint16).tolist()
    assert read('train.bin') == sum((enc.encode_ordinary(t) + [50256] for t in rows[:4]), [])
    assert read('val.bin') == enc.encode_ordinary(rows[4]) + [50256]


def test_hf_dataset_reads_the_chosen_split(tmp_path, bpe):
    """--hf_dataset with a dataset laid out as on the Hub (data/<split>-*.parquet), here a local folder
    (load_dataset reads those offline): only the chosen split's rows, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / 'hub' / 'data').mkdir(parents=True)
    rows = {split: [f'{split} document number {i}' for i in range(n)] for split, n in (('train', 10), ('test', 20))}
    for split, texts in rows.items():
        pq.write_table(pa.table({'story': texts}), tmp_path / 'hub' / 'data' / f'{split}-00000-of-00001.parquet')
    meta = prepare('h', tokenizer=f'hf:{bpe}', data_dir=str(tmp_path), hf_dataset=str(tmp_path / 'hub'),
                   split='test', text_field='story')
    tok = auto(bpe)
    read = lambda f: np.fromfile(tmp_path / 'h' / f, dtype=meta['dtype']).tolist()
    assert read('val.bin') == tok(rows['test'][9])['input_ids'] + [1] + tok(rows['test'][19])['input_ids'] + [1]
    assert read('train.bin') == sum((tok(t)['input_ids'] + [1] for i, t in enumerate(rows['test']) if i % 10 != 9), [])


def test_one_text_file_with_a_transformers_tokenizer(tmp_path, bpe):
    text = synthetic_text(100)
    (tmp_path / 'in.txt').write_text(text)
    meta = prepare('t', str(tmp_path / 'in.txt'), f'hf:{bpe}', 0.1, str(tmp_path))
    assert meta == dict(tokenizer='hf', path=bpe, vocab_size=300, dtype='uint16')
    n = int(len(text) * 0.9)   # the first 90% of the characters, as for char and gpt2
    tok = auto(bpe)
    assert np.fromfile(tmp_path / 't' / 'train.bin', dtype=np.uint16).tolist() == tok(text[:n])['input_ids']
    assert np.fromfile(tmp_path / 't' / 'val.bin', dtype=np.uint16).tolist() == tok(text[n:])['input_ids']


def test_model_directories_name_their_vocabulary(tmp_path, bpe):
    """hf:DIR takes the vocabulary size of a model's config.json where it is larger than the tokenizer's
    (padded embeddings), and an export.py directory's meta.json (the tokenizer its model was trained with)."""
    (tmp_path / 'in.txt').write_text('abc\n' * 50)
    model = tmp_path / 'model'
    shutil.copytree(bpe, model)
    (model / 'config.json').write_text(json.dumps({'vocab_size': 320}))
    assert prepare('m', str(tmp_path / 'in.txt'), f'hf:{model}', 0.1, str(tmp_path))['vocab_size'] == 320
    export = tmp_path / 'export'
    export.mkdir()
    (export / 'meta.json').write_text(json.dumps(dict(tokenizer='char', vocab_size=4, chars='\nabc', dtype='uint16')))
    meta = prepare('e', str(tmp_path / 'in.txt'), f'hf:{export}', 0.1, str(tmp_path))
    assert meta == dict(tokenizer='char', vocab_size=4, chars='\nabc', dtype='uint16')
    assert np.fromfile(tmp_path / 'e' / 'train.bin', dtype=np.uint16)[:4].tolist() == [1, 2, 3, 0]


def test_uint32_dataset_trains_and_samples(tmp_path, wide, monkeypatch):
    """A vocabulary of 70000: ids above 65535 in uint32 files, which train.py reads for two iterations
    (the model's vocabulary from meta.json), and sample.py encodes the prompt and decodes with the tokenizer."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    rows = synthetic_text(400).split('\n\n')
    (corpus / 'lines.jsonl').write_text(''.join(json.dumps({'body': t}) + '\n' for t in rows))
    meta = prepare('w', str(corpus / 'lines.jsonl'), f'hf:{wide}', 0.1, str(tmp_path / 'data'), text_field='body')
    assert meta == dict(tokenizer='hf', path=wide, vocab_size=70000, dtype='uint32')
    ids = np.fromfile(tmp_path / 'data' / 'w' / 'train.bin', dtype=np.uint32)
    tok = auto(wide)
    assert ids[:len(tok(rows[0])['input_ids']) + 1].tolist() == tok(rows[0])['input_ids'] + [2]
    assert ids.max() == 69999 and set(ids.tolist()) <= {1, 2} | set(range(70000 - len(WORDS), 70000))
    out = tmp_path / 'out'
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    r = run('train.py', *TINY, '--n_embd=32', f'--data_dir={tmp_path / "data"}', '--dataset=w', f'--out_dir={out}',
            '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--batch_size=4')
    assert r.returncode == 0, r.stderr
    first = next(r for r in map(json.loads, (out / 'train_log.jsonl').read_text().splitlines()) if 'val_loss' in r)
    assert abs(first['val_loss'] - np.log(70000)) < 1.0     # a fresh model over 70000 tokens: ln(70000) = 11.2
    r = run('sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1', '--max_new_tokens=3',
            '--start=the king of', '--verify=False')
    assert r.returncode == 0, r.stderr
    sample = r.stdout.split('---------------')[0].strip().splitlines()[-1].split()
    assert sample[:3] == ['the', 'king', 'of'] and len(sample) == 6   # the prompt, then 3 tokens (no <s>)


def test_bad_corpora_end_in_one_line_and_keep_the_data(tmp_path, bpe):
    root = tmp_path
    make_corpus(root / 'corpus', n_rows=4)
    (root / 'empty').mkdir()
    (root / 'nofield.jsonl').write_text('{"body": "x"}\n' * 20)
    (root / 'nulls.jsonl').write_text('{"text": "x"}\n{"text": null}\n')
    (root / 'broken.jsonl').write_text('{"text": "x"}\n{"text": \n')
    (root / 'table.csv').write_text('text\nx\n')
    (root / 'latin').mkdir()
    (root / 'latin' / 'a.txt').write_text('fine')
    (root / 'latin' / 'b.txt').write_bytes('caf\u00e9'.encode('latin-1'))
    noeos = root / 'noeos'
    shutil.copytree(bpe, noeos)
    config = json.loads((noeos / 'tokenizer_config.json').read_text())
    config.pop('eos_token')
    (noeos / 'tokenizer_config.json').write_text(json.dumps(config))
    c = str(root / 'corpus')
    cases = [
        (dict(input_path=str(root / 'empty')), "input file not found: no .txt, .jsonl or .parquet file in"),
        (dict(input_path=str(root / 'nothing' / '*.jsonl')), "input file not found"),
        (dict(input_path=str(root / '*.csv')), "table.csv is not a .txt, .jsonl or .parquet file"),
        (dict(input_path=c, tokenizer='char'), "tokenizer char reads one text file"),
        (dict(input_path=c, tokenizer='hf:' + str(root / 'none')), "tokenizer directory not found"),
        (dict(input_path=c, tokenizer=f'hf:{noeos}'), "has no eos token to end each document with"),
        (dict(input_path=c, text_field='body'), "d.parquet has no column 'body' (its columns: text, n)"),
        (dict(input_path=str(root / 'nofield.jsonl')), "record 1 of {root}/nofield.jsonl has no field 'text' (its fields: body)"),
        (dict(input_path=str(root / 'nulls.jsonl')), "record 2 of {root}/nulls.jsonl: field 'text' holds null"),
        (dict(input_path=str(root / 'broken.jsonl')), "cannot read {root}/broken.jsonl (ArrowInvalid"),
        (dict(input_path=str(root / 'latin')), "cannot read {root}/latin/b.txt (UnicodeDecodeError"),
        (dict(input_path=str(root / 'corpus' / '*.txt')), "2 document(s) leave the validation split empty"),
        (dict(input_path=c, hf_dataset='someone/corpus'), "give either --input"),
        (dict(input_path=c, hf_config='en'), "--hf_config chooses from a Hugging Face dataset"),
        (dict(input_path=c, num_proc=0), "num_proc must be an integer >= 1"),
    ]
    for kw, message in cases:
        before = tree_state(root)
        with pytest.raises(DataError) as e:
            prepare('x', **{'tokenizer': f'hf:{bpe}', 'data_dir': str(root / 'data'), **kw})
        assert message.replace('{root}', str(root)) in str(e.value), str(e.value)
        assert tree_state(root) == before, kw
    # a dataset already there: refused before any tokenizing; with overwrite=True, a corpus that fails
    # half-way leaves it as it was (the new files are written beside it and renamed at the end)
    prepare('x', c, f'hf:{bpe}', data_dir=str(root / 'data'))
    shutil.copy(root / 'broken.jsonl', root / 'corpus' / 'z.jsonl')
    before = tree_state(root / 'data')
    with pytest.raises(DataError, match=r"already holds a prepared dataset \(train.bin\).*--overwrite=True"):
        prepare('x', c, f'hf:{bpe}', data_dir=str(root / 'data'))
    with pytest.raises(DataError, match="z.jsonl"):
        prepare('x', c, f'hf:{bpe}', data_dir=str(root / 'data'), overwrite=True)
    assert tree_state(root / 'data') == before


def test_command_line_errors_of_a_corpus(tmp_path, monkeypatch):
    """Two refusals as the user sees them: one line, exit 2, nothing written."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')   # no network here: fail at once, as without it
    for args, message in [
        (['--hf_dataset=nobody/no-such-dataset', '--tokenizer=gpt2'], "could not open the dataset nobody/no-such-dataset"),
        (['--input=corpus', '--num_proc=-1'], "num_proc must be an integer >= 1, got -1"),
    ]:
        before = tree_state(tmp_path)
        r = run('prepare_data.py', 'x', f'--data_dir={tmp_path}', *args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith('error: ') and r.stderr.count('\n') == 1, r.stderr
        assert message in r.stderr
        assert tree_state(tmp_path) == before
