"""MkDocs hooks: the generated Verification page, test-reference checks, optional nav entries.

*Verification page.* ``verification.md`` is generated at build time from
the test files (``tests/**/test_*.py``, parsed with :mod:`ast`, never
imported): one section per test function, under an anchor named after the
test (``verification.md#test_pythagoras``), with its docstring, the pages
that cite it, and its source. Theory pages link there, so the text shown is
always the test that runs.

*Reference check.* Every ``tests/<path>.py::<test>`` written in a page must
name a test that exists; every link to ``verification.md#<anchor>`` must use
the anchor of the test it names. Violations are logged as warnings, so
``mkdocs build --strict`` fails on them.

*Public names.* Every name in ``__all__`` of ``jactus_linalg`` must be
rendered by a ``::: jactus_linalg.<name>`` block in ``docs/api/``; a missing
one is a warning. The torch adapter's page, ``api/torch.md``, is generated
from ``jactus_linalg.torch.__all__`` (grouped by the submodule each name is
imported from), and only when that package exists.

*Optional nav entries.* Pages that other people add later (``OPTIONAL_NAV``)
are listed in ``mkdocs.yml`` but dropped from the nav while they do not
exist; a directory entry (ending in ``/``) expands to its Markdown files,
``index.md`` first.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.verification")

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PAGE = "verification.md"
TORCH_PAGE = "api/torch.md"
OPTIONAL_NAV = ("benchmarks.md", "results/", "tutorials/", TORCH_PAGE)

#: ``tests/test_lowrank.py::test_pythagoras`` (also ``tests/torch/...`` and ``::Class::test``).
TEST_REF = re.compile(r"tests/((?:[\w-]+/)*test_\w+\.py)::(\w+(?:::\w+)?)")
#: A Markdown link whose text names a test and whose target is a Verification anchor.
TEST_LINK = re.compile(
    r"\[`?tests/((?:[\w-]+/)*test_\w+\.py)::(\w+(?:::\w+)?)`?\]\(([^)#\s]*)#([^)\s]+)\)"
)

# The reST-to-Markdown converter is shared with mkdocstrings, whose config names
# the Griffe extension ``griffe_rst:RstToMarkdown``: registering the module here
# (hooks load before any page renders) makes that import work from any cwd.
_spec = importlib.util.spec_from_file_location(
    "griffe_rst", Path(__file__).with_name("griffe_rst.py")
)
griffe_rst = importlib.util.module_from_spec(_spec)
sys.modules["griffe_rst"] = griffe_rst
_spec.loader.exec_module(griffe_rst)


@dataclass
class TestCase:
    path: str  # relative to the repository root, e.g. tests/test_lowrank.py
    name: str  # function name, or Class::method
    line: int
    source: str
    doc: str
    anchor: str = ""
    cited_in: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.path}::{self.name}"


def _segment(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, str]:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    block = lines[first - 1 : node.end_lineno]
    indent = min(len(x) - len(x.lstrip()) for x in block if x.strip())
    return first, "\n".join(x[indent:] for x in block)


def collect_tests(tests_dir: Path = TESTS) -> list[TestCase]:
    """Every test function (module level, or a method of a ``Test*`` class), in file order."""
    cases: list[TestCase] = []
    for file in sorted(tests_dir.rglob("test_*.py")):
        text = file.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = file.relative_to(tests_dir.parent).as_posix()
        for node in ast.parse(text).body:
            found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
                "test"
            ):
                found.append((node.name, node))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                found.extend(
                    (f"{node.name}::{sub.name}", sub)
                    for sub in node.body
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef)
                    and sub.name.startswith("test")
                )
            for name, fn in found:
                line, source = _segment(lines, fn)
                cases.append(TestCase(rel, name, line, source, ast.get_docstring(fn) or ""))
    _assign_anchors(cases)
    return cases


def _assign_anchors(cases: list[TestCase]) -> None:
    """The test's name; qualified by its file where two files share a name."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.name] = counts.get(case.name, 0) + 1
    for case in cases:
        plain = case.name.replace("::", "-")
        if counts[case.name] == 1:
            case.anchor = plain
        else:
            stem = case.path.removeprefix("tests/").removesuffix(".py").replace("/", "-")
            case.anchor = f"{stem}--{plain}"


def anchor_of(ref: str, cases: list[TestCase]) -> str | None:
    """Anchor on the Verification page for ``tests/...py::name`` (``None`` if no such test)."""
    for case in cases:
        if case.ref == ref:
            return case.anchor
    return None


def render_page(cases: list[TestCase]) -> str:
    by_file: dict[str, list[TestCase]] = {}
    for case in cases:
        by_file.setdefault(case.path, []).append(case)
    cited = sum(1 for c in cases if c.cited_in)
    out = [
        "# Verification",
        "",
        "Every identity and bound on the theory pages names the test that checks it and "
        "links here. This page is **generated at build time** from the test files "
        "(`docs/hooks/verification.py` parses `tests/**/test_*.py` with `ast`), so the "
        "source below is the source that runs in CI. "
        f"{len(cases)} tests in {len(by_file)} files; {cited} of them are cited in these docs.",
        "",
        "Run them all with `make test`, or one with "
        "`.venv/bin/python -m pytest 'tests/test_lowrank.py::test_pythagoras'`.",
        "",
        "| file | tests | cited in the docs |",
        "|---|---:|---:|",
    ]
    for path, group in by_file.items():
        out.append(
            f"| [`{path}`](#{_file_anchor(path)}) | {len(group)} | "
            f"{sum(1 for c in group if c.cited_in)} |"
        )
    for path, group in by_file.items():
        out += ["", f"## `{path}` {{ #{_file_anchor(path)} }}", ""]
        for case in group:
            out += [f"### `{case.name}` {{ #{case.anchor} }}", ""]
            if case.cited_in:
                out += ["Cited in: " + ", ".join(case.cited_in) + ".", ""]
            if case.doc:
                out += [griffe_rst.convert(case.doc), ""]
            out += [
                f'??? quote "Source: `{case.path}`, line {case.line}"',
                "",
                "    ````python",
                *(f"    {x}" if x else "" for x in case.source.splitlines()),
                "    ````",
                "",
            ]
    return "\n".join(out) + "\n"


def _file_anchor(path: str) -> str:
    return path.removesuffix(".py").replace("/", "-")


# --- MkDocs events ------------------------------------------------------------

_state: dict[str, object] = {}


def on_config(config):
    config["nav"] = _prune_nav(config.get("nav"), Path(config["docs_dir"]))
    return config


def _prune_nav(items, docs_dir: Path):
    if items is None:
        return None
    out = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                value = _prune_nav(value, docs_dir)
                if value:
                    out.append({title: value})
                continue
            kept = _optional_entry(value, docs_dir)
            if kept is None:
                out.append(item)
            elif kept:
                out.append({title: kept if len(kept) > 1 else kept[0]})
        else:
            kept = _optional_entry(item, docs_dir)
            if kept is None:
                out.append(item)
            else:
                out.extend(kept)
    return out


def _optional_entry(value: str, docs_dir: Path) -> list[str] | None:
    """``None`` for an ordinary entry; otherwise what an optional entry expands to now."""
    if not isinstance(value, str) or value not in OPTIONAL_NAV:
        return None
    if value == TORCH_PAGE:
        pages = [value] if griffe_rst.PACKAGES["jactus_linalg.torch"].is_file() else []
    elif value.endswith("/"):
        folder = docs_dir / value
        pages = (
            sorted(p.relative_to(docs_dir).as_posix() for p in folder.rglob("*.md"))
            if folder.is_dir()
            else []
        )
        pages.sort(key=lambda p: (not p.endswith("/index.md"), p))
    else:
        pages = [value] if (docs_dir / value).is_file() else []
    if not pages:
        log.info("optional nav entry %r does not exist yet: left out of the nav", value)
    return pages


def on_files(files: Files, config) -> Files:
    cases = collect_tests()
    _state["cases"] = cases
    docs_dir = Path(config["docs_dir"])
    titles: dict[str, str] = {}
    for file in files.documentation_pages():
        if file.src_uri == PAGE:
            continue
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        title = _title(text, file.src_uri)
        titles[file.src_uri] = title
        for ref in sorted({m.group(0) for m in TEST_REF.finditer(text)}):
            for case in cases:
                if case.ref == ref:
                    link = f"[{title}]({file.src_uri})"
                    if link not in case.cited_in:
                        case.cited_in.append(link)
    _check_public_names(docs_dir)
    _add_generated(files, config, PAGE, render_page(cases))
    torch_init = griffe_rst.PACKAGES["jactus_linalg.torch"]
    if torch_init.is_file():
        _add_generated(files, config, TORCH_PAGE, render_torch_page(torch_init))
    return files


def _add_generated(files: Files, config, src_uri: str, content: str) -> None:
    existing = files.get_file_from_path(src_uri)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, src_uri, content=content))


def render_torch_page(init_file: Path) -> str:
    """``::: jactus_linalg.torch.<name>`` for every public name, grouped by submodule."""
    tree = ast.parse(init_file.read_text(encoding="utf-8"))
    public = set(griffe_rst.public_all(init_file))
    groups: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names = [a.asname or a.name for a in node.names if (a.asname or a.name) in public]
            if names:
                groups.setdefault(node.module, []).extend(names)
    grouped = {n for names in groups.values() for n in names}
    rest = [n for n in griffe_rst.public_all(init_file) if n not in grouped]
    if rest:
        groups["(defined in the package)"] = rest
    doc = ast.get_docstring(tree) or ""
    out = [
        "# Torch adapter",
        "",
        "`jactus_linalg.torch` applies the core to `torch.nn` models. This page is "
        "generated at build time from `jactus_linalg.torch.__all__`, grouped by the "
        "submodule each name comes from.",
        "",
        griffe_rst.convert(doc),
    ]
    for module, names in groups.items():
        title = f"`jactus_linalg.torch.{module}`" if not module.startswith("(") else module
        out += ["", f"## {title}", ""]
        for name in names:
            out += [f"::: jactus_linalg.torch.{name}", "    options:", "      heading_level: 3", ""]
    return "\n".join(out) + "\n"


def _title(text: str, fallback: str) -> str:
    match = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else fallback


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == PAGE:
        return markdown
    cases: list[TestCase] = _state.get("cases", [])  # type: ignore[assignment]
    known = {c.ref for c in cases}
    for match in TEST_REF.finditer(markdown):
        if match.group(0) not in known:
            log.warning(
                "%s cites %s, which is not a test in %s", page.file.src_uri, match.group(0), TESTS
            )
    for match in TEST_LINK.finditer(markdown):
        ref = f"tests/{match.group(1)}::{match.group(2)}"
        target, anchor = match.group(3), match.group(4)
        expected = anchor_of(ref, cases)
        if not target.endswith(PAGE):
            log.warning("%s links %s to %r, not to %s", page.file.src_uri, ref, target, PAGE)
        elif expected is not None and anchor != expected:
            log.warning(
                "%s links %s to #%s; its anchor is #%s", page.file.src_uri, ref, anchor, expected
            )
    return markdown


def documented_names(docs_dir: Path) -> set[str]:
    """Objects rendered by ``::: name`` blocks under ``docs/api/``."""
    names: set[str] = set()
    for md in (docs_dir / "api").rglob("*.md"):
        names |= set(
            re.findall(r"^:::\s+([\w.]+)", md.read_text(encoding="utf-8"), flags=re.MULTILINE)
        )
    return names


def _check_public_names(docs_dir: Path) -> None:
    documented = documented_names(docs_dir)
    for name in griffe_rst.public_all(griffe_rst.PACKAGES["jactus_linalg"]):
        if f"jactus_linalg.{name}" not in documented:
            log.warning(
                "public name jactus_linalg.%s has no `::: jactus_linalg.%s` block in docs/api/",
                name,
                name,
            )
