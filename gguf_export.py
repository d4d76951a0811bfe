"""
GGUF files for llama.cpp: a b1.58 GPT as one .gguf file in llama.cpp's 'bitnet' architecture
(the one BitNet b1.58 2B4T converts to), written with the gguf package (llama.cpp's own writer):

    python export.py --out_dir=out --to=model.gguf --format=gguf

What goes in (llama.cpp src/models/bitnet.cpp names; GGUF lists a shape innermost first):

    token_embd.weight            (n_embd, vocab)  F32 (dtype='bfloat16': BF16); also the output
                                 layer: the bitnet graph always ties it (so lm_head must be tied)
    output_norm.weight           (n_embd,)        F32, model.norm
    blk.N.attn_norm / ffn_norm   (n_embd,)        F32, input_layernorm / post_attention_layernorm
    blk.N.attn_sub_norm          (n_embd,)        F32, in front of attn_output
    blk.N.ffn_sub_norm           (intermediate,)  F32, in front of ffn_down
    blk.N.attn_q/k/v/output, ffn_gate/up/down .weight   TQ2_0: W_t, 2 bits a weight
    blk.N.<same>.scale           (1,)             F32: s_w, applied after the product

TQ2_0 stores blocks of 256 weights along a row (the input dimension): 64 bytes of 2-bit codes
(code = W_t + 1) and an fp16 scale d. Every d here is 1.0 (0.0 for an all-zero block), so the
codes are W_t exactly and s_w stays float32 in the .scale tensor: the file holds exactly the
ternary weights and scales of bitlinear.quantize_weight. n_embd and intermediate_size must be
multiples of 256.

How llama.cpp computes it (read at commit 0c1e57098, 2026-10-01): RMSNorm, q/k/v, RoPE in the
NEOX style (pairs (i, i + d/2), our rotate-half, so q and k need no permutation), attention with
scale 1/sqrt(head_dim), attn_sub_norm, attn_output, residual; ffn_norm, gate and up, the gated
activation, ffn_sub_norm, ffn_down, residual; output_norm, token_embd as the output layer. A
TQ2_0 product quantizes its input to Q8_K: int8 in blocks of 256 along the row, scale
max|x| / 127 per block, round to nearest even, as our per-token quantizer does when the row is
one block (in_features = 256); wider rows get one scale per 256 values instead of one per token.
Its bitnet graph applies SiLU (silu(gate) * up), not our relu(gate)^2 * up: the 2024 bitnet
architecture was a SiLU model, and the 2B4T's squared ReLU is not in the graph at that commit
(ggml-org/llama.cpp#25885, microsoft/BitNet#588). The file says relu2 in
bitnet.hidden_activation; docs/gguf.md shows the 6-line change that makes llama.cpp read it.

Tokenizers: GPT-2 BPE as tokenizer.ggml.model 'gpt2' (pre-tokenizer 'gpt-2', GPT-2's tokens and
50,000 merges, <|endoftext|> as bos and eos, no bos added), ids past 50,257 as unused [PADi];
a character vocabulary as model 'rwkv': a greedy longest match over byte strings, which for
single characters is exactly our character encoding (any Unicode), with no special tokens.
"""

import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType, TokenType

from bitlinear import quantize_weight
from hf import GPT2_EOT, gpt2_vocab_and_merges
from model import PROJECTIONS, projection_parent

ARCH = 'bitnet'
BLOCK = 256                  # TQ2_0 / Q8_K block: weights (activations) sharing one scale
SOURCE_KEY = 'bitnet_gpt.source'   # the checkpoint a file was exported from: marks files export.py wrote
GGUF_NAMES = dict(q_proj='attn_q', k_proj='attn_k', v_proj='attn_v', o_proj='attn_output',
                  gate_proj='ffn_gate', up_proj='ffn_up', down_proj='ffn_down')
NORM_NAMES = {'input_layernorm': 'attn_norm', 'self_attn.attn_sub_norm': 'attn_sub_norm',
              'post_attention_layernorm': 'ffn_norm', 'mlp.ffn_sub_norm': 'ffn_sub_norm'}


def gguf_refusal(config, meta):
    """Why llama.cpp's bitnet architecture cannot hold this model (config: GPTConfig, meta: the
    tokenizer meta data), as one sentence that says what to do; None when it can."""
    if config.quant != 'b1.58':
        return (f"llama.cpp's bitnet architecture holds ternary projections (quant='b1.58'), this model has "
                f"quant='{config.quant}': export it with --format=hf instead")
    options = config.nonstandard_options()
    if options:
        return (f"llama.cpp's bitnet graph computes 8-bit symmetric activations without a bias, this model has "
                f"{options}: export it with --format=hf instead")
    if not config.tie_embeddings:
        return ("llama.cpp's bitnet graph uses token_embd as the output layer (tied embeddings), this model has "
                "its own lm_head: train with --tie_embeddings=True, or export with --format=hf")
    if config.n_embd % BLOCK or config.intermediate_size % BLOCK:
        return (f"TQ2_0 packs rows in blocks of {BLOCK}, but n_embd is {config.n_embd} and intermediate_size "
                f"{config.intermediate_size}: train with both multiples of {BLOCK}")
    if meta is None:
        return "the checkpoint has no tokenizer meta data, and llama.cpp needs the vocabulary in the file"
    if meta['tokenizer'] not in ('char', 'gpt2'):
        return (f"its tokenizer ({meta['tokenizer']}) is neither GPT-2's nor a character vocabulary, the two "
                f"this export writes: export it with --format=hf instead")
    size = len(meta['chars']) if meta['tokenizer'] == 'char' else GPT2_EOT + 1
    if config.vocab_size < size:
        return f"the model's vocab_size ({config.vocab_size}) is smaller than its tokenizer's ({size})"
    return None


def ternary_weights(model):
    """[{'q_proj': (W_t int8 (out, in), s_w float32 scalar), ...} per layer] of a b1.58 GPT,
    training form (bitlinear.quantize_weight of the latent weights) or packed (the stored codes)."""
    layers = []
    for block in model.model.layers:
        if hasattr(block, 'ternary_weights'):   # packed.PackedBlock
            layers.append({k: (w, s.reshape(())) for k, (w, s) in block.ternary_weights().items()})
        else:
            layers.append({p: quantize_weight(getattr(getattr(block, projection_parent(p)), p).weight)
                           for p in PROJECTIONS})
    return layers


def tq2_0(w_t):
    """W_t int8 (out, in) -> TQ2_0 bytes (out, in / 256 * 66): codes W_t + 1, every block scale 1."""
    return gguf.quants.quantize(w_t.numpy().astype(np.float32), GGMLQuantizationType.TQ2_0)


def escape_rwkv(char):
    """A character as llama.cpp's rwkv tokenizer reads a token: backslash escapes (\\\\, \\n, \\t, \\r),
    every other character as itself."""
    return {'\\': '\\\\', '\n': '\\n', '\t': '\\t', '\r': '\\r'}.get(char, char)


def tokenizer_fields(meta, vocab_size):
    """(model, pre, tokens, token types, merges, special ids {bos/eos: id}) for the vocabulary of
    meta, padded with unused tokens to vocab_size."""
    if meta['tokenizer'] == 'char':
        tokens = [escape_rwkv(c) for c in meta['chars']]
        types = [TokenType.NORMAL] * len(tokens)
        model, pre, merges, special = 'rwkv', None, [], {}
    else:
        vocab, merges = gpt2_vocab_and_merges()
        tokens = [None] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        types = [TokenType.NORMAL] * len(tokens)
        types[GPT2_EOT] = TokenType.CONTROL
        model, pre, special = 'gpt2', 'gpt-2', dict(bos=GPT2_EOT, eos=GPT2_EOT)
    pad = range(len(tokens), vocab_size)
    return model, pre, tokens + [f'[PAD{i}]' for i in pad], types + [TokenType.UNUSED] * len(pad), merges, special


def write_gguf(model, meta, path, dtype='float32', source=''):
    """Write model (a b1.58 GPT that gguf_refusal accepts, training form or packed) and its
    tokenizer to path as GGUF. dtype: 'float32' or 'bfloat16' for the embedding (norms and scales
    stay float32). source names the checkpoint (SOURCE_KEY). Returns the number of bytes written."""
    c = model.config
    head_dim = c.n_embd // c.n_head
    w = gguf.GGUFWriter(path, ARCH)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(SOURCE_KEY, source or 'unknown')
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_string(f'{ARCH}.hidden_activation', 'relu2')   # what the graph should apply (module docstring)
    tok_model, pre, tokens, types, merges, special = tokenizer_fields(meta, c.vocab_size)
    w.add_tokenizer_model(tok_model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    if 'bos' in special:
        w.add_bos_token_id(special['bos'])
        w.add_eos_token_id(special['eos'])
        w.add_add_bos_token(False)   # sample.py starts from the prompt's own tokens

    f32 = lambda t: t.detach().float().cpu().numpy()
    embedding = model.model.embed_tokens.weight.detach().float().cpu()
    if dtype == 'bfloat16':
        w.add_tensor('token_embd.weight', gguf.quants.quantize(embedding.numpy(), GGMLQuantizationType.BF16),
                     raw_dtype=GGMLQuantizationType.BF16)
    else:
        w.add_tensor('token_embd.weight', embedding.numpy())
    w.add_tensor('output_norm.weight', f32(model.model.norm.weight))
    for i, (block, weights) in enumerate(zip(model.model.layers, ternary_weights(model))):
        for ours, theirs in NORM_NAMES.items():
            norm = block
            for part in ours.split('.'):
                norm = getattr(norm, part)
            w.add_tensor(f'blk.{i}.{theirs}.weight', f32(norm.weight))
        for proj in PROJECTIONS:
            w_t, s_w = weights[proj]
            w.add_tensor(f'blk.{i}.{GGUF_NAMES[proj]}.weight', tq2_0(w_t), raw_dtype=GGMLQuantizationType.TQ2_0)
            w.add_tensor(f'blk.{i}.{GGUF_NAMES[proj]}.scale', f32(s_w).reshape(1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.path.getsize(path)


def is_gguf_export(path):
    """True when path is a GGUF file that export.py wrote (it has SOURCE_KEY), which a later
    export may replace; False for anything else."""
    try:
        with open(path, 'rb') as f:
            if f.read(4) != b'GGUF':
                return False
        return SOURCE_KEY in gguf.GGUFReader(path).fields
    except Exception:
        return False
