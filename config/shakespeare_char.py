# A baby GPT with BitNet b1.58 layers on tiny Shakespeare, one token per character: the size of
# nanoGPT's shakespeare_char config (6 layers, 6 heads, 384 wide, block 256, batch 64; about 10.7M
# parameters, 10.6M of them in BitLinear layers). The settings and what they gain: docs/results.md.
out_dir = 'out-shakespeare-char'
eval_interval = 250  # a validation loss every 250 steps locates the best model within the run
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # this small data set overfits: keep the best model only

wandb_project = 'shakespeare-char'
wandb_run_name = 'bitnet-b1.58'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1  # the whole batch fits one GPU; CUDA graphs need a single micro-step
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.35  # 1 MB of text overfits fast; less dropout bottoms out earlier and higher
quant = 'b1.58'

learning_rate = 2e-3  # ternary weights want a higher peak than float (nanoGPT: 1e-3)
max_iters = 4000  # about where validation loss bottoms out with this regularization
lr_decay_iters = 4000  # anneal fully by the end of the run
min_lr = 2e-4  # learning_rate / 10, as nanoGPT
beta2 = 0.99  # a little higher than 0.95 because the batches are small
weight_decay = 0.2  # more than train.py's 0.1: regularization again, against overfitting
ema_decay = 0.9995  # evaluate and save a moving average of the weights (time constant 2000 steps)
warmup_iters = 100  # as nanoGPT's shakespeare_char
