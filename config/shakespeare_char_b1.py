# config/shakespeare_char.py with the original 1-bit BitNet layers (binary weights).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char.py')).read())

quant = 'b1'
out_dir = 'out-shakespeare-char-b1'
wandb_run_name = 'bitnet-b1'
