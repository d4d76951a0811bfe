# Turn the float shakespeare_char model ternary: fine-tune it as b1.58 with Hugging Face's warm-up
# quantization ("Fine-tuning LLMs to 1.58bit", lambda ramping 0 -> 1 over quant_warmup_iters). First
#   python train.py config/shakespeare_char_float.py
#   python export.py --out_dir=out-shakespeare-char-float --to=out-shakespeare-char-float-hf
# then python train.py config/shakespeare_char_convert.py. The model is the float one's (6 x 384, its
# character vocabulary); the results against b1.58 from scratch: docs/results.md.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char.py')).read())

init_from = 'hf:out-shakespeare-char-float-hf'  # the float model, exported (export.py)
out_dir = 'out-shakespeare-char-convert'
wandb_run_name = 'convert'
quant = 'b1.58'  # applies to the imported float weights: the BitLinear layers take them as latent weights
quant_warmup_iters = 500  # lambda = min(iter / 500, 1); 0: quantize at once
max_iters = 1500
lr_decay_iters = 1500  # anneal fully by the end of the run
learning_rate = 1e-3  # half the from-scratch peak: the weights start trained
min_lr = 1e-4
ema_decay = 0.999  # a time constant of 1000 steps, for a run of 1500
