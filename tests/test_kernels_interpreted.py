"""The Triton kernels' arithmetic checked on the CPU: tests/kernels_on_cpu.py under Triton's
interpreter, in a subprocess (the interpreter is chosen when triton is first imported)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip('triton')


def test_triton_kernels_under_the_interpreter():
    result = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'kernels_on_cpu.py')],
                            env={**os.environ, 'TRITON_INTERPRET': '1'}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    assert result.stdout.count('ok ') == 2 * 8 + 7 + 4   # 8 GEMV cases x 2 kernels, 7 lm_head, 4 attention
