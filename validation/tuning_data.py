"""Fine-tuning batches from multiple-choice items: context + correct answer, loss on the answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from validation.commonsense import MAX_LENGTH, MCItem
from validation.scoring import decoder_and_head, encode_pair, padding_id


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
    ctx, ans = encode_pair(tokenizer, *item.request(item.label), max_length)
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
    pad_id = padding_id(tokenizer)
    examples = [tuning_example(tokenizer, items[i], max_length) for i in order]
    return [
        collate_tuning(examples[s : s + batch_size], pad_id)
        for s in range(0, len(examples), batch_size)
    ]


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""Mean next-token cross-entropy over the answer tokens: ``model(**batch).loss``, cheaper.

    With :math:`h_t` the decoder's last hidden state at position :math:`t`
    and :math:`\mathcal{A}` the positions whose next label is not ``-100``,

    .. math:: L = -\frac{1}{|\mathcal{A}|} \sum_{t \in \mathcal{A}}
              \log \operatorname{softmax}(W_{\mathrm{head}} h_t)_{y_{t+1}},

    the loss a causal LM computes from ``labels``. The output head is applied
    at the answer positions only, not at every position: on SmolLM2-135M
    (vocabulary 49,152) that is about a fifth of a tuning step's work.
    A model wrapped in ``DistributedDataParallel`` takes the plain
    ``model(**batch).loss`` (its forward is where gradients are reduced).

    Parameters
    ----------
    model : causal LM or peft model (see :func:`~validation.scoring.decoder_and_head`)
    batch : dict of torch.Tensor
        From :func:`collate_tuning`: ``input_ids``, ``attention_mask``, ``labels``.

    Returns
    -------
    torch.Tensor
        A float32 scalar.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in batch.items()}).loss
    decoder, head = decoder_and_head(model)
    device = head.weight.device
    targets = batch["labels"][:, 1:].to(device)
    rows, pos = torch.nonzero(targets != -100, as_tuple=True)
    if rows.numel() == 0:
        msg = "answer_loss: every label of the batch is -100 (no answer token to score)"
        raise ValueError(msg)
    hidden = decoder(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device),
                     use_cache=False).last_hidden_state
    logits = head(hidden[rows, pos]).float()
    return torch.nn.functional.cross_entropy(logits, targets[rows, pos])
