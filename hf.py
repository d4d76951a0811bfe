"""
Hugging Face transformers checkpoints, both ways: our GPT <-> a directory that
transformers.AutoModelForCausalLM loads as BitNetForCausalLM (model_type 'bitnet'), the format
of the BitNet b1.58 2B4T release (reference section 5).

    python export.py --out_dir=out --to=hf-out [--variant=packed]    ours -> transformers
    python train.py ... --init_from=hf:DIR                            transformers -> ours, fine-tune
    python sample.py --ckpt_path=hf:DIR                               transformers -> ours, sample

A directory holds config.json, model.safetensors (or the shards listed in
model.safetensors.index.json) and tokenizer files. export.py adds meta.json (our tokenizer meta
data, as in data/<name>/meta.json, so an import decodes as the original did) and export.json.

config.json <-> GPTConfig: vocab_size, hidden_size = n_embd, intermediate_size,
num_hidden_layers = n_layer, num_attention_heads = n_head, num_key_value_heads = n_kv_head,
max_position_embeddings = block_size, rms_norm_eps = norm_eps, rope_theta,
tie_word_embeddings = tie_embeddings, hidden_act; quantization_config {"quant_method": "bitnet"}
means quant='b1.58', no quantization_config quant='none'. model.py uses the Hugging Face module
names, so the state dict needs no renaming; lm_head.weight is left out when tied.

Two layouts: model_type 'bitnet' (BitNetForCausalLM: sub-norms, hidden_act 'relu2' as 2B4T, or
'silu') is sub_norms=True; model_type 'llama' (LlamaForCausalLM: no sub-norms, hidden_act 'silu'
in every Llama release) is sub_norms=False. Both use rotate-half rotary embeddings (Hugging Face
Llama checkpoints are stored permuted for it), as model.py does. transformers' bitnet quantization
applies to either (Hugging Face's Llama3-8B-1.58 is a LlamaForCausalLM with a bitnet
quantization_config), so a b1.58 model without sub-norms exports as a quantized LlamaForCausalLM.
bos_token_id and eos_token_id name tokens of the tokenizer, not of the model: import checks that
they lie in the vocabulary; export writes those of the tokenizer it copies (GPT-2's <|endoftext|>,
or a transformers tokenizer directory's config.json), None for a character vocabulary.

The released BitNet b1.58 2B4T config.json (microsoft/bitnet-b1.58-2B-4T), field by field:
vocab_size 128256, hidden_size 2560, intermediate_size 6912, num_hidden_layers 30,
num_attention_heads 20, num_key_value_heads 5 (head_dim 128), max_position_embeddings 4096,
rms_norm_eps 1e-5, rope_theta 500000.0, tie_word_embeddings true, hidden_act 'relu2',
bos_token_id 128000, eos_token_id 128001, torch_dtype bfloat16, and quantization_config
{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"} (packed,
weight_scale = 1 / s_w); initializer_range, use_cache and auto_map do not change the model.
Its -bf16 sibling holds the latent weights without a quantization_config, which transformers runs
as a float model and so does the import: fine-tune it with --quant=b1.58 (train.py).

What transformers does with the two variants (read in transformers 5.23,
integrations/bitnet.py, AutoBitLinear):
- master, quantization_mode 'online': each projection holds the latent float weight and every
  forward quantizes it as our BitLinear does: s_w = max(mean|W|, 1e-5), W_q = clamp(round(W /
  s_w), -1, 1) * s_w, and the input per token, in float32: s_x = 127 / max(max|x|, 1e-5),
  x_q = clamp(round(x * s_x), -128, 127) / s_x; y = F.linear(x_q, W_q).
- packed, quantization_mode 'offline': weight is uint8 (out / 4, in), 2 bits a value
  (bitlinear.pack_ternary), unpacked on load to W_t in the model's dtype; weight_scale is a (1,)
  tensor, cast to the model's dtype on load, and y = F.linear(x_q, W_t) * weight_scale, so
  weight_scale = s_w (we store it in float32 whatever the dtype, as pack.py's files do).
  transformers unpacks only when 4 * rows == out_features, so a layer whose output size is not a
  multiple of 4 cannot be exported packed.
- the older linear_class 'bitlinear' (the packed 2B4T release) computes y = F.linear(x_int, W_t)
  / (s_x * weight_scale): it stores weight_scale = 1 / s_w. Import reads both classes.

Packed weights come back as latent weights of magnitude about s_w / f, f the fraction of
nonzero W_t (latent_from_ternary). W_t * s_w alone is not enough: its mean|W| is f * s_w, so it
would quantize to a smaller scale, another model. With the 1 / f, mean|W| = s_w and W / s_w is
0 or about +-1/f, which rounds and clamps back to W_t.
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from bitlinear import pack_ternary, quantize_weight, unpack_2bit, weight_scale
from checkpoint import CheckpointError
from model import ACTIVATIONS, GPT, PROJECTIONS, GPTConfig
from prepare_data import gpt2_encoding

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
VARIANTS = ('master', 'packed')
ROPE_THETA = {'bitnet': 500000.0, 'llama': 10000.0}   # BitNetConfig's and LlamaConfig's when config.json names none
GPT2_EOT = 50256                # <|endoftext|>, GPT-2's only special token


class HFError(CheckpointError):
    """A directory that cannot become our GPT, or a GPT that cannot become one; says what to do."""


def progress(items, what):
    """items with a progress bar on stderr while they are consumed, for the minutes a large model takes;
    shown only on a terminal, and cleared (also by an error, when used as a context manager)."""
    return tqdm(items, desc=what, unit='tensor', leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def is_projection(name):
    """True for the weight of a BitLinear projection, e.g. model.layers.0.mlp.up_proj.weight."""
    parts = name.split('.')
    return len(parts) >= 2 and parts[-1] == 'weight' and parts[-2] in PROJECTIONS


# -----------------------------------------------------------------------------
# ours -> transformers

def hf_special_ids(meta):
    """(bos_token_id, eos_token_id) of a tokenizer's meta data: GPT-2's <|endoftext|> for both,
    a transformers tokenizer directory's config.json values (else its tokenizer's), None for a
    character vocabulary or none at all."""
    if meta and meta.get('tokenizer') == 'gpt2':
        return GPT2_EOT, GPT2_EOT
    if meta and meta.get('tokenizer') == 'hf' and meta.get('path'):
        config_path = os.path.join(meta['path'], 'config.json')
        if os.path.isfile(config_path):
            config = read_json(config_path, 'config.json')
            return config.get('bos_token_id'), config.get('eos_token_id')
        tokenizer = hf_tokenizer(meta['path'])
        return tokenizer.bos_token_id, tokenizer.eos_token_id
    return None, None


def hf_config(model_args, variant, dtype, meta):
    """config.json of the BitNetForCausalLM (or, without sub-norms, LlamaForCausalLM) equal to a GPT
    of model_args."""
    cfg = GPTConfig(**model_args)
    if cfg.quant == 'b1':
        raise HFError("a b1 (binary) model cannot be exported: transformers' BitNet format holds ternary "
                      "(b1.58) or float weights only")
    options = cfg.nonstandard_options()
    if options:
        raise HFError(f"a model with {options} cannot be exported: transformers' BitNet layers compute "
                      f"8-bit symmetric activations without a bias (sample.py samples from the checkpoint itself)")
    if variant == 'packed' and cfg.quant != 'b1.58':
        raise HFError("a float model (quant='none') has no ternary weights to pack: export it with --variant=master")
    bos, eos = hf_special_ids(meta)
    config = dict(
        architectures=['BitNetForCausalLM' if cfg.sub_norms else 'LlamaForCausalLM'],
        model_type='bitnet' if cfg.sub_norms else 'llama',
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=bos,   # None for a character-level vocabulary (BitNetConfig's default is Llama 3's)
        eos_token_id=eos,
        pad_token_id=None,
        torch_dtype=dtype,
    )
    if not cfg.sub_norms:
        config.update(mlp_bias=False, head_dim=cfg.n_embd // cfg.n_head)
    if cfg.quant == 'b1.58':
        config['quantization_config'] = dict(quant_method='bitnet', linear_class='autobitlinear',
                                             quantization_mode='online' if variant == 'master' else 'offline')
    return config


def hf_state_dict(model, variant, dtype):
    """The tensors of model.safetensors: our state dict in dtype, without lm_head.weight when it is
    tied; packed: every projection as uint8 'weight' (ceil(out / 4), in) plus 'weight_scale' (1,)."""
    out = {}
    with progress(model.state_dict().items(), 'converting') as tensors:
        for name, t in tensors:
            if name == 'lm_head.weight' and model.config.tie_embeddings:
                continue    # transformers ties it to model.embed_tokens.weight
            if variant == 'packed' and is_projection(name):
                if t.shape[0] % 4:
                    raise HFError(f"{name} has {t.shape[0]} output rows, and transformers loads packed weights "
                                  f"only when that is a multiple of 4: export with --variant=master")
                w_t, s_w = quantize_weight(t)
                out[name] = pack_ternary(w_t)
                out[name + '_scale'] = s_w.reshape(1)   # ...q_proj.weight_scale, float32 as in pack.py's files
            else:
                out[name] = t.detach().to('cpu', DTYPES[dtype]).contiguous()
    return out


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters, the alphabet of its vocab.json
    and merges.txt (printable bytes map to themselves, the others to chr(256 + k))."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    chars = {b: chr(b) for b in keep}
    for k, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + k)
    return chars


def gpt2_vocab_and_merges():
    """GPT-2's BPE vocabulary {token text: id} (byte-level text, bytes_to_unicode) and its 50,000
    merges ('left right', in rank order), built from tiktoken's GPT-2 ranks. tiktoken stores ranks,
    not merges; the merge that makes a token is found by running BPE on its bytes with the ranks
    below its own, which leaves exactly two parts. transformers'
    TikTokenConverter.extract_vocab_merges_from_model gives the same vocabulary (in rank order,
    without <|endoftext|>) but lists every split of a token into two tokens as a merge (108,299
    lines instead of GPT-2's 50,000), so its files differ from GPT-2's; tests/test_hf.py compares."""
    enc = gpt2_encoding()
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    byte_chars = bytes_to_unicode()
    text = lambda b: ''.join(byte_chars[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:   # byte-pair merges in rank order, as the tokenizer does them
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"GPT-2 token {token!r} is not one merge of two lower-ranked tokens"
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(b): r for b, r in ranks.items()}
    vocab['<|endoftext|>'] = GPT2_EOT
    return vocab, merges


def gpt2_tokenizer_files(model_max_length):
    """{file name: text} of a GPT-2 tokenizer that transformers' AutoTokenizer loads
    (gpt2_vocab_and_merges): vocab.json (token -> id), merges.txt and tokenizer_config.json."""
    vocab, merges = gpt2_vocab_and_merges()
    config = dict(tokenizer_class='GPT2Tokenizer', model_max_length=model_max_length, add_prefix_space=False,
                  bos_token='<|endoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')
    return {
        'vocab.json': json.dumps(vocab, ensure_ascii=False),
        'merges.txt': '#version: 0.2\n' + '\n'.join(merges) + '\n',
        'tokenizer_config.json': json.dumps(config, indent=2),
    }


# -----------------------------------------------------------------------------
# transformers -> ours

def read_json(path, what):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except OSError:
        raise HFError(f"no {what} at {path}: point hf:DIR at a transformers BitNet or Llama directory "
                      f"(python export.py writes one)") from None
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None


def gpt_args_from_hf(config, where):
    """(GPTConfig fields, linear_class) of a config.json; HFError for anything our GPT cannot be."""
    model_type = config.get('model_type')
    if model_type not in ('bitnet', 'llama'):
        raise HFError(f"{where} holds a model of type {model_type!r}: only 'bitnet' (BitNetForCausalLM) and "
                      f"'llama' (LlamaForCausalLM) checkpoints can be read")
    missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                           'num_attention_heads') if config.get(k) is None]
    if missing:
        raise HFError(f"{where}/config.json has no {missing[0]}")
    hidden_act = config.get('hidden_act', 'relu2' if model_type == 'bitnet' else 'silu')   # the configs' defaults
    if hidden_act not in ACTIVATIONS:
        raise HFError(f"{where} has hidden_act {hidden_act!r}: our GPT's MLP gates with one of {', '.join(ACTIVATIONS)}")
    if config.get('attention_bias') or config.get('mlp_bias'):
        raise HFError(f"{where} has biases in its projections: our GPT imports models without them")
    vocab = config['vocab_size']
    for key in ('bos_token_id', 'eos_token_id'):
        ids = config.get(key)
        ids = ids if isinstance(ids, list) else [ids]
        if any(i is not None and not (isinstance(i, int) and 0 <= i < vocab) for i in ids):
            raise HFError(f"{where}/config.json has {key} {config[key]}, outside its vocabulary of {vocab} tokens")
    rope = config.get('rope_parameters') or config.get('rope_scaling') or {}
    if rope.get('rope_type', rope.get('type', 'default')) != 'default':
        raise HFError(f"{where} uses rope_type {rope.get('rope_type', rope.get('type'))!r}; only plain "
                      f"rotary embeddings ('default') are supported")
    head_dim = config['hidden_size'] // config['num_attention_heads']
    if config.get('head_dim') not in (None, head_dim):
        raise HFError(f"{where} has head_dim {config['head_dim']}, but our GPT needs hidden_size / "
                      f"num_attention_heads = {head_dim}")
    qc = config.get('quantization_config')
    linear_class = None
    if qc is not None:
        if qc.get('quant_method') != 'bitnet':
            raise HFError(f"{where} is quantized with {qc.get('quant_method')!r}, not BitNet's ternary weights")
        linear_class = qc.get('linear_class', 'bitlinear')   # BitNetQuantConfig's default
        if linear_class not in ('autobitlinear', 'bitlinear') or qc.get('use_rms_norm'):
            raise HFError(f"{where} uses linear_class {linear_class!r} with use_rms_norm={qc.get('use_rms_norm')}: "
                          f"only 'autobitlinear' and 'bitlinear' without an extra RMSNorm are supported")
        if set(qc.get('modules_to_not_convert') or []) - {'lm_head', 'lm_head$'}:
            raise HFError(f"{where} keeps {qc['modules_to_not_convert']} in float; our GPT quantizes "
                          f"every projection")
    args = dict(
        vocab_size=config['vocab_size'],
        n_embd=config['hidden_size'],
        intermediate_size=config['intermediate_size'],
        n_layer=config['num_hidden_layers'],
        n_head=config['num_attention_heads'],
        n_kv_head=config.get('num_key_value_heads') or config['num_attention_heads'],   # the configs' default
        block_size=config.get('max_position_embeddings', 2048),
        norm_eps=config.get('rms_norm_eps', 1e-5),
        rope_theta=float(rope.get('rope_theta', config.get('rope_theta', ROPE_THETA[model_type]))),
        tie_embeddings=bool(config.get('tie_word_embeddings', False)),
        quant='b1.58' if qc is not None else 'none',
        dropout=0.0,
        hidden_act=hidden_act,
        sub_norms=model_type == 'bitnet',
    )
    try:
        GPTConfig(**args)
    except ValueError as e:
        raise HFError(f"{where}/config.json: {e}") from None
    return args, linear_class


def read_tensors(path):
    """{name: tensor} of model.safetensors, or of every shard in model.safetensors.index.json."""
    single, index = os.path.join(path, 'model.safetensors'), os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        files = [os.path.join(path, f) for f in sorted(set(read_json(index, 'index')['weight_map'].values()))]
    else:
        raise HFError(f"{path} has no model.safetensors (nor model.safetensors.index.json): only safetensors "
                      f"weights are read")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:
            raise HFError(f"{f} is missing, damaged or not safetensors ({type(e).__name__})") from None
    return tensors


def latent_from_ternary(w_t, s_w):
    """Latent float weights W that quantize back to (w_t, s_w): every nonzero gets a magnitude near
    s_w / f, f the fraction of nonzeros, so W / s_w rounds and clamps to w_t, and mean|W| = s_w.
    For the mean to be s_w bit for bit, the magnitudes are whole multiples of q, the float32
    spacing at S (the float32 with S / n == s_w), summing to S: every partial sum is then exact,
    in any order. That needs q <= s_w / 2, true up to about 4M weights a layer; larger layers get
    equal magnitudes s_w / f, whose mean can be an ulp or two off s_w."""
    w_t = w_t.float()
    nonzero = w_t.ne(0)
    nnz = int(nonzero.sum())
    if nnz == 0:
        return torch.zeros_like(w_t)
    total = torch.tensor(s_w.item() * w_t.numel(), dtype=torch.float32)   # S, the sum of |W| to hit
    for _ in range(16):   # S, then its float32 neighbours until S / n rounds to s_w
        q = 2.0 ** (math.frexp(total.item())[1] - 24)    # S = M * q with the integer M < 2^24
        base, extra = divmod(round(total.item() / q), nnz)
        if base * q < s_w.item() / 2:
            break
        magnitudes = torch.full((nnz,), base * q)
        magnitudes[:extra] += q
        w = torch.zeros_like(w_t)
        w[nonzero] = magnitudes
        w = w * w_t
        got = weight_scale(w)
        if got == s_w:
            return w
        total = torch.nextafter(total, total * 2 if got < s_w else total / 2)
    return w_t * (s_w * w_t.numel() / nnz)


def gpt_state_dict_from_hf(tensors, model_args, linear_class, where):
    """Our state dict (float32) from a directory's tensors; packed projections become latent weights."""
    with torch.device('meta'):   # the shapes our GPT expects, without allocating it
        expected = GPT(GPTConfig(**model_args)).state_dict()
    tied = model_args['tie_embeddings']
    state, used = {}, set()
    with progress(expected.items(), 'reading weights') as names:
        for name, like in names:
            if name == 'lm_head.weight' and tied:
                continue
            if name not in tensors:
                raise HFError(f"{where}: {name} is missing from the weights")
            t = tensors[name]
            used.add(name)
            if t.dtype == torch.uint8 and is_projection(name):   # packed 2-bit weights
                shape = (math.ceil(like.shape[0] / 4), like.shape[1])
                scale = tensors.get(name + '_scale')
                if linear_class is None or scale is None or scale.numel() != 1 or tuple(t.shape) != shape:
                    raise HFError(f"{where}: {name} is packed (uint8 {tuple(t.shape)}), but config.json "
                                  f"describes {tuple(like.shape)} and needs a bitnet quantization_config and a (1,) "
                                  f"weight_scale")
                codes = unpack_2bit(t, like.shape[0])
                if (codes == 3).any():
                    raise HFError(f"{where}: {name} holds the 2-bit code 3, which is no ternary value: "
                                  f"the file is damaged")
                scale = scale.float().reshape(())
                if not (torch.isfinite(scale) and scale > 0):
                    raise HFError(f"{where}: {name}_scale is {scale.item()}, not a positive number: "
                                  f"the file is damaged")
                s_w = scale if linear_class == 'autobitlinear' else 1.0 / scale   # 'bitlinear' stores 1 / s_w
                t = latent_from_ternary(codes.to(torch.int8) - 1, s_w)
                used.add(name + '_scale')
            elif tuple(t.shape) != tuple(like.shape):
                raise HFError(f"{where}: {name} has shape {tuple(t.shape)}, but config.json describes "
                              f"{tuple(like.shape)}")
            state[name] = t.float()
    if tied:
        state['lm_head.weight'] = state['model.embed_tokens.weight']
        used.add('lm_head.weight')   # a tied checkpoint may store it anyway; transformers ignores it
    unexpected = sorted(k for k in set(tensors) - used if not k.endswith('rotary_emb.inv_freq'))
    if unexpected:
        layout = 'BitNetForCausalLM' if model_args.get('sub_norms', True) else 'LlamaForCausalLM'
        raise HFError(f"{where}: {unexpected[0]} is not a weight of the {layout} config.json describes"
                      f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    return state


def load_hf_checkpoint(path):
    """A transformers BitNet directory as one of our checkpoint dicts ('model', 'model_args' and,
    where known, 'tokenizer'), for checkpoint.model_from_checkpoint. The tokenizer is our meta.json
    when export.py wrote the directory, else the directory's own transformers tokenizer."""
    if not os.path.isdir(path):
        raise HFError(f"no directory at {path}: hf:DIR names a transformers BitNet directory "
                      f"(python export.py --to=DIR writes one)")
    config = read_json(os.path.join(path, 'config.json'), 'config.json')
    model_args, linear_class = gpt_args_from_hf(config, path)
    state = gpt_state_dict_from_hf(read_tensors(path), model_args, linear_class, path)
    checkpoint = dict(model=state, model_args=model_args)
    if os.path.isfile(os.path.join(path, 'meta.json')):
        checkpoint['tokenizer'] = read_json(os.path.join(path, 'meta.json'), 'meta.json')
    elif any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer_config.json')):
        checkpoint['tokenizer'] = dict(tokenizer='hf', path=os.path.abspath(path), vocab_size=config['vocab_size'])
    return checkpoint


def hf_tokenizer(path):
    """transformers' AutoTokenizer of a directory, or HFError."""
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise HFError(f"could not load the tokenizer of {path} with transformers ({type(e).__name__}): "
                      f"pip install transformers, or check its tokenizer files") from None


def same_hf_tokenizer(a, b):
    """Whether the transformers tokenizers of directories a and b are one tokenizer: the same
    directory, or the same vocabulary (token -> id, added tokens included) and special tokens."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ta, tb = hf_tokenizer(a), hf_tokenizer(b)
    return ta.get_vocab() == tb.get_vocab() and ta.all_special_tokens == tb.all_special_tokens


def check_finetuning_data(checkpoint, meta, block_size, where, data_path):
    """Fine-tuning continues the model's own vocabulary: the dataset must be tokenized with it (the
    same meta data as export.py's meta.json, or for a directory with its own transformers tokenizer,
    a dataset tokenized with that tokenizer: prepare_data.py --tokenizer=hf:DIR), and its
    sequences must fit the model's rotary tables (max_position_embeddings)."""
    own = checkpoint.get('tokenizer')
    strip = lambda m: {k: v for k, v in m.items() if k != 'dtype'}
    vocab = checkpoint['model_args']['vocab_size']
    other = (f"{where} was trained with another tokenizer ({own['tokenizer'] if own else ''}, {vocab} tokens) than "
             f"{data_path} ({meta['tokenizer']}, {meta['vocab_size']} tokens): fine-tune it on a dataset prepared "
             f"with its own tokenizer")
    if own is not None and own['tokenizer'] != 'hf' and strip(own) != strip(meta):
        raise HFError(other)
    if own is not None and own['tokenizer'] == 'hf':
        if meta.get('tokenizer') != 'hf' or not meta.get('path'):
            raise HFError(other + f" (python prepare_data.py NAME --input=... --tokenizer=hf:{own['path']})")
        if not same_hf_tokenizer(own['path'], meta['path']):
            raise HFError(other.replace(f"({meta['tokenizer']},", f"(hf:{meta['path']},"))
    if meta['vocab_size'] != vocab:
        raise HFError(f"{where} has a vocabulary of {vocab} tokens, {data_path} one of {meta['vocab_size']}: "
                      f"fine-tune it on a dataset prepared with the model's own tokenizer")
    longest = checkpoint['model_args']['block_size']
    if block_size > longest:
        raise HFError(f"block_size {block_size} is longer than {where}'s max_position_embeddings ({longest}): "
                      f"use --block_size={longest} or less")
