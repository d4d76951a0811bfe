import math

import pytest
import torch
import torch.nn.functional as F

from bitlinear import (BitLinear, BitLinear1b, BitLinearConfig, RMSNorm, TernaryMatmul, bitlinear_report,
                       integer_forward, integer_weight, pack_ternary, quantize_activation, quantize_activation_1b,
                       quantize_activation_shifted, quantize_weight, quantize_weight_1b, ternary_matmul_ste,
                       unpack_2bit, unpack_ternary, verify_bitlinear)


# --- b1.58 quantizers against hand-computed values ----------------------------------

def test_quantize_weight_hand_values():
    w = torch.tensor([[0.5, -1.0, 0.0, 2.0], [0.1, -0.2, 0.3, -0.4]])
    w_t, s = quantize_weight(w)
    # mean|W| = 4.5 / 8 = 0.5625; W / s = [.89, -1.78, 0, 3.56, .18, -.36, .53, -.71]
    assert s.item() == pytest.approx(0.5625)
    assert w_t.dtype == torch.int8
    assert w_t.tolist() == [[1, -1, 0, 1], [0, 0, 1, -1]]


def test_quantize_weight_all_zero_uses_eps():
    w_t, s = quantize_weight(torch.zeros(3, 5))
    assert s.item() == pytest.approx(1e-5)
    assert w_t.abs().sum().item() == 0


def test_quantize_activation_hand_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.0, 0.0]])
    x_int, s = quantize_activation(x)
    assert s.squeeze(-1).tolist() == pytest.approx([127.0, 63.5])
    # 127 * -0.5 = -63.5 rounds half to even -> -64; 127 * 0.25 = 31.75 -> 32; 63.5 * 1.0 -> 64 (even)
    assert x_int.tolist() == [[127, -64, 32, 0], [-127, 64, 0, 0]]
    assert x_int.dtype == torch.int8


def test_quantize_activation_range_and_all_zero():
    x = torch.randn(64, 33) * 100
    x_int, s = quantize_activation(x)
    assert x_int.min().item() >= -127 and x_int.max().item() <= 127   # absmax maps onto +-127 exactly
    assert (x_int.abs().amax(dim=-1) == 127).all()
    z_int, z_s = quantize_activation(torch.zeros(2, 4))
    assert z_int.abs().sum().item() == 0
    assert z_s.flatten().tolist() == pytest.approx([127 / 1e-5] * 2)
    tiny_int, _ = quantize_activation(torch.tensor([[1e-7, -2e-6]]))  # max|x| below eps: clamped scale
    assert tiny_int.tolist() == [[1, -25]]   # 1e-7 * 127 / 1e-5 = 1.27, -2e-6 * 127 / 1e-5 = -25.4


def test_bitlinear_forward_is_the_dequantized_product():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(3, 5, 16)
    w_t, s_w = quantize_weight(layer.weight)
    x_int, s_x = quantize_activation(x)
    expected = (x_int.float() / s_x) @ (w_t.float() * s_w).t()
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_bitlinear_ste_gradients_are_the_identity():
    torch.manual_seed(0)
    layer = BitLinear(12, 7)
    x = torch.randn(4, 12, requires_grad=True)
    g = torch.randn(4, 7)
    layer(x).backward(g)
    w_t, s_w = quantize_weight(layer.weight)
    x_int, s_x = quantize_activation(x)
    w_q, x_q = w_t.float() * s_w, x_int.float() / s_x
    assert torch.allclose(x.grad, g @ w_q, atol=1e-6)             # dy/dx = W_q
    assert torch.allclose(layer.weight.grad, g.t() @ x_q, atol=1e-5)  # dy/dW = x_q


def ste_reference(x, w):
    """The b1.58 layer in the straight-through form of the FAQ's code, written out here:
    x_q = x_int / s_x and W_q = W_t * s_w, each q.detach() + (v - v.detach()), scales detached,
    y = x_q @ W_q^T."""
    x = x.float()
    s_x = (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)).detach()
    x_q = (x * s_x).round().clamp(-128, 127) / s_x
    s_w = w.abs().mean().clamp(min=1e-5).detach()
    w_q = (w / s_w).round().clamp(-1, 1) * s_w
    return F.linear(x_q.detach() + (x - x.detach()), w_q.detach() + (w - w.detach()))


def hand_made():
    """x (2, 3, 4), W (3, 4), dL/dy (2, 3, 3): rounding ties, clamped values, zeros, an all-zero row."""
    x = torch.tensor([[[2.0, -1.0, 0.25, 0.0],     # s_x = 63.5: u = [127, -63.5 (tie: -64), 15.875, 0]
                       [0.0, 0.0, 0.0, 0.0],       # max|x| = 0, clamped to 1e-5
                       [1e-7, -2e-6, 0.0, 0.0]],   # max|x| < 1e-5: u = [1.27, -25.4, 0, 0]
                      [[0.3, -0.7, 0.1, 0.5],
                       [-4.0, 2.0, 1.0, -0.5],     # s_x = 31.75: u = [-127, 63.5 (tie: 64), 31.75, -15.875]
                       [1.0, 1.0, -1.0, 1.0]]])
    # mean|W| = 6 / 12 = 0.5, W / s_w = [0.5, -0.5, 1.5, -2 | 4, 0, -1, 0.25 | 0.75, -0.25, 1, -0.25]:
    # W_t = [0, 0, 1, -1 | 1, 0, -1, 0 | 1, 0, 1, 0] (ties at +-0.5 round to 0)
    w = torch.tensor([[0.25, -0.25, 0.75, -1.0], [2.0, 0.0, -0.5, 0.125], [0.375, -0.125, 0.5, -0.125]])
    g = torch.linspace(-1, 1, 18).reshape(2, 3, 3)
    return x, w, g


def random_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 96, generator=gen) * torch.rand(4, 16, 1, generator=gen) * 3
    return x, torch.randn(48, 96, generator=gen) * 0.02, torch.randn(4, 16, 48, generator=gen)


def forward_backward(fn, x, w, g, dtype=None):
    """(y, dL/dx, dL/dW) of y = fn(x, w), under CPU autocast to dtype if one is given."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = fn(x, w)
    y.backward(g.to(y.dtype))
    return y, x.grad, w.grad


def bitlinear(x, w):
    """BitLinear's forward with the weight w (a tensor of ours, so that its gradient can be read)."""
    return torch.func.functional_call(BitLinear(w.size(1), w.size(0)), {'weight': w}, (x,))


@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16],
                         ids=['float32', 'autocast-bf16', 'autocast-fp16'])
@pytest.mark.parametrize('case', [hand_made, random_case], ids=['hand_made', 'random'])
def test_bitlinear_is_the_ste_form(case, dtype):
    x, w, g = case()
    ours = forward_backward(bitlinear, x, w, g, dtype)
    assert ours[0].dtype == (dtype or torch.float32) and ours[1].dtype == ours[2].dtype == torch.float32
    for a, b in zip(ours, forward_backward(ste_reference, x, w, g, dtype)):   # y, dL/dx, dL/dW
        assert torch.equal(a, b)   # bit for bit
    if case is hand_made and dtype is None:   # x_int @ W_t^T * (s_w / s_x) by hand
        assert ours[0][0, 0].tolist() == pytest.approx([16 / 127, 111 / 127, 143 / 127])
        assert ours[0][1, 1].tolist() == pytest.approx([48 / 63.5, -159 / 63.5, -95 / 63.5])
        assert ours[0][0, 1].tolist() == [0.0, 0.0, 0.0]


def test_ternary_matmul_one_gradient():
    """A frozen weight, or an input that needs no gradient: the other gradient alone, the same numbers."""
    x, w, g = hand_made()
    _, x_grad, w_grad = forward_backward(ste_reference, x, w, g)
    x_only, w_only = x.clone().requires_grad_(), w.clone().requires_grad_()
    TernaryMatmul.apply(x_only, w, BitLinearConfig()).backward(g)
    TernaryMatmul.apply(x, w_only, BitLinearConfig()).backward(g)
    assert torch.equal(x_only.grad, x_grad) and torch.equal(w_only.grad, w_grad)


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['float32', 'autocast-bf16'])
def test_bitlinear_eager_runs_the_function_compiled_the_ste_form(monkeypatch, dtype):
    """Eager BitLinear calls TernaryMatmul; under torch.compile it traces the straight-through form
    (Inductor fuses that one). Both give the reference's numbers. The aot_eager backend runs the
    traced graph without generating code (seconds, not a minute)."""
    calls, forward = [], TernaryMatmul.forward

    def counted_forward(ctx, x, w, config):
        assert not torch.compiler.is_compiling(), 'torch.compile traced BitLinear through TernaryMatmul'
        calls.append(1)
        return forward(ctx, x, w, config)
    monkeypatch.setattr(TernaryMatmul, 'forward', staticmethod(counted_forward))
    x, w, g = random_case()
    ref = forward_backward(ste_reference, x, w, g, dtype)
    assert all(map(torch.equal, forward_backward(bitlinear, x, w, g, dtype), ref)) and len(calls) == 1
    layer = BitLinear(w.size(1), w.size(0))
    layer.weight.data.copy_(w)
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    xr = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = compiled(xr)
    y.backward(g.to(y.dtype))
    for a, b in zip((y, xr.grad, layer.weight.grad), ref):
        assert torch.equal(a, b)


def test_bitlinear_rms_norm_option():
    torch.manual_seed(0)
    plain, normed = BitLinear(10, 6), BitLinear(10, 6, rms_norm=True)
    normed.weight.data.copy_(plain.weight.data)
    normed.norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 10) * 3
    assert torch.equal(normed(x), plain(normed.norm(x)))
    assert not torch.allclose(normed(x), plain(x))


# --- b1 -------------------------------------------------------------------------------

def test_b1_weight_hand_values():
    w = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    w_b, beta = quantize_weight_1b(w)
    # alpha = mean(W) = 1; W - alpha = [0, 1, 2, -3]; sign(0) = -1; beta = mean|W| = 2
    assert w_b.tolist() == [[-1, 1], [1, -1]]
    assert beta.item() == 2.0


def test_b1_activation_hand_values():
    x = torch.tensor([[0.5, -1.0, 0.25]])
    x_q, gamma = quantize_activation_1b(x)          # Q_b = 128, gamma = 1
    assert gamma.item() == 1.0
    assert x_q.tolist() == [[64.0, -128.0, 32.0]]   # -128 clamps to -128 + eps, rounds back
    x_q4, _ = quantize_activation_1b(x, act_bits=4)  # Q_b = 8
    assert x_q4.tolist() == [[4.0, -8.0, 2.0]]
    x_qe, _ = quantize_activation_1b(torch.tensor([[0.5, -1.0]]), eps=0.6)   # clamp at -128 + 0.6
    assert x_qe.tolist() == [[64.0, -127.0]]


def test_b1_layer_output_and_options():
    layer = BitLinear1b(2, 2, bias=True)
    layer.weight.data = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    layer.bias.data = torch.tensor([0.5, -0.5])
    x = torch.tensor([[0.5, -1.0]])
    # x_q = [64, -128]; W_b = [[-1, 1], [1, -1]]; y = x_q @ W_b^T * beta * gamma / Q_b + b
    expected = torch.tensor([[-192.0, 192.0]]) * 2.0 / 128 + layer.bias
    assert torch.allclose(layer(x), expected)
    assert BitLinear1b(4, 3).bias is None and BitLinear1b(4, 3, bias=True).bias is not None


def test_b1_ste_gradients():
    torch.manual_seed(0)
    layer = BitLinear1b(9, 5, bias=False)
    x = torch.randn(3, 9, requires_grad=True)
    g = torch.randn(3, 5)
    layer(x).backward(g)
    w_b, beta = quantize_weight_1b(layer.weight)
    assert torch.allclose(x.grad, g @ (w_b.float() * beta), atol=1e-6)


# --- options (BitLinearConfig) ---------------------------------------------------------

def test_config_and_constructor_as_nn_linear():
    assert BitLinear(4, 3).config == BitLinearConfig(act_bits=8, eps=1e-5, bias=False, before_nonlinear=False)
    assert BitLinear(4, 3, True).bias.shape == (3,) and BitLinear1b(4, 3, bias=True).bias.shape == (3,)
    layer = BitLinear1b(4, 3, config=BitLinearConfig(act_bits=4, bias=True), before_nonlinear=True)
    assert layer.config == BitLinearConfig(act_bits=4, bias=True, before_nonlinear=True)
    assert 'act_bits=4' in repr(layer) and 'before_nonlinear=True' in repr(layer)
    with pytest.raises(ValueError, match='act_bits must be an integer from 2 to 8'):
        BitLinear(4, 3, act_bits=9)
    with pytest.raises(TypeError):
        BitLinear(4, 3, bit_width=4)


def test_act_bits_4_hand_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.3, 0.0]])
    x_int, s = quantize_activation(x, act_bits=4)     # Q = 7
    assert s.squeeze(-1).tolist() == [7.0, 3.5]
    # 7 * -0.5 = -3.5 -> -4 (tie to even), 1.75 -> 2; 3.5 * 1.0 = 3.5 -> 4, 3.5 * 0.3 = 1.05 -> 1
    assert x_int.tolist() == [[7, -4, 2, 0], [-7, 4, 1, 0]]
    layer = BitLinear(4, 3, act_bits=4)
    layer.weight.data = hand_made()[1]                # W_t = [0, 0, 1, -1 | 1, 0, -1, 0 | 1, 0, 1, 0], s_w = 0.5
    # x_int @ W_t^T = [2, 5, 9] and [1, -8, -6], times s_w / s_x = 0.5 / 7 and 0.5 / 3.5
    expected = [[1 / 7, 5 / 14, 9 / 14], [1 / 7, -8 / 7, -6 / 7]]
    for y in (layer(x), integer_forward(layer, x)):
        torch.testing.assert_close(y, torch.tensor(expected))


def test_eps_option():
    layer = BitLinear(2, 2, eps=0.5)
    layer.weight.data = torch.tensor([[0.2, -0.4], [0.1, 0.0]])   # mean|W| = 0.175 < eps: s_w = 0.5
    x = torch.tensor([[0.1, -0.2]])                                # max|x| = 0.2 < eps: s_x = 127 / 0.5 = 254
    assert quantize_weight(layer.weight, eps=0.5)[0].tolist() == [[0, -1], [0, 0]]   # W / 0.5 = [.4, -.8, .2, 0]
    assert quantize_activation(x, eps=0.5)[0].tolist() == [[25, -51]]               # [25.4, -50.8]
    torch.testing.assert_close(layer(x), torch.tensor([[51 * 0.5 / 254, 0.0]]))
    # the default eps: s_w = 0.175, W_t = [[1, -1], [1, 0]]; s_x = 635, x_int = [64 (63.5), -127]
    layer.config = BitLinearConfig()
    torch.testing.assert_close(layer(x), torch.tensor([[191 * 0.175 / 635, 64 * 0.175 / 635]]))


@pytest.mark.parametrize('kind', [BitLinear, BitLinear1b])
def test_bias_option(kind):
    torch.manual_seed(0)
    layer = kind(6, 3, bias=True)
    layer.bias.data = torch.tensor([0.5, -1.0, 2.0])
    x = torch.randn(4, 6, requires_grad=True)
    y = layer(x)
    plain = kind(6, 3)
    plain.weight.data = layer.weight.data
    assert torch.equal(y, plain(x) + layer.bias) and torch.equal(integer_forward(layer, x), integer_forward(plain, x) + layer.bias)
    y.backward(torch.ones(4, 3))
    assert layer.bias.grad.tolist() == [4.0, 4.0, 4.0]


def test_before_nonlinear_hand_values():
    x = torch.tensor([[0.5, -1.0, 0.25]])
    # max - min = 1.5: s_x = 255 / 1.5 = 170, z = round(1 * 170) = 170;
    # x * s_x = [85, -170, 42.5 -> 42 (tie to even)], + z = [255, 0, 212]
    x_int, s_x, z = quantize_activation_shifted(x)
    assert (x_int.tolist(), s_x.item(), z.item()) == ([[255.0, 0.0, 212.0]], 170.0, 170.0)
    # 4 bits: s_x = 15 / 1.5 = 10, z = 10, x * s_x = [5, -10, 2.5 -> 2] + z = [15, 0, 12]
    assert quantize_activation_shifted(x, act_bits=4)[0].tolist() == [[15.0, 0.0, 12.0]]
    # 0 stays exactly 0: min = -0.3, s_x = 255 / 1.3, z = round(58.85) = 59, the code of 0 is 59
    zeros, s0, z0 = quantize_activation_shifted(torch.tensor([[0.0, -0.3, 1.0, 0.0]]))
    assert zeros[0, 0].item() == zeros[0, 3].item() == z0.item() == 59.0 and zeros[0, 1].item() == 0.0
    # b1: W = [[1, 2, -3], [4, 5, 6]]: alpha = 2.5, W_b = [[-1, -1, -1], [1, 1, 1]], beta = 3.5, row sums -3, 3.
    # x_q = (x_int - z) / 170 = [0.5, -1, 42 / 170]; W_b beta x_q = -+3.5 * (-43 / 170);
    # as the integer line: (x_int @ W_b^T - z * row sums) * beta / s_x = (-+467 +- 510) * 3.5 / 170
    b1 = BitLinear1b(3, 2, before_nonlinear=True)
    b1.weight.data = torch.tensor([[1.0, 2.0, -3.0], [4.0, 5.0, 6.0]])
    assert (-467 + 510) * 3.5 / 170 == pytest.approx(150.5 / 170)
    for y in (b1(x), integer_forward(b1, x)):
        torch.testing.assert_close(y, torch.tensor([[150.5 / 170, -150.5 / 170]]))
    # b1.58, 4 bits: W_t = [[1, 0, -1], [1, 1, 0]], s_w = 2/3, row sums 0, 2; x_q = ([15, 0, 12] - 10) / 10
    # = [0.5, -1, 0.2]: W_t s_w x_q = [0.3, -0.5] * 2/3; integer line: ([3, 15] - 10 * [0, 2]) * s_w / 10
    t = BitLinear(3, 2, act_bits=4, before_nonlinear=True)
    t.weight.data = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])
    for y in (t(x), integer_forward(t, x)):
        torch.testing.assert_close(y, torch.tensor([[0.2, -1 / 3]]))
    # a constant token: max - min = 0 (clamped to eps), x_int = 0, the output is the shift's term alone
    c = torch.full((1, 3), 2.0)
    assert quantize_activation_shifted(c)[0].tolist() == [[0.0, 0.0, 0.0]]
    torch.testing.assert_close(t(c), torch.tensor([[0.0, 2 * 2 * 2 / 3]]))


def literal_paper_form(x, w_q, act_bits=8, eps=1e-5):
    """The 1-bit paper's before-nonlinearity formula read literally: gamma = max|x|, (x - eta)
    clipped to [eps, Q_b - eps], eta never added back."""
    q_b = 2 ** (act_bits - 1)
    gamma, eta = x.abs().amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    return F.linear(((x - eta) * q_b / gamma).clamp(eps, q_b - eps).round() * gamma / q_b, w_q)


@pytest.mark.parametrize('kind', [BitLinear, BitLinear1b])
def test_before_nonlinear_approximates_w_x(kind):
    """On Gaussian input the layer's output is close to W_q x (W_q its dequantized weight); the
    paper's literal form computes W_q (x - eta), off by more than the output's size. The
    straight-through backward is W_q's, consistent with a forward that approximates W_q x."""
    torch.manual_seed(0)
    layer = kind(256, 128, before_nonlinear=True)
    w_i, scale = integer_weight(layer)
    w_q = w_i.float() * scale
    x = torch.randn(64, 256, requires_grad=True)
    rel = lambda y, x: ((y - F.linear(x, w_q)).norm() / F.linear(x, w_q).norm()).item()
    y = layer(x)
    assert rel(y, x) < 0.01 and rel(literal_paper_form(x, w_q), x) > 2.0
    # a non-negative input (ReLU's output: eta = 0) gets steps half the symmetric quantizer's
    symmetric = kind(256, 128)
    symmetric.weight.data = layer.weight.data
    r = F.relu(x)
    assert rel(layer(r), r) < 0.6 * rel(symmetric(r), r)
    g = torch.randn(64, 128)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w_q, atol=1e-6)


@pytest.mark.parametrize('options', [dict(act_bits=4), dict(before_nonlinear=True),
                                     dict(act_bits=3, eps=0.1, before_nonlinear=True)],
                         ids=['act_bits=4', 'before_nonlinear', 'act_bits=3,eps,before_nonlinear'])
def test_ternary_matmul_is_the_ste_form_for_every_option(options):
    """Eager (TernaryMatmul) and compiled (ternary_matmul_ste) forms agree bit for bit, forward and gradients."""
    config = BitLinearConfig(**options)
    x, w, g = random_case()
    eager = forward_backward(lambda x, w: TernaryMatmul.apply(x, w, config), x, w, g)
    for a, b in zip(eager, forward_backward(lambda x, w: ternary_matmul_ste(x, w, config), x, w, g)):
        assert torch.equal(a, b)


# --- packing --------------------------------------------------------------------------

def test_pack_hand_made_bytes():
    w = torch.tensor([[-1], [0], [1], [1], [0]], dtype=torch.int8)   # out = 5: R = 2 packed rows
    packed = pack_ternary(w)
    # packed row 0: rows 0, 2, 4 -> codes 0 | 2 << 2 | 1 << 4 = 24; row 1: rows 1, 3 -> 1 | 2 << 2 = 9
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[24], [9]]


@pytest.mark.parametrize('shape', [(1, 1), (1, 3), (4, 4), (5, 7), (6, 2), (13, 1), (64, 33), (127, 5)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    packed = pack_ternary(w)
    assert packed.shape == (math.ceil(shape[0] / 4), shape[1])
    assert torch.equal(unpack_ternary(packed, shape[0]), w)
    assert unpack_2bit(packed, shape[0]).max().item() <= 2


# --- report and verification -------------------------------------------------------------

def tiny_model(quant='b1.58', **options):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=32, quant=quant, **options))


def test_report_flags_non_ternary_layers():
    model = tiny_model()
    rows = bitlinear_report(model)
    assert len(rows) == 14 and all(r['ok'] for r in rows)
    assert all(0.1 < r['zero_fraction'] < 0.6 for r in rows)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float('inf')
    bad = [r['name'] for r in bitlinear_report(model) if not r['ok']]
    assert bad == ['model.layers.1.mlp.up_proj']


@pytest.mark.parametrize('quant', ['b1.58', 'b1'])
def test_verify_passes_within_float32_rounding(quant):
    """Training's dequantized product equals the integer product up to float32 rounding: far
    inside verify's tolerance (1e-5 of the largest logit)."""
    model = tiny_model(quant)
    report = verify_bitlinear(model, torch.randint(20, (2, 16)))
    assert report['ok'] and report['n_layers'] == 14
    assert report['max_diff'] < 1e-6 and report['tol'] == 1e-5
    assert report['packed_bits'] == 2.0


@pytest.mark.parametrize('quant', ['b1.58', 'b1'])
@pytest.mark.parametrize('options', [dict(act_bits=4), dict(bias=True), dict(before_nonlinear=True),
                                     dict(act_bits=3, bias=True, before_nonlinear=True)],
                         ids=['act_bits=4', 'bias', 'before_nonlinear', 'all'])
def test_verify_passes_for_every_option(quant, options):
    """integer_forward computes every option from integers (act_bits, the shift's row sums, the bias):
    each layer of the training form equals it within float32 rounding."""
    model = tiny_model(quant, **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('.bias'):
                p.normal_()
    idx = torch.randint(20, (2, 16))
    report = verify_bitlinear(model, idx)
    assert report['ok'] and report['n_layers'] == 14 and report['max_diff'] < 1e-6


@pytest.mark.parametrize('options', [dict(act_bits=4), dict(before_nonlinear=True)], ids=['act_bits=4', 'before_nonlinear'])
def test_verify_fails_when_forward_ignores_an_option(monkeypatch, options):
    model = tiny_model(**options)
    monkeypatch.setattr(BitLinear, 'forward', lambda self, x: TernaryMatmul.apply(x, self.weight, BitLinearConfig()))
    report = verify_bitlinear(model, torch.randint(20, (2, 16)))
    assert not report['ok'] and report['max_diff'] > 100 * report['tol']


def test_verify_fails_when_forward_skips_quantization(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(BitLinear, 'forward', lambda self, x: F.linear(x, self.weight))
    report = verify_bitlinear(model, torch.randint(20, (2, 16)))
    assert not report['ok'] and report['max_diff'] > report['tol']


def test_rmsnorm():
    norm = RMSNorm(4, eps=0.0)
    norm.weight.data = torch.tensor([1.0, 2.0, 1.0, 1.0])
    y = norm(torch.tensor([[1.0, 1.0, -1.0, -1.0], [2.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(y, torch.tensor([[1.0, 2.0, -1.0, -1.0], [2.0, 0.0, 0.0, 0.0]]))


def test_verify_compares_the_training_form_under_no_grad():
    """sample.py verifies in eval mode without grad, where a CPU BitLinear would take the eval
    cache (the integer line itself): verify still runs the training form, so rounding shows."""
    torch.manual_seed(0)
    model = tiny_model('b1.58').eval()
    with torch.no_grad():
        report = verify_bitlinear(model, torch.randint(20, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert report['ok'] and 0 < report['max_diff'] < 1e-6
