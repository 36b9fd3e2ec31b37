"""Continuation log-likelihood scoring of multiple-choice items (lm_eval's protocol).

Tokenization
------------
As ``lm_eval``'s ``HFLM`` (``lm_eval==0.4.13``, ``TemplateLM._encode_pair``
and ``loglikelihood``): trailing whitespace of the context moves to the
continuation; the context and the whole string context + continuation are
encoded with the tokenizer's default special tokens, and the continuation's
tokens are the whole string's tokens after the context's. An empty context
becomes the prefix token (BOS, else EOS), or the continuation's first token
when that is the prefix token. If the pair is longer than ``max_length``
(default :data:`MAX_LENGTH` = 96) tokens, the context is truncated from the
left, keeping at least one token; the continuation is cut from the right
only if it alone exceeds ``max_length - 1`` (where ``HFLM`` refuses). The
model reads the first ``max_length - 1`` of these tokens, so ``max_length``
here is ``HFLM(max_length=max_length - 1)``.

Scoring
-------
:func:`score_items` sums the log-probabilities of each choice's continuation
tokens. It runs the decoder (``model.model``) once per batch, gathers the
hidden states at the positions that predict continuation tokens and applies
``lm_head`` only there, which avoids the ``batch x seq x vocab`` logits
tensor (49152-wide for SmolLM2). Predictions use ``length_norm``: ``"chars"``
(sum / :meth:`~validation.commonsense.MCItem.choice_length`, the characters
of the choice text: lm_eval's ``acc_norm``, the default), ``"tokens"`` (mean
per token) or ``"none"`` (sum, lm_eval's ``acc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from validation.commonsense import MAX_LENGTH, MCItem

#: ``length_norm`` choices of :meth:`ScoreResult.predictions`.
LENGTH_NORMS = ("chars", "tokens", "none")


# ----------------------------------------------------------------------------- tokenization


def encode_pair(
    tokenizer, context: str, continuation: str, max_length: int = MAX_LENGTH
) -> tuple[list[int], list[int]]:
    """Tokenize a context and continuation as lm_eval does, truncating to ``max_length`` tokens.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
    context, continuation : str
    max_length : int, default :data:`MAX_LENGTH`
        Maximum of ``len(context_ids) + len(continuation_ids)``, >= 2.

    Returns
    -------
    context_ids, continuation_ids : list of int
        The continuation's ids are those of ``context + continuation`` after
        the context's (trailing whitespace of the context moved to the
        continuation first); an empty context is the prefix token. The context
        is left-truncated (at least one token kept); the continuation is
        right-truncated only if it alone exceeds ``max_length - 1``.
    """
    return _encode_requests(tokenizer, [(context, continuation)], max_length)[0]


def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS (``HFLM.prefix_token_id``)."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise ValueError("an empty context needs a tokenizer with bos_token_id or eos_token_id")
    return tok


def _encode_requests(tokenizer, requests: Sequence[tuple[str, str]], max_length: int):
    """Encode ``(context, continuation)`` pairs; returns a list of (ctx_ids, cont_ids)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    moved = []
    for context, continuation in requests:
        stripped = context.rstrip()
        moved.append((stripped, context[len(stripped):] + continuation))
    full = [(c, c + t) for c, t in moved if c]
    encoded = tokenizer([s for pair in full for s in pair])["input_ids"] if full else []
    empty = [t for c, t in moved if not c]
    alone = tokenizer(empty, add_special_tokens=False)["input_ids"] if empty else []
    pairs, k, e = [], 0, 0
    for context, continuation in moved:
        if context:
            ctx, whole = encoded[2 * k], encoded[2 * k + 1]
            cont = whole[len(ctx):]
            k += 1
        else:
            cont = alone[e]
            e += 1
            prefix = prefix_token_id(tokenizer)
            ctx, cont = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        if not cont:
            raise ValueError(f"the continuation {continuation!r} encodes to zero tokens "
                             f"after the context {context[-40:]!r}")
        cont = cont[: max_length - 1]
        pairs.append((ctx[-(max_length - len(cont)):], cont))
    return pairs


def _encode_items(tokenizer, items: Sequence[MCItem], max_length: int):
    """Encode every (item, choice) request; returns a list of (ctx_ids, cont_ids)."""
    requests = [it.request(j) for it in items for j in range(len(it.choices))]
    return _encode_requests(tokenizer, requests, max_length)


def padding_id(tokenizer) -> int:
    """The tokenizer's padding id (its EOS id when it has no pad token)."""
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
        Per item and choice, scored tokens and the characters ``acc_norm``
        divides by (:meth:`~validation.commonsense.MCItem.choice_length`, at least 1).
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
    pad_id = padding_id(tokenizer)
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
        n_chars.append(np.array([max(it.choice_length(j), 1) for j in range(n)], dtype=np.float64))
        k += n
    return ScoreResult(items, logprobs, n_tokens, n_chars)
