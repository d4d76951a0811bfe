"""export.py --format=gguf: the file read back with the gguf package's reader (llama.cpp's own):
tensor names, types, shapes, metadata, the ternary codes and scales, the tokenizer, the refusals."""
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import run

from bitlinear import quantize_weight
from checkpoint import save_checkpoint, save_packed
from gguf_export import escape_rwkv, gguf_refusal, tokenizer_fields
from hf import bytes_to_unicode
from model import GPT, PROJECTIONS, GPTConfig, projection_name
from packed import pack_model
from prepare_data import DataError, gpt2_encoding

CHARS = '\n !\\abcdefgé東'   # a newline, a backslash and characters of 2 and 3 UTF-8 bytes
META = dict(tokenizer='char', vocab_size=len(CHARS), chars=CHARS, dtype='uint16')
ARGS = dict(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
            intermediate_size=512, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-6)
GGUF_NAMES = dict(q_proj='attn_q', k_proj='attn_k', v_proj='attn_v', o_proj='attn_output',
                  gate_proj='ffn_gate', up_proj='ffn_up', down_proj='ffn_down')


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**ARGS, **overrides}))
    with torch.no_grad():   # norms away from 1, so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(checkpoint path, model, gguf path): a tiny char-level model exported by export.py."""
    root = tmp_path_factory.mktemp('gguf')
    model = tiny_model()
    save_checkpoint(dict(model=model.state_dict(), model_args=ARGS, tokenizer=META), str(root / 'ckpt.pt'))
    r = run('export.py', f'--ckpt_path={root / "ckpt.pt"}', f'--to={root / "model.gguf"}', '--format=gguf')
    assert r.returncode == 0, r.stderr
    assert f'wrote {root / "model.gguf"}: llama.cpp architecture bitnet' in r.stdout
    return root / 'ckpt.pt', model, root / 'model.gguf'


def field(reader, key):
    return reader.fields[key].contents()


def test_tensors_metadata_and_exact_ternary_weights(exported):
    _, model, path = exported
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    c = model.config
    expected = {'token_embd.weight': (gguf.GGMLQuantizationType.F32, [256, len(CHARS)]),
                'output_norm.weight': (gguf.GGMLQuantizationType.F32, [256])}
    for i in range(c.n_layer):
        for norm, size in (('attn_norm', 256), ('attn_sub_norm', 256), ('ffn_norm', 256), ('ffn_sub_norm', 512)):
            expected[f'blk.{i}.{norm}.weight'] = (gguf.GGMLQuantizationType.F32, [size])
        for proj, shape in dict(q_proj=[256, 256], k_proj=[256, 128], v_proj=[256, 128], o_proj=[256, 256],
                                gate_proj=[256, 512], up_proj=[256, 512], down_proj=[512, 256]).items():
            expected[f'blk.{i}.{GGUF_NAMES[proj]}.weight'] = (gguf.GGMLQuantizationType.TQ2_0, shape)
            expected[f'blk.{i}.{GGUF_NAMES[proj]}.scale'] = (gguf.GGMLQuantizationType.F32, [1])
    assert {n: (t.tensor_type, t.shape.tolist()) for n, t in tensors.items()} == expected
    # the codes and scales are quantize_weight's, exactly; every TQ2_0 block scale is 1
    state = model.state_dict()
    for i in range(c.n_layer):
        for proj in PROJECTIONS:
            w_t, s_w = quantize_weight(state[f'{projection_name(i, proj)}.weight'])
            t = tensors[f'blk.{i}.{GGUF_NAMES[proj]}.weight']
            codes = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.array_equal(codes, w_t.numpy().astype(np.float32))
            assert set(t.data.reshape(-1, 66)[:, 64:].copy().view(np.float16).ravel()) <= {1.0, 0.0}
            assert tensors[f'blk.{i}.{GGUF_NAMES[proj]}.scale'].data.tolist() == [s_w.item()]
        for ours, theirs in (('input_layernorm', 'attn_norm'), ('self_attn.attn_sub_norm', 'attn_sub_norm'),
                             ('post_attention_layernorm', 'ffn_norm'), ('mlp.ffn_sub_norm', 'ffn_sub_norm')):
            assert np.array_equal(tensors[f'blk.{i}.{theirs}.weight'].data,
                                  state[f'model.layers.{i}.{ours}.weight'].numpy())
    assert np.array_equal(tensors['token_embd.weight'].data, state['model.embed_tokens.weight'].numpy())
    assert np.array_equal(tensors['output_norm.weight'].data, state['model.norm.weight'].numpy())
    # the hyperparameters llama.cpp reads for the bitnet architecture
    meta = {k: field(reader, k) for k in reader.fields if k.startswith(('general.architecture', 'bitnet.'))}
    assert meta == {'general.architecture': 'bitnet', 'bitnet.context_length': 16, 'bitnet.embedding_length': 256,
                    'bitnet.block_count': 2, 'bitnet.feed_forward_length': 512, 'bitnet.attention.head_count': 4,
                    'bitnet.attention.head_count_kv': 2, 'bitnet.rope.dimension_count': 64,
                    'bitnet.rope.freq_base': 500.0, 'bitnet.attention.layer_norm_rms_epsilon': pytest.approx(1e-6),
                    'bitnet.vocab_size': len(CHARS), 'bitnet.hidden_activation': 'relu2'}
    assert field(reader, 'general.file_type') == gguf.LlamaFileType.MOSTLY_TQ2_0


def unescape_rwkv(token):
    """llama.cpp's llama_unescape_rwkv_token (src/llama-vocab.cpp), for the escapes escape_rwkv writes."""
    out, escaping = '', False
    for ch in token:
        if escaping:
            out += {'n': '\n', 't': '\t', 'r': '\r'}.get(ch, ch)
            escaping = False
        elif ch == '\\':
            escaping = True
        else:
            out += ch
    return out


def test_char_vocabulary_is_an_rwkv_token_list(exported):
    reader = gguf.GGUFReader(exported[2])
    assert field(reader, 'tokenizer.ggml.model') == 'rwkv'
    tokens = field(reader, 'tokenizer.ggml.tokens')
    assert tokens[:2] == ['\\n', ' '] and tokens[3] == '\\\\'
    assert [unescape_rwkv(t) for t in tokens] == list(CHARS)
    assert field(reader, 'tokenizer.ggml.token_type') == [gguf.TokenType.NORMAL] * len(CHARS)
    assert 'tokenizer.ggml.merges' not in reader.fields and 'tokenizer.ggml.eos_token_id' not in reader.fields
    assert escape_rwkv('x') == 'x' and escape_rwkv('\t') == '\\t'


def test_gpt2_vocabulary_matches_tiktoken(tmp_path):
    try:
        enc = gpt2_encoding()
    except DataError:
        pytest.skip("tiktoken's GPT-2 files are not available")
    meta = dict(tokenizer='gpt2', vocab_size=50257, dtype='uint16')
    model_kind, pre, tokens, types, merges, special = tokenizer_fields(meta, 50304)
    assert (model_kind, pre, special) == ('gpt2', 'gpt-2', dict(bos=50256, eos=50256))
    byte_text = bytes_to_unicode()
    for i in (0, 11, 198, 262, 1212, 30000, 50255):   # the token's bytes, written in GPT-2's byte alphabet
        assert tokens[i] == ''.join(byte_text[b] for b in enc.decode_single_token_bytes(i))
    assert tokens[50256] == '<|endoftext|>' and types[50256] == gguf.TokenType.CONTROL
    assert tokens[50257:] == [f'[PAD{i}]' for i in range(50257, 50304)]
    assert types[50257:] == [gguf.TokenType.UNUSED] * 47 and len(tokens) == len(types) == 50304
    assert len(merges) == 50000 and merges[0] == 'Ġ t'
    # (the char test reads a token list back from a file; reading GPT-2's 100,000 strings takes 12 s)


def test_packed_file_and_bfloat16(tmp_path, exported):
    """A packed file exports the same ternary tensors as its training checkpoint; dtype=bfloat16
    stores the embedding as BF16 and nothing else changes."""
    ckpt, model, path = exported
    packed = pack_model(tiny_model())
    save_packed(packed, str(tmp_path / 'packed.pt'), META)
    r = run('export.py', f'--ckpt_path={tmp_path / "packed.pt"}', f'--to={tmp_path / "p.gguf"}', '--format=gguf',
            '--dtype=bfloat16')
    assert r.returncode == 0, r.stderr
    a = {t.name: t for t in gguf.GGUFReader(path).tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / 'p.gguf').tensors}
    assert a.keys() == b.keys()
    for name in a:
        if name == 'token_embd.weight':
            assert b[name].tensor_type == gguf.GGMLQuantizationType.BF16
            bf16 = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
            assert np.array_equal(gguf.quants.dequantize(b[name].data, b[name].tensor_type), bf16)
        else:
            assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data, b[name].data), name


def test_refusals_and_replacing_a_file(tmp_path, exported):
    base = GPTConfig(**ARGS)
    assert gguf_refusal(base, META) is None
    cases = {
        "quant='b1'": GPTConfig(**{**ARGS, 'quant': 'b1'}),
        'act_bits=4': GPTConfig(**{**ARGS, 'act_bits': 4}),
        'bias=True': GPTConfig(**{**ARGS, 'bias': True}),
        'before_nonlinear=True': GPTConfig(**{**ARGS, 'before_nonlinear': True}),
        '--tie_embeddings=True': GPTConfig(**{**ARGS, 'tie_embeddings': False}),
        'n_embd is 128 and intermediate_size 512': GPTConfig(**{**ARGS, 'n_embd': 128}),
        'intermediate_size 320': GPTConfig(**{**ARGS, 'intermediate_size': 320}),
    }
    for words, config in cases.items():
        assert words in gguf_refusal(config, META)
    assert 'no tokenizer meta data' in gguf_refusal(base, None)
    assert 'neither GPT-2' in gguf_refusal(base, dict(tokenizer='hf', path='x', vocab_size=65))
    assert 'smaller than its tokenizer' in gguf_refusal(GPTConfig(**{**ARGS, 'vocab_size': 5}), META)
    # export.py's one-line errors: tests/test_bad_inputs.py. A file it did not write is replaced only
    # with --overwrite=True; its own earlier export always
    ckpt = exported[0]
    (tmp_path / 'mine.gguf').write_text('keep me')
    r = run('export.py', f'--ckpt_path={ckpt}', f'--to={tmp_path / "mine.gguf"}', '--format=gguf', '--overwrite=True')
    assert r.returncode == 0, r.stderr
    r = run('export.py', f'--ckpt_path={ckpt}', f'--to={tmp_path / "mine.gguf"}', '--format=gguf')
    assert r.returncode == 0, r.stderr
    assert gguf.GGUFReader(tmp_path / 'mine.gguf').fields['bitnet_gpt.source'].contents() == 'ckpt.pt'
