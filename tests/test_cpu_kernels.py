"""The CPU kernel (csrc/ternary_cpu.cpp via cpu_kernels.py) against ops.packed_linear_reference:
bit for bit, for shapes that leave every vector loop a tail, and its fallback where no build."""
import pytest
import torch

import cpu_kernels
from bitlinear import pack_ternary
from ops import EPILOGUES, packed_linear, packed_linear_reference


@pytest.fixture(scope='module')
def ext():
    """The compiled extension, built once per test session (cached in .build/ across sessions)."""
    ext = cpu_kernels.extension()
    assert ext is not None, "the CPU kernel did not build: see the note above"
    return ext


def layer_args(rows, out, k, epilogue, norm, dtype, seed):
    """Arguments of packed_linear for `rows` tokens and a random ternary layer (out, k)."""
    g = torch.Generator().manual_seed(seed)
    n_weight_rows = 2 * out if epilogue == 'relu2' else out   # relu2 packs [gate; up]
    w_t = torch.randint(-1, 2, (n_weight_rows, k), generator=g, dtype=torch.int8)
    packed = pack_ternary(w_t)
    row_scale = torch.rand(4 * packed.size(0), generator=g) * 0.05 + 0.01
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    norm_weight = torch.rand(k, generator=g) + 0.5 if norm else x.new_empty(0)
    residual = torch.randn(rows, out, generator=g).to(dtype) if epilogue == 'residual' else x.new_empty(0)
    return x, norm_weight, packed, row_scale, residual, out, EPILOGUES[epilogue], 1e-5


# rows: 1 (decoding), and counts that are no multiple of the 4 rows per pass or of 16;
# (out, in): in_features below, between and above the SIMD widths (16, 32, 64 bytes), out odd
@pytest.mark.parametrize('rows', [1, 3, 6, 37])
@pytest.mark.parametrize('out,k', [(7, 5), (13, 70), (30, 129), (96, 768)])
@pytest.mark.parametrize('epilogue', ['none', 'residual', 'relu2'])
def test_kernel_equals_reference_bit_for_bit(ext, rows, out, k, epilogue):
    if epilogue == 'relu2' and out % 2:
        out += 1   # [gate; up] of 2 * out rows must fill whole packed rows
    for norm in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            args = layer_args(rows, out, k, epilogue, norm, dtype, seed=rows * 1000 + k)
            ref = packed_linear_reference(*args)
            y = ext.packed_linear(*args)
            assert y.dtype == ref.dtype and y.shape == (rows, out)
            assert torch.equal(y, ref), (norm, dtype, (y.float() - ref.float()).abs().max().item())


def test_the_op_runs_the_kernel_on_cpu(ext, monkeypatch):
    """torch.ops.bitnet.packed_linear on CPU tensors goes to the compiled kernel, and
    enabled = False sends it back to the reference."""
    calls = []

    class Counting:
        def packed_linear(self, *args):
            calls.append(1)
            return ext.packed_linear(*args)
    monkeypatch.setattr(cpu_kernels, '_ext', Counting())
    args = layer_args(5, 24, 100, 'relu2', True, torch.float32, seed=1)
    assert torch.equal(packed_linear(*args), packed_linear_reference(*args))
    assert len(calls) == 1
    monkeypatch.setattr(cpu_kernels, 'enabled', False)
    assert torch.equal(packed_linear(*args), packed_linear_reference(*args))
    assert len(calls) == 1


def test_packed_model_logits_and_tokens_equal_the_reference_path(ext, monkeypatch):
    """A whole packed model on the CPU: its layers run the kernel, whose logits equal the
    pure-PyTorch path's bit for bit (prefill of 9 rows and decoding), so greedy decoding picks
    the same tokens."""
    import packed
    from model import GPT, GPTConfig
    calls = []

    class Counting:
        def packed_linear(self, *args):
            calls.append(args[0].size(0))
            return ext.packed_linear(*args)
    monkeypatch.setattr(cpu_kernels, '_ext', Counting())
    torch.manual_seed(0)
    model = packed.pack_model(GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2,
                                            n_embd=96, intermediate_size=136)).eval())
    idx = torch.randint(50, (1, 9))
    with torch.no_grad():
        logits = model(idx, idx)[0]
        assert calls == [9] * 8   # 2 layers x (qkv, o, gate_up, down), 9 rows each
        tokens = model.generate(idx, 12, temperature=0)
        packed._reference_path = True
        try:
            logits_ref = model(idx, idx)[0]
            tokens_ref = model.generate(idx, 12, temperature=0)
        finally:
            packed._reference_path = False
    assert len(calls) == 8 + 8 * 12   # the reference path never called the kernel
    assert torch.equal(logits, logits_ref)
    assert torch.equal(tokens, tokens_ref)


def test_failed_build_falls_back_with_one_notice(monkeypatch, capsys):
    """No compiler: one line on stderr, once, and the op still computes the reference."""
    def no_compiler():
        raise RuntimeError("Error building extension 'ternary_cpu': c++: command not found")
    monkeypatch.setattr(cpu_kernels, 'build', no_compiler)
    monkeypatch.setattr(cpu_kernels, '_ext', None)
    args = layer_args(2, 8, 40, 'none', False, torch.float32, seed=2)
    ref = packed_linear_reference(*args)
    assert torch.equal(packed_linear(*args), ref)
    assert torch.equal(packed_linear(*args), ref)
    assert not cpu_kernels.available()
    err = capsys.readouterr().err
    assert err == ("note: the CPU ternary kernel could not be built (Error building extension 'ternary_cpu': "
                   "c++: command not found); packed layers use the pure-PyTorch path\n")


def test_f16_linear(ext):
    """The lm_head kernel: float32 activations x float16 weights, float32 sums, against the
    same product in float64 (odd sizes: every vector loop has a tail)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(301, 77, generator=g).half()
    x = torch.randn(3, 77, generator=g)
    y = ext.linear_f16(x, w)
    ref = (x.double() @ w.double().t()).float()
    assert y.shape == (3, 301) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_half_head(ext, monkeypatch):
    """half_head: the lm_head reads a float16 copy (float32 sums) that a tied embedding reads too
    (rows widened to float32); the kernel and the fallback (F.linear on the widened weights) agree."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=40, tie_embeddings=True)).eval()
    w16 = model.lm_head.weight.detach().half()
    x = torch.randn(2, 3, 40)
    idx = torch.tensor([[0, 299, 7]])
    cpu_kernels.half_head(model)
    assert model.lm_head.weight_f16 is model.model.embed_tokens.weight_f16 and torch.equal(w16, model.lm_head.weight_f16)
    assert torch.equal(model.model.embed_tokens(idx), w16[idx].float())
    y = model.lm_head(x)
    expected = (x.double() @ w16.double().t()).float()
    assert y.shape == (2, 3, 300) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(cpu_kernels, 'enabled', False)
    torch.testing.assert_close(model.lm_head(x), expected, rtol=0, atol=1e-5)
    assert model.generate(idx, 3, temperature=0).shape == (1, 6)


def test_sample_uses_the_kernel_and_can_be_told_not_to(tmp_path, trained_ckpt):
    """sample.py on the CPU: the same greedy text with the kernel (default) and without it
    (--cpu_kernel=False), the lm_head in float16 both times."""
    from conftest import run
    path = str(tmp_path / 'packed.pt')
    assert run('pack.py', f'--out_dir={trained_ckpt}', f'--packed_path={path}').returncode == 0
    args = (f'--ckpt_path={path}', '--num_samples=1', '--max_new_tokens=30', '--device=cpu', '--temperature=0',
            '--start=ROMEO:', '--verify=False')
    fast, slow = run('sample.py', *args), run('sample.py', *args, '--cpu_kernel=False')
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert fast.stdout == slow.stdout and fast.stdout.startswith('ROMEO:')
    bad = run('sample.py', *args, '--cpu_head=bfloat16')
    assert bad.returncode == 2 and bad.stderr == "error: cpu_head must be one of float16, float32, got 'bfloat16'\n"
