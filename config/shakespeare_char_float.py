# The float baseline of config/shakespeare_char.py: the same model, data and budget, with
# nn.Linear in place of every BitLinear.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char.py')).read())

quant = 'none'
out_dir = 'out-shakespeare-char-float'
wandb_run_name = 'float'
