"""Dense cosine similarity maps (DCSM) and the small CNN that scores an image-caption pair from its map.

A CLIP scores a pair by one cosine between two pooled vectors, which cannot hold attribute binding, spatial
relations and negation all at once ("Is CLIP ideal? No. Can we fix it? Yes!", arXiv 2503.08723). DCSM keeps
the cosine between every image token (the pooled one, then each patch) and every caption token, both in the
shared embedding space, and lets a CNN read the (image tokens x caption tokens) map:
- the caption is padded to TEXT_TOKENS positions; padding columns are zero;
- a column whose token belongs to a functional word (FUNCTIONAL_WORDS: relations, sizes, negations) is replaced
  by that word's fixed row, so the CNN sees which relation or negation a caption states, whatever the towers
  make of the word;
- the map is standardised by constants measured on the training maps, so a pair's score never depends on the
  other pairs scored with it;
- two 3x3 convolutions of 4 channels, a 128-wide layer and one score.
The towers stay frozen: the head learns to read what they already encode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUNCTIONAL_WORDS = ("above", "below", "left", "right", "small", "big", "not", "no", "without", "but", "absent")
TEXT_TOKENS = 30  # the caption positions a map has, as in the DCSM authors' maps
CHANNELS, HIDDEN = 4, 128
ROWS_SEED = 2503_08723  # the functional rows are fixed: the same for every head, reproducible


def dense_tokens(tokenizer, texts: list[str], length: int = TEXT_TOKENS) -> dict[str, torch.Tensor]:
    """Captions -> `input_ids`, `attention_mask` padded to exactly `length`, and `functional` (M, length): at each
    position 1 + the index in FUNCTIONAL_WORDS of the word the token belongs to, 0 elsewhere.

    The word of a token is the whitespace-separated word holding its last character, lowercased and stripped of
    punctuation, so a word split into several tokens marks each of them.
    """
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt",
                        return_offsets_mapping=True, return_token_type_ids=False)
    functional = torch.zeros(len(texts), length, dtype=torch.long)
    for row, (text, offsets) in enumerate(zip(texts, encoded["offset_mapping"].tolist())):
        word_at = _words_by_character(text)
        for position, (start, end) in enumerate(offsets):
            if end > start:
                word = word_at[end - 1]
                if word in FUNCTIONAL_WORDS:
                    functional[row, position] = FUNCTIONAL_WORDS.index(word) + 1
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "functional": functional}


def encode_captions(encode_text_tokens, tokenizer, texts: list[str], device: torch.device | str,
                    length: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions -> their (M, length, D) token features by `encode_text_tokens(ids, mask)`, their attention mask and
    their functional-word ids (`dense_tokens`), all on `device`: what `similarity_maps` and a DenseScorer read."""
    tokens = {k: v.to(device) for k, v in dense_tokens(tokenizer, texts, length).items()}
    mask = tokens["attention_mask"]
    return encode_text_tokens(tokens["input_ids"], mask), mask, tokens["functional"]


def _words_by_character(text: str) -> list[str]:
    """For each character of `text`, the normalised word it is part of ('' for spaces)."""
    words = []
    for piece in text.split(" "):
        word = piece.strip(".,;:!?\"'()").lower()
        words.extend([word] * len(piece) + [""])
    return words


def similarity_maps(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(N, I, D) and (M, T, D) unit vectors, (M, T) mask -> (N, M, I, T) cosines, zero at padding."""
    maps = torch.einsum("nid,mtd->nmit", image_tokens, text_tokens)
    return maps * text_mask[None, :, None, :].to(maps.dtype)


class DenseScorer(nn.Module):
    """(N, M, I, T) maps and (M, T) functional-word ids -> (N, M) scores, one per image-caption pair."""

    def __init__(self, image_tokens: int, text_tokens: int = TEXT_TOKENS):
        super().__init__()
        self.image_tokens, self.text_tokens = image_tokens, text_tokens
        rows = torch.rand(len(FUNCTIONAL_WORDS), image_tokens, generator=torch.Generator().manual_seed(ROWS_SEED))
        self.register_buffer("functional_rows", 2 * rows - 1)  # in the range of cosines
        self.register_buffer("map_mean", torch.tensor(0.0))
        self.register_buffer("map_std", torch.tensor(1.0))
        self.conv1 = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.fc1 = nn.Linear(CHANNELS * image_tokens * text_tokens, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 1)

    def with_functional_rows(self, maps: torch.Tensor, functional: torch.Tensor) -> torch.Tensor:
        """The maps with the column of every functional-word token replaced by that word's row."""
        rows = torch.cat([torch.zeros_like(self.functional_rows[:1]), self.functional_rows])  # id 0: no word
        written = rows[functional].transpose(1, 2)  # (M, I, T)
        keep = (functional == 0)[None, :, None, :]
        return torch.where(keep, maps, written[None].to(maps.dtype))

    @torch.no_grad()
    def set_normalisation(self, maps: torch.Tensor, functional: torch.Tensor) -> None:
        """Standardise every later map by the mean and spread of these (training) maps."""
        values = self.with_functional_rows(maps, functional)
        self.map_mean.copy_(values.mean())
        self.map_std.copy_(values.std().clamp(min=1e-6))

    def forward(self, maps: torch.Tensor, functional: torch.Tensor) -> torch.Tensor:
        n, m, i, t = maps.shape
        if (i, t) != (self.image_tokens, self.text_tokens):
            raise ValueError(f"maps of {i} x {t} tokens for a head of {self.image_tokens} x {self.text_tokens}")
        x = (self.with_functional_rows(maps, functional) - self.map_mean) / self.map_std
        x = F.relu(self.conv1(x.reshape(n * m, 1, i, t)))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).view(n, m)

    def extra_repr(self) -> str:
        return f"image_tokens={self.image_tokens}, text_tokens={self.text_tokens}"
