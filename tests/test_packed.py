import io
import math
import os

import pytest
import torch

from bitlinear import pack_ternary, quantize_weight, unpack_ternary
from checkpoint import load_checkpoint, save_checkpoint, save_packed
from conftest import integer_layers, run
from model import GPT, GPTConfig
from ops import packed_linear_reference
from packed import PackedLinear, is_packed, load_packed, pack_model, packed_state_dict, verify_packed


def make(**kw):
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=40, n_layer=2, n_head=4, n_embd=64, quant='b1.58')
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


@pytest.mark.parametrize('kw', [{}, {'n_kv_head': 2}, {'tie_embeddings': True}])
def test_packed_model_equals_training_form(kw):
    """Packed logits equal the training form's computed through the integer line, bit for bit on
    the CPU. (Training's own dequantized product differs from it by float rounding, which can flip
    an activation that sits on a rounding boundary in a later layer; verify_bitlinear checks that
    form layer by layer.)"""
    model = make(**kw)
    idx = torch.randint(40, (3, 32))
    with torch.no_grad():
        with integer_layers(model):
            ref, _ = model(idx, idx)
            greedy = model.generate(idx[:, :4], 40, temperature=0)
        assert pack_model(model) is model
        out, _ = model(idx, idx)
        assert torch.equal(model.generate(idx[:, :4], 40, temperature=0), greedy)
    assert is_packed(model)
    assert torch.equal(out, ref)   # the same integer products and rescaling
    assert not any(n.endswith('_proj.weight') for n, _ in model.named_parameters())   # no latent weights


def test_packed_model_decodes_through_the_static_cache():
    """The engine's cache on a packed model: the fused qkv goes to the decode_attention op as it is."""
    from engine import StaticKVCache
    model = pack_model(make(n_kv_head=2))
    prompt = torch.randint(40, (2, 5))
    with torch.no_grad():
        expected = model.generate(prompt, 12, temperature=0)
        cache = StaticKVCache(model.config, 2, 20, 'cpu', torch.float32)
        idx = prompt
        logits, _ = model(prompt, kv_cache=cache)
        for _ in range(12):
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            logits, _ = model(idx[:, -1:], kv_cache=cache)
    assert torch.equal(idx, expected)


def test_fused_gate_up_layout_and_epilogues():
    g = torch.Generator().manual_seed(0)
    gate = torch.randint(-1, 2, (6, 5), generator=g, dtype=torch.int8)
    up = torch.randint(-1, 2, (6, 5), generator=g, dtype=torch.int8)
    layer = PackedLinear([(gate, torch.tensor(0.5)), (up, torch.tensor(0.25))], 'relu2')
    assert layer.packed.shape == (3, 5) and layer.out_features == 6
    # packed row r holds gate[r], gate[r + 3], up[r], up[r + 3]
    assert torch.equal(unpack_ternary(layer.packed, 12), torch.cat([gate, up]))
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0]])
    x_int = torch.round(x * 127 / 3)   # s_x = 127 / max|x|
    y_gate = (x_int @ gate.float().t()) * (0.5 / (127 / 3))
    y_up = (x_int @ up.float().t()) * (0.25 / (127 / 3))
    assert torch.allclose(layer(x), torch.relu(y_gate) ** 2 * y_up, atol=1e-6)
    res = torch.randn(1, 6)
    single = PackedLinear([(gate, torch.tensor(0.5))], 'residual')
    assert torch.allclose(single(x, residual=res), y_gate + res, atol=1e-6)


def test_packed_linear_applies_its_norm():
    from bitlinear import BitLinear, RMSNorm, integer_forward
    torch.manual_seed(0)
    layer = BitLinear(16, 7)
    norm = RMSNorm(16)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    packed = PackedLinear([quantize_weight(layer.weight)])
    assert torch.equal(packed(x, norm), integer_forward(layer, norm(x)))
    assert torch.allclose(packed(x, norm), layer(norm(x)), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_in_hugging_face_layout(tmp_path):
    model = make(n_kv_head=2)
    weights = {n: quantize_weight(m.weight) for n, m in model.named_modules() if n.endswith('_proj')}
    idx = torch.randint(40, (2, 20))
    pack_model(model)
    with torch.no_grad():
        out, _ = model(idx, idx)
    path = str(tmp_path / 'packed.pt')
    save_packed(model, path, tokenizer={'tokenizer': 'char', 'chars': 'ab'})
    state = torch.load(path, weights_only=True)['packed']
    k = state['model.layers.1.self_attn.k_proj.weight']
    assert k.dtype == torch.uint8 and k.shape == (8, 64)          # (ceil(32 / 4), 64): 2 kv heads of 16
    assert state['model.layers.1.self_attn.k_proj.weight_scale'].shape == (1,)
    for name, (w_t, s_w) in weights.items():                       # every projection, exactly
        assert torch.equal(state[f'{name}.weight'], pack_ternary(w_t))
        assert state[f'{name}.weight_scale'].item() == s_w.item()
    assert 'model.layers.0.mlp.ffn_sub_norm.weight' in state and 'lm_head.weight' in state
    loaded = load_packed(load_checkpoint(path))
    with torch.no_grad():
        out2, _ = loaded(idx, idx)
    assert torch.equal(out2, out)
    assert packed_state_dict(loaded).keys() == state.keys()


def test_memory_is_about_two_bits_per_weight():
    model = pack_model(GPT(GPTConfig(n_layer=1, vocab_size=65)))   # the shakespeare_char width, 384
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    n_weights = sum(sum(m.out_sizes) * m.in_features for m in layers)
    bits = 8 * sum(m.packed.numel() + m.row_scale.numel() * 4 for m in layers) / n_weights
    assert 2.0 < bits < 2.1


def test_verify_packed_flags_an_invalid_code():
    model = pack_model(make())
    idx = torch.randint(40, (1, 16))
    report = verify_packed(model, idx)
    assert report['ok'] and report['max_diff'] == 0 and report['n_layers'] == 14
    model.model.layers[1].down.packed[0, 0] = 0b11   # code 3 in rows 0 of the first block
    report = verify_packed(model, idx)
    assert not report['ok']
    assert [r['name'] for r in report['rows'] if not r['ok']] == ['model.layers.1.down']


def test_reference_op_epilogue_shapes():
    x = torch.randn(2, 8)
    w_t = torch.randint(-1, 2, (5, 8), dtype=torch.int8)
    packed = pack_ternary(w_t)
    scale = torch.zeros(8)
    scale[:5] = 0.1
    y = packed_linear_reference(x, torch.empty(0), packed, scale, torch.empty(0), 5, 0, 1e-5)
    x_int = torch.round(x * 127 / x.abs().amax(-1, keepdim=True))
    assert torch.allclose(y, (x_int @ w_t.float().t()) * 0.1 / (127 / x.abs().amax(-1, keepdim=True)), atol=1e-6)


def test_pack_and_sample_from_the_packed_file(tmp_path, trained_ckpt):
    r = run('pack.py', f'--out_dir={trained_ckpt}')
    assert r.returncode == 0, r.stderr
    path = os.path.join(trained_ckpt, 'ckpt_packed.pt')
    assert os.path.getsize(path) < os.path.getsize(os.path.join(trained_ckpt, 'ckpt.pt')) / 5
    r = run('sample.py', f'--ckpt_path={path}', '--num_samples=1', '--max_new_tokens=30', '--device=cpu',
            '--temperature=0', '--start=ROMEO:')
    assert r.returncode == 0, r.stderr
    assert 'packed' in r.stdout and 'PASS' in r.stdout and 'max |diff| 0 ' in r.stdout
    packed_text = r.stdout.split('PASS\n', 1)[1]
    r = run('sample.py', f'--out_dir={trained_ckpt}', '--num_samples=1', '--max_new_tokens=30', '--device=cpu',
            '--temperature=0', '--start=ROMEO:')
    assert r.stdout.split('PASS\n', 1)[1] == packed_text     # greedy text equals the training form's

    ckpt = torch.load(path, weights_only=True)
    ckpt['packed']['model.layers.0.mlp.up_proj.weight'][1, 1] = 0xFF   # four invalid codes
    bad = str(tmp_path / 'bad_codes.pt')
    save_checkpoint(ckpt, bad)
    r = run('sample.py', f'--ckpt_path={bad}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 1 and 'FAIL' in r.stdout and 'model.layers.0.gate_up' in r.stdout
    del ckpt['packed']['model.layers.1.self_attn.o_proj.weight_scale']
    missing = str(tmp_path / 'missing.pt')
    save_checkpoint(ckpt, missing)
    r = run('sample.py', f'--ckpt_path={missing}', '--device=cpu')
    assert r.returncode == 2
    assert r.stderr.startswith('error: ') and 'model.layers.1.self_attn.o_proj is missing' in r.stderr


def test_pack_refuses_what_it_cannot_pack(tmp_path, trained_ckpt):
    r = run('pack.py', f'--ckpt_path={trained_ckpt / "ckpt_packed.pt"}', f'--packed_path={tmp_path / "x.pt"}')
    assert r.returncode == 2 and ('already packed' in r.stderr or 'no checkpoint' in r.stderr)
    r = run('pack.py', f'--out_dir={tmp_path}')
    assert r.returncode == 2 and 'no checkpoint at' in r.stderr
    r = run('pack.py', f'--out_dir={trained_ckpt}', f'--packed_path={trained_ckpt / "ckpt.pt"}')
    assert r.returncode == 2 and 'would replace its source' in r.stderr


def test_pack_replaces_only_a_packed_file_unless_told(tmp_path, trained_ckpt):
    dst = tmp_path / 'p.pt'
    dst.write_text('my notes')
    r = run('pack.py', f'--out_dir={trained_ckpt}', f'--packed_path={dst}')
    assert r.returncode == 2 and 'pass --overwrite=True' in r.stderr and dst.read_text() == 'my notes'
    assert run('pack.py', f'--out_dir={trained_ckpt}', f'--packed_path={dst}', '--overwrite=True').returncode == 0
    first = dst.read_bytes()
    assert first.startswith(b'PK')                    # a torch zip file now
    r = run('pack.py', f'--out_dir={trained_ckpt}', f'--packed_path={dst}')   # an earlier packed file: replaced
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(dst, weights_only=True)['packed']['model.layers.0.mlp.up_proj.weight'],
                       torch.load(io.BytesIO(first), weights_only=True)['packed']['model.layers.0.mlp.up_proj.weight'])


def test_bench_runs_on_cpu_in_seconds():
    r = run('bench.py', '--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16',
            '--batch_size=2', '--warmup=1', '--rounds=1', '--steps_per_round=2')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = {l.split()[0]: l.split() for l in lines if l.split() and l.split()[0] in ('none', 'b1.58', 'b1')}
    assert set(rows) == {'none', 'b1.58', 'b1'} and rows['none'][2] == '1.000x'
    assert float(rows['b1.58'][1]) > 0

def test_bench_decode_on_cpu(tmp_path):
    """The three models on the same weights: the training form and the packed model pick the same
    greedy tokens; the packed file's own process reports its resident memory."""
    r = run('bench.py', '--mode=decode', '--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--new_tokens=6', '--prompt_len=3', '--repeats=1', f'--packed_file={tmp_path / "p.pt"}')
    assert r.returncode == 0, r.stderr
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if len(l.split()) == 11 and 'MiB' in l}
    assert set(rows) == {'training', 'packed', 'float'}
    # bits per weight (32 wide: a scale per row is 1 bit); the training form holds its float weights
    # and, after its first forward, the eval cache's codes and scales
    assert 34.0 < float(rows['training'][5]) < 35.0 and 2.0 < float(rows['packed'][5]) < 3.0
    assert 'training form: its first forward (one token, quantizing and packing every weight' in r.stdout
    assert 'training form and packed: the same greedy tokens for the first 6 of 6' in r.stdout
    assert 'a fresh process' in r.stdout and 'MiB resident' in r.stdout
    r = run('bench.py', '--mode=decode', '--device=cpu', '--variants=packed,fast')
    assert r.returncode == 2 and r.stderr.startswith('error: variants must be')


def test_bench_refusals():
    r = run('bench.py', '--quants=none,b2')
    assert r.returncode == 2 and 'quants must be' in r.stderr
    r = run('bench.py', '--mode=layer', '--device=cpu')
    assert r.returncode == 2 and r.stderr.startswith('error: mode=layer times the CUDA kernels') and not r.stdout
    r = run('bench.py', '--mode=layer', '--rows=1,x')
    assert r.returncode == 2 and r.stderr == "error: rows must be a comma-separated list of positive integers, got '1,x'\n"
    r = run('bench.py', '--device=cpu', '--cuda_graphs=True')
    assert r.returncode == 2
    assert r.stderr == "error: cuda_graphs=True needs compile=True on a CUDA GPU: drop --cuda_graphs=True\n"
