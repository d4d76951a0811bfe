# A baby GPT with BitNet b1.58 layers on tiny Shakespeare, one token per character.
# The size of nanoGPT's shakespeare_char config: 6 layers, 6 heads, 384 wide, block 256,
# batch 64 (about 10.7M parameters, 10.6M of them in BitLinear layers). Tuned on an H100
# (README, Results): dropout 0.35, a 4000-iteration cosine schedule and weight decay 0.2 gave
# the best validation loss: 1.4305 to 1.4464 in ten runs (mean 1.4406), at iterations
# 3250-4000 (dropout 0.4: 1.4365 to 1.4550 in ten runs, mean 1.4439; 0.3: mean 1.4484 in six).
out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # this small data set overfits: keep the best model only

wandb_project = 'shakespeare-char'
wandb_run_name = 'bitnet-b1.58'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.35  # this data set overfits fast: 0.2 -> best val 1.464 at iter 2000, then it climbs
quant = 'b1.58'

learning_rate = 2e-3  # ternary weights want a higher peak than float (nanoGPT: 1e-3)
max_iters = 4000
lr_decay_iters = 4000
min_lr = 2e-4
beta2 = 0.99  # a little higher than 0.95 because the batches are small
weight_decay = 0.2  # at dropout 0.4, 0.1 (train.py's default): mean best val 1.4501 over 11 runs; 0.2: 1.4439 over 10
warmup_iters = 100
