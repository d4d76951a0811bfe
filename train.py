"""
Train a 1.58-bit GPT. One process on a CPU, a Mac or a GPU:

    python train.py config/shakespeare_char.py
    python train.py config/shakespeare_char.py --device=cpu --max_iters=200 --compile=False

Several GPUs with torchrun: DDP (a full copy of the model on each), or FSDP with --fsdp=True
(weights, gradients and optimizer state sharded over the ranks); on several nodes, the same
command on each with --nnodes=2 --node_rank=K --rdzv-endpoint=HOST:PORT instead of --standalone:

    torchrun --standalone --nproc_per_node=8 train.py config/shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py config/shakespeare_char.py --fsdp=True

batch_size and gradient_accumulation_steps describe the whole step, whatever the number of ranks:
each of N ranks computes batch_size / N sequences of every micro-batch, so 1 or N ranks train on
the same batches (with dropout, each rank draws its own masks).

The settings below are the defaults; a config file reassigns some of them and --key=value
overrides single ones (configurator.py). Checkpoints go to out_dir/ckpt.pt, the log of
every logged iteration and evaluation to out_dir/train_log.jsonl. A new run never starts in an
out_dir that holds either (resume it, or choose another); a resumed one drops the records logged
after its checkpoint (a crashed run's tail), which it writes again. A run whose loss or gradient
norm becomes inf or nan stops with one line (exit code 2) and never saves those weights.
"""

import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

from configurator import (check, check_choice, check_device, check_device_present, check_floats, check_heads, check_ints,
                          check_optional_bools, configure, fail, settings_of)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 250        # evaluate (and maybe checkpoint) every this many iterations, and at the end
log_interval = 10          # print the training loss and the mean time per iteration every this many iterations
eval_iters = 200           # batches per split in an evaluation
eval_only = False          # evaluate once and exit
always_save_checkpoint = False  # save at every evaluation, not only when val loss improves
init_from = 'scratch'      # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'hf:DIR' (start from the weights of a
                           # transformers BitNetForCausalLM or LlamaForCausalLM directory, e.g. export.py's; hf.py).
                           # hf:DIR's architecture is the directory's: a model-shape setting set to another value
                           # is refused; quant, act_bits, before_nonlinear, dropout and sub_norms=True (adds the
                           # sub-norms, weights 1, to a Llama layout) apply to it
# wandb logging (imported only when on)
wandb_log = False
wandb_project = 'bitnet'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'   # data_dir/<dataset>/{train,val}.bin, meta.json (prepare_data.py)
data_dir = 'data'
gradient_accumulation_steps = 1  # micro-batches per optimizer step (every rank computes its share of each)
batch_size = 64            # sequences per micro-batch over all ranks: each of N ranks computes batch_size / N
block_size = 256           # tokens per sequence
# model
n_layer = 6
n_head = 6
n_kv_head = None           # None: n_head; fewer for grouped-query attention
n_embd = 384
intermediate_size = None   # MLP width; None: 8/3 * n_embd, rounded up to 64
dropout = 0.2
quant = 'b1.58'            # 'b1.58' (ternary), 'b1' (binary) or 'none' (float baseline)
act_bits = 8               # bits per activation of the BitLinear layers, 2..8 (4: a W1.58A4 model)
bias = False               # a bias in every projection (pack.py and export.py refuse it)
before_nonlinear = False   # down_proj quantizes its input over min..max and adds the shift back (bitlinear.py)
tie_embeddings = False
rope_theta = 10000.0
hidden_act = 'relu2'       # the MLP's gate: 'relu2' (relu(x)^2, BitNet b1.58 2B4T) or 'silu' (Llama)
sub_norms = True           # attn_sub_norm, ffn_sub_norm in front of o_proj, down_proj (SubLN; False: the Llama layout)
quant_warmup_iters = 0     # > 0: warm-up quantization over the first this many iterations, for turning a float model
                           # (quant='none' checkpoint, or float Llama directory) ternary with --quant=b1.58: every
                           # BitLinear multiplies x + lambda * (quant(x) - x), weights alike, with lambda = min(iter /
                           # quant_warmup_iters, 1), a linear ramp per step as Hugging Face's "Fine-tuning LLMs to 1.58bit"
                           # (its 10B-token runs: lambda = min(step / 1000, 1)); lambda < 1 evaluations are logged but
                           # never counted as the best model or saved as one (0: quantized from the first step)
# AdamW
learning_rate = 1e-3       # peak learning rate
max_iters = 5000           # optimizer steps
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0            # clip the gradient norm to this; 0 turns clipping off
ema_decay = 0.0            # > 0: keep an exponential moving average of the weights (Polyak averaging),
                           # after every step ema = ema_decay * ema + (1 - ema_decay) * weights, from the
                           # initial weights on; evaluations, best_val_loss and the checkpoint's 'model' are
                           # then the average's, and the trained weights go to 'train_model' for resuming
# learning rate schedule
lr_schedule = 'cosine'     # 'cosine': warmup, then cosine to min_lr at lr_decay_iters
                           # 'two_stage': the b1.58 recipe: cosine from learning_rate until
                           # lr_decay_iters / 2, then a drop to stage2_lr and a cosine from there
                           # to min_lr; weight decay is switched off in the second stage
warmup_iters = 100
lr_decay_iters = 5000      # usually max_iters
min_lr = 1e-4
stage2_lr = 4e-4           # peak of the second stage ('two_stage' only)
# system
device = 'auto'            # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'             # 'auto' (bfloat16 on CUDA where supported, else float16; float32 elsewhere),
                           # 'float32', 'bfloat16', 'float16' (CUDA only, with a gradient scaler)
compile = None             # torch.compile; None: on for CUDA, off elsewhere
cuda_graphs = None         # run the compiled forward and backward as CUDA graphs (torch.compile
                           # mode='reduce-overhead'): one launch instead of hundreds of kernels, the
                           # step of small models is bound by launching them (docs/results.md, training
                           # step); None: on when compiling for one CUDA GPU (not under torchrun)
                           # with gradient_accumulation_steps = 1
seed = 1337
backend = 'nccl'           # torch.distributed backend on CUDA ('gloo' is used on CPU)
fsdp = False               # under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2,
                           # fully_shard per block, then the rest) instead of a full copy on each (DDP)
activation_checkpointing = False  # keep only each block's input and recompute its activations in the backward
                                  # pass: activation memory of about one block, for one more forward of compute
# -----------------------------------------------------------------------------
config_keys = list(settings_of(globals()))
explicit = set()  # the settings a config file or a flag set: hf:DIR refuses shape settings among them
configure(globals(), sys.argv[1:], explicit)
config = {k: globals()[k] for k in config_keys}  # saved in the checkpoint and sent to wandb

# every setting's range, and what out_dir holds, checked before torch is imported (2 s) or a file is touched
check_choice(globals(), 'quant', ('b1.58', 'b1', 'none'))   # model.QUANT_MODES
check_choice(globals(), 'lr_schedule', ('cosine', 'two_stage'))
check_choice(globals(), 'hidden_act', ('relu2', 'silu'))   # model.ACTIVATIONS
check(init_from in ('scratch', 'resume') or init_from.startswith('hf:'),
      f"init_from must be 'scratch', 'resume' or 'hf:DIR', got '{init_from}'")
check_choice(globals(), 'dtype', ('auto', 'float32', 'bfloat16', 'float16'))
check_choice(globals(), 'backend', ('nccl', 'gloo'))
check_device(device)
check_ints(globals(), 'eval_interval log_interval eval_iters batch_size block_size gradient_accumulation_steps '
                      'n_layer n_head n_embd', 1)
check_ints(globals(), 'n_kv_head intermediate_size', 1, allow_none=True)
check_ints(globals(), 'max_iters warmup_iters lr_decay_iters seed quant_warmup_iters', 0)
check_floats(globals(), 'learning_rate rope_theta', 0, low_open=True)
check_floats(globals(), 'min_lr stage2_lr weight_decay grad_clip', 0)
check_floats(globals(), 'beta1 beta2 dropout', 0, 1)
check(2 <= act_bits <= 8, f"act_bits must be 2..8 (8: the b1.58 model; 4: W1.58A4), got {act_bits}")
check(0.0 <= ema_decay < 1.0, f"ema_decay must be in [0, 1) (0: no moving average; e.g. 0.999), got {ema_decay}")
check_optional_bools(globals(), 'compile cuda_graphs')
check(isinstance(sub_norms, bool), f"sub_norms must be True or False, got {sub_norms!r}")
check_heads(n_embd, n_head, n_kv_head)
check(not os.path.isfile(out_dir), f"--out_dir={out_dir} is a file: name a directory (a new one, or a run's to resume)")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'train_log.jsonl')
if init_from != 'resume' and os.environ.get('RANK', '0') == '0':  # new weights never touch an existing run
    check(not (eval_only and init_from == 'scratch' and os.path.exists(ckpt_path)),
          f"--eval_only=True with init_from='scratch' would evaluate new random weights, not {ckpt_path}: "
          f"add --init_from=resume to evaluate the checkpoint")
    existing = [p for p in (ckpt_path, log_path) if os.path.exists(p)]
    check(not existing, f"{existing[0] if existing else ''} exists and a new run would overwrite it: continue it with "
                        f"--init_from=resume, or choose another --out_dir, or delete it")

# torch and the model, after the settings are checked ----------------------------
import numpy as np
import torch
from tqdm import tqdm

import prepare_data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from hf import check_finetuning_data, load_hf_checkpoint
from model import GPT, GPTConfig, device_peak_flops

# devices, DDP, precision -----------------------------------------------------
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
device_type = device.split(':')[0]
check_device_present(device)
distributed = 'RANK' in os.environ  # launched by torchrun: DDP, or FSDP with fsdp=True
if distributed:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0  # logs and writes the checkpoint
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
# checked before the ranks connect: every rank ends alike, none waits for another
if dtype == 'float16' and device_type != 'cuda':
    fail("dtype float16 needs CUDA (it trains with a CUDA gradient scaler): use float32 or bfloat16")
if batch_size % world_size:
    fail(f"batch_size ({batch_size}) must be a multiple of the number of processes ({world_size}), which "
         f"share every micro-batch: set --batch_size={max(batch_size // world_size, 1) * world_size} or run "
         f"a number of processes that divides {batch_size}")
if fsdp and not distributed:
    fail("fsdp=True shards the model over torchrun's processes: "
         "torchrun --standalone --nproc_per_node=N train.py ... (N=1 works too)")
if fsdp and dtype == 'float16':  # the gradient scaler's inf check would see only this rank's shards
    fail("fsdp=True trains in bfloat16 or float32, not float16: use --dtype=bfloat16")
local_batch_size = batch_size // world_size  # this rank's sequences of every micro-batch
if distributed:
    import torch.distributed as dist
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend if device_type == 'cuda' else 'gloo')

ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
scaler = torch.amp.GradScaler('cuda', enabled=(dtype == 'float16'))
if compile is None:
    compile = device_type == 'cuda'
graphs_possible = compile and device_type == 'cuda' and not distributed and gradient_accumulation_steps == 1
if cuda_graphs is None:
    cuda_graphs = graphs_possible
elif cuda_graphs and not graphs_possible:  # a graph's next run overwrites the gradients being accumulated
    fail("cuda_graphs=True needs compile=True on one CUDA GPU (not under torchrun) and "
         "gradient_accumulation_steps=1: drop --cuda_graphs=True")
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# data: prepared on the fly for the built-in datasets ---------------------------
data_path = os.path.join(data_dir, dataset)
if not all(os.path.exists(os.path.join(data_path, f)) for f in ('train.bin', 'val.bin', 'meta.json')):
    if dataset not in prepare_data.DATASETS:
        fail(f"dataset '{dataset}' is not prepared: run python prepare_data.py {dataset} --input=YOUR_TEXT.txt")
    if master_process:
        try:
            prepare_data.prepare(dataset, data_dir=data_dir)
        except prepare_data.DataError as e:
            fail(str(e))
    if distributed:
        dist.barrier()
with open(os.path.join(data_path, 'meta.json')) as f:
    meta = json.load(f)
split_tokens = {split: os.path.getsize(os.path.join(data_path, f'{split}.bin')) // np.dtype(meta['dtype']).itemsize
                for split in ('train', 'val')}
TRAIN, EVAL = 0, 1  # purposes of random draws


def get_batch(split, purpose, *key):
    """This rank's local_batch_size rows (from rank * local_batch_size on) of a batch of batch_size
    random windows of split. The batch is a function of (seed, purpose, split, key) alone: training
    draws use (iter, micro_step), evaluations a fixed set per split, so a resumed run sees the same
    batches as an uninterrupted one, and N ranks together the batches of one process."""
    # recreate np.memmap every batch to avoid a memory leak (nanoGPT)
    data = np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    if len(data) <= block_size:
        fail(f"{data_path}/{split}.bin has {len(data)} tokens, fewer than block_size + 1 ({block_size + 1})")
    rng = np.random.default_rng([seed, purpose, ('train', 'val').index(split), *key])
    ix = rng.integers(0, len(data) - block_size, size=batch_size)[rank * local_batch_size:(rank + 1) * local_batch_size]
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device_type == 'cuda':  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# model ---------------------------------------------------------------------------
model_args = dict(block_size=block_size, vocab_size=meta['vocab_size'], n_layer=n_layer, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=intermediate_size, dropout=dropout,
                  quant=quant, tie_embeddings=tie_embeddings, rope_theta=rope_theta, act_bits=act_bits, bias=bias,
                  before_nonlinear=before_nonlinear, hidden_act=hidden_act, sub_norms=sub_norms)
iter_num, best_val_loss, best_iter = 0, float('inf'), 0
wandb_run_id = None  # a resumed run logs on in the wandb run its checkpoint names
torch.manual_seed(seed)  # the same initial weights on every rank
if init_from == 'scratch':
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        fail(str(e))
    checkpoint = None
elif init_from.startswith('hf:'):  # a new run from a transformers directory's weights, in its vocabulary
    try:
        checkpoint = load_hf_checkpoint(init_from[3:])
        check_finetuning_data(checkpoint, meta, block_size, init_from, data_path)
        own = checkpoint['model_args']
        # the directory's shape; the quantizer's settings and dropout are this run's, and sub_norms=True adds
        # sub-norms (weights 1) to a Llama layout, the RMSNorm in front of o_proj and down_proj that Hugging Face's
        # 1.58-bit fine-tuning puts in front of every BitLinear (q, k, v, gate, up read the block's pre-norms)
        for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'intermediate_size', 'tie_embeddings', 'rope_theta',
                  'hidden_act', 'bias', 'sub_norms'):
            if k in explicit and model_args[k] != own.get(k, GPTConfig.__dataclass_fields__[k].default) and \
                    not (k == 'sub_norms' and model_args[k]):
                fail(f"--{k}={model_args[k]} conflicts with {init_from}, whose {k} is {own.get(k)}: the architecture "
                     f"is the directory's; drop --{k} (quant, act_bits, before_nonlinear, dropout and sub_norms=True "
                     f"apply to an imported model)")
        model_args = {**own, 'dropout': dropout,
                      **{k: model_args[k] for k in ('quant', 'act_bits', 'before_nonlinear', 'sub_norms') if k in explicit}}
        if model_args['sub_norms'] and not own.get('sub_norms', True):
            for i in range(model_args['n_layer']):
                checkpoint['model'][f'model.layers.{i}.self_attn.attn_sub_norm.weight'] = torch.ones(model_args['n_embd'])
                checkpoint['model'][f'model.layers.{i}.mlp.ffn_sub_norm.weight'] = torch.ones(model_args['intermediate_size'])
        checkpoint['model_args'] = model_args
        model = model_from_checkpoint(checkpoint, init_from, dropout=dropout)
    except CheckpointError as e:
        fail(str(e))
    checkpoint = None  # a new run: no optimizer state
else:
    try:  # under FSDP every rank reads the whole file and keeps its shards
        checkpoint = load_checkpoint(ckpt_path, map_location='cpu' if fsdp else device)
        if checkpoint.get('tokenizer') != meta:
            raise CheckpointError(f"{ckpt_path} was trained on another vocabulary than {data_path}: "
                                  f"resume it with its own --dataset")
        # the architecture is the checkpoint's; dropout may change
        changed = [k for k, v in checkpoint['model_args'].items() if k != 'dropout' and model_args.get(k) != v]
        if changed and master_process:
            print(f"resuming with the checkpoint's {', '.join(changed)} (not the settings')")
        model_args = {**checkpoint['model_args'], 'dropout': dropout}
        config.update({k: model_args[k] for k in changed if k in config})
        block_size = model_args['block_size']  # the length of get_batch's windows too
        # with a moving average, 'model' is the average and 'train_model' the weights being trained
        trained = {**checkpoint, 'model': checkpoint['train_model']} if 'train_model' in checkpoint else checkpoint
        model = model_from_checkpoint(trained, ckpt_path, dropout=dropout)
    except CheckpointError as e:
        fail(str(e))
    saved_warmup = checkpoint.get('config', {}).get('quant_warmup_iters', 0)   # the run's own ramp, whatever the flags
    if saved_warmup != quant_warmup_iters and master_process:
        print(f"resuming with the checkpoint's quant_warmup_iters={saved_warmup} (not the settings')")
    quant_warmup_iters = config['quant_warmup_iters'] = saved_warmup
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    best_iter = checkpoint.get('best_iter', iter_num)
    wandb_run_id = checkpoint.get('wandb_run_id')
if quant_warmup_iters and model_args['quant'] == 'none':  # e.g. a float hf:DIR, whose quant applies unless set
    fail(f"quant_warmup_iters ramps in the quantization of BitLinear layers, and this model is float (quant='none'): "
         f"add --quant=b1.58")
for split, n in split_tokens.items():  # checked here, before an evaluation runs on a split that is too short
    if n <= block_size:
        fail(f"{data_path}/{split}.bin has {n} tokens, fewer than block_size + 1 ({block_size + 1}): "
             f"use --block_size={n - 1} or less, or prepare more text")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # block_size may be the checkpoint's
model.activation_checkpointing = activation_checkpointing
if fsdp:
    # each block's weights are gathered whole just before its forward (and its backward) and freed
    # after it, so a BitLinear's absmean scale is that of the whole tensor, as without FSDP. The
    # sharded weights, their gradients and Adam's state stay float32; with dtype bfloat16 the gathered
    # copies are bfloat16 (half the traffic; a latent weight rounded to bfloat16 can land on the other
    # side of a ternary rounding boundary), so are the activations between blocks (autocast alone keeps
    # the residual stream float32), and gradients are reduced in float32
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == 'bfloat16' else None,
                                  reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)  # moves the block to device, keeps this rank's shard
    fully_shard(model, mp_policy=policy)      # the embedding, the final norm and lm_head
else:
    model.to(device)


def get_quant_lambda(it):
    """Warm-up quantization's lambda at iteration it (quant_warmup_iters above); None once it is 1 (or
    without a warm-up): the plain quantized layers, the same numbers bit for bit (bitlinear.quant_mix)."""
    if quant_warmup_iters == 0 or it >= quant_warmup_iters:
        return None
    return it / quant_warmup_iters


quant_lambda = get_quant_lambda(iter_num)
model.set_quant_lambda(quant_lambda)  # before torch.compile: the shared tensor is then updated in place
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)

# Checkpoints hold whole tensors whatever the sharding, and the optimizer's state keyed by position, as
# optimizer.state_dict() writes it. torch.distributed.checkpoint's helpers gather FSDP's shards into
# whole tensors (and shard them again on loading); they key the optimizer's state by parameter name.
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on rank 0's CPU ({} elsewhere)
WHOLE = StateDictOptions(full_state_dict=True)                     # loading: every rank passes the whole tensors
param_name = {p: n for n, p in model.named_parameters()}
optimizer_names = [param_name[p] for group in optimizer.param_groups for p in group['params']]  # position -> name
optimizer_positions = {n: i for i, n in enumerate(optimizer_names)}


def rekey_optimizer_state(state_dict, key):
    """An optimizer state dict with every parameter key k replaced by key[k] (name <-> position)."""
    return dict(state={key[k]: v for k, v in state_dict['state'].items()},
                param_groups=[{**group, 'params': [key[k] for k in group['params']]}
                              for group in state_dict['param_groups']])


if checkpoint is not None:
    set_optimizer_state_dict(model, optimizer, rekey_optimizer_state(checkpoint['optimizer'], optimizer_names),
                             options=WHOLE)
    scaler.load_state_dict(checkpoint['scaler'])
# the moving average of the weights, kept by every rank for its part of the weights (all of them, or its
# shards under FSDP): one tensor per state-dict entry (all parameters), continued from a checkpoint that
# has one (loaded into the model to be split like the weights, then the trained weights again), else
# started at the weights
state = model.state_dict()
weights = [w.to_local() if isinstance(w, DTensor) else w for w in state.values()]  # views of the parameters,
ema = None                                                                           # updated in place
if ema_decay > 0:
    if checkpoint is not None and 'train_model' in checkpoint:
        set_model_state_dict(model, checkpoint['model'], options=WHOLE)
        ema = [w.clone() for w in weights]
        set_model_state_dict(model, checkpoint['train_model'], options=WHOLE)
    else:
        ema = [w.clone() for w in weights]
# after each step: ema = ema_decay * ema + (1 - ema_decay) * weights, one lerp over all tensors
ema_update = torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)
checkpoint = None  # free up memory
raw_model = model  # evaluated, and saved: no '_orig_mod.' (compile) or 'module.' (DDP) prefixes
if compile:
    model = torch.compile(model, mode='reduce-overhead' if cuda_graphs else None)
if distributed and not fsdp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
# evaluation runs the compiled model, never the DDP wrapper: DDP pairs every forward's buffer broadcast
# and every backward's gradient reduction across the ranks, which evaluation must not join
eval_model = model.module if distributed and not fsdp else model
peak_flops, device_name = device_peak_flops(device)


@contextmanager
def averaged_weights():
    """Inside: the model computes with the moving average of its weights (when there is one);
    after: with its own weights again. Copies in place, so compiled graphs stay valid."""
    if ema is None:
        yield
        return
    with torch.no_grad():
        own = [w.clone() for w in weights]
        for w, e in zip(weights, ema):
            w.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, o in zip(weights, own):
                w.copy_(o)


@torch.no_grad()
def estimate_loss(splits=('train', 'val')):
    """Mean loss over eval_iters fixed batches of each split. Every rank computes the loss of its
    rows of each batch (the same number of forwards on every rank, as FSDP's gathers need); the
    mean of the ranks' means is the mean over the batch."""
    out = {}
    model.eval()
    for split in splits:
        losses = torch.zeros(eval_iters, device=device)
        for k in tqdm(range(eval_iters), desc=f'eval {split}', unit='batch', leave=False, dynamic_ncols=True,
                      disable=not (master_process and sys.stderr.isatty())):
            X, Y = get_batch(split, EVAL, k)
            with autocast:
                _, loss = eval_model(X, Y)
            losses[k] = loss
        if distributed:
            dist.all_reduce(losses)  # a sum: gloo has no average
            losses /= world_size
        out[split] = losses.mean().item()
    if fsdp:  # FSDP keeps the root's gathered weights after a forward for the backward that follows in
        raw_model.reshard()  # training; none follows here, and the weights may change (averaged_weights)
    model.train()
    return out


def get_lr(it):
    """Learning rate at iteration it (see lr_schedule above)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if lr_schedule == 'two_stage' and it >= lr_decay_iters // 2:
        start, peak = lr_decay_iters // 2, stage2_lr
    else:
        start, peak = warmup_iters, learning_rate
    ratio = (it - start) / (lr_decay_iters - start)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - min_lr)


def get_weight_decay(it):
    """weight_decay, except in the second stage of 'two_stage', where it is 0 (b1.58 recipe)."""
    return 0.0 if lr_schedule == 'two_stage' and it >= lr_decay_iters // 2 else weight_decay


# logging --------------------------------------------------------------------------
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    if init_from == 'resume' and not eval_only and os.path.exists(log_path):
        # records from the checkpoint's iteration on were written after it was saved (by a run that then
        # crashed, or ended without a better evaluation): this run writes those iterations again, so they go
        with open(log_path) as f:
            lines = f.readlines()

        def stale(i, line):
            try:
                return json.loads(line).get('iter', -1) >= iter_num
            except (ValueError, AttributeError):
                if i == len(lines) - 1:  # cut short by the crash
                    return True
                fail(f"{log_path} line {i + 1} is not a JSON record: mend or delete that line, then resume again")
        keep = [line for i, line in enumerate(lines) if line.strip() and not stale(i, line)]
        if len(keep) < len(lines):
            with open(log_path + '.tmp', 'w') as f:
                f.writelines(keep)
            os.replace(log_path + '.tmp', log_path)
            print(f"{log_path}: dropped {len(lines) - len(keep)} records from iteration {iter_num} on, written "
                  f"after the checkpoint; this run writes them again")
    log_file = open(log_path, 'a')  # a new run starts it (the checks above: no log is there), a resumed one adds
    n_params = raw_model.get_num_params()
    print(f"{n_params / 1e6:.2f}M parameters (non-embedding), quant={raw_model.config.quant}, "
          f"{device_name}, {dtype}, compile={compile}, cuda_graphs={cuda_graphs}, {world_size} process(es)"
          f"{' (FSDP)' if fsdp else ' (DDP)' if distributed else ''}, "
          f"{tokens_per_iter:,} tokens per iteration")
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb (or WANDB_MODE=offline to log locally)")
    # id=None starts a new run; a resumed checkpoint's id continues its run (resume='allow' also starts
    # it afresh under that id if wandb no longer has it)
    wandb_run_id = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                              id=wandb_run_id, resume='allow').id


def log(record):
    """One line on the console, one JSON line in train_log.jsonl, and wandb when on."""
    log_file.write(json.dumps(record) + '\n')
    log_file.flush()
    if wandb_log:
        wandb.log(record, step=record['iter'])


# the first iteration whose loss or gradient norm was inf or nan (-1: none yet), kept on the device and
# read only where the loop syncs anyway (logging, evaluation), so the check costs no step any time
nonfinite_at = torch.tensor(-1, device=device)


def stop_diverged(what, it):
    """Exit with one line: what became inf or nan at iteration it, the likely cause, and that no
    checkpoint was written from such weights."""
    cause = ("float16 overflowed: train in --dtype=bfloat16 (or float32)" if dtype == 'float16' else
             f"the learning rate ({get_lr(it):.2e} there) is too high for this model: lower --learning_rate "
             f"(or raise --warmup_iters)")
    kept = f"{ckpt_path} was left as it was" if os.path.exists(ckpt_path) else "no checkpoint was written"
    fail(f"{what} became inf or nan at iteration {it}: {cause}; {kept}")


def stop_if_diverged():
    """Stop if a loss or gradient norm since the last check was not finite: the weights are then not
    finite either (or soon will not be), so nothing is evaluated or saved from them."""
    if distributed:  # a rank's own loss may be the one that diverged: all of them stop alike
        dist.all_reduce(nonfinite_at, op=dist.ReduceOp.MAX)
    it = nonfinite_at.item()
    if it >= 0:
        stop_diverged("the training loss (or its gradient norm)", it)


# training loop ------------------------------------------------------------------
pbar = tqdm(total=max_iters, initial=iter_num, unit='it', dynamic_ncols=True,
            disable=not (master_process and sys.stderr.isatty()))
running_mfu = None
local_iter = 0  # iterations of this process (the first ones include compilation)
t0, timed = time.time(), 0  # the clock and the iterations run since the last log or evaluation
while True:
    lr, wd = get_lr(iter_num), get_weight_decay(iter_num)
    if quant_lambda is not None:  # one change of graph when the ramp ends (None: the plain layers)
        quant_lambda = get_quant_lambda(iter_num)
        raw_model.set_quant_lambda(quant_lambda)
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.param_groups[0]['weight_decay'] = wd  # the decayed group (configure_optimizers)

    evaluate = iter_num % eval_interval == 0 or iter_num >= max_iters or local_iter == 0
    if evaluate:  # every rank: all of them stop alike, and each evaluates its share of the batches
        stop_if_diverged()
        record = dict(iter=iter_num, eval_only=True) if eval_only else dict(iter=iter_num)
        if ema is not None:  # the trained weights too, to show what averaging gains
            record['val_loss_trained_weights'] = estimate_loss(('val',))['val']
        with averaged_weights():
            losses = estimate_loss()
        record.update(train_loss=losses['train'], val_loss=losses['val'], lr=lr)
        if quant_lambda is not None:
            record['quant_lambda'] = quant_lambda
        if not all(map(math.isfinite, losses.values())):
            stop_diverged("the evaluation loss", iter_num)
        if master_process:
            tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" +
                       (f" (warm-up quantization, lambda {quant_lambda:.3f})" if quant_lambda is not None else "") +
                       (f" (moving average; the trained weights: val loss {record['val_loss_trained_weights']:.4f})"
                        if ema is not None else ""))
            log(record)
        # the same decision on every rank: all-reduced losses are equal; a partly quantized model is never the best
        if losses['val'] < best_val_loss and quant_lambda is None:
            best_val_loss, best_iter = losses['val'], iter_num
            improved = True
        else:
            improved = False
        resumed_here = init_from == 'resume' and local_iter == 0  # the checkpoint holds these weights already
        if (improved or always_save_checkpoint) and iter_num > 0 and not eval_only and not resumed_here:
            finite = torch.tensor(float(all(torch.isfinite(w).all() for w in weights + (ema or []))), device=device)
            if distributed:  # each rank holds its part of the weights (FSDP): all of them decide together
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                stop_diverged("a weight", iter_num)
            # gathered by every rank (FSDP's shards travel), written by rank 0 while the others wait
            weights_saved = dict(model=get_model_state_dict(raw_model, options=GATHER))
            if ema is not None:  # copied: on a CPU the gathered tensors can be the parameters themselves
                with averaged_weights():
                    average = {k: w.clone() for k, w in get_model_state_dict(raw_model, options=GATHER).items()}
                weights_saved = dict(model=average, train_model=weights_saved['model'])
            optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=GATHER)
            if master_process:
                save_checkpoint(dict(**weights_saved, optimizer=rekey_optimizer_state(optimizer_state, optimizer_positions),
                                     scaler=scaler.state_dict(), model_args=model_args, iter_num=iter_num,
                                     best_val_loss=best_val_loss, best_iter=best_iter, config=config, tokenizer=meta,
                                     wandb_run_id=wandb_run_id),
                                ckpt_path)
                tqdm.write(f"saved checkpoint to {ckpt_path}")
            if distributed:
                dist.barrier()
        t0, timed = time.time(), 0  # evaluation time is not training time
    if iter_num >= max_iters or eval_only:
        break

    # dropout draws from the global generator: seed it per iteration and rank (see get_batch)
    torch.manual_seed(seed + 1_000_003 * rank + iter_num)
    train_loss = 0.0  # this rank's mean loss over the micro-batches
    for micro_step in range(gradient_accumulation_steps):
        if distributed and not fsdp:  # DDP: sync gradients on the last micro-step only (FSDP reduces
            # every micro-step's gradients into its shards: unsharded ones would take the memory it saves)
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        X, Y = get_batch('train', TRAIN, iter_num, micro_step)
        with autocast:
            _, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # the mean over micro-steps
        scaler.scale(loss).backward()
        train_loss = train_loss + loss.detach()
    finite = torch.isfinite(train_loss)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not scaler.is_enabled():  # float16's scaler skips a step with inf gradients itself, and tries a smaller scale
            finite &= torch.isfinite(grad_norm)
    nonfinite_at.masked_fill_(~finite & (nonfinite_at < 0), iter_num)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, weights, iter_num)

    timed += 1
    if iter_num % log_interval == 0:
        stop_if_diverged()
    if distributed and iter_num % log_interval == 0:  # the mean over all ranks, on every rank
        dist.all_reduce(train_loss)
        train_loss /= world_size
    if master_process and iter_num % log_interval == 0:
        # a CPU-GPU sync point: the GPU has finished every iteration since t0. Timing the iterations
        # between two syncs, not the host's time for the last one, which can run ahead of the GPU
        # (CUDA graphs) or wait for a backlog
        lossf = train_loss.item()
        t1 = time.time()
        dt, t0, timed = (t1 - t0) / timed, t1, 0
        mfu = raw_model.estimate_mfu(tokens_per_iter // world_size, block_size, dt, peak_flops)  # one GPU's
        if mfu is not None and local_iter >= 5:
            running_mfu = mfu if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = f", mfu {running_mfu * 100:.1f}%" if running_mfu is not None else ""
        tqdm.write(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.1f}ms{mfu_text}")
        log(dict(iter=iter_num, loss=lossf, lr=lr, weight_decay=wd, dt_ms=dt * 1000, mfu=running_mfu))
    iter_num += 1
    local_iter += 1
    pbar.update(1)

pbar.close()
if master_process:
    print(f"best val loss {best_val_loss:.4f} at iter {best_iter}")
    if device_type == 'cuda':
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (allocated by tensors)")
    log_file.close()
    if wandb_log:
        wandb.finish()
if distributed:
    dist.barrier()   # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
