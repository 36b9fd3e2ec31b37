"""Griffe extension: render the package's reST docstring markup as Markdown.

The docstrings of ``jactus_linalg`` are NumPy style with reST math and
cross-reference roles (the scipy convention). mkdocstrings renders
docstrings as Markdown, so before they are parsed this extension rewrites

* ``:math:`x``` to ``\\(x\\)`` and ``.. math::`` blocks to ``\\[ ... \\]``
  (rendered by ``pymdownx.arithmatex`` and MathJax);
* ``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``,
  ``:obj:`` and ``:exc:`` roles to autorefs links when the target is a
  documented public name (``__all__`` of ``jactus_linalg`` or
  ``jactus_linalg.torch``), and to inline code otherwise;
* ``.. [1] ...`` citations to a bullet list.

The same :func:`convert` is used by the Verification page hook for test
docstrings. Nothing in the package is changed.
"""

from __future__ import annotations

import ast
import re
import textwrap
from functools import lru_cache
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "jactus_linalg": ROOT / "jactus_linalg" / "__init__.py",
    "jactus_linalg.torch": ROOT / "jactus_linalg" / "torch" / "__init__.py",
}

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(
    r":(?:py:)?(func|class|meth|attr|mod|data|obj|exc):`(~)?([^`<]+?)(?:\s*<([^`>]+)>)?`"
)
_OTHER_ROLE = re.compile(r":[a-z]+:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>\S.*)?$")
_CITATION = re.compile(r"^(?P<indent>[ \t]*)\.\. \[(?P<label>[^\]]+)\][ \t]+(?P<text>.*)$")


def public_all(init_file: Path) -> tuple[str, ...]:
    """``__all__`` of a package ``__init__.py``, read statically (nothing is imported)."""
    if not init_file.is_file():
        return ()
    tree = ast.parse(init_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


@lru_cache(maxsize=1)
def public_names() -> dict[str, str]:
    """Map every documented public name (short and qualified) to its autorefs identifier."""
    names: dict[str, str] = {}
    for package, init_file in PACKAGES.items():  # the core first: it wins short names
        if not init_file.is_file():
            continue
        names[package] = package
        for name in public_all(init_file):
            names[f"{package}.{name}"] = f"{package}.{name}"
            names.setdefault(name, f"{package}.{name}")
    return names


def _resolve(target: str) -> str | None:
    """Autorefs identifier for a role target, or ``None`` if it is not documented."""
    names = public_names()
    parts = target.strip().lstrip(".").removesuffix("()").split(".")
    # the longest documented head wins: ``jactus_linalg.whiten``, ``LayerPlan.factorize``,
    # or a re-export named under its defining module (``jactus_linalg.covariance.CovarianceRoot``)
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in names and (cut == len(parts) or head not in PACKAGES):
            return ".".join([names[head], *parts[cut:]])
    if parts[0] == "jactus_linalg":
        for cut in range(1, len(parts)):
            if parts[cut] in names:
                return ".".join([names[parts[cut]], *parts[cut + 1 :]])
    return None


def _xref(match: re.Match[str]) -> str:
    kind, tilde, text, explicit = match.groups()
    target = (explicit or text).strip()
    shown = text.strip()
    if tilde:
        shown = shown.split(".")[-1]
    if kind in ("func", "meth") and not shown.endswith(")"):
        shown += "()"
    ident = _resolve(target)
    if ident is None:
        return f"`{shown}`"
    return f"[`{shown}`][{ident}]"


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group("indent")
        body: list[str] = [match.group("inline")] if match.group("inline") else []
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() and (len(line) - len(line.lstrip())) <= len(indent):
                break
            body.append(line)
            i += 1
        content = textwrap.dedent("\n".join(body)).strip("\n")
        out.extend(
            ["", f"{indent}\\[", *(f"{indent}{b}" for b in content.split("\n")), f"{indent}\\]", ""]
        )
    return "\n".join(out)


def _citations(text: str) -> str:
    out: list[str] = []
    for line in text.split("\n"):
        match = _CITATION.match(line)
        if match:
            out.append(f"{match.group('indent')}- [{match.group('label')}] {match.group('text')}")
        else:
            out.append(line)
    return "\n".join(out)


def convert(text: str) -> str:
    """Rewrite reST math, roles and citations in a docstring as Markdown."""
    text = _math_blocks(text)
    text = _citations(text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    text = _XREF_ROLE.sub(_xref, text)
    return _OTHER_ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    """Convert every docstring as soon as its object is created."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
