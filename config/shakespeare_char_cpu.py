# A laptop-sized b1.58 model on tiny Shakespeare characters: trains on a CPU in minutes.
# (nanoGPT's "I only have a laptop" settings.) The float baseline: add --quant=none.
out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
quant = 'b1.58'

learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
compile = False
