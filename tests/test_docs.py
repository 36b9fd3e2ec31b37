"""The documentation builds, cites only tests that exist, and its example scripts run.

* ``mkdocs build --strict`` in a subprocess: broken links, missing anchors,
  unresolved API references, citations of missing tests and public names
  without an API entry are all warnings, so they fail the build
  (``docs/hooks/verification.py`` adds the last three checks).
* Every ``tests/<file>.py::<test>`` written in ``docs/`` names a test
  function that exists (parsed with ``ast``, nothing imported), and every
  link to it points at its anchor on the generated Verification page.
* Every script in ``docs/examples/`` exits 0; each asserts its own numbers
  against dtype-derived tolerances. BLAS runs single-threaded, as it did when
  the outputs shown in the docs were recorded.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
HOOK = DOCS / "hooks" / "verification.py"


def _quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["NO_MKDOCS_2_WARNING"] = "1"
    env["PYTHONWARNINGS"] = "error"  # the examples must run warning-free, like the suite
    return env


@functools.cache
def _load_hook():
    """The docs hook module (reference patterns, test collection), loaded by path."""
    name = "_jactus_docs_verification_hook"
    spec = importlib.util.spec_from_file_location(name, HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def test_site_builds_strict(tmp_path):
    env = _quiet_env()
    env.pop("PYTHONWARNINGS")  # third-party plugins may warn; mkdocs --strict judges the build
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "verification" / "index.html").is_file()


def _defined_tests(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{sub.name}"
                for sub in node.body
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def test_every_cited_test_exists():
    hook = _load_hook()
    cited = {
        (m.group(1), m.group(2), page.relative_to(ROOT).as_posix())
        for page in _pages()
        for m in hook.TEST_REF.finditer(page.read_text(encoding="utf-8"))
    }
    assert len(cited) >= 40, f"expected the theory pages to cite many tests; found {len(cited)}"
    missing = []
    for file, name, page in sorted(cited):
        path = ROOT / "tests" / file
        if not path.is_file() or name not in _defined_tests(path):
            missing.append(f"{page}: tests/{file}::{name}")
    assert not missing, "docs cite tests that do not exist:\n" + "\n".join(missing)


def test_test_links_point_at_their_anchor():
    hook = _load_hook()
    cases = hook.collect_tests(ROOT / "tests")
    wrong = []
    n_links = 0
    for page in _pages():
        for m in hook.TEST_LINK.finditer(page.read_text(encoding="utf-8")):
            n_links += 1
            ref = f"tests/{m.group(1)}::{m.group(2)}"
            target, anchor = m.group(3), m.group(4)
            expected = hook.anchor_of(ref, cases)
            if not target.endswith("verification.md") or (
                expected is not None and anchor != expected
            ):
                wrong.append(
                    f"{page.relative_to(ROOT)}: {ref} -> {target}#{anchor} (anchor: {expected})"
                )
    assert n_links >= 40, f"expected many links to the Verification page; found {n_links}"
    assert not wrong, "test links with the wrong target:\n" + "\n".join(wrong)


def test_every_public_name_has_an_api_entry():
    hook = _load_hook()
    documented = hook.documented_names(DOCS)
    public = hook.griffe_rst.public_all(ROOT / "jactus_linalg" / "__init__.py")
    assert public, "could not read jactus_linalg.__all__"
    missing = [name for name in public if f"jactus_linalg.{name}" not in documented]
    assert not missing, f"add `::: jactus_linalg.<name>` to a page in docs/api/ for: {missing}"


def test_every_example_is_shown_in_the_docs():
    text = "\n".join(p.read_text(encoding="utf-8") for p in _pages())
    unshown = [
        e.name
        for e in EXAMPLES
        if f"docs/examples/{e.name}" not in text and f"examples/{e.name}" not in text
    ]
    assert EXAMPLES, "no scripts in docs/examples/"
    assert not unshown, f"examples not referenced from any page: {unshown}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs(script: Path):
    proc = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT))],
        cwd=ROOT,
        env=_quiet_env(),
        capture_output=True,
        text=True,
        timeout=600,  # a guard against a hang, not a speed check: a loaded 2-core machine took over 120 s
        check=False,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"


def test_recorded_outputs_name_their_script():
    """Every ``<!-- output: X -->`` block in the docs belongs to an existing example."""
    names = {e.name for e in EXAMPLES}
    for page in _pages():
        for name in re.findall(r"<!-- output: (\S+) -->", page.read_text(encoding="utf-8")):
            assert name in names, f"{page.relative_to(ROOT)} shows output of missing script {name}"
