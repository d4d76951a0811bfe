# A baby GPT with BitNet b1.58 layers on tiny Shakespeare, one token per character.
# The size of nanoGPT's shakespeare_char config: 6 layers, 6 heads, 384 wide, block 256,
# batch 64 (about 10.7M parameters, 10.6M of them in BitLinear layers). Tuned on an H100
# (README, Results): dropout 0.35, a 4000-iteration cosine schedule, weight decay 0.2 and a moving
# average of the weights (ema_decay 0.9995) gave best validation losses of 1.3999 to 1.4194 in ten
# runs (mean 1.4100), mostly at iteration 4000; the trained weights themselves: mean 1.4410.
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
ema_decay = 0.9995  # evaluate and save a moving average of the weights; 0.999: mean 1.4274 over 10 runs; 0.9998: 1.58-1.61 (3)
warmup_iters = 100
