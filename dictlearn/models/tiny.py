"""The embedded default model: a byte-level GPT-2 trained on the Python standard library.

Its weights ship inside the package (``dictlearn/models/tiny_stdlib/``: ``config.json``,
``model.safetensors`` and ``training.json``, the record of how they were made), so dictlearn's
defaults run offline on any machine. ``python -m dictlearn.models.train_tiny`` reproduces them;
docs/embedded_model.md has the numbers.

    model = load_tiny()                          # transformers.GPT2LMHeadModel, eval mode
    ids = ByteTokenizer().encode("import os\\n")  # UTF-8 bytes: [105, 109, ...]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dictlearn.errors import DictLearnError

if TYPE_CHECKING:  # transformers takes ~0.5 s to import: only where a model is built or loaded
    import transformers

TINY_NAME = "dictlearn/tiny-stdlib"
TINY_DIR = Path(__file__).resolve().parent / "tiny_stdlib"
WEIGHTS_FILE = "model.safetensors"
# Window length in tokens when neither the user nor a file says otherwise (harvest, evaluate, the
# downstream callback): the length the embedded model was trained on.
DEFAULT_CONTEXT = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus 256 = BOS (which also separates documents).

    Every byte string is representable, so no text is ever out of vocabulary and files that are
    not valid UTF-8 are tokenised exactly. `encode` adds no special tokens.
    """

    vocab_size = 257
    bos_token_id = 256
    byte_level = True  # iter_windows passes raw document bytes, not decoded text

    def encode(self, text: str | bytes) -> list[int]:
        """text -> [len(UTF-8 bytes)] ids in 0..255."""
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids) -> str:
        """ids -> text; BOS ids are dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) != self.bos_token_id).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, bos_token_id=256)"


def tiny_config(
    n_layer: int = 4, n_embd: int = 128, n_head: int = 4, context: int = DEFAULT_CONTEXT
) -> transformers.GPT2Config:
    """The embedded model's architecture: GPT-2 with the byte vocabulary.

    BOS = EOS = 256 so that transformers' generation has its special ids and does not warn.
    `dictlearn_tokenizer` is recorded in config.json so that `load_model(DIR)` on a saved copy
    knows to pair it with `ByteTokenizer` (there are no tokenizer files to load).
    """
    import transformers

    return transformers.GPT2Config(
        vocab_size=ByteTokenizer.vocab_size, n_positions=context, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.bos_token_id,
        # No dropout: the model sees each byte of the corpus at most once, so it cannot overfit.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dictlearn_tokenizer="byte",
    )


def load_tiny(device: str = "cpu") -> transformers.GPT2LMHeadModel:
    """The embedded model on `device`, in eval mode."""
    return load_byte_model(TINY_DIR, device)


def load_byte_model(folder: Path, device: str = "cpu") -> transformers.GPT2LMHeadModel:
    """A byte-level GPT-2 saved by train_tiny (config.json + model.safetensors) -> eval-mode model."""
    missing = [name for name in ("config.json", WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise DictLearnError(f"embedded model: {folder / missing[0]} is missing; reinstall dictlearn or "
                             f"rebuild it with: python -m dictlearn.models.train_tiny --out {folder}")
    import transformers

    with quiet_loading():
        model = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No 'Loading weights' progress bar from transformers (dictlearn's output is one line per
    event); the caller's setting is restored afterwards."""
    import transformers

    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()
