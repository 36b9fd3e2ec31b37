"""The paper's experiments, reproduced: ``python validation/run_paper.py`` (or ``python -m validation.run_paper``).

Modules, by topic:

* :mod:`validation.run_paper`: the runner (presets, one :class:`~validation.run_paper.RunConfig`
  per run, resumable results);
* :mod:`validation.sweep`: hyperparameters chosen on the tune split only;
* :mod:`validation.methods`: JACTUS and the baselines as one ``build_method``;
* :mod:`validation.parts`, :mod:`validation.paper_data`: the language and vision parts
  (offline defaults, paper-scale inputs from local paths);
* :mod:`validation.commonsense`, :mod:`validation.vision`: the data sets (tasks, prompt
  format, seeded splits);
* :mod:`validation.scoring`, :mod:`validation.tuning_data`: continuation log-likelihood
  scoring, and the fine-tuning batches built from the same items;
* :mod:`validation.assets`: offline model assets (SmolLM2, a tiny Llama);
* :mod:`validation.train`, :mod:`validation.report`: the tuning loop and the results files;
* :mod:`validation.bench`: the benchmarks.

Importing the package imports nothing heavy and changes no environment variable;
models and data are read from local folders only.
"""
