# A laptop-sized b1.58 model on tiny Shakespeare characters that trains on a CPU in minutes
# (nanoGPT's "I only have a laptop" settings). Its float baseline: add --quant=none.
out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20  # a rough validation loss, cheap on a CPU
log_interval = 50
always_save_checkpoint = False  # keep the best model only

dataset = 'shakespeare_char'
batch_size = 12
block_size = 64  # short sequences keep a CPU step fast

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # a model this small, trained this briefly, does not overfit
quant = 'b1.58'

learning_rate = 2e-3  # ternary weights want a higher peak than float
max_iters = 2000
lr_decay_iters = 2000  # anneal fully by the end of the run
min_lr = 2e-4  # learning_rate / 10
beta2 = 0.99  # a little higher than 0.95 because the batches are small
warmup_iters = 100

device = 'cpu'  # run on the CPU even where a GPU (or MPS) is present
compile = False  # torch.compile takes longer to compile than this run takes to train
