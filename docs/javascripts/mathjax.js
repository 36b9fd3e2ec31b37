// MathJax configuration for pymdownx.arithmatex (generic mode), as in the
// mkdocs-material documentation. MathJax itself is served by the site
// (assets/mathjax/, copied from a registry package by docs/hooks/mathjax.py),
// so pages render their math with no network.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Re-typeset after instant navigation (material's document$ observable).
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
