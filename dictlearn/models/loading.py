"""Load a causal language model and its tokenizer, offline, by name or folder.

    lm = load_model()                  # the embedded byte-level model (TINY_NAME)
    lm = load_model("path/to/folder")  # any transformers causal LM saved with save_pretrained
    lm = load_model("gpt2")            # only if already in the local Hugging Face cache

dictlearn never downloads: every transformers call passes ``local_files_only=True``. A folder
whose config.json says ``"dictlearn_tokenizer": "byte"`` (one written by train_tiny) is paired with
`ByteTokenizer`; any other folder or cached model with its own `AutoTokenizer`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dictlearn.errors import ConfigError
from dictlearn.models.tiny import TINY_DIR, TINY_NAME, WEIGHTS_FILE, ByteTokenizer, load_byte_model, quiet_loading


@dataclass
class LanguageModel:
    """A model in eval mode with the tokenizer it was trained with.

    `tokenizer.encode(text)` returns ids without special tokens; `tokenizer.bos_token_id` is the
    id windows start with (None if the tokenizer has none). `revision` identifies the weights:
    the hub commit for cached models, a hash of the weights for the embedded model, else None.
    """

    model: nn.Module
    tokenizer: object
    name: str
    revision: str | None


class HFTokenizer:
    """A transformers tokenizer behind the small interface dictlearn uses (no special tokens added)."""

    byte_level = False

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.vocab_size: int = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        """text -> ids; verbose=False because whole documents exceed the model's max length on
        purpose (iter_windows cuts them)."""
        return self.hf.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, bos_token_id={self.bos_token_id})"


def load_model(name: str | None = None, device: str = "cpu") -> LanguageModel:
    """None or TINY_NAME: the embedded model; a folder: the model saved there; else a cached hub name."""
    if name is None or name == TINY_NAME:
        return LanguageModel(load_byte_model(TINY_DIR, device), ByteTokenizer(), TINY_NAME, weights_hash(TINY_DIR))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _load_folder(folder, device)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model {name!r}: no such folder; pass a folder written by save_pretrained or a hub name")
    return _load_cached(name, device)


def weights_hash(folder: Path) -> str:
    """'sha256:' + the first 16 hex digits of the weights file's hash: the revision of local weights."""
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    return f"sha256:{digest[:16]}"


def _load_folder(folder: Path, device: str) -> LanguageModel:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model {folder}: no config.json in this folder; pass a folder written by save_pretrained")
    if json.loads(config_file.read_text()).get("dictlearn_tokenizer") == "byte":
        revision = weights_hash(folder) if (folder / WEIGHTS_FILE).is_file() else None
        return LanguageModel(load_byte_model(folder, device), ByteTokenizer(), str(folder.resolve()), revision)
    try:
        model, tokenizer = _from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {folder}: cannot load a causal LM and its tokenizer from this folder "
                          f"({_first_line(error)})") from error
    return LanguageModel(model.to(device).eval(), HFTokenizer(tokenizer), str(folder.resolve()), None)


def _from_pretrained(source: str | Path):
    """A transformers causal LM and its tokenizer from a folder or the local cache, never the network."""
    import transformers  # ~0.5 s: only when a model is loaded

    with quiet_loading():
        model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    return model, transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)


def _load_cached(name: str, device: str) -> LanguageModel:
    try:
        model, tokenizer = _from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {name!r}: not in the local Hugging Face cache and dictlearn never downloads; "
                          f"pass a local folder (--model DIR) or download it first") from error
    revision = getattr(model.config, "_commit_hash", None)
    return LanguageModel(model.to(device).eval(), HFTokenizer(tokenizer), name, revision)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
