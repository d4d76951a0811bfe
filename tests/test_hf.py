"""Hugging Face transformers checkpoints both ways (hf.py, export.py, hf:DIR in train.py and
sample.py), checked against transformers' own BitNetForCausalLM.

transformers wraps its BitNet quantizers in torch.compile; on a CPU that compiles C++ for half a
minute per test, so these tests run them eagerly (the same operations, uncompiled). Most script
runs happen in this process (script(): runpy with sys.argv set), which saves the seconds a new
process spends importing torch; a few run as real processes, to see exit codes and one-line errors."""

import contextlib
import copy
import io
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitlinear import BitLinear, activation_scale, quantize_activation, quantize_weight
from checkpoint import model_from_checkpoint, save_checkpoint, save_packed
from conftest import REPO, TINY, run
import hf
from hf import HFError, check_finetuning_data, gpt2_tokenizer_files, is_projection, load_hf_checkpoint
from model import GPT, GPTConfig
from packed import pack_model
from prepare_data import DataError, gpt2_encoding, load_tokenizer, prepare

transformers = pytest.importorskip('transformers')
from transformers import AutoModelForCausalLM, AutoTokenizer, BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402

transformers.logging.set_verbosity_error()
RTOL = 1e-5   # logits agree within RTOL * max(1, max|logits|) (float32)
MAX_FLIPS = 3   # integer activations allowed to round the other way at a boundary (see logit_diff)


@pytest.fixture(autouse=True, scope='module')
def eager_transformers():
    """Run transformers' torch.compile'd BitNet functions eagerly (see the module docstring)."""
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def make_checkpoint(path, corpus_dir, steps=30, **overrides):
    """Train a tiny GPT for a few AdamW steps on the 'tiny' corpus and save it as train.py does.
    Returns the model (eval mode) and the tokenizer meta data."""
    with open(corpus_dir / 'tiny' / 'meta.json') as f:
        meta = json.load(f)
    data = np.fromfile(corpus_dir / 'tiny' / 'train.bin', dtype=meta['dtype']).astype(np.int64)
    args = dict(block_size=32, vocab_size=meta['vocab_size'], n_layer=2, n_head=2, n_kv_head=None, n_embd=64,
                intermediate_size=None, dropout=0.0, quant='b1.58', tie_embeddings=False, rope_theta=10000.0)
    args.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu')
    rng = np.random.default_rng(0)
    loss = torch.tensor(float('inf'))
    for _ in range(steps):
        ix = rng.integers(0, len(data) - 33, size=16)
        x = torch.from_numpy(np.stack([data[i:i + 32] for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 33] for i in ix]))
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=args,
                         iter_num=steps, best_val_loss=loss.item(), best_iter=steps, config={}, tokenizer=meta),
                    str(path))
    return model.eval(), meta


def script(name, *args):
    """Run one of the repo's scripts in this process, as `python name args` would; returns a
    CompletedProcess with the exit code and what it printed."""
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [name, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(REPO, name), run_name='__main__')
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def export(ckpt, to, *flags):
    return script('export.py', f'--ckpt_path={ckpt}', f'--to={to}', *flags)


def probe(vocab_size, T=32):
    return torch.randint(vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


def rounding_flips(name, x_ours, x_theirs):
    """[(index, transformers' integer)] where the b1.58 integer activations of the two inputs to
    projection name differ, each checked to be a rounding-boundary flip: the integers are 1 apart and
    both u = x * s_x lie within 1e-3 of the boundary between them."""
    (q_ours, s_ours), (q_theirs, s_theirs) = quantize_activation(x_ours), quantize_activation(x_theirs)
    where = q_ours != q_theirs
    boundary = (q_ours.float() + q_theirs.float()) / 2
    flip = (((q_ours.float() - q_theirs.float()).abs() == 1) & ((x_ours.float() * s_ours - boundary).abs() < 1e-3)
            & ((x_theirs.float() * s_theirs - boundary).abs() < 1e-3))
    assert flip[where].all(), f"{name}: integer activations differ, and not by a rounding-boundary flip"
    return [(tuple(i.tolist()), q_theirs[tuple(i)].item()) for i in where.nonzero()]


@torch.no_grad()
def logit_diff(ours, theirs, idx):
    """(max |our logits - transformers' logits| over every position of idx, tolerance, flips).

    A b1.58 projection rounds u = x * 127 / max|x| to an integer. Where u sits on a rounding boundary
    (k + 0.5 up to float32 noise), the two implementations' different operation order before it may
    round it either way, and that one integer moves some logits by ~1e-3. So the first projection (in
    forward order) whose integer activations differ from transformers' is found, every difference
    must be such a flip (rounding_flips), our activation there is set to transformers' integer, and
    our model runs again, until all integers agree. flips counts them, at most MAX_FLIPS. A wrong
    scale or norm shows up as integers further apart, or as logits that differ."""
    names = [n for n, m in ours.named_modules() if isinstance(m, BitLinear)]
    theirs_in, ours_in, patches = {}, {}, {n: [] for n in names}

    def record(name):
        return lambda module, args, out: theirs_in.__setitem__(name, args[0])

    def patch(name):   # our input to a projection, with the flips found so far set to transformers' integers
        def hook(module, args):
            x, s_x = args[0].clone(), activation_scale(args[0].float())
            for i, q in patches[name]:
                x[i] = q / s_x[i[:-1] + (0,)]     # x * s_x rounds to q
            ours_in[name] = args[0], x
            return (x,)
        return hook

    def first_flips():
        for name, (_, x) in ours_in.items():      # in forward order
            new = rounding_flips(name, x, theirs_in[name])
            if new:
                return name, new
        return None, []

    hooks = ([theirs.get_submodule(n).register_forward_hook(record(n)) for n in names] +
             [ours.get_submodule(n).register_forward_pre_hook(patch(n)) for n in names])
    try:
        b = theirs(idx).logits
        flips = 0
        while True:
            a = ours(idx, idx)[0]                 # with targets: logits at every position
            name, new = first_flips()
            if not new:
                break
            flips += len(new)
            assert flips <= MAX_FLIPS, f"more than {MAX_FLIPS} rounding-boundary flips"
            for n, (x, _) in ours_in.items():     # every projection that reads the same tensor (q, k, v)
                if x is ours_in[name][0]:
                    patches[n] += new
    finally:
        for h in hooks:
            h.remove()
    assert a.shape == b.shape
    return (a - b).abs().max().item(), RTOL * max(1.0, a.abs().max().item()), flips


CONFIGS = {
    'mha': dict(),                                                          # 2 heads, untied
    'gqa': dict(n_head=4, n_kv_head=2, tie_embeddings=True, rope_theta=500.0),   # grouped-query, tied
    'float': dict(quant='none'),
}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, corpus_dir):
    """{name: (ckpt path, model, meta)} of the tiny trained models of CONFIGS."""
    root = tmp_path_factory.mktemp('hf_ckpts')
    out = {}
    for name, overrides in CONFIGS.items():
        path = root / f'{name}.pt'
        model, meta = make_checkpoint(path, corpus_dir, **overrides)
        out[name] = (path, model, meta)
    return out


EXPORTS = [('mha', 'master'), ('mha', 'packed'), ('gqa', 'master'), ('gqa', 'packed'), ('float', 'master')]


@pytest.fixture(scope='module')
def exports(tmp_path_factory, checkpoints):
    """{(name, variant): directory export.py wrote}; tests copy a directory before changing it."""
    root = tmp_path_factory.mktemp('hf_exports')
    out = {}
    for name, variant in EXPORTS:
        out[name, variant] = root / f'{name}-{variant}'
        r = export(checkpoints[name][0], out[name, variant], f'--variant={variant}')
        assert r.returncode == 0, r.stderr
        assert f'wrote {out[name, variant]}/' in r.stdout
    return out


# -----------------------------------------------------------------------------
# ours -> transformers

@pytest.mark.parametrize('name,variant', EXPORTS)
def test_export_loads_in_transformers_with_equal_logits(checkpoints, exports, name, variant):
    _, model, meta = checkpoints[name]
    d = exports[name, variant]
    config = json.loads((d / 'config.json').read_text())
    assert config['model_type'] == 'bitnet' and config['architectures'] == ['BitNetForCausalLM']
    assert config['num_key_value_heads'] == model.config.n_kv_head
    assert config['rope_theta'] == model.config.rope_theta and config['torch_dtype'] == 'float32'
    if name == 'float':
        assert 'quantization_config' not in config
    else:
        assert config['quantization_config'] == dict(quant_method='bitnet', linear_class='autobitlinear',
                                                     quantization_mode='online' if variant == 'master' else 'offline')
    assert json.loads((d / 'meta.json').read_text()) == meta
    vocab = json.loads((d / 'vocab.json').read_text())
    assert [c for c, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == list(meta['chars'])

    theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(theirs).__name__ == 'BitNetForCausalLM'
    q_proj = theirs.model.layers[0].self_attn.q_proj
    if name == 'float':
        assert type(q_proj) is torch.nn.Linear
    else:
        assert type(q_proj).__name__ == 'AutoBitLinear' and q_proj.online_quant == (variant == 'master')
    if variant == 'packed':   # transformers holds W_t in {-1, 0, 1} and weight_scale = mean|W| (shape (1,))
        w_t, s_w = quantize_weight(model.model.layers[0].self_attn.q_proj.weight)
        assert torch.equal(q_proj.weight, w_t.float()) and q_proj.weight_scale.shape == (1,)
        assert q_proj.weight_scale.item() == s_w.item()
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == model.config.tie_embeddings
    diff, tol, flips = logit_diff(model, theirs, probe(model.config.vocab_size))
    print(f"\n{name} {variant}: max |logit diff| ours vs transformers {diff:.3g} (tolerance {tol:.3g}), "
          f"{flips} rounding-boundary flips")
    assert diff <= tol


@pytest.mark.parametrize('name', ['model.layers.0.self_attn.o_proj.weight_scale',
                                  'model.layers.1.post_attention_layernorm.weight', 'model.norm.weight'])
def test_logit_diff_fails_for_a_wrong_scale_or_norm(checkpoints, exports, name):
    """logit_diff lets rounding-boundary flips through, and nothing else: a weight scale, or one channel
    of a norm, 1% off moves integer activations away from any boundary, or (after the last
    projection) the logits. (A norm scaled as a whole would change nothing: absmax quantization
    divides it out.)"""
    _, model, _ = checkpoints['mha']
    theirs = AutoModelForCausalLM.from_pretrained(exports['mha', 'packed'], dtype=torch.float32).eval()
    theirs.state_dict()[name][0] *= 1.01
    try:
        diff, tol, _ = logit_diff(model, theirs, probe(model.config.vocab_size))
    except AssertionError as e:
        print(f"\n{name}: {e}")
        assert name != 'model.norm.weight' and 'not by a rounding-boundary flip' in str(e)
    else:
        print(f"\n{name}: max |logit diff| {diff:.3g} (tolerance {tol:.3g})")
        assert name == 'model.norm.weight' and diff > 10 * tol


def test_packed_export_is_small_and_uses_the_2bit_layout(checkpoints, exports):
    model = checkpoints['mha'][1]
    tensors = load_file(exports['mha', 'packed'] / 'model.safetensors')
    w = tensors['model.layers.1.mlp.down_proj.weight']
    assert w.dtype == torch.uint8 and w.shape == (64 // 4, model.config.intermediate_size)
    scale = tensors['model.layers.1.mlp.down_proj.weight_scale']
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    assert scale.item() == quantize_weight(model.model.layers[1].mlp.down_proj.weight)[1].item()
    assert len([k for k in tensors if k.endswith('weight_scale')]) == 14
    master_size = 4 * sum(p.numel() for n, p in model.state_dict().items() if is_projection(n))
    packed_size = sum(tensors[n].numel() for n in tensors if is_projection(n))
    assert packed_size * 16 == master_size   # 2 bits instead of 32


# -----------------------------------------------------------------------------
# transformers -> ours

def tiny_bitnet(tmp_path):
    """A random BitNetForCausalLM built by transformers, saved with save_pretrained (float)."""
    config = BitNetConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    model.save_pretrained(tmp_path / 'float')
    return model


def with_quantization(src, dst, quantization_config, pack=None):
    """A copy of directory src with a quantization_config; pack(W) -> (uint8 weight, weight_scale)
    replaces every projection's weight (transformers' own packing, not ours)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / 'config.json').read_text())
    config['quantization_config'] = quantization_config
    (dst / 'config.json').write_text(json.dumps(config))
    if pack is not None:
        tensors = load_file(dst / 'model.safetensors')
        for name in [n for n in tensors if is_projection(n)]:
            tensors[name], tensors[name + '_scale'] = pack(tensors[name])
        save_file(tensors, dst / 'model.safetensors', metadata={'format': 'pt'})
    return dst


def hf_pack(w, reciprocal=False):
    """transformers' pack_weights of W's ternary values, and the scale as linear_class stores it."""
    w_t, s_w = quantize_weight(w)
    return pack_weights(w_t.clone()), (1 / s_w if reciprocal else s_w).reshape(1)


@pytest.mark.parametrize('kind', ['float', 'online', 'offline', 'bitlinear'])
def test_transformers_model_imports_with_equal_logits(tmp_path, kind):
    tiny_bitnet(tmp_path)
    qc = dict(quant_method='bitnet', linear_class='autobitlinear')
    d = {
        'float': lambda: tmp_path / 'float',
        'online': lambda: with_quantization(tmp_path / 'float', tmp_path / kind, dict(qc, quantization_mode='online')),
        'offline': lambda: with_quantization(tmp_path / 'float', tmp_path / kind,
                                             dict(qc, quantization_mode='offline'), hf_pack),
        # the packed 2B4T release's class: weight_scale = 1 / mean|W|, divided by
        'bitlinear': lambda: with_quantization(tmp_path / 'float', tmp_path / kind,
                                               dict(quant_method='bitnet', linear_class='bitlinear'),
                                               lambda w: hf_pack(w, reciprocal=True)),
    }[kind]()
    theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    checkpoint = load_hf_checkpoint(str(d))
    assert checkpoint['model_args'] == dict(vocab_size=50, n_embd=64, intermediate_size=128, n_layer=2, n_head=4,
                                            n_kv_head=2, block_size=32, norm_eps=1e-5, rope_theta=10000.0,
                                            tie_embeddings=False, quant='none' if kind == 'float' else 'b1.58',
                                            dropout=0.0, hidden_act='relu2', sub_norms=True)
    ours = model_from_checkpoint(checkpoint, str(d)).eval()
    diff, tol, flips = logit_diff(ours, theirs, probe(50))
    print(f"\ntransformers {kind} -> ours: max |logit diff| {diff:.3g} (tolerance {tol:.3g}), {flips} flips")
    assert diff <= tol


def test_sharded_directory_imports(tmp_path):
    model = tiny_bitnet(tmp_path)
    model.save_pretrained(tmp_path / 'sharded', max_shard_size='100KB')
    assert os.path.isfile(tmp_path / 'sharded' / 'model.safetensors.index.json')
    assert len([f for f in os.listdir(tmp_path / 'sharded') if f.endswith('.safetensors')]) > 1
    sharded, single = (load_hf_checkpoint(str(tmp_path / d))['model'] for d in ('sharded', 'float'))
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)


# -----------------------------------------------------------------------------
# round trips

def test_round_trip_master_gives_identical_weights(checkpoints, exports):
    for name in ('mha', 'gqa', 'float'):
        _, model, meta = checkpoints[name]
        back = load_hf_checkpoint(str(exports[name, 'master']))
        assert back['tokenizer'] == meta
        cfg = model.config
        assert back['model_args'] == dict(vocab_size=cfg.vocab_size, n_embd=cfg.n_embd,
                                          intermediate_size=cfg.intermediate_size, n_layer=cfg.n_layer,
                                          n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, block_size=cfg.block_size,
                                          norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                          tie_embeddings=cfg.tie_embeddings, quant=cfg.quant, dropout=0.0,
                                          hidden_act='relu2', sub_norms=True)
        original = model.state_dict()
        assert back['model'].keys() == original.keys()
        assert all(torch.equal(back['model'][k], original[k]) for k in original), name


def test_round_trip_packed_gives_identical_ternary_weights_and_scales(tmp_path, checkpoints, exports):
    _, model, meta = checkpoints['gqa']
    back = load_hf_checkpoint(str(exports['gqa', 'packed']))['model']
    original = model.state_dict()
    n = 0
    for name, w in original.items():
        if not is_projection(name):
            assert torch.equal(back[name], w), name
            continue
        w_t, s_w = quantize_weight(w)
        w_t2, s_w2 = quantize_weight(back[name])
        assert torch.equal(w_t2, w_t) and s_w2.item() == s_w.item(), name   # bit for bit
        # the naive latent weight W_t * s_w keeps the ternary values but not the scale: mean|W_t * s_w|
        # is s_w times the fraction of nonzeros (see hf.py)
        naive_t, naive_s = quantize_weight(w_t.float() * s_w)
        assert torch.equal(naive_t, w_t)
        assert naive_s.item() == pytest.approx(s_w.item() * w_t.ne(0).float().mean().item(), rel=1e-5)
        n += 1
    assert n == 14
    # so the imported model computes exactly what the original does
    idx = probe(model.config.vocab_size)
    ours = model_from_checkpoint(load_hf_checkpoint(str(exports['gqa', 'packed'])), 'packed').eval()
    with torch.no_grad():
        assert torch.equal(ours(idx, idx)[0], model(idx, idx)[0])
    # pack.py's packed checkpoint of the same model exports to the very same file
    save_packed(pack_model(copy.deepcopy(model)), str(tmp_path / 'ckpt_packed.pt'), tokenizer=meta)
    r = export(tmp_path / 'ckpt_packed.pt', tmp_path / 'from_pack', '--variant=packed')
    assert r.returncode == 0, r.stderr
    a, b = (load_file(d / 'model.safetensors') for d in (exports['gqa', 'packed'], tmp_path / 'from_pack'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_export(tmp_path, checkpoints):
    path, model, _ = checkpoints['mha']
    r = export(path, tmp_path / 'bf16', '--dtype=bfloat16')
    assert r.returncode == 0, r.stderr
    assert 'bfloat16 rounding changed' in r.stdout
    assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    back = load_hf_checkpoint(str(tmp_path / 'bf16'))['model']
    assert all(torch.equal(back[k], v.bfloat16().float()) for k, v in model.state_dict().items())


# -----------------------------------------------------------------------------
# train.py and sample.py with hf:DIR

def test_sample_from_hf_dir_equals_sample_from_checkpoint(checkpoints, exports):
    common = ['--num_samples=2', '--max_new_tokens=30', '--start=ROMEO:', '--device=cpu']
    a = script('sample.py', f'--ckpt_path={checkpoints["gqa"][0]}', *common)
    b = script('sample.py', f'--ckpt_path=hf:{exports["gqa", "packed"]}', *common)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert 'PASS' in a.stdout and 'PASS' in b.stdout
    assert "each layer's output, training form vs integer weights and scales" in b.stdout
    samples = lambda r: r.stdout.split('PASS\n', 1)[1]
    assert samples(b) == samples(a) and samples(a).startswith('ROMEO:')


def test_finetune_from_hf_dir(tmp_path, corpus_dir, checkpoints, exports):
    meta = checkpoints['gqa'][2]
    out = tmp_path / 'out'
    no_shape = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd'))]   # the directory's
    r = run('train.py', *no_shape, f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={out}',
            f'--init_from=hf:{exports["gqa", "master"]}', '--max_iters=2', '--eval_interval=2')
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(out / 'train_log.jsonl')]
    assert log[0]['iter'] == 0 and log[0]['val_loss'] < 2.8   # trained weights: a fresh model starts at ln(38) = 3.6
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['n_kv_head'] == 2 and ckpt['model_args']['tie_embeddings'] is True
    assert ckpt['tokenizer'] == meta and ckpt['iter_num'] == 2


def test_finetune_needs_the_models_vocabulary(tmp_path, checkpoints, exports):
    meta = checkpoints['mha'][2]
    checkpoint = load_hf_checkpoint(str(exports['mha', 'master']))
    other = dict(meta, chars=meta['chars'][::-1])   # same size, other characters
    with pytest.raises(HFError, match='another tokenizer'):
        check_finetuning_data(checkpoint, other, 32, 'hf:DIR', 'data/x')
    del checkpoint['tokenizer']                      # a directory without our meta.json
    with pytest.raises(HFError, match='vocabulary of 38 tokens, data/x one of 40'):
        check_finetuning_data(checkpoint, dict(meta, vocab_size=40), 32, 'hf:DIR', 'data/x')
    with pytest.raises(HFError, match='max_position_embeddings'):
        check_finetuning_data(checkpoint, meta, 64, 'hf:DIR', 'data/x')
    # through train.py: one line, exit code 2
    (tmp_path / 'other.txt').write_text('0123456789 abc\n' * 500)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare('other', str(tmp_path / 'other.txt'), data_dir=str(tmp_path))
    r = script('train.py', *TINY, f'--data_dir={tmp_path}', '--dataset=other', f'--out_dir={tmp_path / "out"}',
               f'--init_from=hf:{exports["mha", "master"]}', '--max_iters=1')
    assert r.returncode == 2 and 'another tokenizer' in r.stderr and r.stderr.count('\n') == 1


# -----------------------------------------------------------------------------
# errors

def test_export_errors(tmp_path, corpus_dir, checkpoints):
    b1 = tmp_path / 'b1.pt'
    make_checkpoint(b1, corpus_dir, steps=0, quant='b1')
    r = run('export.py', f'--ckpt_path={b1}', f'--to={tmp_path / "x"}')   # a real process: exit code, one line
    assert r.returncode == 2 and 'b1 (binary) model cannot be exported' in r.stderr and r.stderr.count('\n') == 1
    assert not os.path.exists(tmp_path / 'x')
    odd = tmp_path / 'odd.pt'
    make_checkpoint(odd, corpus_dir, steps=0, intermediate_size=70)
    r = export(odd, tmp_path / 'x', '--variant=packed')
    assert r.returncode == 2 and 'multiple of 4' in r.stderr and '--variant=master' in r.stderr
    r = export(checkpoints['float'][0], tmp_path / 'x', '--variant=packed')
    assert r.returncode == 2 and 'no ternary weights to pack' in r.stderr
    r = export(tmp_path / 'nope.pt', tmp_path / 'x')
    assert r.returncode == 2 and 'no checkpoint at' in r.stderr and 'Traceback' not in r.stderr
    # a directory with someone else's files is never written into
    path, _, _ = checkpoints['mha']
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    r = export(path, tmp_path / 'mine')
    assert r.returncode == 2 and 'did not write' in r.stderr
    assert os.listdir(tmp_path / 'mine') == ['notes.txt']
    # an earlier export is replaced; of the rest, only files an export writes and its record lists go
    assert export(path, tmp_path / 'hf', '--variant=packed').returncode == 0
    record = json.loads((tmp_path / 'hf' / 'export.json').read_text())
    record['files'] += ['merges.txt', '../outside.txt']   # as if a GPT-2 export had been there
    (tmp_path / 'hf' / 'export.json').write_text(json.dumps(record))
    for f in ('hf/merges.txt', 'hf/README.md', 'outside.txt'):
        (tmp_path / f).write_text('old')
    r = export(path, tmp_path / 'hf')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / 'hf' / 'export.json').read_text())['variant'] == 'master'
    assert sorted(os.listdir(tmp_path / 'hf')) == ['README.md', 'config.json', 'export.json', 'meta.json',
                                                   'model.safetensors', 'vocab.json']
    assert (tmp_path / 'outside.txt').read_text() == 'old'


def test_import_errors(tmp_path, exports):
    def broken(name, edit_config=None, remove=None):
        d = tmp_path / name
        shutil.copytree(exports['mha', 'master'], d)
        if edit_config:
            config = json.loads((d / 'config.json').read_text())
            edit_config(config)
            (d / 'config.json').write_text(json.dumps(config))
        if remove:
            os.remove(d / remove)
        return str(d)

    with pytest.raises(HFError, match="model of type 'mistral': only 'bitnet'"):
        load_hf_checkpoint(broken('mistral', lambda c: c.update(model_type='mistral')))
    with pytest.raises(HFError, match='sub_norm.weight is not a weight of the LlamaForCausalLM config.json describes'):
        load_hf_checkpoint(broken('llama', lambda c: c.update(model_type='llama')))   # a BitNet model called Llama
    with pytest.raises(HFError, match='no config.json at'):
        load_hf_checkpoint(broken('noconfig', remove='config.json'))
    with pytest.raises(HFError, match='has no model.safetensors'):
        load_hf_checkpoint(broken('noweights', remove='model.safetensors'))
    with pytest.raises(HFError, match=r'gate_proj.weight has shape \(192, 64\), but config.json describes \(256, 64\)'):
        load_hf_checkpoint(broken('shape', lambda c: c.update(intermediate_size=256)))
    d = broken('missing')
    tensors = load_file(os.path.join(d, 'model.safetensors'))
    del tensors['model.layers.1.mlp.up_proj.weight']
    save_file(tensors, os.path.join(d, 'model.safetensors'))
    with pytest.raises(HFError, match='model.layers.1.mlp.up_proj.weight is missing'):
        load_hf_checkpoint(d)
    d = broken('damaged')
    weights = open(os.path.join(d, 'model.safetensors'), 'rb').read()
    open(os.path.join(d, 'model.safetensors'), 'wb').write(weights[:len(weights) // 2])   # truncated
    with pytest.raises(HFError, match='is missing, damaged or not safetensors'):
        load_hf_checkpoint(d)
    for name, damage, message in [('badscale', lambda t: t['model.layers.0.mlp.up_proj.weight_scale'].fill_(-1.0),
                                   'not a positive number'),
                                  ('badcode', lambda t: t['model.layers.0.mlp.up_proj.weight'].fill_(255),
                                   'the 2-bit code 3')]:
        d = tmp_path / name
        shutil.copytree(exports['mha', 'packed'], d)
        tensors = load_file(d / 'model.safetensors')
        damage(tensors)
        save_file(tensors, d / 'model.safetensors')
        with pytest.raises(HFError, match=message):
            load_hf_checkpoint(str(d))
    with pytest.raises(HFError, match="quantized with 'gptq'"):
        load_hf_checkpoint(broken('gptq', lambda c: c.update(quantization_config=dict(quant_method='gptq'))))
    with pytest.raises(HFError, match='no directory at'):
        load_hf_checkpoint(str(tmp_path / 'nowhere'))
    # through sample.py: one line, exit code 2
    r = run('sample.py', f'--ckpt_path=hf:{tmp_path / "mistral"}', '--device=cpu')
    assert r.returncode == 2 and "type 'mistral'" in r.stderr and r.stderr.count('\n') == 1


# -----------------------------------------------------------------------------
# tokenizer

def test_gpt2_tokenizer_export_encodes_like_tiktoken(tmp_path):
    try:
        enc = gpt2_encoding()
    except DataError:
        pytest.skip("tiktoken's GPT-2 files are not available")
    meta = dict(tokenizer='gpt2', vocab_size=enc.n_vocab, dtype='uint16')
    args = dict(block_size=16, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16, intermediate_size=32,
                tie_embeddings=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    save_checkpoint(dict(model=model.state_dict(), model_args=args, tokenizer=meta), str(tmp_path / 'gpt2.pt'))
    r = export(tmp_path / 'gpt2.pt', tmp_path / 'hf')
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['bos_token_id'] == config['eos_token_id'] == 50256
    tok = AutoTokenizer.from_pretrained(tmp_path / 'hf')
    for text in ["Hello world! It's 2024, isn't it?", "ROMEO:\nBut, soft!  what light\n\n through yonder",
                 "naïve café — 東京 🤖 <|endoftext|>"]:
        ids = enc.encode(text, allowed_special={'<|endoftext|>'})
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert len(tok) == enc.n_vocab
    assert load_hf_checkpoint(str(tmp_path / 'hf'))['tokenizer'] == meta
    # a directory without our meta.json decodes with its own tokenizer files (through transformers)
    os.remove(tmp_path / 'hf' / 'meta.json')
    own = load_hf_checkpoint(str(tmp_path / 'hf'))['tokenizer']
    assert own == dict(tokenizer='hf', path=str(tmp_path / 'hf'), vocab_size=enc.n_vocab)
    encode, decode = load_tokenizer(own)
    assert encode("ROMEO:\nBut, soft!") == enc.encode("ROMEO:\nBut, soft!")
    assert decode(enc.encode("ROMEO:\nBut, soft!")) == "ROMEO:\nBut, soft!"


def test_gpt2_tokenizer_files_against_transformers_tiktoken_converter():
    """transformers' TikTokenConverter (extract_vocab_merges_from_model) would replace
    hf.gpt2_tokenizer_files if its files were byte-identical. They are not: its vocab is the same
    map in rank order (ours: tiktoken's byte order, plus <|endoftext|>), and its merges list every
    split of a token into two tokens (108,299 lines) where GPT-2's merges.txt has the one split BPE
    makes (50,000, ours). This test fails when that changes: then switch to the library."""
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode
    try:
        enc = gpt2_encoding()
    except DataError:
        pytest.skip("tiktoken's GPT-2 files are not available")

    class FromEncoding(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _: enc._mergeable_ranks)
    vocab, merges = FromEncoding().extract_vocab_merges_from_model(None)
    ours = gpt2_tokenizer_files(1024)
    assert hf.bytes_to_unicode() == bytes_to_unicode()
    theirs_vocab = {**vocab, '<|endoftext|>': 50256}
    assert json.loads(ours['vocab.json']) == theirs_vocab
    assert ours['vocab.json'] != json.dumps(theirs_vocab, ensure_ascii=False)   # the order of the keys
    our_merges = ours['merges.txt'].splitlines()
    their_merges = [f'{a} {b}' for a, b in merges]
    assert our_merges[0] == '#version: 0.2' and len(our_merges) - 1 == 50000 == enc.n_vocab - 257
    assert len(their_merges) == 108299
    assert our_merges[1:8] == ['Ġ t', 'Ġ a', 'h e', 'i n', 'r e', 'o n', 'Ġt he']   # GPT-2's merges.txt
    assert their_merges[:7] == ['Ġ t', 'Ġ a', 'h e', 'i n', 'r e', 'o n', 'Ġ the']
    remaining = iter(their_merges)
    assert all(m in remaining for m in our_merges[1:])   # ours: a subsequence of theirs, in the same order
