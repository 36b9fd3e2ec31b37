"""The README's examples run and print exactly what the README shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PAIR = re.compile(r"```python\n(.*?)```\s*\n\s*prints\s*\n\s*```text\n(.*?)```", re.S)


def _examples():
    return PAIR.findall(README.read_text())


def test_readme_has_examples():
    assert len(_examples()) >= 2


@pytest.mark.parametrize("index", range(len(_examples())))
def test_readme_example_prints_what_it_shows(index, tmp_path):
    code, expected = _examples()[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300,
        cwd=README.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected.strip()


def test_importing_the_core_does_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import jactus_linalg, sys; assert 'torch' not in sys.modules"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
