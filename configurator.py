"""
Settings from config files and --key=value flags, nanoGPT style, but strict:

    python train.py config/shakespeare_char.py --batch_size=32 --compile=False

A script keeps its settings as module globals and calls

    configure(globals(), sys.argv[1:])

Each config file is plain Python that reassigns some of those names; each --key=value then
overrides one (the value is read as a Python literal, or taken as a string for str settings).
A key that is not a setting, a value of the wrong type (or a float that is inf or nan), a
missing config file or an error inside one ends the program with one line naming it, and exit
code 2. Each script then checks the ranges of its settings in one block right after configure,
with the helpers at the end of this file, before it imports torch (2 s) or touches a file.
"""

import ast
import difflib
import math
import os
import re
import sys


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def settings_of(namespace):
    """The configurable names of a script: its lower-case int/float/bool/str/None globals
    (UPPER_CASE names are constants, _private names are not settings)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper()
            and (v is None or isinstance(v, (int, float, bool, str)))}


def unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    fail(f"{where}unknown setting '{key}'{hint}")


def coerce(key, value, default, where):
    """value converted to the type of default, or a one-line error."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    finite = ' (a finite number)' if isinstance(default, float) else ''
    fail(f"{where}'{key}' must be {type(default).__name__}{finite}, got {value!r}")


def configure(namespace, args, assigned=None):
    """Apply config files and --key=value flags in args to the settings in namespace; the names they
    set (to any value, the default's too) are added to the set assigned, when one is given."""
    settings = settings_of(namespace)   # the defaults: types are checked against these
    for arg in args:
        if not arg.startswith('--'):
            path = arg
            try:
                source = open(path).read()
            except OSError:
                fail(f"config file not found: {path} (a config file is a .py file; flags look like --key=value)")
            scope = {'__file__': path}  # so a config can build on another (see config/)
            try:
                exec(compile(source, path, 'exec'), scope)
            except SyntaxError as e:
                fail(f"{path} line {e.lineno}: {e.msg}")
            except Exception as e:
                tb = e.__traceback__
                while tb.tb_next is not None:
                    tb = tb.tb_next
                fail(f"{path} line {tb.tb_lineno}: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if key.startswith('_') or type(value).__name__ in ('module', 'function', 'type'):
                    continue
                if key not in settings:
                    unknown(key, settings, f"{path}: ")
                namespace[key] = coerce(key, value, settings[key], f"{path}: ")
                if assigned is not None:
                    assigned.add(key)
        else:
            if '=' not in arg:
                fail(f"flag {arg} needs a value: write {arg}=VALUE")
            key, raw = arg[2:].split('=', 1)
            if key not in settings:
                unknown(key, settings, "")
            if isinstance(settings[key], str):
                value = raw
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = raw
            namespace[key] = coerce(key, value, settings[key], "")
            if assigned is not None:
                assigned.add(key)
    return namespace


# -----------------------------------------------------------------------------
# the checks of a script's validation block; each ends the program with one line (fail)

def check(ok, message):
    """One rule: fail(message) unless ok."""
    if not ok:
        fail(message)


def check_ints(namespace, names, low, allow_none=False):
    """Each setting in names (space-separated) must be an int >= low; with allow_none also None
    (the settings whose default None means 'derived from the others')."""
    for name in names.split():
        value = namespace[name]
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            fail(f"{name} must be an integer >= {low}{' (or None)' if allow_none else ''}, got {value!r}")


def check_floats(namespace, names, low, high=None, low_open=False, high_open=True):
    """Each setting in names (space-separated) must lie between low and high (None: no upper end);
    low_open/high_open exclude the ends, e.g. beta2 in [0, 1) or learning_rate > 0."""
    for name in names.split():
        value = namespace[name]
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            if high is None:
                fail(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
            fail(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}")


def check_heads(n_embd, n_head, n_kv_head):
    """The attention shape: n_embd is n_head times an even head size, and n_kv_head divides n_head."""
    check(n_embd % n_head == 0 and n_embd // n_head % 2 == 0, f"n_embd ({n_embd}) must be n_head ({n_head}) times an "
          f"even head size (rotary embeddings turn pairs of numbers): change --n_embd or --n_head")
    check(n_kv_head is None or n_head % n_kv_head == 0, f"n_kv_head ({n_kv_head}) must divide n_head ({n_head})")


def check_choice(namespace, name, choices):
    """Setting name must be one of choices."""
    if namespace[name] not in choices:
        fail(f"{name} must be one of {', '.join(map(str, choices))}, got {namespace[name]!r}")


def check_optional_bools(namespace, names):
    """Each setting in names (space-separated, default None: 'decide from the device') must be None,
    True or False."""
    for name in names.split():
        if namespace[name] is not None and not isinstance(namespace[name], bool):
            fail(f"{name} must be True, False or None (automatic), got {namespace[name]!r}")


def bool_list(namespace, name):
    """A setting that times one or both ways of something: 'False', 'True' or 'False,True' -> the list
    of bools."""
    values = [{'False': False, 'True': True}.get(v) for v in namespace[name].split(',')]
    check(None not in values, f"{name} must be False, True or False,True, got '{namespace[name]}'")
    return values


def check_device(device, extra=('auto',)):
    """A device string torch understands: cpu, cuda, cuda:N, mps (and the words in extra)."""
    if device not in extra and not re.fullmatch(r'cpu|mps|cuda(:\d+)?', device):
        fail(f"device must be {', '.join(extra)}{', ' if extra else ''}cpu, cuda, cuda:N or mps, got '{device}'")


def check_device_present(device):
    """After torch is imported: the device (one that check_device accepts, not 'auto') is on this machine."""
    import torch
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        fail("device is cuda but torch sees no CUDA GPU: use --device=cpu (or mps on a Mac)")
    if kind == 'cuda' and ':' in device and int(device[5:]) >= torch.cuda.device_count():
        fail(f"device is {device} but torch sees {torch.cuda.device_count()} CUDA GPU(s): "
             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if kind == 'mps' and not torch.backends.mps.is_available():
        fail("device is mps but this torch has no MPS support: use --device=cpu")


def check_new_file(path, setting, overwrite=False, replaceable=None):
    """path (from --setting) is a file a script is about to write: its directory must exist, it must
    not be a directory, and a file already there is replaced only when replaceable(path) says it is
    one this script writes (e.g. an earlier packed file) or overwrite (--overwrite=True) forces it:
    a script never replaces what the user made for something else."""
    folder = os.path.dirname(path) or '.'
    if not os.path.isdir(folder):
        fail(f"--{setting}={path}: the directory {folder} does not exist: create it, or choose another --{setting}")
    if os.path.isdir(path):
        fail(f"--{setting}={path} is a directory: name a file in it, e.g. --{setting}={os.path.join(path, 'x.pt')}")
    if os.path.exists(path) and not overwrite and not (replaceable and replaceable(path)):
        fail(f"{path} exists and is not a file this script writes: choose another --{setting}, "
             f"or pass --overwrite=True to replace it")
