"""GPU-only checks (the Triton kernel, the CUDA-graph engine); skipped without CUDA.
Run on a GPU machine with: python -m pytest -q tests/test_cuda.py"""

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def random_packed_inputs(M, K, out, epilogue, dtype, norm, seed):
    from bitlinear import pack_ternary
    g = torch.Generator().manual_seed(seed)
    rows = 2 * out if epilogue == 2 else out
    w_t = torch.randint(-1, 2, (rows, K), generator=g, dtype=torch.int8)
    packed = pack_ternary(w_t)
    scale = torch.zeros(4 * packed.size(0))
    scale[:rows] = torch.rand(rows, generator=g) * 0.05 + 0.01
    x = torch.randn(M, K, generator=g) * 3
    norm_weight = torch.rand(K, generator=g) + 0.5 if norm else torch.empty(0)
    residual = torch.randn(M, out, generator=g) if epilogue == 1 else torch.empty(0)
    to = lambda t, d=None: t.to('cuda', d) if d is not None else t.to('cuda')
    return (to(x, dtype), to(norm_weight, dtype) if norm else to(norm_weight), to(packed), to(scale),
            to(residual, dtype) if epilogue == 1 else to(residual), out, epilogue, 1e-5)


@pytest.mark.parametrize('K,out,epilogue', [(2560, 3840, 0), (2560, 2560, 1), (2560, 6912, 2), (6912, 2560, 1)])
def test_row_configs_give_the_autotuned_kernel_s_outputs(K, out, epilogue, monkeypatch):
    """The 2B4T shapes of ternary_kernels.ROW_CONFIGS (qkv, o, gate+up, down) against another configuration
    of the same kernel: the same activations and exact integer sums, so the same bfloat16 outputs."""
    import ternary_kernels
    from ops import packed_linear
    args = random_packed_inputs(1, K, out, epilogue, torch.bfloat16, True, seed=K + out)
    assert (args[2].size(0), K) in ternary_kernels.ROW_CONFIGS
    y = packed_linear(*args)
    monkeypatch.setitem(ternary_kernels.ROW_CONFIGS, (args[2].size(0), K), (4, 2, 4, 1))
    assert torch.equal(packed_linear(*args), y)


@pytest.mark.parametrize('M', [1, 3, 40])
@pytest.mark.parametrize('K,out', [(64, 64), (200, 13), (2560, 96), (202, 8), (8200, 24)])   # 202: the fallback; 8200: the loop kernel
@pytest.mark.parametrize('epilogue', [0, 1, 2])
def test_kernel_matches_reference_without_norm(M, K, out, epilogue):
    from ops import packed_linear, packed_linear_reference
    if epilogue == 2 and out % 2:
        out += 1
    args = random_packed_inputs(M, K, out, epilogue, torch.float32, False, seed=M * K + out + epilogue)
    y = packed_linear(*args)
    ref = packed_linear_reference(*args)
    assert y.shape == ref.shape == (M, out)
    # no norm: the same int8 activations and exact integer sums, so equal to float32 rounding
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('epilogue', [0, 1, 2])
def test_kernel_matches_reference_with_norm(dtype, epilogue):
    from ops import packed_linear, packed_linear_reference
    args = random_packed_inputs(1, 2560, 640, epilogue, dtype, True, seed=7 + epilogue)
    y, ref = packed_linear(*args).float(), packed_linear_reference(*args).float()
    # the kernel's rsqrt may differ from F.rms_norm's in the last bit, which can move an
    # activation across a rounding boundary now and then: nearly all outputs agree exactly
    close = torch.isclose(y, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert close.float().mean().item() > 0.99
    assert (y - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('nh,nkv,hd', [(4, 4, 64), (20, 5, 128), (12, 1, 64)])
@pytest.mark.parametrize('pos', [0, 63, 64, 200])
def test_decode_attention_kernel_matches_reference(dtype, nh, nkv, hd, pos):
    import ternary_kernels  # noqa: F401
    from model import rotary_tables
    from ops import decode_attention, decode_attention_reference
    g = torch.Generator(device='cuda').manual_seed(pos + nh)
    qkv = torch.randn(2, (nh + 2 * nkv) * hd, device='cuda', generator=g).to(dtype)
    k = torch.randn(2, nkv, 256, hd, device='cuda', generator=g).to(dtype)
    v = torch.randn(2, nkv, 256, hd, device='cuda', generator=g).to(dtype)
    k[:, :, pos + 1:] = float('nan')   # positions past pos must not be read
    v[:, :, pos + 1:] = float('nan')
    cos, sin = [t.cuda() for t in rotary_tables(hd, 256, 10000.0)]
    p = torch.tensor(pos, device='cuda')
    k_ref, v_ref = k[:, :, :pos + 1].clone(), v[:, :, :pos + 1].clone()
    y = decode_attention(qkv, k, v, p, cos, sin, nh)
    ref = decode_attention_reference(qkv, k_ref, v_ref, p, cos, sin, nh)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k[:, :, pos].float(), k_ref[:, :, pos].float(), rtol=tol, atol=tol)   # rotated k written
    torch.testing.assert_close(v[:, :, pos], v_ref[:, :, pos])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_at_a_position_per_sequence(dtype):
    import ternary_kernels  # noqa: F401
    from model import rotary_tables
    from ops import decode_attention, decode_attention_reference
    g = torch.Generator(device='cuda').manual_seed(3)
    nh, nkv, hd, B = 20, 5, 128, 4
    pos = torch.tensor([0, 63, 200, 129], device='cuda')
    qkv = torch.randn(B, (nh + 2 * nkv) * hd, device='cuda', generator=g).to(dtype)
    k = torch.randn(B, nkv, 256, hd, device='cuda', generator=g).to(dtype)
    v = torch.randn(B, nkv, 256, hd, device='cuda', generator=g).to(dtype)
    for b, p in enumerate(pos.tolist()):
        k[b, :, p + 1:] = float('nan')   # positions past a sequence's own must not be read
        v[b, :, p + 1:] = float('nan')
    cos, sin = [t.cuda() for t in rotary_tables(hd, 256, 10000.0)]
    k_ref, v_ref = k.nan_to_num(), v.nan_to_num()
    y = decode_attention(qkv, k, v, pos, cos, sin, nh)
    ref = decode_attention_reference(qkv, k_ref, v_ref, pos, cos, sin, nh)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    for b, p in enumerate(pos.tolist()):
        torch.testing.assert_close(k[b, :, p].float(), k_ref[b, :, p].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize('int8', [False, True], ids=['float', 'int8'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('B,V,C', [(1, 128256, 2560), (2, 50257, 768), (3, 80, 128), (16, 50257, 768)])
def test_lm_head_kernel_matches_reference(dtype, B, V, C, int8):
    import ternary_kernels  # noqa: F401
    from ops import lm_head_argmax, lm_head_argmax_reference, quantize_head
    g = torch.Generator(device='cuda').manual_seed(V)
    x = torch.randn(B, C, device='cuda', generator=g).to(dtype)
    w = (torch.randn(V, C, device='cuda', generator=g) * 0.02).to(dtype)
    scale = None
    if int8:
        w, scale = quantize_head(w)
    ref_logits, ref_token = lm_head_argmax_reference(x, w, scale)
    logits, token = lm_head_argmax(x, w, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=tol, atol=tol)
    assert torch.equal(token, logits.argmax(dim=-1, keepdim=True))   # the first maximum of its own logits
    ties = [V // 3, V // 2, V - 1]
    w[ties] = x.float().sum(0).to(dtype) if not int8 else 127   # three equal rows: the largest logit of every row
    if int8:
        x = x.abs()
        scale[ties] = 1.0
    for _ in range(2):   # again: the done-counts are back at 0
        logits, token = lm_head_argmax(x, w, scale)
        assert token.flatten().tolist() == [V // 3] * B


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('sizes,K,bias', [([2560], 2560, False), ([640], 2560, True), ([6912], 2560, False),
                                          ([2560], 6912, True), ([13], 200, True), ([3], 8192, False),
                                          ([2560, 640, 640], 2560, True), ([6912, 6912], 2560, False),
                                          ([12, 20, 7], 200, True)])
def test_float_linear_kernel_matches_reference(dtype, sizes, K, bias):
    """bitnet::linear on CUDA: the Triton GEMV for one row of x and weights side by side (12 rows:
    tiles of 4), against F.linear in float32 from the same inputs, within the rounding to dtype;
    more rows, and rows past 8192 inputs, are ops.linear_reference itself."""
    import ternary_kernels  # noqa: F401
    from ops import linear, linear_reference
    g = torch.Generator(device='cuda').manual_seed(sum(sizes) + K)
    ws = [(torch.randn(n, K, device='cuda', generator=g) * 0.02).to(dtype) for n in sizes]
    b = torch.randn(sum(sizes), device='cuda', generator=g).to(dtype) if bias else None
    x = torch.randn(1, 1, K, device='cuda', generator=g).to(dtype)
    ref = F.linear(x.float(), torch.cat(ws).float(), None if b is None else b.float())
    y = linear(x, ws, b)
    assert y.shape == (1, 1, sum(sizes)) and y.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((y.float() - ref).abs() <= eps * ref.abs() + 1e-5 * K ** 0.5).all()   # half an ulp, and float32 sums
    x3 = torch.randn(3, K, device='cuda', generator=g).to(dtype)
    assert torch.equal(linear(x3, ws, b), linear_reference(x3, ws, b))
    wide = torch.randn(2, 8200, device='cuda', generator=g).to(dtype)
    assert torch.equal(linear(x[0, :, :1].expand(1, 8200).contiguous(), [wide]),
                       F.linear(x[0, :, :1].expand(1, 8200), wide))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('sizes,K,epilogue', [([2560, 640, 640], 2560, 0), ([2560], 2560, 1), ([6912, 6912], 2560, 2),
                                              ([2560], 6912, 1), ([24, 24], 200, 2)])
def test_float_linear_kernel_with_norm_and_epilogue_matches_reference(dtype, sizes, K, epilogue):
    """bitnet::linear with an RMSNorm first and + residual or relu(gate)^2 * up after, as a float
    block decodes (engine.DecodeBlock): the GEMV against ops.linear_reference (cuBLAS, torch's
    element-wise ops) on the same inputs, within a few roundings to dtype."""
    import ternary_kernels  # noqa: F401
    from ops import linear, linear_reference
    g = torch.Generator(device='cuda').manual_seed(sum(sizes) + K + epilogue)
    ws = [(torch.randn(n, K, device='cuda', generator=g) / K ** 0.5).to(dtype) for n in sizes]
    out = sizes[0] if epilogue == 2 else sum(sizes)
    b = torch.randn(sum(sizes), device='cuda', generator=g).to(dtype)
    nw = (1 + torch.randn(K, device='cuda', generator=g) / 4).to(dtype)
    res = torch.randn(1, 1, out, device='cuda', generator=g).to(dtype) if epilogue == 1 else None
    x = (3 * torch.randn(1, 1, K, device='cuda', generator=g)).to(dtype)
    y = linear(x, ws, b, nw, res, epilogue, 1e-5)
    ref = linear_reference(x, ws, b, nw, res, epilogue, 1e-5)
    assert y.shape == ref.shape == (1, 1, out) and y.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((y.float() - ref.float()).abs() <= 4 * eps * ref.float().abs() + 1e-4 * K ** 0.5).all()
    x3, res3 = x.expand(1, 3, K).contiguous(), None if res is None else res.expand(1, 3, out)
    assert torch.equal(linear(x3, ws, b, nw, res3, epilogue, 1e-5), linear_reference(x3, ws, b, nw, res3, epilogue, 1e-5))


def tiny_gpt(quant='b1.58', **kw):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    args = dict(block_size=128, vocab_size=80, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, quant=quant)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


def assert_greedy_equal(model, got, expected, what, rtol=1e-4):
    """Greedy tokens (T,) of two code paths from one prompt: equal, or equal up to the first position
    where model's own logits hold a near-tie between the two tokens (within rtol of the largest
    logit's size), where float32 sums in another order may pick either one; the rest then differs."""
    differ = (got != expected).nonzero().flatten().tolist()
    if differ:
        p = differ[0]
        with torch.no_grad():
            logits = model(expected[None, :p])[0][0, -1].float()
        gap = (logits[expected[p]] - logits[got[p]]).abs().item()
        assert gap <= rtol * logits.abs().max().item(), f"{what}: differs at position {p}, logits {gap:.3g} apart"


def test_packed_model_logits_on_cuda_equal_training_form():
    from packed import pack_model, verify_packed
    from conftest import integer_layers
    model = tiny_gpt().cuda()
    idx = torch.randint(80, (2, 50), device='cuda')
    with torch.no_grad(), integer_layers(model):   # the integer line: no rounding-boundary flips
        ref, _ = model(idx, idx)
        pack_model(model)
        out, _ = model(idx, idx)
        report = verify_packed(model, idx)
    assert (out - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
    assert report['ok'], report['max_diff']


@pytest.mark.parametrize('compile', [True, False])
@pytest.mark.parametrize('packed', [False, True])
def test_engine_greedy_equals_generate(packed, compile):
    from engine import Engine
    from packed import pack_model
    model = tiny_gpt('b1.58' if packed else 'none').cuda()
    if packed:
        pack_model(model)
    prompt = torch.randint(80, (1, 7), device='cuda')
    with torch.no_grad():
        expected = model.generate(prompt, 100, temperature=0)
    engine = Engine(model, max_len=107, dtype=torch.float32, compile=compile)
    assert torch.equal(engine.generate(prompt, 100), expected)
    assert torch.equal(engine.generate(prompt, 100), expected)   # replaying the captured graphs again
    other = torch.randint(80, (1, 30), device='cuda')             # another prompt length: a new prefill graph
    with torch.no_grad():
        assert torch.equal(engine.generate(other, 50), model.generate(other, 50, temperature=0))
    assert torch.equal(engine.generate(prompt, 100), expected)


@pytest.mark.parametrize('compile', [True, False])
def test_float_gemv_engine_runs_the_gemv_and_equals_generate(compile):
    """Engine(float_gemv=True): a decoding step of the float model runs float_gemv_kernel, not cuBLAS,
    also when an engine without it compiled a step of the same model before (torch 2.11 reused that
    code), and its greedy tokens equal model.generate's (whose one-row steps take the same op)."""
    from engine import Engine
    model = tiny_gpt('none').cuda()
    prompt = torch.randint(80, (1, 7), device='cuda')
    Engine(model, max_len=60, dtype=torch.float32, compile=compile, float_gemv=False).generate(prompt, 20)
    engine = Engine(model, max_len=107, dtype=torch.float32, compile=compile, float_gemv=True)
    got = engine.generate(prompt, 100)
    with torch.no_grad():
        assert torch.equal(got, model.generate(prompt, 100, temperature=0))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum('float_gemv_kernel' in n for n in names) == 3 * 4, names   # qkv, o, gate_up, down in each of 3 blocks


@pytest.mark.parametrize('packed', [False, True])
def test_batched_engine_equals_generate_per_sequence(packed):
    """Batches of 4 and 16, prompts of different lengths, compiled step: each sequence's greedy
    tokens equal model.generate on that prompt alone."""
    from engine import Engine
    from packed import pack_model
    model = tiny_gpt('b1.58' if packed else 'none').cuda()
    if packed:
        pack_model(model)
    for B in (4, 16):
        lengths = [7 - b % 7 for b in range(B)]
        prompt = torch.randint(80, (B, 7), device='cuda')
        engine = Engine(model, batch_size=B, max_len=107, dtype=torch.float32)
        got = engine.generate(prompt, 100, lengths=lengths)
        for b, L in enumerate(lengths):
            with torch.no_grad():
                expected = model.generate(prompt[b:b + 1, :L], 100, temperature=0)[0]
            assert_greedy_equal(model, got[b, :L + 100], expected, f"batch {B}, sequence {b} (prompt {L})")
        assert torch.equal(engine.generate(prompt, 100, lengths=lengths), got)   # replaying the graphs again


def GPT_training_logits(checkpoint, idx):
    """Last-position logits of a checkpoint's training-form model (float32, CUDA)."""
    from checkpoint import model_from_checkpoint
    model = model_from_checkpoint(checkpoint, dropout=0.0).cuda().eval()
    with torch.no_grad():
        return model(idx)[0][0, -1].float()


@pytest.mark.skipif(not os.environ.get('BITNET_CKPT'), reason='set BITNET_CKPT to a trained b1.58 ckpt.pt')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['float32', 'bfloat16'])
def test_packed_engine_greedy_equals_training_form_on_a_trained_checkpoint(dtype):
    """BITNET_CKPT=out-shakespeare-char/ckpt.pt python -m pytest -q tests/test_cuda.py -k trained -s"""
    from checkpoint import load_checkpoint, model_from_checkpoint
    from engine import Engine
    from packed import pack_model
    from prepare_data import load_tokenizer
    checkpoint = load_checkpoint(os.environ['BITNET_CKPT'])
    encode, decode = load_tokenizer(checkpoint['tokenizer'])
    model = model_from_checkpoint(checkpoint, dropout=0.0).cuda().eval()
    prompt = torch.tensor([encode('ROMEO:\n')], device='cuda')
    n = model.config.block_size - prompt.size(1)
    with torch.no_grad():
        expected = model.generate(prompt, n, temperature=0)   # training form, float32
    pack_model(model)
    got = Engine(model, max_len=model.config.block_size, dtype=dtype).generate(prompt, n)
    same = (got[0] == expected[0]).tolist()
    first_diff = same.index(False) - prompt.size(1) if False in same else n
    print(f"\n{dtype}: packed engine equals the training form for the first {first_diff} of {n} new tokens")
    if first_diff < n:
        # where they part, the training form's own logits: the two tokens are (nearly) tied
        p = prompt.size(1) + first_diff
        ref = GPT_training_logits(checkpoint, expected[:, :p])
        top2 = ref.topk(2).values
        gap = (top2[0] - top2[1]).item()
        chosen_gap = (ref.max() - ref[got[0, p]]).item()
        print(f"first difference at new token {first_diff}: training-form top-2 logit gap {gap:.2e}, "
              f"the engine's token is {chosen_gap:.2e} below the top")
        if dtype == torch.float32:
            assert first_diff >= 200 or chosen_gap < 1e-3 * ref.abs().max().item()
    print(decode(got[0].tolist()))


@pytest.mark.skipif(not os.environ.get('BITNET_CKPT'), reason='set BITNET_CKPT to a trained b1.58 ckpt.pt')
def test_int8_head_on_a_trained_checkpoint():
    """The packed engine (bfloat16) with the lm_head in int8 against the same engine with it in
    bfloat16: the greedy tokens, and the logits at every position of the bfloat16 engine's text
    (max |difference| within each row's bound sum |x| * scale / 2, plus bfloat16 rounding)."""
    from checkpoint import load_checkpoint, model_from_checkpoint
    from engine import Engine
    from ops import lm_head_argmax, quantize_head
    from packed import pack_model
    from prepare_data import load_tokenizer
    checkpoint = load_checkpoint(os.environ['BITNET_CKPT'])
    encode, _ = load_tokenizer(checkpoint['tokenizer'])
    model = model_from_checkpoint(checkpoint, dropout=0.0).cuda().eval()
    pack_model(model)
    n = model.config.block_size - 7
    prompt = torch.tensor([encode('ROMEO:\n')], device='cuda')
    bf16 = Engine(model, max_len=model.config.block_size, dtype=torch.bfloat16).generate(prompt, n)
    int8 = Engine(model, max_len=model.config.block_size, dtype=torch.bfloat16, int8_head=True).generate(prompt, n)
    same = (bf16[0] == int8[0]).tolist()
    first_diff = same.index(False) - 7 if False in same else n
    with torch.no_grad():
        x = model.hidden(bf16[:, :-1])[0]                              # (T, C) bfloat16
        ref, _ = lm_head_argmax(x, model.lm_head.weight)
        q, scale = quantize_head(model.lm_head.weight)
        got, tokens = lm_head_argmax(x, q, scale)
    err = (got.float() - ref.float()).abs()
    bound = x.float().abs().sum(1, keepdim=True) * scale / 2 + ref.float().abs() / 128   # + bf16 rounding of both
    agree = (tokens[:, 0] == ref.argmax(-1)).float().mean().item()
    print(f"\nint8 head: greedy tokens equal the bfloat16 head's for the first {first_diff} of {n}; over "
          f"{x.size(0)} positions: argmax agreement {agree:.4f}, max |logit difference| {err.max().item():.4f} "
          f"(logits span {ref.float().min().item():.2f} .. {ref.float().max().item():.2f})")
    assert (err <= bound).all()
