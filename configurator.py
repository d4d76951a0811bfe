"""
Settings from config files and --key=value flags, nanoGPT style, but strict:

    python train.py config/shakespeare_char.py --batch_size=32 --compile=False

A script keeps its settings as module globals and calls

    configure(globals(), sys.argv[1:])

Each config file is plain Python that reassigns some of those names; each --key=value then
overrides one (the value is read as a Python literal, or taken as a string for str settings).
A key that is not a setting, a value of the wrong type, a missing config file or an error
inside one ends the program with one line naming it, and exit code 2.
"""

import ast
import difflib
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    fail(f"{where}'{key}' must be {type(default).__name__}, got {value!r}")


def configure(namespace, args):
    """Apply config files and --key=value flags in args to the settings in namespace."""
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
    return namespace
