"""A1111-style prompts: emphasis weights, BREAK, and prompts longer than one text-encoder window.

    segments = parse_prompt_attention("a (red:1.3) [car] BREAK at night")
    encoding = encode_prompt(encoder, ["a (red:1.3) car", "blurry"])   # tokens (B, chunks * max_length, D)

Syntax (as AUTOMATIC1111's web UI reads it): `(x)` weighs x by 1.1, `((x))` by 1.21, `[x]` by 1/1.1, `(x:1.3)`
by 1.3; `\\(`, `\\)`, `\\[`, `\\]` are literal brackets; an unmatched closing bracket is plain text and an unclosed
opening bracket weighs everything after it; `BREAK` (upper case, a word of its own) starts a new chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ldm.models.text_encoders import TextEncoder, TextEncoding

EMPHASIS = 1.1            # one pair of round brackets multiplies by this; square brackets divide by it
COMMA_BACKTRACK = 20      # a full chunk moves its tail after the last comma into the next one, if that tail is short
class _BreakMarker:
    def __repr__(self) -> str:
        return "BREAK"


BREAK = _BreakMarker()    # marks a BREAK between segments in the parser's output

_TOKEN = re.compile(
    r"""\\[()\[\]\\]           # escaped bracket or backslash
      | \(|\[                  # opening brackets
      | :\s*([+-]?[.\d]+)\s*\) # explicit weight closing a round bracket
      | \)|\]                  # closing brackets
      | [^\\()\[\]:]+          # plain text
      | [\\:]                  # a lone backslash or colon is text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class _Weighted:
    text: object  # a str, or BREAK
    weight: float


def parse_prompt_attention(prompt: str) -> list[tuple[object, float]]:
    """Split a prompt into (text, weight) segments; BREAK appears as `(BREAK, -1.0)`. Adjacent segments with
    equal weights are merged, and an empty prompt gives [("", 1.0)]."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    segments: list[_Weighted] = []
    open_round: list[int] = []   # segment index where each open bracket starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for segment in segments[start:]:
            if segment.text is not BREAK:
                segment.weight *= factor

    for match in _TOKEN.finditer(prompt):
        token, explicit = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            segments.append(_Weighted(token[1], 1.0))
        elif token == "(":
            open_round.append(len(segments))
        elif token == "[":
            open_square.append(len(segments))
        elif explicit is not None and open_round:
            scale(open_round.pop(), _explicit_weight(explicit))
        elif token == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:
            _append_text(segments, token)
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)
    return [(s.text, -1.0 if s.text is BREAK else s.weight) for s in _merged(segments)] or [("", 1.0)]


def _explicit_weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"emphasis weight {text!r} is not a number; write e.g. (word:1.2)") from None


def _append_text(segments: list[_Weighted], text: str) -> None:
    parts = _BREAK.split(text)
    for index, part in enumerate(parts):
        if index:
            segments.append(_Weighted(BREAK, -1.0))
        if part:
            segments.append(_Weighted(part, 1.0))


def _merged(segments: list[_Weighted]) -> list[_Weighted]:
    merged: list[_Weighted] = []
    for segment in segments:
        last = merged[-1] if merged else None
        if last and BREAK not in (last.text, segment.text) and last.weight == segment.weight:
            last.text += segment.text
        else:
            merged.append(_Weighted(segment.text, segment.weight))
    return merged


# Encoding -----------------------------------------------------------------------------------------------------

@dataclass
class _Chunk:
    ids: list[int]
    weights: list[float]


def chunk_prompt(encoder: TextEncoder, prompt: str) -> list[_Chunk]:
    """Weighted content tokens of one prompt, cut into chunks of at most `encoder.content_length`."""
    size = encoder.content_length
    comma = encoder.tokenize([","])[0][-1]
    chunks, current, last_comma = [], _Chunk([], []), -1

    def close() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current, last_comma = _Chunk([], []), -1

    for text, weight in parse_prompt_attention(prompt):
        if text is BREAK:
            close()
            continue
        for token in encoder.tokenize([text])[0]:
            if len(current.ids) == size:
                tail = len(current.ids) - (last_comma + 1)
                if last_comma >= 0 and tail <= COMMA_BACKTRACK:
                    carried = _Chunk(current.ids[last_comma + 1:], current.weights[last_comma + 1:])
                    del current.ids[last_comma + 1:], current.weights[last_comma + 1:]
                    close()
                    current = carried
                else:
                    close()
            if token == comma:
                last_comma = len(current.ids)
            current.ids.append(token)
            current.weights.append(weight)
    if current.ids or not chunks:
        chunks.append(current)
    return chunks


def encode_prompt(encoder: TextEncoder, prompts: Sequence[str]) -> TextEncoding:
    """Encode A1111-style prompts: tokens (B, chunks * max_length, D), pooled from each prompt's first chunk.

    Every prompt of the call gets the same number of chunks (the longest's; missing ones encode the empty
    prompt), so encode cond and uncond prompts in ONE call and split the result, or their lengths may differ.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings; wrap a single prompt as [prompt]")
    per_prompt = [chunk_prompt(encoder, prompt) for prompt in prompts]
    count = max(len(chunks) for chunks in per_prompt)
    for chunks in per_prompt:
        chunks.extend(_Chunk([], []) for _ in range(count - len(chunks)))
    encodings = [_encode_chunk(encoder, [chunks[k] for chunks in per_prompt]) for k in range(count)]
    masks = [e.attention_mask for e in encodings]
    return TextEncoding(
        tokens=torch.cat([e.tokens for e in encodings], dim=1),
        pooled=encodings[0].pooled,
        attention_mask=None if masks[0] is None else torch.cat(masks, dim=1),
    )


def _encode_chunk(encoder: TextEncoder, chunks: list[_Chunk]) -> TextEncoding:
    encoding = encoder.encode_ids(*encoder.frame([chunk.ids for chunk in chunks]))
    weights = torch.ones(encoding.tokens.shape[:2], dtype=encoding.tokens.dtype)
    for row, chunk in enumerate(chunks):
        start = int(encoder.special.bos is not None)  # BOS, EOS and padding keep weight 1
        weights[row, start:start + len(chunk.ids)] = torch.tensor(chunk.weights, dtype=weights.dtype)
    if torch.all(weights == 1):  # untouched, so plain prompts match encoder.encode bit for bit
        return encoding
    encoding.tokens = apply_weights(encoding.tokens, weights.to(encoding.tokens.device))
    return encoding


def apply_weights(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale token states (B, T, D) by weights (B, T), then rescale each prompt back to its original mean, as
    A1111 does, so emphasis shifts attention between tokens without changing the conditioning's overall size.
    (A1111 takes one mean over the whole batch; per prompt keeps a prompt's result independent of its batch.)"""
    original_mean = tokens.mean(dim=(1, 2), keepdim=True)
    weighted = tokens * weights[..., None]
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
