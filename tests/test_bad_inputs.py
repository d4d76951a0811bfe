"""Bad invocations of every script, run as real processes, as a new user would make them. Each must
end with exit code 2 and exactly one line on stderr ('error: ...', no traceback) that names the
problem, and must change no file: every file (and folder) under the shared fixture folder and
in the repository is hashed before and after.

The settings' ranges are checked before torch is imported, so most cases take a fraction of a
second; the ones that need a checkpoint or the device share one tiny run (module fixture)."""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, synthetic_text

# (script, arguments, a fragment the error line must hold); {root} is the fixture folder:
#   data/tiny (a prepared dataset), run/ (ckpt.pt, train_log.jsonl, ckpt_packed.pt), empty/ (a folder),
#   notes.txt (a file of the user's), and the damaged files of the fixture below
TRAIN = ['train.py', *TINY, '--data_dir={root}/data', '--dataset=tiny', '--out_dir={root}/new']
CASES = [
    # train.py: types and ranges (checked before torch is imported)
    (*TRAIN, '--n_layers=2', "unknown setting 'n_layers' (did you mean 'n_layer'?)"),
    (*TRAIN, '--n_layer=0', "n_layer must be an integer >= 1, got 0"),
    (*TRAIN, '--max_iters=-5', "max_iters must be an integer >= 0, got -5"),
    (*TRAIN, '--gradient_accumulation_steps=0', "gradient_accumulation_steps must be an integer >= 1"),
    (*TRAIN, '--learning_rate=-1e-3', "learning_rate must be > 0, got -0.001"),
    (*TRAIN, '--learning_rate=1e999', "'learning_rate' must be float (a finite number), got inf"),
    (*TRAIN, '--beta2=1.5', "beta2 must be in [0, 1), got 1.5"),
    (*TRAIN, '--dropout=1.0', "dropout must be in [0, 1), got 1.0"),
    (*TRAIN, '--weight_decay=-0.1', "weight_decay must be >= 0"),
    (*TRAIN, '--seed=-1', "seed must be an integer >= 0, got -1"),
    (*TRAIN, '--batch_size=many', "'batch_size' must be int, got 'many'"),
    (*TRAIN, '--block_size=1.5', "'block_size' must be int, got 1.5"),
    (*TRAIN, '--n_kv_head=abc', "n_kv_head must be an integer >= 1 (or None), got 'abc'"),
    (*TRAIN, '--compile=5', "compile must be True, False or None"),
    (*TRAIN, '--eval_only=1', "'eval_only' must be bool, got 1"),
    (*TRAIN, '--device=tpu', "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (*TRAIN, '--dtype=int8', "dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    (*TRAIN, '--init_from=pretrained', "init_from must be 'scratch', 'resume' or 'hf:DIR'"),
    (*TRAIN, '--lr_schedule=linear', "lr_schedule must be one of cosine, two_stage"),
    (*TRAIN, '--n_head=3', "n_embd (64) must be n_head (3) times an even head size"),
    (*TRAIN, '--n_kv_head=3', "n_kv_head (3) must divide n_head (2)"),
    (*TRAIN, '{root}/missing_config.py', "config file not found: {root}/missing_config.py"),
    (*TRAIN, '{root}/broken_config.py', "{root}/broken_config.py line 2"),
    # train.py: paths, runs that exist, data, damaged checkpoints
    (*TRAIN, '--out_dir={root}/notes.txt', "--out_dir={root}/notes.txt is a file"),
    (*TRAIN, '--out_dir={root}/run', "{root}/run/ckpt.pt exists and a new run would overwrite it"),
    (*TRAIN, '--out_dir={root}/run', '--eval_only=True', "add --init_from=resume to evaluate the checkpoint"),
    (*TRAIN, '--out_dir={root}/logonly', "{root}/logonly/train_log.jsonl exists and a new run would overwrite it"),
    (*TRAIN, '--dataset=mine', "python prepare_data.py mine --input=YOUR_TEXT.txt"),
    (*TRAIN, '--device=cuda', "torch sees no CUDA GPU: use --device=cpu"),
    (*TRAIN, '--block_size=4000', "val.bin has 1639 tokens, fewer than block_size + 1 (4001): use --block_size=1638"),
    (*TRAIN, '--init_from=resume', "no checkpoint at {root}/new/ckpt.pt"),
    (*TRAIN, '--init_from=resume', '--out_dir={root}/truncated', "{root}/truncated/ckpt.pt is damaged or not a checkpoint"),
    (*TRAIN, '--init_from=resume', '--out_dir={root}/evil', "was refused: it holds Python code (a pickled posix.getcwd)"),
    (*TRAIN, '--init_from=resume', '--out_dir={root}/mismatch',
     "does not match the model it describes: model.layers.1.mlp.up_proj.weight has shape (3, 64), the model needs"),
    (*TRAIN, '--init_from=hf:{root}/empty', "no config.json at {root}/empty"),
    # sample.py
    ('sample.py', '--out_dir={root}/run', '--max_new_tokens=-5', "max_new_tokens must be an integer >= 1, got -5"),
    ('sample.py', '--out_dir={root}/run', '--num_samples=-1', "num_samples must be an integer >= 1, got -1"),
    ('sample.py', '--out_dir={root}/run', '--temperature=-1', "temperature must be >= 0, got -1.0"),
    ('sample.py', '--out_dir={root}/run', '--top_k=0', "top_k must be an integer >= 1 (or None), got 0"),
    ('sample.py', '--out_dir={root}/run', '--device=tpu', "device must be auto, cpu, cuda, cuda:N or mps"),
    ('sample.py', '--out_dir={root}/run', '--dtype=float64', "dtype must be one of auto, float32"),
    ('sample.py', '--out_dir={root}/notes.txt', "is a file: for a checkpoint file use --ckpt_path"),
    ('sample.py', '--out_dir={root}/run', '--start=FILE:{root}/latin1.txt', "latin1.txt is not UTF-8 text (byte 0xe9"),
    ('sample.py', '--out_dir={root}/run', '--start=FILE:{root}/nope.txt', "prompt file not found: {root}/nope.txt"),
    ('sample.py', '--out_dir={root}/run', '--device=cuda', "torch sees no CUDA GPU"),
    ('sample.py', '--out_dir={root}/empty', "no checkpoint at {root}/empty/ckpt.pt"),
    ('sample.py', '--ckpt_path={root}/truncated/ckpt.pt', "is damaged or not a checkpoint"),
    ('sample.py', '--ckpt_path={root}/random.bin', "is damaged or not a checkpoint"),
    ('sample.py', '--ckpt_path={root}/notes.txt', "is damaged or not a checkpoint"),
    ('sample.py', '--ckpt_path={root}/evil/ckpt.pt', "holds Python code"),
    ('sample.py', '--ckpt_path={root}/missing_key.pt', "model.norm.weight is missing"),
    ('sample.py', '--ckpt_path={root}/not_ours.pt', "is not a checkpoint of this repo"),
    ('sample.py', '--ckpt_path=hf:{root}/nope', "no directory at {root}/nope"),
    # prepare_data.py
    ('prepare_data.py', '--input={root}/text.txt', "name the dataset first"),
    ('prepare_data.py', '../escape', '--input={root}/text.txt', "the dataset name '../escape' names a folder"),
    ('prepare_data.py', 'x', '--input={root}/latin1.txt', '--data_dir={root}/new',
     "latin1.txt is not UTF-8 text (byte 0xe9"),
    ('prepare_data.py', 'x', '--input={root}/random.bin', '--data_dir={root}/new', "random.bin is not UTF-8 text"),
    ('prepare_data.py', 'x', '--input={root}/nope.txt', '--data_dir={root}/new', "input file not found"),
    ('prepare_data.py', 'x', '--input={root}/empty', '--data_dir={root}/new', "input file not found"),
    ('prepare_data.py', 'x', '--input={root}/short.txt', '--data_dir={root}/new', "has only 11 characters"),
    ('prepare_data.py', 'x', '--input={root}/text.txt', '--data_dir={root}/new', '--tokenizer=bpe',
     "tokenizer must be one of"),
    ('prepare_data.py', 'x', '--input={root}/text.txt', '--data_dir={root}/new', '--val_fraction=1.5',
     "val_fraction must be between 0 and 1"),
    ('prepare_data.py', 'x', '--input={root}/text.txt', '--data_dir={root}/notes.txt', "cannot write"),
    ('prepare_data.py', 'tiny', '--input={root}/other.txt', '--data_dir={root}/data',
     "holds another prepared dataset (train.bin differs from this one)"),
    ('prepare_data.py', 'x', '--val_fraction=half', "'val_fraction' must be float (a finite number), got 'half'"),
    # pack.py
    ('pack.py', '--out_dir={root}/run', '--dtype=float16', "dtype must be one of float32, bfloat16"),
    ('pack.py', '--out_dir={root}/run', '--packed_path={root}/notes.txt',
     "{root}/notes.txt exists and is not a file this script writes: choose another --packed_path, or pass --overwrite=True"),
    ('pack.py', '--out_dir={root}/run', '--packed_path={root}/mismatch/ckpt.pt', "pass --overwrite=True"),
    ('pack.py', '--out_dir={root}/run', '--packed_path={root}/run/ckpt.pt', "would replace its source"),
    ('pack.py', '--out_dir={root}/run', '--packed_path={root}/nodir/x.pt', "the directory {root}/nodir does not exist"),
    ('pack.py', '--out_dir={root}/run', '--packed_path={root}/empty', "is a directory"),
    ('pack.py', '--out_dir={root}/empty', "no checkpoint at {root}/empty/ckpt.pt"),
    ('pack.py', '--ckpt_path={root}/evil/ckpt.pt', '--packed_path={root}/new.pt', "holds Python code"),
    ('pack.py', '--ckpt_path={root}/run/ckpt_packed.pt', '--packed_path={root}/new.pt', "is already packed"),
    # export.py
    ('export.py', '--out_dir={root}/run', "name the directory to write: --to=DIR"),
    ('export.py', '--out_dir={root}/run', '--to={root}/hf', '--variant=int4', "variant must be 'master' or 'packed'"),
    ('export.py', '--out_dir={root}/run', '--to={root}/hf', '--dtype=float16', "dtype must be float32 or bfloat16"),
    ('export.py', '--out_dir={root}/run', '--to={root}/notes.txt', "is a file, not a directory"),
    ('export.py', '--out_dir={root}/run', '--to={root}/data', "holds files that export.py did not write"),
    ('export.py', '--ckpt_path={root}/truncated/ckpt.pt', '--to={root}/hf', "is damaged or not a checkpoint"),
    ('export.py', '--out_dir={root}/run', '--to={root}/m.gguf', '--format=ggml', "format must be hf or gguf, got 'ggml'"),
    ('export.py', '--out_dir={root}/run', '--format=gguf', "name the file to write: --to=FILE.gguf"),
    ('export.py', '--out_dir={root}/run', '--to={root}/m.gguf', '--format=gguf', '--variant=packed',
     "--variant is a setting of --format=hf"),
    ('export.py', '--out_dir={root}/run', '--to={root}/notes.txt', '--format=gguf',
     "{root}/notes.txt exists and is not a file this script writes: choose another --to, or pass --overwrite=True"),
    ('export.py', '--out_dir={root}/run', '--to={root}/m.gguf', '--format=gguf',
     "this model has its own lm_head: train with --tie_embeddings=True"),
    ('export.py', '--ckpt_path={root}/run/ckpt_packed.pt', '--to={root}/m.gguf', '--format=gguf', "its own lm_head"),
    # compare_gguf.py (the rest needs llama.cpp)
    ('compare_gguf.py', '--max_new_tokens=0', "max_new_tokens must be an integer >= 1, got 0"),
    ('compare_gguf.py', '--ckpt_path={root}/empty/ckpt.pt', "no checkpoint at {root}/empty/ckpt.pt"),
    # bench.py
    ('bench.py', '--dtype=foo', "dtype must be one of auto, float32, bfloat16, float16, got 'foo'"),
    ('bench.py', '--device=cuda', "torch sees no CUDA GPU"),
    ('bench.py', '--n_head=5', "n_embd (384) must be n_head (5) times an even head size"),
    ('bench.py', '--n_kv_head=4', "n_kv_head (4) must divide n_head (6)"),
    ('bench.py', '--rounds=0', "rounds must be an integer >= 1, got 0"),
    ('bench.py', '--batch_size=0', "batch_size must be an integer >= 1, got 0"),
    ('bench.py', '--warmup=-1', "warmup must be an integer >= 0"),
    ('bench.py', '--quants=none,b3', "quants must be a comma-separated list"),
    ('bench.py', '--mode=fast', "mode must be one of train, decode, layer"),
    ('bench.py', '--mode=decode', '--batch_sizes=1,0', "batch_sizes must be a comma-separated list of positive integers"),
    ('bench.py', '--mode=decode', '--int8_head=yes', "int8_head must be False, True or False,True, got 'yes'"),
    ('bench.py', '--mode=decode', '--pdl=on', "pdl must be False, True or False,True, got 'on'"),
    ('bench.py', '--mode=decode', '--float_gemv=yes', "float_gemv must be False, True or False,True, got 'yes'"),
    ('bench.py', '--mode=decode', '--device=cpu', '--batch_sizes=4', "batch_sizes, int8_head, pdl and float_gemv time the CUDA engine"),
    ('bench.py', '--mode=decode', '--device=cpu', '--float_gemv=False', "batch_sizes, int8_head, pdl and float_gemv time the CUDA"),
    ('bench.py', '--packed_file={root}/p.pt', "packed_file is written by --mode=decode only"),
    ('bench.py', '--mode=decode', '--device=cpu', '--packed_file={root}/nodir/p.pt', "the directory {root}/nodir does not exist"),
    ('bench.py', '--mode=decode', '--device=cpu', '--packed_file={root}/notes.txt', "pass --overwrite=True"),
]


def tree_state(*roots):
    """{path: sha1 of the file, or 'dir'} of everything under roots (caches, the CPU kernel's build and .git left out)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ('.git', '__pycache__', '.pytest_cache', '.build')]
            state[folder] = 'dir'
            for name in files:
                path = os.path.join(folder, name)
                with open(path, 'rb') as f:
                    state[path] = hashlib.sha1(f.read()).hexdigest()
    return state


class Code:
    """Unpickling this calls os.getcwd: a harmless stand-in for a pickle that runs code."""
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """One tiny trained run and every kind of damaged or foreign file the cases point at."""
    import prepare_data
    from checkpoint import is_packed_file, load_checkpoint, model_from_checkpoint, save_checkpoint, save_packed
    from packed import pack_model
    root = tmp_path_factory.mktemp('bad_inputs')
    (root / 'text.txt').write_text(synthetic_text(400))
    (root / 'other.txt').write_text(synthetic_text(400, seed=1))
    prepare_data.prepare('tiny', str(root / 'text.txt'), data_dir=str(root / 'data'))
    r = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *TINY, f'--data_dir={root}/data',
                        '--dataset=tiny', f'--out_dir={root}/run', '--max_iters=1', '--eval_interval=1'],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(root / 'run' / 'ckpt.pt'))
    model = model_from_checkpoint(ckpt)
    pack_model(model)
    save_packed(model, str(root / 'run' / 'ckpt_packed.pt'), tokenizer=ckpt['tokenizer'])
    assert is_packed_file(str(root / 'run' / 'ckpt_packed.pt'))
    for name in ('truncated', 'evil', 'mismatch', 'logonly', 'empty'):
        (root / name).mkdir()
    (root / 'truncated' / 'ckpt.pt').write_bytes((root / 'run' / 'ckpt.pt').read_bytes()[:3000])
    torch.save({'model_args': ckpt['model_args'], 'model': Code()}, root / 'evil' / 'ckpt.pt')
    mismatch = dict(ckpt, model=dict(ckpt['model']))
    mismatch['model']['model.layers.1.mlp.up_proj.weight'] = torch.zeros(3, 64)
    save_checkpoint(mismatch, str(root / 'mismatch' / 'ckpt.pt'))
    missing = dict(ckpt, model=dict(ckpt['model']))
    del missing['model']['model.norm.weight']
    save_checkpoint(missing, str(root / 'missing_key.pt'))
    save_checkpoint({'weights': [1, 2, 3]}, str(root / 'not_ours.pt'))
    shutil.copy(root / 'run' / 'train_log.jsonl', root / 'logonly')
    (root / 'notes.txt').write_text('my notes, not a checkpoint\n')
    (root / 'latin1.txt').write_bytes(('caf\u00e9 ' * 200).encode('latin-1'))
    (root / 'random.bin').write_bytes(bytes(range(256)) * 8)
    (root / 'short.txt').write_text('hello world')
    (root / 'broken_config.py').write_text('batch_size = 8\nlearning_rate = (1e-3\n')
    return root


@pytest.mark.parametrize('case', CASES, ids=lambda c: f"{c[0]} {' '.join(a for a in c[1:-1] if a not in TRAIN)}")
def test_bad_invocation_ends_in_one_line_and_changes_nothing(root, case):
    script, *args, expected = [str(x).replace('{root}', str(root)) for x in case]
    before = tree_state(root, REPO)
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=root, capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith('error: ') and r.stderr.count('\n') == 1, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and expected in r.stderr, r.stderr
    assert tree_state(root, REPO) == before


def test_offline_download_points_to_prepare_data(root):
    """A built-in dataset that cannot be downloaded (a proxy that refuses, as offline): the line
    names prepare_data.py's --input, not a train.py flag, and nothing is written."""
    before = tree_state(root)
    r = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *TINY, f'--data_dir={root}/new',
                        '--dataset=shakespeare_char', f'--out_dir={root}/new'], cwd=root, capture_output=True,
                       text=True, env={**os.environ, 'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9'})
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    assert 'could not download' in r.stderr and 'python prepare_data.py shakespeare_char --input=PATH' in r.stderr
    assert tree_state(root) == before
