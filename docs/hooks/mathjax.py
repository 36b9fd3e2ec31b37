"""MkDocs hook: serve MathJax from the site itself, so the math renders offline.

MathJax 3 comes from a registry package, ``django-static-mathjax`` (PyPI,
the ``docs`` extra): a verbatim copy of the MathJax release under
``mathjax/static/mathjax/es5``. The package is only a file source here;
nothing of Django is imported or needed.

The hook adds the combined TeX bundle (``tex-mml-chtml.js``) and the
components it loads on demand (the CHTML web fonts, the TeX extensions that
``autoload`` pulls in, the menu and accessibility modules) to the build under
``assets/mathjax/``. MathJax finds them relative to its own script, so the
site works from any folder or server with no network; ``mkdocs.yml`` lists
``assets/mathjax/tex-mml-chtml.js`` in ``extra_javascript``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DEST = "assets/mathjax"
BUNDLE = "tex-mml-chtml.js"
# what the bundle loads lazily: fonts, TeX extensions, menu, a11y and speech
COMPONENT_DIRS = ("output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y", "sre")
SOURCE_PACKAGE = "django-static-mathjax"


def mathjax_root() -> Path:
    """The ``es5`` folder of the installed MathJax copy.

    Raises
    ------
    PluginError
        When the package is missing or holds no ``tex-mml-chtml.js``; the
        message says what to install.
    """
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        root = Path(location) / "static" / "mathjax" / "es5"
        if (root / BUNDLE).is_file():
            return root
    msg = (
        f"MathJax not found: the docs serve it from the {SOURCE_PACKAGE!r} package "
        f"(looked for mathjax/static/mathjax/es5/{BUNDLE} in {locations or 'no installed mathjax package'}); "
        f"run `make env` or `pip install -e .[docs]`"
    )
    raise PluginError(msg)


def vendored_files(root: Path) -> list[tuple[str, Path]]:
    """``(uri under assets/mathjax, source path)`` for the bundle and its lazy components."""
    pairs = [(f"{DEST}/{BUNDLE}", root / BUNDLE)]
    for sub in COMPONENT_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                pairs.append((f"{DEST}/{path.relative_to(root).as_posix()}", path))
    return pairs


def on_files(files: Files, config) -> Files:
    for uri, path in vendored_files(mathjax_root()):
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
