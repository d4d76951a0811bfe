"""The engine's batched decoding (each sequence at its own position) and its int8 lm_head, run
eagerly on the CPU (test_model.eager_capture stands in for CUDA graphs), against model.generate."""

import pytest
import torch

from model import GPT, GPTConfig, rotary_tables
from ops import decode_attention_reference, lm_head_argmax, quantize_head
from test_model import eager_capture


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()


def batched_engine(monkeypatch, model, batch_size, **kw):
    from engine import Engine
    monkeypatch.setattr(Engine, '_capture', eager_capture)
    return Engine(model, batch_size=batch_size, max_len=40, dtype=torch.float32, compile=False, **kw)


def test_batched_prompts_of_different_lengths_equal_generate_per_sequence(monkeypatch, tiny):
    engine = batched_engine(monkeypatch, tiny, 3)
    lengths = [5, 2, 7]
    prompt = torch.randint(50, (3, 7))   # right-padded with random tokens, which must not matter
    for n in (12, 1, 9):                 # 12 and 9: the graph of 8 steps, then single steps
        got = engine.generate(prompt, n, lengths=lengths)
        assert got.shape == (3, 7 + n)
        for b, L in enumerate(lengths):
            with torch.no_grad():
                expected = tiny.generate(prompt[b:b + 1, :L], n, temperature=0)[0]
            assert torch.equal(got[b, :L + n], expected), (n, b)
            assert got[b, L + n:].eq(0).all()
    assert engine.cache.pos.tolist() == [L + 8 for L in lengths]   # the last token's position + 1
    # the same prompts without lengths: all at position 7
    with torch.no_grad():
        assert torch.equal(engine.generate(prompt, 6), tiny.generate(prompt, 6, temperature=0))


def test_batched_lengths_are_checked(monkeypatch, tiny):
    engine = batched_engine(monkeypatch, tiny, 2)
    for bad in ([0, 3], [3, 4], [3]):
        with pytest.raises(ValueError, match='lengths must hold 2 prompt lengths from 1 to 3'):
            engine.generate(torch.zeros(2, 3, dtype=torch.long), 4, lengths=bad)


def test_decode_attention_reference_at_a_position_per_sequence():
    """Positions (B,) give each sequence what a call with its own 0-d position gives it."""
    g = torch.Generator().manual_seed(0)
    nh, nkv, hd = 4, 2, 8
    qkv = torch.randn(3, (nh + 2 * nkv) * hd, generator=g)
    k, v = torch.randn(2, 3, nkv, 16, hd, generator=g)
    cos, sin = rotary_tables(hd, 16, 10000.0)
    pos = torch.tensor([3, 0, 11])
    kb, vb = k.clone(), v.clone()
    y = decode_attention_reference(qkv, kb, vb, pos, cos, sin, nh)
    for b in range(3):
        k1, v1 = k[b:b + 1].clone(), v[b:b + 1].clone()
        y1 = decode_attention_reference(qkv[b:b + 1], k1, v1, pos[b], cos, sin, nh)
        torch.testing.assert_close(y[b:b + 1], y1, rtol=1e-6, atol=1e-6)
        assert torch.equal(kb[b], k1[0]) and torch.equal(vb[b], v1[0])   # written at pos[b] only
    assert not torch.equal(kb[2, :, 11], k[2, :, 11]) and torch.equal(kb[2, :, 12:], k[2, :, 12:])


def test_quantize_head_rows_and_the_scaled_op():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0], [2.0, 1.0, -2.0, 0.01]])
    q, scale = quantize_head(w)
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32, 0], [127, 64, -127, 1]]
    assert torch.allclose(scale, torch.tensor([1.0, 2.0]) / 127)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
    logits, token = lm_head_argmax(x, q, scale)
    torch.testing.assert_close(logits, x @ (q.float() * scale[:, None]).T)
    assert token.flatten().tolist() == logits.argmax(-1).tolist()
    # the bound: |x . (w - q s)| <= sum |x| * s / 2
    assert ((logits - x @ w.T).abs() <= x.abs().sum(1, keepdim=True) * scale / 2 + 1e-6).all()


def test_engine_with_an_int8_head_equals_generate_with_the_rounded_head(monkeypatch, tiny):
    prompt = torch.randint(50, (2, 5))
    engine = batched_engine(monkeypatch, tiny, 2, int8_head=True)
    got = engine.generate(prompt, 10)
    q, scale = engine.head
    assert q.dtype == torch.int8
    with torch.no_grad():
        tiny.lm_head.weight.copy_(q.float() * scale[:, None])
        assert torch.equal(got, tiny.generate(prompt, 10, temperature=0))


def test_each_compiled_engine_compiles_its_own_step(monkeypatch, tiny):
    """Every Engine compiles its own copy of Engine._step's code: engines of other batch sizes
    (bench.py builds one per variant) are not recompilations of one code object, which dynamo
    limits (8 by default, 1 here) and fails hard at under fullgraph=True; and an engine never runs
    code compiled for another one (torch 2.11 did, once float_gemv had changed the model)."""
    from engine import Engine
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 1)
    monkeypatch.setattr(Engine, '_capture', eager_capture)
    prompt = torch.randint(50, (3, 4))
    for b in (1, 2, 3):
        engine = Engine(tiny, batch_size=b, max_len=40, dtype=torch.float32, compile=True)
        with torch.no_grad():
            assert torch.equal(engine.generate(prompt[:b], 3), tiny.generate(prompt[:b], 3, temperature=0))
    assert engine.step.__wrapped__.__func__.__code__ is not Engine._step.__code__


def test_weight_bytes_count_what_a_step_reads(tiny):
    """Engine.weight_bytes, by hand for the tiny shape (2 layers of 32 wide, kv 16, MLP 128, vocab 50):
    per layer 15,360 projection weights and 224 norm weights, a final norm of 32, the lm_head
    50 x 32; the embedding left out (a step reads one row of it), a tied one counted once."""
    from engine import Engine
    from packed import pack_model
    weights = 2 * (15360 + 224) + 32
    tied = GPT(tiny.config).eval()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    packed = pack_model(GPT(tiny.config).eval())
    engine = lambda model, **kw: Engine(model, max_len=8, dtype=torch.bfloat16, compile=False, **kw)
    assert engine(tiny).weight_bytes() == 2 * (weights + 50 * 32)
    assert engine(tied).weight_bytes() == 2 * (weights + 50 * 32)
    assert engine(tiny, int8_head=True).weight_bytes() == 2 * weights + 50 * 32 + 4 * 50
    # packed: 2-bit codes (4 per byte) and a float32 scale per row of qkv (64), o (32), gate_up (256), down (32)
    assert engine(packed).weight_bytes() == 2 * (15360 // 4 + 4 * 384) + 2 * (2 * 224 + 32) + 2 * 50 * 32


def test_float_gemv_gives_the_float_blocks_the_decode_op_and_takes_it_back(monkeypatch):
    """Engine(float_gemv=True) turns the float model's blocks into DecodeBlock, which without autograd
    runs as torch.ops.bitnet.linear (counted here through a CPU kernel registered for it): input norm
    with q, k, v; sub-norm, o and the residual; norm, gate and up with relu^2; sub-norm, down and the
    residual. float_gemv=False, or a batch of more than one, turns them back. Same tokens either way,
    with and without sub-norms and with silu, and with gradients on a DecodeBlock is a Block: training
    still works."""
    from engine import DecodeBlock
    from model import Block
    from ops import linear_reference
    calls = []

    def counted(x, weights, bias=None, norm_weight=None, residual=None, epilogue=0, eps=0.0):
        calls.append((tuple(x.shape), [tuple(w.shape) for w in weights], bias is not None, norm_weight is not None,
                      residual is not None, epilogue))
        return linear_reference(x, weights, bias, norm_weight, residual, epilogue, eps)
    lib = torch.library.Library('bitnet', 'IMPL')
    lib.impl('linear', counted, 'CPU')
    try:
        for kw in (dict(), dict(sub_norms=False, hidden_act='silu')):
            torch.manual_seed(0)
            model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                  quant='none', bias=True, **kw)).eval()
            prompt = torch.randint(50, (1, 5))
            with torch.no_grad():
                expected = model.generate(prompt, 6, temperature=0)
            calls.clear()
            got = batched_engine(monkeypatch, model, 1, float_gemv=True).generate(prompt, 6)
            layers = model.model.layers
            assert [type(b) for b in layers] == [DecodeBlock] * 2 and type(model.lm_head) is torch.nn.Linear
            assert torch.equal(got, expected)
            sub = 'sub_norms' not in kw
            step = [((1, 1, 32), [(32, 32), (16, 32), (16, 32)], True, True, False, 0),
                    ((1, 1, 32), [(32, 32)], True, sub, True, 1),
                    ((1, 1, 32), [(128, 32), (128, 32)], True, True, False, 2 if sub else 0),
                    ((1, 1, 128), [(32, 128)], True, sub, True, 1)]
            assert calls[-8:] == step * 2 and len(calls) % 4 == 0
            model.train()
            loss = model(prompt, prompt)[1]
            loss.backward()
            assert layers[0].mlp.up_proj.weight.grad is not None and layers[0].mlp.up_proj.bias.grad is not None
            model.eval()
            calls.clear()
            assert torch.equal(batched_engine(monkeypatch, model, 1, float_gemv=False).generate(prompt, 6), expected)
            assert calls == [] and [type(b) for b in layers] == [Block] * 2
            assert not batched_engine(monkeypatch, model, 2, float_gemv=True).float_gemv   # a batch: cuBLAS
            assert [type(b) for b in layers] == [Block] * 2
    finally:
        del lib
