"""The OpenAI CLIP BPE vocabulary, vendored, turned into Hugging Face tokenizer files offline.

`assets/bpe_simple_vocab_16e6.txt.gz` is the merges file that OpenAI's CLIP (MIT licence, see
`assets/LICENSE-CLIP`) ships and that every Stable Diffusion 1.x tokenizer is built from. From it we
derive `vocab.json` and `merges.txt`, so tests and the bundled demo model get the exact token ids of
`openai/clip-vit-large-patch14` without touching the Hub.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps this many merges; with bytes and specials: 49408 ids
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable-unicode table, in byte order of its construction."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = dict.fromkeys(printable)
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = 256 + extra
            extra += 1
    return tuple(chr(symbols[b] if b not in printable else b) for b in symbols)


@cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1])  # type: ignore[misc]


def clip_vocab() -> dict[str, int]:
    symbols = list(_byte_symbols())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in clip_merges()] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for a CLIP tokenizer into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in clip_merges()) + "\n", encoding="utf-8")
    return vocab_path, merges_path
