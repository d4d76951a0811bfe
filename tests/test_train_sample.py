import json
import math
import os
import re
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import TINY, run


def read_log(out_dir):
    with open(os.path.join(out_dir, 'train_log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train(corpus_dir, out_dir, *args):
    return run('train.py', *TINY, f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={out_dir}', *args)


def test_loss_falls_clearly(trained_ckpt):
    evals = [r for r in read_log(trained_ckpt) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 30, 60]
    assert evals[0]['val_loss'] > 3.0                       # ln(vocab of ~30 characters) = 3.4
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0
    ckpt = load_checkpoint(os.path.join(trained_ckpt, 'ckpt.pt'))
    assert ckpt['iter_num'] == 60 and ckpt['best_iter'] == 60
    assert ckpt['best_val_loss'] == pytest.approx(evals[-1]['val_loss'])
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])


@pytest.mark.parametrize('schedule,ema_decay', [('cosine', 0.0), ('two_stage', 0.0), ('cosine', 0.9)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_dir, schedule, ema_decay):
    common = ['--log_interval=1', '--eval_interval=6', '--always_save_checkpoint=True', '--lr_decay_iters=12',
              '--warmup_iters=2', f'--lr_schedule={schedule}', '--dropout=0.1', '--gradient_accumulation_steps=2',
              f'--ema_decay={ema_decay}']
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert train(corpus_dir, full, *common, '--max_iters=12').returncode == 0
    assert train(corpus_dir, part, *common, '--max_iters=6').returncode == 0
    r = train(corpus_dir, part, *common, '--max_iters=12', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    losses = lambda d: [(x['iter'], x['loss'], x['lr'], x['weight_decay']) for x in read_log(d) if 'loss' in x]
    assert len(losses(full)) == 12
    assert losses(part) == losses(full)   # exactly, float for float
    evals = lambda d: {x['iter']: x for x in read_log(d) if 'val_loss' in x}   # the resumed run evaluates 6 twice
    assert evals(part) == evals(full)
    a, b = (load_checkpoint(os.path.join(d, 'ckpt.pt')) for d in (full, part))
    assert sorted(a) == sorted(b) and ('train_model' in a) == (ema_decay > 0)
    for weights in ('model', 'train_model') if ema_decay else ('model',):
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
    if schedule == 'two_stage':            # stage 2 from iter 6: no weight decay, a lower peak
        assert [x[3] for x in losses(full)] == [0.1] * 6 + [0.0] * 6
        assert losses(full)[6][2] < losses(full)[5][2]


def test_moving_average_of_the_weights(tmp_path, corpus_dir):
    """ema_decay: evaluations and the checkpoint's 'model' are the average, 'train_model' the trained
    weights, which are those of the same run without an average."""
    common = ['--log_interval=1', '--eval_interval=1', '--always_save_checkpoint=True', '--lr_decay_iters=3',
              '--warmup_iters=1', '--dropout=0.1', '--learning_rate=3e-3']
    plain, ema2, ema3 = tmp_path / 'plain', tmp_path / 'ema2', tmp_path / 'ema3'
    assert train(corpus_dir, plain, *common, '--max_iters=3').returncode == 0
    assert train(corpus_dir, ema2, *common, '--max_iters=2', '--ema_decay=0.75').returncode == 0
    r = train(corpus_dir, ema3, *common, '--max_iters=3', '--ema_decay=0.75')
    assert r.returncode == 0, r.stderr
    assert 'val loss' in r.stdout and '(moving average; the trained weights: val loss' in r.stdout
    losses = lambda d: [(x['iter'], x['loss']) for x in read_log(d) if 'loss' in x]
    assert len(losses(plain)) == 3 and losses(ema3) == losses(plain)   # training is untouched
    p, a2, a3 = (load_checkpoint(os.path.join(d, 'ckpt.pt')) for d in (plain, ema2, ema3))
    assert 'train_model' not in p and sorted(a3['model']) == sorted(p['model'])
    for k, w in p['model'].items():
        assert torch.equal(a3['train_model'][k], w)
        # one more step: ema = 0.75 * ema + 0.25 * weights
        torch.testing.assert_close(a3['model'][k], 0.75 * a2['model'][k] + 0.25 * w, rtol=3e-7, atol=1e-9)
    w = 'model.layers.0.mlp.down_proj.weight'
    assert (a3['model'][w] - p['model'][w]).abs().max() > 1e-4   # the average is not the weights
    # evaluations: the trained weights' val loss is the plain run's, the average's is reported and kept
    plain_evals, evals = [x for x in read_log(plain) if 'val_loss' in x], [x for x in read_log(ema3) if 'val_loss' in x]
    assert [x['val_loss_trained_weights'] for x in evals] == [x['val_loss'] for x in plain_evals]
    assert evals[0]['val_loss'] == evals[0]['val_loss_trained_weights']   # iteration 0: the average is the weights
    assert evals[3]['val_loss'] != evals[3]['val_loss_trained_weights']
    assert a3['best_val_loss'] == min(x['val_loss'] for x in evals)
    # evaluating the checkpoint again gives the logged numbers (the same seed: the same batches)
    r = train(corpus_dir, ema3, *common, '--max_iters=3', '--ema_decay=0.75', '--init_from=resume', '--eval_only=True')
    assert r.returncode == 0, r.stderr
    again = read_log(ema3)[-1]
    assert (again['iter'], again['val_loss'], again['val_loss_trained_weights']) == \
        (3, evals[3]['val_loss'], evals[3]['val_loss_trained_weights'])
    # sample.py samples from (and verifies) the average
    r = run('sample.py', f'--out_dir={ema3}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'PASS' in r.stdout


def test_resumed_run_continues_its_wandb_run(tmp_path, corpus_dir, monkeypatch):
    """The checkpoint stores the wandb run's id; --init_from=resume logs on in that run."""
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')   # offline runs are folders wandb/offline-run-<time>-<id>
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    common = ['--wandb_log=True', '--eval_interval=2', '--always_save_checkpoint=True', '--eval_iters=1']
    out = tmp_path / 'out'
    r = train(corpus_dir, out, *common, '--max_iters=2')
    assert r.returncode == 0, r.stderr
    run_id = load_checkpoint(os.path.join(out, 'ckpt.pt'))['wandb_run_id']
    assert re.fullmatch(r'[a-z0-9]{8}', run_id)
    r = train(corpus_dir, out, *common, '--max_iters=4', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(os.path.join(out, 'ckpt.pt'))['wandb_run_id'] == run_id
    runs = sorted(d for d in os.listdir(tmp_path / 'wandb') if d.startswith('offline-run-'))
    assert len(runs) == 2 and all(d.endswith('-' + run_id) for d in runs)


def test_a_new_run_never_overwrites_a_checkpoint(corpus_dir, trained_ckpt):
    before = os.path.getmtime(trained_ckpt / 'ckpt.pt')
    r = train(corpus_dir, trained_ckpt, '--max_iters=1')
    assert r.returncode == 2
    assert 'exists' in r.stderr and '--init_from=resume' in r.stderr and 'Traceback' not in r.stderr
    assert os.path.getmtime(trained_ckpt / 'ckpt.pt') == before


def test_exception_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': {'w': torch.ones(3)}, 'model_args': {}}, path)
    real_save = torch.save

    def broken_save(obj, f, *a, **kw):
        with open(f, 'wb') as fh:
            fh.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        save_checkpoint({'model': {'w': torch.zeros(3)}, 'model_args': {}}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_damaged_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match='no checkpoint'):
        load_checkpoint(str(tmp_path / 'nope.pt'))
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='damaged'):
        load_checkpoint(str(bad))


def test_sample_verifies_and_generates(trained_ckpt):
    r = run('sample.py', f'--out_dir={trained_ckpt}', '--num_samples=2', '--max_new_tokens=40',
            '--start=ROMEO:', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert '14 BitLinear layers' in r.stdout and 'PASS' in r.stdout
    diff = re.search(r"each layer's output, training form vs integer weights and scales: max \|diff\| (\S+) ", r.stdout)
    assert diff and float(diff.group(1)) < 1e-6   # float32 rounding only
    samples = r.stdout.split('PASS\n', 1)[1].split('---------------\n')
    assert len(samples) == 3 and samples[2] == ''
    assert all(s.startswith('ROMEO:') and len(s) == len('ROMEO:') + 40 + 1 for s in samples[:2])


def test_sample_fails_on_a_tampered_checkpoint(tmp_path, trained_ckpt):
    ckpt = load_checkpoint(os.path.join(trained_ckpt, 'ckpt.pt'))
    ckpt['model']['model.layers.1.self_attn.v_proj.weight'][3, 5] = float('inf')
    path = str(tmp_path / 'tampered.pt')
    save_checkpoint(ckpt, path)
    r = run('sample.py', f'--ckpt_path={path}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 1
    assert 'FAIL' in r.stdout and 'model.layers.1.self_attn.v_proj' in r.stdout
    assert '13 of them exactly' in r.stdout


def test_sample_user_errors(tmp_path, trained_ckpt):
    r = run('sample.py', f'--out_dir={trained_ckpt}', '--start=ROMEO€', '--device=cpu')
    assert r.returncode == 2 and "'€' is not in this model's vocabulary" in r.stderr
    assert r.stderr.count('\n') == 1
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 2 and 'no checkpoint at' in r.stderr and 'Traceback' not in r.stderr
    bad = tmp_path / 'ckpt.pt'
    bad.write_bytes(open(os.path.join(trained_ckpt, 'ckpt.pt'), 'rb').read()[:5000])   # truncated
    r = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu')
    assert r.returncode == 2 and 'damaged' in r.stderr and 'Traceback' not in r.stderr
    r = run('sample.py', f'--out_dir={trained_ckpt}', '--start=FILE:/nonexistent.txt', '--device=cpu')
    assert r.returncode == 2 and 'prompt file not found' in r.stderr


def test_float_checkpoint_says_there_is_nothing_to_verify(tmp_path, corpus_dir):
    out = tmp_path / 'float'
    assert train(corpus_dir, out, '--quant=none', '--max_iters=2', '--eval_interval=2').returncode == 0
    r = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0
    assert 'no BitLinear layers' in r.stdout and 'PASS' not in r.stdout


def test_train_prepares_a_missing_builtin_dataset_or_says_how(tmp_path):
    r = run('train.py', *TINY, f'--data_dir={tmp_path}', '--dataset=mine', '--max_iters=1')
    assert r.returncode == 2
    assert 'python prepare_data.py mine --input=' in r.stderr
    # a built-in dataset is prepared on the fly; offline, the download fails with one line
    os.makedirs(tmp_path / 'shakespeare_char')
    (tmp_path / 'shakespeare_char' / 'input.txt').write_text('hello world, ' * 1000)
    r = run('train.py', *TINY, f'--data_dir={tmp_path}', '--dataset=shakespeare_char', '--max_iters=1',
            f'--out_dir={tmp_path / "out"}', '--eval_interval=1')
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / 'shakespeare_char' / 'train.bin')


# -----------------------------------------------------------------------------
# never damaging a run: evaluation, divergence, resuming with other settings, the log after a crash

def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('ckpt_packed.pt'))
    return dst


def test_eval_only_never_touches_a_run_it_does_not_evaluate(tmp_path, corpus_dir, trained_ckpt):
    run_dir = copy_run(trained_ckpt, tmp_path / 'run')
    log_before, ckpt_before = (run_dir / 'train_log.jsonl').read_bytes(), (run_dir / 'ckpt.pt').read_bytes()
    r = train(corpus_dir, run_dir, '--eval_only=True')   # init_from='scratch': new random weights
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert "would evaluate new random weights" in r.stderr and '--init_from=resume' in r.stderr
    assert (run_dir / 'train_log.jsonl').read_bytes() == log_before
    r = train(corpus_dir, run_dir, '--eval_only=True', '--init_from=resume', '--max_iters=60')
    assert r.returncode == 0, r.stderr
    log = read_log(run_dir)
    assert log[:-1] == read_log(trained_ckpt)            # appended to, never truncated
    last = [x for x in log[:-1] if 'val_loss' in x][-1]  # the checkpoint's own evaluation, the same batches
    assert log[-1] == dict(last, eval_only=True, lr=log[-1]['lr'])   # lr: of this invocation's schedule
    assert (run_dir / 'ckpt.pt').read_bytes() == ckpt_before


def test_divergence_in_a_new_run_stops_it_without_a_checkpoint(tmp_path, corpus_dir):
    r = train(corpus_dir, tmp_path / 'out', '--learning_rate=1e4', '--warmup_iters=0', '--max_iters=30',
              '--eval_interval=10', '--log_interval=5')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    it = int(re.search(r'became inf or nan at iteration (\d+): the learning rate', r.stderr).group(1))
    assert 0 < it < 5 and 'lower --learning_rate' in r.stderr and 'no checkpoint was written' in r.stderr
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')
    assert max(x['iter'] for x in read_log(tmp_path / 'out')) <= 5   # stopped at the first log point


def test_divergence_keeps_the_last_good_checkpoint_with_always_save(tmp_path, corpus_dir):
    # two_stage: a sane first stage (iterations 0-3), then a learning rate of 1e4 from iteration 4
    out = tmp_path / 'out'
    r = train(corpus_dir, out, '--lr_schedule=two_stage', '--lr_decay_iters=8', '--warmup_iters=0',
              '--stage2_lr=1e4', '--max_iters=8', '--eval_interval=1', '--log_interval=100',
              '--always_save_checkpoint=True')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    it = int(re.search(r'at iteration (\d+)', r.stderr).group(1))
    assert it >= 4 and f'{out}/ckpt.pt was left as it was' in r.stderr
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert 1 <= ckpt['iter_num'] <= it   # saved before the first non-finite loss, never after
    assert all(torch.isfinite(w).all() for w in ckpt['model'].values())
    assert math.isfinite(ckpt['best_val_loss'])


def test_divergence_after_resuming_keeps_the_checkpoint(tmp_path, corpus_dir, trained_ckpt):
    run_dir = copy_run(trained_ckpt, tmp_path / 'run')
    before = (run_dir / 'ckpt.pt').read_bytes()
    r = train(corpus_dir, run_dir, '--init_from=resume', '--max_iters=80', '--lr_decay_iters=80',
              '--learning_rate=1e4', '--warmup_iters=0', '--always_save_checkpoint=True', '--eval_interval=2')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert re.search(r'became inf or nan at iteration 6\d', r.stderr) and 'was left as it was' in r.stderr
    assert (run_dir / 'ckpt.pt').read_bytes() == before


def test_resume_uses_the_checkpoints_block_size(tmp_path, corpus_dir, trained_ckpt):
    run_dir = copy_run(trained_ckpt, tmp_path / 'run')
    r = train(corpus_dir, run_dir, '--init_from=resume', '--block_size=64', '--max_iters=62', '--eval_interval=2',
              '--always_save_checkpoint=True')
    assert r.returncode == 0, r.stderr
    assert "resuming with the checkpoint's block_size" in r.stdout and '512 tokens per iteration' in r.stdout
    ckpt = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'))
    assert ckpt['iter_num'] == 62 and ckpt['model_args']['block_size'] == 32 and ckpt['config']['block_size'] == 32


def test_resume_after_a_crash_leaves_each_iteration_once_in_the_log(tmp_path, corpus_dir):
    common = ['--log_interval=1', '--eval_interval=3', '--always_save_checkpoint=True', '--lr_decay_iters=6',
              '--warmup_iters=1']
    out = tmp_path / 'out'
    assert train(corpus_dir, out, *common, '--max_iters=3').returncode == 0
    at_3 = (out / 'ckpt.pt').read_bytes()
    assert train(corpus_dir, out, *common, '--max_iters=6', '--init_from=resume').returncode == 0
    strip = lambda log: [{k: v for k, v in x.items() if k not in ('dt_ms', 'mfu')} for x in log]
    whole = strip(read_log(out))
    assert [(x['iter'], 'val_loss' in x) for x in whole] == \
        [(0, True)] + [(i, False) for i in range(3)] + [(3, True)] + [(i, False) for i in range(3, 6)] + [(6, True)]
    # the crash: the run went on from the checkpoint at 3 and died writing iteration 5's record
    (out / 'ckpt.pt').write_bytes(at_3)
    with open(out / 'train_log.jsonl', 'a') as f:
        f.write('{"iter": 5, "lo')
    r = train(corpus_dir, out, *common, '--max_iters=6', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert 'dropped 6 records from iteration 3 on' in r.stdout
    assert strip(read_log(out)) == whole
