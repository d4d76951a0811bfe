import json
import os
import urllib.request

import numpy as np
import pytest

import prepare_data
from configurator import configure
from conftest import SHAKESPEARE, run


def settings():
    return dict(batch_size=64, learning_rate=1e-3, compile=None, quant='b1.58', decay_lr=True, n_kv_head=None)


def configure_error(capsys, *args):
    with pytest.raises(SystemExit) as e:
        configure(settings(), list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count('\n') == 1 and err.startswith('error: ')
    return err


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("import math\nbatch_size = 32\nlearning_rate = 2 * math.pi\n")
    s = configure(settings(), [str(cfg), '--quant=b1', '--learning_rate=3', '--compile=True', '--n_kv_head=2'])
    assert s['batch_size'] == 32 and s['quant'] == 'b1' and s['compile'] is True and s['n_kv_head'] == 2
    assert s['learning_rate'] == 3.0 and isinstance(s['learning_rate'], float)


def test_unknown_key_names_it_and_suggests(capsys):
    err = configure_error(capsys, '--learing_rate=1e-3')
    assert "unknown setting 'learing_rate'" in err and "did you mean 'learning_rate'" in err


def test_wrong_types(capsys):
    assert "'batch_size' must be int, got 'many'" in configure_error(capsys, '--batch_size=many')
    assert "'batch_size' must be int, got 1.5" in configure_error(capsys, '--batch_size=1.5')
    assert "'decay_lr' must be bool, got 1" in configure_error(capsys, '--decay_lr=1')
    assert "needs a value" in configure_error(capsys, '--decay_lr')


def test_config_file_errors(tmp_path, capsys):
    assert 'config file not found: nope.py' in configure_error(capsys, 'nope.py')
    typo = tmp_path / 'typo.py'
    typo.write_text("batch_size = 8\nlearing_rate = 1e-3\n")
    err = configure_error(capsys, str(typo))
    assert f"{typo}: unknown setting 'learing_rate'" in err
    broken = tmp_path / 'broken.py'
    broken.write_text("batch_size = 8\nlearning_rate = (1e-3\n")
    assert f"{broken} line 2" in configure_error(capsys, str(broken))
    name = tmp_path / 'name.py'
    name.write_text("batch_size = 8\nlearning_rate = lr\n")
    err = configure_error(capsys, str(name))
    assert f"{name} line 2: NameError" in err
    wrong = tmp_path / 'wrong.py'
    wrong.write_text("quant = 1.58\n")
    assert "'quant' must be str" in configure_error(capsys, str(wrong))


def test_train_py_reports_a_bad_flag_in_one_line():
    r = run('train.py', '--n_layers=4')
    assert r.returncode == 2
    assert r.stderr == "error: unknown setting 'n_layers' (did you mean 'n_layer'?)\n"
    r = run('train.py', '--quant=b2', '--device=cpu')
    assert r.returncode == 2 and "quant must be one of b1.58, b1, none" in r.stderr
    r = run('train.py', '--device=cpu', '--cuda_graphs=True')
    assert r.returncode == 2
    assert r.stderr == ("error: cuda_graphs=True needs compile=True on one CUDA GPU (not under torchrun) and "
                        "gradient_accumulation_steps=1: drop --cuda_graphs=True\n")
    r = run('train.py', '--device=cpu', '--ema_decay=1.0')
    assert r.returncode == 2
    assert r.stderr == "error: ema_decay must be in [0, 1) (0: no moving average; e.g. 0.999), got 1.0\n"


# --- prepare_data -------------------------------------------------------------------------

def test_char_dataset_round_trip(tmp_path):
    text = 'hello world\n' * 500 + 'the end.\n'
    (tmp_path / 'in.txt').write_text(text)
    r = run('prepare_data.py', 'mine', f'--input={tmp_path / "in.txt"}', f'--data_dir={tmp_path}')
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / 'mine' / 'meta.json'))
    assert meta == dict(tokenizer='char', vocab_size=12, chars='\n .dehlnortw', dtype='uint16')
    encode, decode = prepare_data.load_tokenizer(meta)
    train = np.fromfile(tmp_path / 'mine' / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'mine' / 'val.bin', dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9)
    assert decode(train.tolist()) + decode(val.tolist()) == text
    assert encode('hello') == [5, 4, 6, 6, 8]
    with pytest.raises(prepare_data.DataError, match="'z' is not in this model's vocabulary"):
        encode('hello zz')


def test_gpt2_dataset(tmp_path):
    pytest.importorskip('tiktoken')
    try:
        prepare_data.gpt2_encoding()
    except prepare_data.DataError:
        pytest.skip("tiktoken's GPT-2 files are not available offline")
    (tmp_path / 'in.txt').write_text('To be, or not to be: that is the question.\n' * 50)
    meta = prepare_data.prepare('q', str(tmp_path / 'in.txt'), 'gpt2', 0.1, str(tmp_path))
    assert meta == dict(tokenizer='gpt2', vocab_size=50257, dtype='uint16')
    ids = np.fromfile(tmp_path / 'q' / 'train.bin', dtype=np.uint16).tolist()
    assert ids[:6] == [2514, 307, 11, 393, 407, 284]   # "To be, or not to"
    encode, decode = prepare_data.load_tokenizer(meta)
    assert decode(encode('that is the question')) == 'that is the question'


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason='needs ../shared/data/tinyshakespeare')
def test_chunked_gpt2_encoding_equals_whole_text():
    try:
        enc = prepare_data.gpt2_encoding()
    except prepare_data.DataError:
        pytest.skip("tiktoken's GPT-2 files are not available offline")
    text = open(SHAKESPEARE).read()
    chunks = list(prepare_data.text_chunks(text, size=50_000))
    assert len(chunks) > 20 and ''.join(chunks) == text
    assert sum((enc.encode_ordinary(c) for c in chunks), []) == enc.encode_ordinary(text)


def test_offline_download_names_both_ways_out(tmp_path, monkeypatch):
    def no_network(*a, **kw):
        raise OSError('network is unreachable')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    with pytest.raises(prepare_data.DataError) as e:
        prepare_data.prepare('shakespeare_char', data_dir=str(tmp_path))
    msg = str(e.value)
    assert '--input=PATH' in msg and os.path.join(str(tmp_path), 'shakespeare_char', 'input.txt') in msg
    assert not os.path.exists(tmp_path / 'shakespeare_char' / 'train.bin')


def test_prepare_data_cli_errors(tmp_path):
    r = run('prepare_data.py')
    assert r.returncode == 2 and 'name the dataset first' in r.stderr
    r = run('prepare_data.py', 'mine', f'--data_dir={tmp_path}')
    assert r.returncode == 2 and "python prepare_data.py mine --input=PATH" in r.stderr
    r = run('prepare_data.py', 'mine', '--input=/no/such/file.txt')
    assert r.returncode == 2 and 'input file not found: /no/such/file.txt' in r.stderr
    r = run('prepare_data.py', 'mine', '--tokenizer=bpe')
    assert r.returncode == 2 and "tokenizer must be one of" in r.stderr


def test_prepare_replaces_another_dataset_only_when_told(tmp_path):
    (tmp_path / 'a.txt').write_text('hello world\n' * 100)
    (tmp_path / 'b.txt').write_text('goodbye moon\n' * 100)
    prepare = lambda text, **kw: prepare_data.prepare('d', str(tmp_path / text), data_dir=str(tmp_path), **kw)
    prepare('a.txt')
    before = (tmp_path / 'd' / 'train.bin').read_bytes()
    prepare('a.txt')                                   # the same dataset again: nothing changes
    with pytest.raises(prepare_data.DataError, match=r"holds another prepared dataset \(train.bin differs.*--overwrite=True"):
        prepare('b.txt')
    assert (tmp_path / 'd' / 'train.bin').read_bytes() == before
    meta = prepare('b.txt', overwrite=True)
    assert json.load(open(tmp_path / 'd' / 'meta.json')) == meta and meta['chars'] == '\n bdegmnoy'
