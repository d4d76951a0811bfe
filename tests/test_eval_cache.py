"""The eval cache of BitLinear (bitlinear.py): on the CPU, in eval mode without gradients, a
default-option b1.58 layer packs its weight once and computes the integer line through
bitlinear.cpu_kernel (the C++ kernel once cpu_kernels is imported). Its outputs equal
integer_forward bit for bit, and training's dequantized forward within float rounding (1e-5 of
the output's magnitude, as verify_bitlinear allows); any change of the weight rebuilds it."""
import copy

import pytest
import torch

import bitlinear
import cpu_kernels
from bitlinear import BitLinear, integer_forward, ternary_linear_reference
from model import GPT, GPTConfig
from packed import pack_model


@pytest.fixture(params=['kernel', 'reference'])
def kernel(request, monkeypatch):
    """Each test twice: with the compiled kernel and with the pure-PyTorch reference."""
    if request.param == 'kernel':
        assert cpu_kernels.extension() is not None, "the CPU kernel did not build"
        assert bitlinear.cpu_kernel is cpu_kernels.ternary_linear_cpu
    else:
        monkeypatch.setattr(bitlinear, 'cpu_kernel', ternary_linear_reference)
    return request.param


def close(y, ref):
    """Training's dequantized product against the integer line: float rounding only."""
    return (y - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# out_features not a multiple of 4 (padding rows in the packed layout), in_features below and
# between the SIMD widths, 1 row (decoding) and 37 (prefill, no multiple of 4)
@pytest.mark.parametrize('out,k', [(7, 5), (13, 70), (30, 129)])
@pytest.mark.parametrize('rows', [1, 37])
def test_cached_forward_is_the_integer_line(kernel, out, k, rows):
    torch.manual_seed(out * k + rows)
    layer = BitLinear(k, out).eval()
    x = torch.randn(1, rows, k) * 3
    uncached = layer(x)                        # gradients on: training's forward, no cache
    assert layer.eval_cache is None and uncached.requires_grad
    with torch.no_grad():
        y = layer(x)
        packed, row_scale = layer.eval_cache[1], layer.eval_cache[2]
        assert torch.equal(y, layer(x)) and layer.eval_cache[1] is packed   # built once, then reused
    assert y.shape == (1, rows, out) and y.dtype == torch.float32
    assert torch.equal(y, integer_forward(layer, x))
    assert close(y, uncached) and not torch.equal(y, torch.zeros_like(y))
    # the compact form only: 2-bit codes and one float32 scale per (padded) row
    assert torch.equal(packed, bitlinear.pack_ternary(bitlinear.quantize_weight(layer.weight)[0]))
    assert torch.equal(row_scale[:out], bitlinear.weight_scale(layer.weight).expand(out))


def test_cache_follows_the_weight(kernel):
    """An optimizer step, an in-place change and load_state_dict each rebuild the codes;
    train() drops them."""
    torch.manual_seed(0)
    layer = BitLinear(40, 12)
    other = BitLinear(40, 12)
    x = torch.randn(3, 40)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.eval()
    for change in ('optimizer', 'in_place', 'load_state_dict'):
        with torch.no_grad():
            before = layer(x)
            old = layer.eval_cache
        if change == 'optimizer':   # a step taken in eval mode, so nothing else drops the cache
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
        elif change == 'in_place':
            with torch.no_grad():
                layer.weight.mul_(-1)
        else:
            layer.load_state_dict(other.state_dict())
        with torch.no_grad():
            after = layer(x)
        assert layer.eval_cache is not old and not torch.equal(after, before), change
        assert torch.equal(after, integer_forward(layer, x)), change
    assert torch.equal(layer.weight, other.weight)
    layer.train()
    assert layer.eval_cache is None


def test_training_and_gradients_unchanged(kernel):
    """train() mode, with or without gradients, and eval mode with gradients never build the
    cache, and give the forward and gradients of a layer that never cached."""
    torch.manual_seed(1)
    layer = BitLinear(33, 10)
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        layer.eval()(torch.randn(2, 33))   # a cache, then back to training
    layer.train()
    x = torch.randn(4, 33, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), fresh(x2)
    y.sin().sum().backward()
    y2.sin().sum().backward()
    assert layer.eval_cache is None
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, fresh.weight.grad)
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x2)) and layer.eval_cache is None   # train mode, no grad
    layer.eval()
    y = layer(x)
    assert y.requires_grad and layer.eval_cache is None and torch.equal(y, y2)


def test_other_options_keep_the_uncached_forward():
    """Other layer options, and a weight made under inference_mode (no version counter to key on)."""
    torch.manual_seed(2)
    x = torch.randn(2, 24)
    with torch.inference_mode():
        layer = BitLinear(24, 8).eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.train()(x)) and layer.eval_cache is None
    for options in (dict(act_bits=4), dict(bias=True), dict(before_nonlinear=True)):
        layer = BitLinear(24, 8, **options).eval()
        with torch.no_grad():
            y = layer(x)
        assert layer.eval_cache is None and torch.equal(y, layer(x).detach()), options


def test_training_form_model_equals_packed_model(kernel):
    """A whole b1.58 GPT in eval mode: every projection cached, and its logits equal the packed
    model's bit for bit (the same integer products, norms and epilogues), so greedy decoding
    picks the same tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=96, intermediate_size=136)).eval()
    packed = pack_model(copy.deepcopy(model))
    idx = torch.randint(50, (1, 9))
    with torch.no_grad():
        logits = model(idx, idx)[0]
        assert all(m.eval_cache is not None for m in model.modules() if isinstance(m, BitLinear))
        assert torch.equal(logits, packed(idx, idx)[0])
        assert torch.equal(model.generate(idx, 12, temperature=0), packed.generate(idx, 12, temperature=0))
