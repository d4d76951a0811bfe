import math
import os

import pytest
import torch
import torch.nn as nn

from bitlinear import BitLinear, BitLinear1b
from engine import StaticKVCache
from model import GPT, GPTConfig, KVCache, apply_rotary, rotary_tables


def make(quant='b1.58', **kw):
    torch.manual_seed(0)
    args = dict(block_size=24, vocab_size=30, n_layer=2, n_head=4, n_embd=32, quant=quant)
    args.update(kw)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize('quant,layer_type', [('b1.58', BitLinear), ('b1', BitLinear1b), ('none', nn.Linear)])
def test_forward_backward_all_quant_modes(quant, layer_type):
    model = make(quant)
    projections = [m for n, m in model.named_modules() if n.endswith('_proj')]
    assert len(projections) == 14 and all(type(m) is layer_type for m in projections)
    idx = torch.randint(30, (3, 24))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 24, 30)
    assert abs(loss.item() - math.log(30)) < 0.3   # near-uniform predictions at initialization
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_state_dict_names_are_hugging_face_names():
    model = make(n_kv_head=2)
    keys = set(model.state_dict())
    layer = {'input_layernorm.weight', 'post_attention_layernorm.weight', 'self_attn.attn_sub_norm.weight',
             'mlp.ffn_sub_norm.weight'} | {f'self_attn.{p}_proj.weight' for p in 'qkvo'} \
        | {f'mlp.{p}_proj.weight' for p in ('gate', 'up', 'down')}
    expected = {'model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'} \
        | {f'model.layers.{i}.{k}' for i in range(2) for k in layer}
    assert keys == expected
    sd = model.state_dict()
    assert sd['model.layers.0.self_attn.k_proj.weight'].shape == (16, 32)  # 2 kv heads of 8
    assert sd['model.layers.0.mlp.gate_proj.weight'].shape == (128, 32)    # 8/3 * 32 -> 128 (multiple of 64)


def test_tied_embeddings_share_one_tensor():
    model = make(tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_num_params(non_embedding=True) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('quant', ['b1.58', 'b1', 'none'])
@pytest.mark.parametrize('n_kv_head', [4, 1])
def test_kv_cache_generation_equals_uncached(quant, n_kv_head):
    model = make(quant, n_kv_head=n_kv_head).eval()
    prompt = torch.randint(30, (2, 5))
    # 40 new tokens run past block_size (24): the window slides and the cache is refilled
    cached = model.generate(prompt, 40, temperature=0)
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize('n_kv_head', [4, 2])
def test_static_cache_decoding_equals_generate(n_kv_head):
    """The engine's cache (position in a tensor, masked attention, the decode_attention op)."""
    model = make(n_kv_head=n_kv_head).eval()
    prompt = torch.randint(30, (2, 5))
    expected = model.generate(prompt, 15, temperature=0)
    cache = StaticKVCache(model.config, 2, 24, 'cpu', torch.float32)
    idx = prompt
    with torch.no_grad():
        logits, _ = model(prompt, kv_cache=cache)
        for _ in range(15):
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            logits, _ = model(idx[:, -1:], kv_cache=cache)
    assert cache.pos.tolist() == [20, 20]
    assert torch.equal(idx, expected)


def test_chunked_prefill_matches_full_forward():
    model = make().eval()
    idx = torch.randint(30, (2, 20))
    with torch.no_grad():
        full, _ = model(idx, idx)  # logits at every position
        cache = KVCache(model.config, 2, 24, 'cpu', torch.float32)
        a, _ = model(idx[:, :12], kv_cache=cache)
        b, _ = model(idx[:, 12:], kv_cache=cache)   # a chunk after a prefix: the masked path
    assert cache.pos == 20
    assert torch.allclose(a[:, -1], full[:, 11], atol=1e-5)
    assert torch.allclose(b[:, -1], full[:, 19], atol=1e-5)


def test_rotary_is_a_rotation_of_pairs_i_and_i_plus_half():
    cos, sin = rotary_tables(4, 3, theta=10000.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y[0, 0, 0], x[0, 0, 0])    # position 0 is not rotated
    # position 1, frequency 1 on the pair (x0, x2) = (1, 3): (cos1 - 3 sin1, 3 cos1 + sin1)
    c, s = math.cos(1.0), math.sin(1.0)
    assert y[0, 0, 1, 0].item() == pytest.approx(c - 3 * s, abs=1e-6)
    assert y[0, 0, 1, 2].item() == pytest.approx(3 * c + s, abs=1e-6)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_optimizer_decays_only_matrices():
    model = make()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert len(decay['params']) == 2 * 7 + 2 and len(no_decay['params']) == 2 * 4 + 1


def test_flops_per_token_and_mfu():
    model = make()
    # matmul weights: 2 layers x (4 * 32*32 + 3 * 32*128) + lm_head 30*32
    n = 2 * (4 * 32 * 32 + 3 * 32 * 128) + 30 * 32
    assert model.flops_per_token(24) == 6 * n + 12 * 2 * 32 * 24
    assert model.estimate_mfu(1000, 24, 0.5, None) is None
    assert model.estimate_mfu(1000, 24, 0.5, 1e9) == pytest.approx(model.flops_per_token(24) * 1000 / 0.5 / 1e9)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match='quant'):
        GPTConfig(quant='b2')
    with pytest.raises(ValueError, match='divisible'):
        GPTConfig(n_embd=30, n_head=4)


def eager_capture(engine, fn):
    """Engine._capture without CUDA: the 'graph' calls fn again on each replay and copies its
    output into the first run's, as a replayed graph refills its static output."""
    pos = engine.cache.pos.clone()
    out = fn()
    engine.cache.pos.copy_(pos)
    graph = type('EagerGraph', (), {})()

    def replay():
        again = fn()
        if out is not None:   # (logits, token) of a step or a prefill
            for static, new in zip(out, again):
                static.copy_(new)
    graph.replay = replay
    return graph, out


def eager_engine(monkeypatch, max_len):
    """A tiny float32 GPT and an Engine for batches of 2 whose graphs are eager_capture's."""
    from engine import Engine
    monkeypatch.setattr(Engine, '_capture', eager_capture)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    return model, Engine(model, batch_size=2, max_len=max_len, dtype=torch.float32, compile=False)


@pytest.mark.parametrize('max_len', [40, 14])   # 14: fewer positions than Engine.STEPS + 1 after the prompt
def test_engine_greedy_loop_on_the_gpu_equals_generate(monkeypatch, max_len):
    """The engine's bookkeeping, run eagerly on the CPU: graphs of 1 and of STEPS greedy steps,
    captured from position 0 before the prompt, then as many replays as the tokens need."""
    from engine import Engine
    model, engine = eager_engine(monkeypatch, max_len)
    prompt = torch.randint(50, (2, 5))
    for n in (1, 8, 9, max_len - 5, 0, 3):
        with torch.no_grad():
            expected = model.generate(prompt, n, temperature=0)
        assert torch.equal(engine.generate(prompt, n), expected), n
    assert engine.steps == min(Engine.STEPS, max_len - 1)


def test_engine_sampling_equals_generate(monkeypatch):
    """The engine's sampling loop (temperature > 0: the step's logits from lm_head_argmax, drawn on
    the host), run eagerly on the CPU, draws the same tokens as model.generate from the same seed."""
    model, engine = eager_engine(monkeypatch, 40)
    prompt = torch.randint(50, (2, 5))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = model.generate(prompt, 30, temperature=0.8, top_k=10)
    torch.manual_seed(1)
    got = engine.generate(prompt, 30, temperature=0.8, top_k=10)
    assert torch.equal(got, expected)
    assert not torch.equal(got, engine.generate(prompt, 30))   # greedy decoding picks other tokens


# --- the BitLinear options (act_bits, bias, before_nonlinear) ----------------------------

@pytest.mark.parametrize('quant,layer_type', [('b1.58', BitLinear), ('b1', BitLinear1b)])
def test_options_reach_the_projections(quant, layer_type):
    model = make(quant, act_bits=4, bias=True, before_nonlinear=True)
    projections = {n: m for n, m in model.named_modules() if n.endswith('_proj')}
    assert all(type(m) is layer_type and m.config.act_bits == 4 for m in projections.values())
    assert all(m.bias is not None and m.bias.abs().sum() == 0 for m in projections.values())   # zeros at init
    assert sorted(n for n, m in projections.items() if m.config.before_nonlinear) == \
        ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']   # the input that follows relu^2
    idx = torch.randint(30, (2, 24))
    model(idx, idx)[1].backward()
    assert all(m.bias.grad.abs().sum() > 0 for m in projections.values())


def test_option_errors_and_the_float_baseline():
    assert all(m.bias is not None for n, m in make('none', bias=True).named_modules() if n.endswith('_proj'))
    with pytest.raises(ValueError, match="quant='none' has none"):
        GPTConfig(quant='none', act_bits=4)
    with pytest.raises(ValueError, match='act_bits must be an integer from 2 to 8'):
        make(act_bits=1)
    assert GPTConfig(act_bits=4, bias=True).nonstandard_options() == 'act_bits=4, bias=True'
    assert GPTConfig().nonstandard_options() == ''


def test_options_are_saved_in_checkpoints_and_old_ones_load(tmp_path):
    from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    model = make('b1', act_bits=5, bias=True, before_nonlinear=True)
    args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    save_checkpoint(dict(model=model.state_dict(), model_args=args), str(tmp_path / 'new.pt'))
    again = model_from_checkpoint(load_checkpoint(str(tmp_path / 'new.pt')))
    down = again.model.layers[1].mlp.down_proj
    assert (down.config.act_bits, down.config.before_nonlinear, down.bias is not None) == (5, True, True)
    idx = torch.randint(30, (2, 24))
    assert torch.equal(again(idx, idx)[0], model(idx, idx)[0])
    # a checkpoint written before these fields existed: its model_args lack them, the defaults apply
    old = {k: v for k, v in args.items() if k not in ('act_bits', 'bias', 'before_nonlinear')}
    plain = make('b1')
    save_checkpoint(dict(model=plain.state_dict(), model_args=old), str(tmp_path / 'old.pt'))
    loaded = model_from_checkpoint(load_checkpoint(str(tmp_path / 'old.pt')))
    assert (loaded.config.act_bits, loaded.config.bias, loaded.config.before_nonlinear) == (8, False, False)


def test_pack_and_hf_config_refuse_what_their_formats_cannot_hold():
    from hf import HFError, hf_config
    from packed import pack_model
    model = make(act_bits=4, before_nonlinear=True)
    with pytest.raises(ValueError, match=r'^a model with act_bits=4, before_nonlinear=True cannot be packed: '):
        pack_model(model)
    args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    with pytest.raises(HFError, match=r"^a model with bias=True cannot be exported: transformers' BitNet"):
        hf_config({**args, 'act_bits': 8, 'before_nonlinear': False, 'bias': True}, 'master', 'float32', None)


def test_train_sample_pack_export_with_every_option(tmp_path, corpus_dir):
    """A tiny W1.58A4 run with biases and before_nonlinear: sample.py's verification compares every
    layer with the integer line and PASSes; pack.py and export.py refuse it with one line."""
    from conftest import TINY, run
    out = tmp_path / 'out'
    r = run('train.py', *TINY, f'--data_dir={corpus_dir}', '--dataset=tiny', f'--out_dir={out}', '--max_iters=4',
            '--eval_interval=4', '--act_bits=4', '--bias=True', '--before_nonlinear=True')
    assert r.returncode == 0, r.stderr
    r = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'PASS' in r.stdout
    options = 'act_bits=4, bias=True, before_nonlinear=True'
    r = run('pack.py', f'--out_dir={out}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert r.stderr.startswith(f'error: {out}/ckpt.pt: a model with {options} cannot be packed')
    r = run('export.py', f'--out_dir={out}', f'--to={tmp_path / "hf"}')
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and not os.path.exists(tmp_path / 'hf')
    assert r.stderr.startswith(f'error: {out}/ckpt.pt: a model with {options} cannot be exported')
