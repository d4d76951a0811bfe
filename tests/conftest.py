import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHAKESPEARE = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
TIKTOKEN_DIR = os.path.join(REPO, '..', 'shared', 'tiktoken')
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(TIKTOKEN_DIR):
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_DIR

# a tiny model that trains in seconds on two CPU cores
TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=64',
        '--block_size=32', '--batch_size=16', '--dropout=0.0', '--eval_iters=4']


def integer_layers(model):
    """A context: inside, every BitLinear of model computes bitlinear.integer_forward: the integer
    line y = (x_int @ W_t^T) * (s_w / s_x) that packed inference computes, instead of training's
    dequantized product (equal up to float rounding)."""
    from bitlinear import bitlinear_hooks, integer_forward
    return bitlinear_hooks(model, lambda mod, args, out: integer_forward(mod, args[0]))


def run(script, *args, cwd=REPO):
    """Run one of the repo's scripts; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def synthetic_text(n_lines=3000, seed=0):
    """A small corpus with structure a tiny model learns quickly: lines built from a few words."""
    rng = random.Random(seed)
    names = ['ROMEO', 'JULIET', 'NURSE', 'FRIAR']
    words = 'the king and queen of love shall speak to thee my lord good night sweet'.split()
    lines = []
    for _ in range(n_lines):
        lines.append(f"{rng.choice(names)}:\n" + ' '.join(rng.choice(words) for _ in range(rng.randint(4, 9))) + '.\n')
    return '\n'.join(lines)


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
    """data_dir holding a prepared character-level dataset named 'tiny'."""
    root = tmp_path_factory.mktemp('corpus')
    text_path = root / 'tiny.txt'
    text_path.write_text(synthetic_text())
    data_dir = root / 'data'
    r = run('prepare_data.py', 'tiny', f'--input={text_path}', f'--data_dir={data_dir}')
    assert r.returncode == 0, r.stderr
    return data_dir


@pytest.fixture(scope='session')
def trained_ckpt(tmp_path_factory, corpus_dir):
    """out_dir of a tiny b1.58 model trained for 60 iterations."""
    out = tmp_path_factory.mktemp('trained') / 'out'
    r = run('train.py', *TINY, f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={out}',
            '--max_iters=60', '--eval_interval=30', '--learning_rate=3e-3', '--warmup_iters=10',
            '--lr_decay_iters=60')
    assert r.returncode == 0, r.stderr
    return out
