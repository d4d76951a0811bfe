"""torchrun with 2 CPU processes (gloo): DDP and FSDP runs that end cleanly and equal the single
process, resume across world sizes and between DDP and FSDP, eval_only, sample.py on the result;
activation checkpointing; FSDP's gathered BitLinear weights; bench.py's wrappers. Run under torchrun, this
file is the FSDP worker of test_fsdp_gathers_whole_weights_and_checkpointing_changes_nothing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, run  # first: puts the repo on sys.path (also when run under torchrun)
from checkpoint import load_checkpoint
from model import GPT, GPTConfig

# 3 + 3 iterations, a moving average, every evaluation saved. No gradient clipping: it multiplies every
# gradient by max_norm / norm, and the last bits that differ between the sum orders of 1 and 2 processes
# then reach Adam's eps and b1.58's rounding boundaries often enough to need a looser bound than 1e-6
COMMON = ['--log_interval=1', '--eval_interval=3', '--always_save_checkpoint=True', '--warmup_iters=2',
          '--lr_decay_iters=6', '--learning_rate=3e-3', '--grad_clip=0.0', '--ema_decay=0.9']
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}  # as torchrun sets it; two threads per process crowd 2 cores


def torchrun(*args, nproc=2):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           os.path.join(REPO, 'train.py'), *TINY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD)


def single(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *TINY, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'train_log.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return [(x['iter'], x['loss']) for x in read_log(out_dir) if 'loss' in x]


def evals(out_dir):
    return [(x['iter'], x['val_loss'], x['val_loss_trained_weights']) for x in read_log(out_dir) if 'val_loss' in x]


def assert_close_runs(a, b, rel=1e-6, atol=1e-6):
    """Two out_dirs: the same iterations, losses and evaluations within rel, and their checkpoints'
    weights (the average and the trained ones) within atol."""
    la, lb = train_losses(a), train_losses(b)
    assert [i for i, _ in la] == [i for i, _ in lb]
    assert [x for _, x in la] == pytest.approx([x for _, x in lb], rel=rel)
    ea, eb = evals(a), evals(b)
    assert [e[0] for e in ea] == [e[0] for e in eb]
    assert [e[1:] for e in ea] == [pytest.approx(e[1:], rel=rel) for e in eb]
    ca, cb = (load_checkpoint(os.path.join(d, 'ckpt.pt')) for d in (a, b))
    assert ca['iter_num'] == cb['iter_num'] and sorted(ca) == sorted(cb)
    for weights in ('model', 'train_model'):
        assert sorted(ca[weights]) == sorted(cb[weights])
        for k in ca[weights]:
            torch.testing.assert_close(ca[weights][k], cb[weights][k], rtol=0, atol=atol)
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sorted(sa) == sorted(sb) and all(sa[i]['step'] == sb[i]['step'] for i in sa)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus_dir):
    """Out_dirs of the runs the tests compare. s3: one process, iterations 0-2, then s6: s3 resumed to 6
    (exact, test_train_sample). d3 (DDP, activation checkpointing) and f3 (FSDP): 2 processes, 0-2.
    d3_s6: d3 resumed by one process; s3_f6: s3 resumed by FSDP on 2 (activation checkpointing);
    f3_d6: f3 resumed by DDP on 2."""
    root = tmp_path_factory.mktemp('dist')
    data = [f'--data_dir={corpus_dir}', '--dataset=tiny', *COMMON]
    out = {name: root / name for name in ('s3', 'd3', 'f3')}

    def check(r):
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    out['s3_stdout'] = check(single(*data, f'--out_dir={out["s3"]}', '--max_iters=3')).stdout
    out['d3_stdout'] = check(torchrun(*data, f'--out_dir={out["d3"]}', '--max_iters=3',
                                      '--activation_checkpointing=True')).stdout
    out['f3_stdout'] = check(torchrun(*data, f'--out_dir={out["f3"]}', '--max_iters=3', '--fsdp=True')).stdout
    resume = ['--max_iters=6', '--init_from=resume']
    out['s6'] = copy_run(out['s3'], root / 's6')
    check(single(*data, f'--out_dir={out["s6"]}', *resume))
    out['d3_s6'] = copy_run(out['d3'], root / 'd3_s6')
    check(single(*data, f'--out_dir={out["d3_s6"]}', *resume))
    out['s3_f6'] = copy_run(out['s3'], root / 's3_f6')
    out['s3_f6_stdout'] = check(torchrun(*data, f'--out_dir={out["s3_f6"]}', *resume, '--fsdp=True',
                                         '--activation_checkpointing=True')).stdout
    out['f3_d6'] = copy_run(out['f3'], root / 'f3_d6')
    check(torchrun(*data, f'--out_dir={out["f3_d6"]}', *resume))
    return out


def test_two_processes_equal_one(runs):
    """The same batches: iterations' mean train losses and evaluations equal within float rounding
    (each process's loss is the mean of its half of the rows, a different sum order), weights within 1e-6."""
    for name in ('d3', 'f3'):
        stdout = runs[f'{name}_stdout']
        assert '2 process(es) (DDP)' in stdout if name == 'd3' else '2 process(es) (FSDP)' in stdout
        assert 'best val loss' in stdout.splitlines()[-1] and stdout.count('best val loss') == 1
        assert [i for i, _ in train_losses(runs[name])] == [0, 1, 2]
        assert_close_runs(runs[name], runs['s3'])
    # DDP and FSDP reduce the same two halves: equal to each other bit for bit
    assert train_losses(runs['d3']) == train_losses(runs['f3']) and evals(runs['d3']) == evals(runs['f3'])


def test_resume_across_world_sizes_and_wrappers(runs):
    """2 -> 1 (DDP's checkpoint), 1 -> 2 (FSDP), FSDP -> DDP: each resumed run continues as the
    uninterrupted single process does (s6), up to float rounding: the weights at the resume differ
    by ~3e-7 (another sum order), and three steps later by up to 1.9e-5, the losses by 2e-6 (2 -> 1,
    AMD EPYC, torch 2.13). A resume that lost the optimizer state or the schedule moves weights by
    the order of the learning rate (3e-3); resuming in the same world size is exact (test_train_sample)."""
    assert [i for i, _ in train_losses(runs['s6'])] == [0, 1, 2, 3, 4, 5]
    for name in ('d3_s6', 's3_f6', 'f3_d6'):
        assert_close_runs(runs[name], runs['s6'], rel=1e-5, atol=1e-4)
    ckpt = load_checkpoint(os.path.join(runs['s3_f6'], 'ckpt.pt'))   # FSDP wrote one file of whole tensors
    assert ckpt['model']['model.layers.0.mlp.up_proj.weight'].shape == (192, 64)
    assert isinstance(ckpt['optimizer']['state'][0]['exp_avg'], torch.Tensor)
    assert ckpt['optimizer']['state'][0]['exp_avg'].shape == ckpt['model']['model.embed_tokens.weight'].shape


def test_eval_only_under_torchrun_and_sample(runs, tmp_path, corpus_dir):
    out = copy_run(runs['s3_f6'], tmp_path / 'again')
    logged = evals(out)[-1]
    for fsdp in ('True', 'False'):
        r = torchrun(f'--data_dir={corpus_dir}', '--dataset=tiny', *COMMON, f'--out_dir={out}', '--max_iters=6',
                     '--init_from=resume', '--eval_only=True', f'--fsdp={fsdp}')
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.splitlines()[-1].startswith('best val loss')
        assert evals(out)[-1] == pytest.approx(logged, rel=1e-6)   # every rank evaluated its rows
    r = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'PASS' in r.stdout


def test_a_batch_the_ranks_cannot_share_is_an_error(tmp_path, corpus_dir):
    r = torchrun(f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--batch_size=15',
                 '--max_iters=1')
    assert r.returncode != 0
    assert 'error: batch_size (15) must be a multiple of the number of processes (2)' in r.stderr
    assert '--batch_size=14' in r.stderr
    r = single(f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={tmp_path}', '--fsdp=True')
    assert r.returncode == 2 and 'torchrun --standalone --nproc_per_node=N' in r.stderr


def test_bench_times_the_wrappers_under_torchrun():
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                        os.path.join(REPO, 'bench.py'), '--device=cpu', '--quants=b1.58', '--wrappers=none,ddp,fsdp',
                        '--activation_checkpointing=False,True', '--n_layer=1', '--n_head=2', '--n_embd=32',
                        '--block_size=16', '--batch_size=2', '--warmup=1', '--rounds=1', '--steps_per_round=2'],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l.split('  ')[0].strip() for l in r.stdout.splitlines() if l.startswith('b1.58')]
    assert rows == ['b1.58', 'b1.58 ac', 'b1.58 ddp', 'b1.58 ddp ac', 'b1.58 fsdp', 'b1.58 fsdp ac']
    assert '1 process(es)' in r.stdout
    r = run('bench.py', '--device=cpu', '--wrappers=fsdp')
    assert r.returncode == 2 and 'torchrun --standalone --nproc_per_node=1 bench.py' in r.stderr


def test_activation_checkpointing_changes_nothing():
    """Recomputing each block in the backward pass (dropout masks replayed): the same loss and gradients."""
    cfg = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    torch.manual_seed(0)
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        model = GPT(cfg)
        model.activation_checkpointing = recompute
        torch.manual_seed(2)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert grads_a['model.layers.0.mlp.up_proj.weight'].abs().sum() > 0


def test_fsdp_gathers_whole_weights_and_checkpointing_changes_nothing(tmp_path):
    """Under FSDP on 2 processes each holds half of every weight, and a BitLinear's forward sees the
    whole tensor: its ternary weights and absmean scale equal those of the unsharded model, bit for
    bit, and so do the loss, and the gradients (gathered) with and without activation checkpointing."""
    result = tmp_path / 'fsdp.json'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.abspath(__file__), str(result)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    checks = json.loads(result.read_text())
    assert checks['bitlinear_layers'] == 14 and checks['local_rows'] == [16, 16]
    assert checks['ternary_equal'] and checks['scale_equal'] and checks['loss_equal']
    assert checks['grads_equal'] and checks['grads_checkpointed_equal']


def fsdp_worker(result_path):
    """Under torchrun: compare an FSDP-sharded tiny GPT with its unsharded copy (see the test above)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from bitlinear import BitLinear, quantize_weight
    dist.init_process_group('gloo')
    torch.manual_seed(0)
    full = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    sharded, checkpointed = copy.deepcopy(full), copy.deepcopy(full)
    checkpointed.activation_checkpointing = True
    for model in (sharded, checkpointed):
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    seen = {}   # BitLinear name -> (ternary weights, scale) of the weight its forward saw

    def record(name):
        return lambda module, args: seen.__setitem__(name, quantize_weight(module.weight))
    for name, module in sharded.named_modules():
        if isinstance(module, BitLinear):
            module.register_forward_pre_hook(record(name))
    _, loss_full = full(x, y)
    _, loss_sharded = sharded(x, y)
    _, loss_checkpointed = checkpointed(x, y)
    for loss in (loss_full, loss_sharded, loss_checkpointed):
        loss.backward()
    whole = {n: quantize_weight(m.weight) for n, m in full.named_modules() if isinstance(m, BitLinear)}
    grads = lambda model: {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # gathered
    g_full, g_sharded, g_checkpointed = {n: p.grad for n, p in full.named_parameters()}, grads(sharded), grads(checkpointed)
    checks = dict(
        bitlinear_layers=len(seen),
        local_rows=[sharded.model.layers[0].self_attn.q_proj.weight.to_local().size(0),
                    full.model.layers[0].self_attn.q_proj.weight.size(0) // 2],
        ternary_equal=all(torch.equal(seen[n][0], whole[n][0]) for n in whole),
        scale_equal=all(torch.equal(seen[n][1], whole[n][1]) for n in whole),
        loss_equal=torch.equal(loss_full, loss_sharded) and torch.equal(loss_full, loss_checkpointed),
        grads_equal=all(torch.equal(g_sharded[n], g_full[n]) for n in g_full),  # the mean of 2 equal ones
        grads_checkpointed_equal=all(torch.equal(g_checkpointed[n], g_sharded[n]) for n in g_full),
    )
    if dist.get_rank() == 0:
        with open(result_path, 'w') as f:
            json.dump(checks, f)
    dist.barrier()   # as in train.py: no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == '__main__':
    fsdp_worker(sys.argv[1])
