"""The CLIP tokenizer through the `tokenizers` library: the same ids as transformers, without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from core.errors import InvalidModel


class ClipTokenizer:
    def __init__(self, tokenizer_json: Path, max_length: int, pad_token_id: int) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception on a missing or corrupt file
            raise InvalidModel(f"{tokenizer_json}: cannot load tokenizer: {exc}") from None
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(length=max_length, pad_id=pad_token_id)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 [len(texts), max_length] token ids, with start/end tokens, padded and truncated."""
        return np.array([e.ids for e in self._tokenizer.encode_batch(texts)], dtype=np.int64)
