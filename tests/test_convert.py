"""Turning float models ternary and fine-tuning released BitNets: warm-up quantization
(bitlinear.quant_mix, train.py quant_warmup_iters), the model options hidden_act and sub_norms,
Llama directories both ways (hf.py), and a directory with the released 2B4T config.json at tiny
sizes fine-tuned with train.py --init_from=hf:DIR, exported packed and loaded in transformers."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bitlinear import BitLinear, dequantize_activation, quantize_weight
from checkpoint import model_from_checkpoint
from conftest import TINY, synthetic_text
from hf import HFError, check_finetuning_data, load_hf_checkpoint
from model import GPT, GPTConfig
import packed as packed_module
from packed import pack_model
from test_hf import eager_transformers, export, hf_pack, logit_diff, probe, script  # noqa: F401 (a fixture)

transformers = pytest.importorskip('transformers')
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402


# -----------------------------------------------------------------------------
# warm-up quantization

def layer_and_input():
    """A 3 -> 2 BitLinear with hand-made weights and a (2, 3) input."""
    layer = BitLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.30, -0.02, 0.11], [-0.25, 0.07, 0.40]]))
    return layer, torch.tensor([[1.0, -0.5, 0.26], [0.003, 2.0, -1.1]], requires_grad=True)


def forward_backward(layer, x):
    layer.weight.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    return y.detach(), x.grad, layer.weight.grad.clone()


def test_quant_lambda_ends_are_the_float_and_the_quantized_layer_bit_for_bit():
    layer, x = layer_and_input()
    plain = forward_backward(layer, x)                  # TernaryMatmul, no warm-up
    layer.quant_lambda = torch.tensor(1.0)
    assert all(torch.equal(a, b) for a, b in zip(forward_backward(layer, x), plain))
    layer.quant_lambda = torch.tensor(0.0)
    y, gx, gw = forward_backward(layer, x)
    assert torch.equal(y, F.linear(x.detach(), layer.weight.detach()))   # the float layer
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(gx, g @ layer.weight.detach()) and torch.equal(gw, g.t() @ x.detach())
    # in between: x + lambda * (x_q - x) and W + lambda * (W_q - W), by hand
    layer.quant_lambda = torch.tensor(0.25)
    w = layer.weight.detach()
    s_w = w.abs().mean()                                  # (0.30 + 0.02 + 0.11 + 0.25 + 0.07 + 0.40) / 6
    w_q = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]) * s_w
    x_q = dequantize_activation(x.detach(), layer.config)
    assert torch.equal(x_q[0], torch.tensor([127.0, -64.0, 33.0]) / 127)   # round(x * 127 / max|x|) / (127 / max|x|)
    y = forward_backward(layer, x)[0]
    torch.testing.assert_close(y, F.linear(x.detach() + 0.25 * (x_q - x.detach()), w + 0.25 * (w_q - w)),
                               rtol=1e-6, atol=1e-7)


def test_gpt_quant_lambda_zero_is_the_float_model_and_compiles_once():
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=32)
    ternary, float_model = GPT(GPTConfig(**cfg)).eval(), GPT(GPTConfig(**cfg, quant='none')).eval()
    float_model.load_state_dict(ternary.state_dict())
    idx = torch.randint(20, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = ternary(idx, idx)[0].detach()   # with grad: TernaryMatmul, not the CPU eval cache's integer line
    with torch.no_grad(), torch._dynamo.config.patch(disable=False):   # this module runs transformers eagerly
        ternary.set_quant_lambda(0.0)
        assert torch.equal(ternary(idx, idx)[0], float_model(idx, idx)[0])
        torch._dynamo.reset()
        compiled = torch.compile(ternary, backend='eager')
        torch._dynamo.utils.counters.clear()
        outputs = []
        for value in (0.0, 0.3, 0.7, 1.0):   # one shared tensor, updated in place: one graph for every value
            ternary.set_quant_lambda(value)
            outputs.append(compiled(idx, idx)[0])
        assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1
        assert torch.equal(outputs[0], float_model(idx, idx)[0]) and torch.equal(outputs[3], plain)
        assert not torch.equal(outputs[1], outputs[2])
    binary = GPT(GPTConfig(**cfg, quant='b1')).eval()   # BitLinear1b mixes alike
    binary.load_state_dict(float_model.state_dict())
    with torch.no_grad():
        plain = binary(idx, idx)[0]
        binary.set_quant_lambda(0.0)
        assert torch.equal(binary(idx, idx)[0], float_model(idx, idx)[0])
        binary.set_quant_lambda(1.0)
        assert torch.equal(binary(idx, idx)[0], plain)


def test_quant_warmup_resumes_exactly(tmp_path, corpus_dir):
    """A warm-up run stopped in the ramp and resumed equals the uninterrupted run; the resumed run keeps
    its checkpoint's quant_warmup_iters whatever the flag says, and lambda < 1 is never the best model."""
    common = [*TINY, f'--data_dir={corpus_dir}', '--dataset=tiny', '--quant_warmup_iters=4', '--eval_interval=2',
              '--log_interval=1', '--lr_decay_iters=6', '--warmup_iters=1', '--always_save_checkpoint=True']
    whole, part = tmp_path / 'whole', tmp_path / 'part'
    r = script('train.py', *common, f'--out_dir={whole}', '--max_iters=6')
    assert r.returncode == 0, r.stderr
    assert '(warm-up quantization, lambda 0.500)' in r.stdout
    r = script('train.py', *common, f'--out_dir={part}', '--max_iters=2')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(part / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['quant_warmup_iters'] == 4 and ckpt['best_val_loss'] == float('inf')
    r = script('train.py', *common[:-5], '--quant_warmup_iters=0', '--eval_interval=2', '--log_interval=1',
               '--lr_decay_iters=6', '--warmup_iters=1', f'--out_dir={part}', '--max_iters=6', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert "resuming with the checkpoint's quant_warmup_iters=4" in r.stdout
    log = lambda d: [{k: v for k, v in json.loads(line).items() if k != 'dt_ms'} for line in open(d / 'train_log.jsonl')]
    a, b = log(whole), log(part)
    assert a == b
    evals = [rec for rec in a if 'val_loss' in rec]
    assert [rec.get('quant_lambda') for rec in evals] == [0.0, 0.5, None, None]
    assert torch.load(whole / 'ckpt.pt', weights_only=True)['best_iter'] in (4, 6)


# -----------------------------------------------------------------------------
# model options and Llama directories

def tiny_llama(path, tie=False):
    """A random LlamaForCausalLM built by transformers (GQA 4/2, rope_theta 5000), saved with save_pretrained."""
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=5000.0,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():   # norms away from 1, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize('tie', [False, True])
def test_llama_imports_with_equal_logits(tmp_path, tie):
    theirs = tiny_llama(tmp_path / 'llama', tie)
    checkpoint = load_hf_checkpoint(str(tmp_path / 'llama'))
    args = checkpoint['model_args']
    assert (args['hidden_act'], args['sub_norms'], args['quant'], args['n_kv_head'], args['rope_theta'],
            args['tie_embeddings']) == ('silu', False, 'none', 2, 5000.0, tie)
    ours = model_from_checkpoint(checkpoint, 'llama').eval()
    idx = probe(50)
    with torch.no_grad():
        a, b = ours(idx, idx)[0], theirs(idx).logits
    diff = (a - b).abs().max().item()
    print(f"\nLlama (tied={tie}) -> ours, float: max |logit diff| {diff:.3g}")
    assert diff <= 1e-5 * max(1.0, b.abs().max().item())


def llama_layout_checkpoint(path, quant):
    """A tiny GPT in the Llama layout (silu, no sub-norms) saved as train.py does, and the model."""
    from checkpoint import save_checkpoint
    args = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                quant=quant, hidden_act='silu', sub_norms=False, rope_theta=5000.0)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
    save_checkpoint(dict(model=model.state_dict(), model_args=args, iter_num=0, config={}, tokenizer=None), str(path))
    return model


@pytest.mark.parametrize('quant,variant', [('none', 'master'), ('b1.58', 'master'), ('b1.58', 'packed')])
def test_llama_layout_exports_as_llama_and_back(tmp_path, quant, variant):
    model = llama_layout_checkpoint(tmp_path / 'ckpt.pt', quant)
    r = export(tmp_path / 'ckpt.pt', tmp_path / 'hf', f'--variant={variant}')
    assert r.returncode == 0, r.stderr
    assert 'LlamaForCausalLM' in r.stdout
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['model_type'] == 'llama' and config['hidden_act'] == 'silu'
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
    assert type(theirs).__name__ == 'LlamaForCausalLM'
    assert type(theirs.lm_head) is torch.nn.Linear
    assert (type(theirs.model.layers[0].mlp.down_proj).__name__ == 'AutoBitLinear') == (quant == 'b1.58')
    diff, tol, flips = logit_diff(model, theirs, probe(50))
    print(f"\nours -> Llama {quant} {variant}: max |logit diff| {diff:.3g} (tolerance {tol:.3g}), {flips} flips")
    assert diff <= tol
    back = model_from_checkpoint(load_hf_checkpoint(str(tmp_path / 'hf')), 'hf').eval()
    idx = probe(50)
    with torch.no_grad():
        assert torch.equal(back(idx, idx)[0], model(idx, idx)[0])


def test_silu_and_unknown_activations_are_refused_where_unsupported(tmp_path):
    model = llama_layout_checkpoint(tmp_path / 'ckpt.pt', 'b1.58')
    with pytest.raises(ValueError, match="hidden_act='silu' cannot be packed"):
        pack_model(model)
    r = script('pack.py', f'--ckpt_path={tmp_path / "ckpt.pt"}')
    assert r.returncode == 2 and "hidden_act='silu' cannot be packed" in r.stderr and r.stderr.count('\n') == 1
    # a relu2 model without sub-norms packs, and its packed logits are the integer line's
    relu2 = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=64, sub_norms=False)).eval()
    from conftest import integer_layers
    idx = torch.randint(20, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), integer_layers(relu2):
        ref = relu2(idx, idx)[0]
    packed = pack_model(relu2)
    packed_module._reference_path = True   # the op's pure-PyTorch form: no C++ kernel to build
    try:
        with torch.no_grad():
            torch.testing.assert_close(packed(idx, idx)[0], ref, rtol=1e-5, atol=1e-5)
    finally:
        packed_module._reference_path = False
    tiny_llama(tmp_path / 'gelu')
    config = json.loads((tmp_path / 'gelu' / 'config.json').read_text())
    (tmp_path / 'gelu' / 'config.json').write_text(json.dumps(dict(config, hidden_act='gelu')))
    with pytest.raises(HFError, match="hidden_act 'gelu'"):
        load_hf_checkpoint(str(tmp_path / 'gelu'))
    (tmp_path / 'gelu' / 'config.json').write_text(json.dumps(dict(config, model_type='mistral')))
    with pytest.raises(HFError, match="type 'mistral'"):
        load_hf_checkpoint(str(tmp_path / 'gelu'))


def test_old_checkpoints_load_with_the_default_options():
    args = dict(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=32)   # no hidden_act, no sub_norms
    model = model_from_checkpoint(dict(model=GPT(GPTConfig(**args)).state_dict(), model_args=args))
    assert model.config.hidden_act == 'relu2' and model.config.sub_norms
    assert 'model.layers.0.mlp.ffn_sub_norm.weight' in model.state_dict()


# -----------------------------------------------------------------------------
# the released 2B4T config.json at tiny sizes, fine-tuned with its own tokenizer

WORDS = 'the king and queen of love shall speak to thee my lord good night sweet ROMEO JULIET NURSE FRIAR : .'.split()


def save_tokenizer(path, words):
    """A word-level transformers tokenizer built offline with the tokenizers library: [UNK], the words,
    then Llama 3's two special tokens at the end of the vocabulary, as 2B4T has them (128000, 128001)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(['[UNK]', *words])}, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]')
    fast.add_special_tokens(dict(bos_token='<|begin_of_text|>', eos_token='<|end_of_text|>'))
    fast.save_pretrained(path)
    return len(fast)


def released_2b4t_dir(path, quantization_config):
    """microsoft/bitnet-b1.58-2B-4T's config.json, every field as released, at tiny sizes (hidden 64 for 2560,
    MLP 96 for 6912, 2 layers for 30, 4/1 heads for 20/5, the vocabulary of our tokenizer for 128256 with
    bos/eos its last two ids as 128000/128001 are Llama 3's), packed weights of the class it names, bf16."""
    vocab = save_tokenizer(path, WORDS)
    config = dict(architectures=['BitNetForCausalLM'], bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                  hidden_act='relu2', hidden_size=64, initializer_range=0.02, intermediate_size=96,
                  max_position_embeddings=4096, model_type='bitnet', rms_norm_eps=1e-05, num_attention_heads=4,
                  num_hidden_layers=2, num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
                  torch_dtype='bfloat16', use_cache=True, vocab_size=vocab, quantization_config=quantization_config)
    (path / 'config.json').write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                          intermediate_size=96, rope_theta=500000.0, tie_embeddings=True))
    tensors = {}
    for name, t in model.state_dict().items():
        if name == 'lm_head.weight':
            continue
        if name.endswith('_proj.weight'):   # 'bitlinear' stores 1 / s_w, divided by
            tensors[name], tensors[name + '_scale'] = hf_pack(t, reciprocal=True)
            tensors[name + '_scale'] = tensors[name + '_scale'].bfloat16()
        else:
            tensors[name] = t.bfloat16()
    save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
    return vocab


def hf_dataset(data_dir, name, tokenizer_dir):
    """train.bin/val.bin (uint32) and meta.json of a text tokenized with a transformers tokenizer, as
    prepare_data.py --tokenizer=hf:DIR writes them."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = np.array(tok(synthetic_text(600))['input_ids'], dtype=np.uint32)
    os.makedirs(data_dir / name)
    n = int(0.9 * len(ids))
    ids[:n].tofile(data_dir / name / 'train.bin')
    ids[n:].tofile(data_dir / name / 'val.bin')
    meta = dict(tokenizer='hf', path=str(tokenizer_dir), vocab_size=len(tok), dtype='uint32')
    (data_dir / name / 'meta.json').write_text(json.dumps(meta))
    return meta


RELEASED_QC = dict(quant_method='bitnet', linear_class='bitlinear', quantization_mode='offline')


def test_released_2b4t_config_fine_tunes_exports_packed_and_loads_in_transformers(tmp_path):
    d = tmp_path / '2b4t'
    d.mkdir()
    vocab = released_2b4t_dir(d, RELEASED_QC)
    args = load_hf_checkpoint(str(d))['model_args']
    assert args == dict(vocab_size=vocab, n_embd=64, intermediate_size=96, n_layer=2, n_head=4, n_kv_head=1,
                        block_size=4096, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True, quant='b1.58',
                        dropout=0.0, hidden_act='relu2', sub_norms=True)
    hf_dataset(tmp_path / 'data', 'words', d)
    out = tmp_path / 'out'
    r = script('train.py', *TINY[:2], '--block_size=32', '--batch_size=8', '--eval_iters=2',
               f'--data_dir={tmp_path / "data"}', '--dataset=words', f'--out_dir={out}', f'--init_from=hf:{d}',
               '--max_iters=2', '--eval_interval=2', '--act_bits=8', '--dropout=0.0')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args'] == dict(args, act_bits=8) and ckpt['tokenizer']['path'] == str(d)
    r = export(out / 'ckpt.pt', tmp_path / 'exported', '--variant=packed')
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
    assert (config['bos_token_id'], config['eos_token_id'], config['rope_theta'], config['num_key_value_heads'],
            config['tie_word_embeddings']) == (vocab - 2, vocab - 1, 500000.0, 1, True)
    assert AutoTokenizer.from_pretrained(tmp_path / 'exported').get_vocab() == AutoTokenizer.from_pretrained(d).get_vocab()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / 'exported', dtype=torch.float32).eval()
    ours = model_from_checkpoint(ckpt, 'ckpt').eval()
    diff, tol, flips = logit_diff(ours, theirs, probe(vocab))
    print(f"\n2B4T config fine-tuned -> packed -> transformers: max |logit diff| {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol


def test_released_2b4t_refusals(tmp_path, corpus_dir):
    """Shape settings that contradict the directory, and data from another tokenizer, end in one line;
    the quantizer's settings apply."""
    d = tmp_path / '2b4t'
    d.mkdir()
    vocab = released_2b4t_dir(d, dict(quant_method='bitnet', offline_quantization=True))   # an older revision's
    hf_dataset(tmp_path / 'data', 'words', d)
    base = [*TINY[:2], '--block_size=32', '--batch_size=4', '--eval_iters=1', f'--data_dir={tmp_path / "data"}',
            '--dataset=words', f'--init_from=hf:{d}', '--max_iters=1', '--eval_interval=1', '--always_save_checkpoint=True']
    r = script('train.py', *base, f'--out_dir={tmp_path / "a"}', '--n_layer=3')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert r.stderr.startswith(f"error: --n_layer=3 conflicts with hf:{d}, whose n_layer is 2")
    r = script('train.py', *base, f'--out_dir={tmp_path / "a"}', '--rope_theta=10000.0')
    assert r.returncode == 2 and 'whose rope_theta is 500000.0' in r.stderr
    r = script('train.py', *base, f'--out_dir={tmp_path / "b"}', '--act_bits=4', '--n_head=4', '--n_kv_head=1')
    assert r.returncode == 0, r.stderr     # act_bits applies; shape settings equal to the directory's pass
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['model_args']['act_bits'] == 4
    # another tokenizer: a character-level dataset, and a transformers tokenizer with other words
    r = script('train.py', *base[:-4], f'--data_dir={corpus_dir}', '--dataset=tiny', f'--init_from=hf:{d}',
               f'--out_dir={tmp_path / "c"}', '--max_iters=1')
    assert r.returncode == 2 and 'another tokenizer' in r.stderr and r.stderr.count('\n') == 1
    other = tmp_path / 'other_tok'
    assert save_tokenizer(other, list(reversed(WORDS))) == vocab
    meta = hf_dataset(tmp_path / 'data', 'other', other)
    with pytest.raises(HFError, match='another tokenizer'):
        check_finetuning_data(load_hf_checkpoint(str(d)), meta, 32, f'hf:{d}', 'data/other')
    check_finetuning_data(load_hf_checkpoint(str(d)), dict(meta, path=str(d)), 32, f'hf:{d}', 'data/words')
    config = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps(dict(config, eos_token_id=[vocab - 1, vocab])))
    with pytest.raises(HFError, match=f'has eos_token_id \\[{vocab - 1}, {vocab}\\], outside its vocabulary of {vocab}'):
        load_hf_checkpoint(str(d))


def test_float_llama_turns_ternary_with_warmup_and_sub_norms(tmp_path):
    """A float Llama directory fine-tuned with --quant=b1.58 --quant_warmup_iters (refused without --quant: the
    directory is float): lambda 0 at the first evaluation; sub_norms=True adds the sub-norms (weight 1, trained)."""
    tiny_llama(tmp_path / 'llama')
    vocab = save_tokenizer(tmp_path / 'llama', WORDS)
    config = json.loads((tmp_path / 'llama' / 'config.json').read_text())
    (tmp_path / 'llama' / 'config.json').write_text(json.dumps(dict(config, vocab_size=vocab)))
    tensors = load_file(tmp_path / 'llama' / 'model.safetensors')
    tensors = {k: v[:vocab].contiguous() if k in ('model.embed_tokens.weight', 'lm_head.weight') else v
               for k, v in tensors.items()}
    save_file(tensors, tmp_path / 'llama' / 'model.safetensors', metadata={'format': 'pt'})
    hf_dataset(tmp_path / 'data', 'words', tmp_path / 'llama')
    out = tmp_path / 'out'
    common = [*TINY[:2], '--block_size=32', '--batch_size=4', '--eval_iters=2', f'--data_dir={tmp_path / "data"}',
              '--dataset=words', f'--init_from=hf:{tmp_path / "llama"}', '--quant_warmup_iters=2']
    r = script('train.py', *common, f'--out_dir={out}')   # the directory's quant='none' unless --quant says
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and r.stderr.endswith("add --quant=b1.58\n")
    r = script('train.py', *common, '--quant=b1.58', '--sub_norms=True', '--max_iters=2', '--eval_interval=1',
               '--dropout=0.0', f'--out_dir={out}', '--always_save_checkpoint=True')
    assert r.returncode == 0, r.stderr
    first = json.loads(open(out / 'train_log.jsonl').readline())
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    args = ckpt['model_args']
    assert (args['quant'], args['hidden_act'], args['sub_norms']) == ('b1.58', 'silu', True)
    assert first['quant_lambda'] == 0.0
    assert torch.equal(ckpt['model']['model.layers.1.mlp.ffn_sub_norm.weight'].ne(1), torch.ones(96, dtype=torch.bool))
