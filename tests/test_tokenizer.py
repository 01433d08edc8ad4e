"""The worker's tokenizer gives the ids of openai/clip-vit-large-patch14, as transformers does."""

from __future__ import annotations

import pytest

from worker.tokenizer import ClipTokenizer

PROMPTS = [
    "a photo of a cat",
    "Cartoonize the image",
    "  Derain   this photo, please!  ",
    "",
    "MAKE IT LOOK LIKE A VAN GOGH PAINTING 123",
    "word " * 100,  # longer than 77 tokens: truncated, still ends with <|endoftext|>
]


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    ours = ClipTokenizer(tiny_checkpoint / "tokenizer" / "tokenizer.json", 77, reference.pad_token_id)
    return reference, ours


def test_a_photo_of_a_cat_has_the_openai_clip_ids(tokenizers):
    _, ours = tokenizers
    ids = ours(["a photo of a cat"])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids.shape == (77,) and set(ids[7:].tolist()) == {49407}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers_padded_and_truncated(tokenizers, prompt):
    reference, ours = tokenizers
    expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours([prompt])[0].tolist() == expected
