"""Text encoders: prompts in, the token states the UNet cross-attends to (and a pooled vector) out.

We wrap the real libraries instead of reimplementing CLIP or T5: transformers' CLIPTextModel (SD1 and SD2
diffusers folders), open_clip's TextTransformer (SD2 single-file checkpoints) and transformers' T5EncoderModel.
Every wrapper offers two levels, so the pipeline can chunk long prompts and weight tokens A1111-style:

    token_ids = encoder.tokenize(prompts)      # content ids, no BOS/EOS, no truncation
    ids, mask = encoder.frame(token_ids)       # (B, max_length): [BOS] content [EOS] padding
    encoding = encoder.encode_ids(ids, mask)   # TextEncoding

and `encode(prompts)` runs all three, giving the same numbers as diffusers' `encode_prompt`.
The wrappers do not switch off autograd: call them under `torch.no_grad()` when not training.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ldm.errors import CheckpointError

logger = logging.getLogger(__name__)

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass
class TextEncoding:
    tokens: torch.Tensor                        # (B, T, D) hidden states the UNet cross-attends to
    pooled: torch.Tensor | None                 # (B, P) one vector per prompt, or None (T5)
    attention_mask: torch.Tensor | None = None  # (B, T) 1 = real token; set only when the encoder masked padding


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None  # start token, or None for encoders that take none (T5)
    eos: int         # end token; pooling and the default attention mask look for its first occurrence
    pad: int         # fills the window after EOS


class TextEncoder(ABC):
    """The interface every text encoder offers; see the module docstring for the three steps."""

    def __init__(self, model: nn.Module, tokenizer, special: SpecialTokens, max_length: int):
        # Built-from-config models start in training mode; T5's dropout would then randomize every prompt.
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.special = special
        self.max_length = max_length  # the window, BOS and EOS included (77 for CLIP)

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width D of `TextEncoding.tokens`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids must lie in [0, vocab_size)."""

    @property
    def max_positions(self) -> int | None:
        """Longest id sequence the model has position embeddings for; None when unlimited."""
        return None

    @property
    def content_length(self) -> int:
        """Content tokens one window holds once BOS and EOS are in (75 for CLIP): the chunk size for long prompts."""
        return self.max_length - 1 - (self.special.bos is not None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Content ids per prompt, without BOS/EOS and without truncation."""
        return self._token_ids(_checked_prompts(prompts))

    def frame(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[BOS] content [EOS] padding, truncated to the window the way diffusers' tokenizer call truncates.

        Returns ids and attention mask, both (B, max_length) int64; the mask is 1 up to and including EOS.
        """
        if not token_ids:
            raise ValueError("token_ids is empty; pass one list of ids per prompt (tokenize() makes them)")
        rows, lengths = [], []
        for index, content in enumerate(token_ids):
            if len(content) > self.content_length:
                logger.warning(
                    "prompt %d: %d tokens beyond the %d-token window were dropped; split long prompts into chunks",
                    index, len(content) - self.content_length, self.content_length,
                )
            start = [] if self.special.bos is None else [self.special.bos]
            row = start + list(content[: self.content_length]) + [self.special.eos]
            lengths.append(len(row))
            rows.append(row + [self.special.pad] * (self.max_length - len(row)))
        ids = torch.tensor(rows, dtype=torch.long)
        return ids, _mask_from_lengths(torch.tensor(lengths), self.max_length)

    def encode_ids(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoding:
        """Encode framed ids (B, T). Without a mask, every token up to and including the first EOS counts as real."""
        self._check_ids(ids)
        ids = ids.to(self.device, torch.long)
        if attention_mask is None:
            attention_mask = _mask_from_lengths(_first_positions(ids, self.special.eos) + 1, ids.shape[1])
        elif attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but ids have {tuple(ids.shape)}; "
                "pass the mask that frame() returned with the ids"
            )
        return self._encode(ids, attention_mask.to(self.device, torch.long))

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Pad to max_length and truncate, as diffusers' StableDiffusionPipeline.encode_prompt does."""
        return self.encode_ids(*self.frame(self.tokenize(prompts)))

    def state_dict_for_model(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename checkpoint keys written by other library versions to this model's names (identity by default)."""
        return dict(state_dict)

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        # transformers tokenizers; verbose=False silences the "longer than the model" warning, chunking is our job.
        return self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]

    @abstractmethod
    def _encode(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        """Run the model on checked ids (B, T) and their mask, both int64 on the model's device."""

    def _check_ids(self, ids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"ids must be an integer torch.Tensor, got {getattr(ids, 'dtype', type(ids))}")
        if ids.ndim != 2 or ids.numel() == 0:
            raise ValueError(f"ids must have shape (batch, length) with both > 0, got {tuple(ids.shape)}")
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(
                f"ids have length {ids.shape[1]} but the model has {self.max_positions} positions; "
                f"split long prompts into chunks of {self.content_length} tokens"
            )
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        rows_without_eos = (~(ids == self.special.eos).any(dim=1)).nonzero().flatten().tolist()
        if rows_without_eos:
            raise ValueError(
                f"ids rows {rows_without_eos} hold no end token (id {self.special.eos}); build ids with frame()"
            )


class CLIPTextEncoder(TextEncoder):
    """transformers' CLIPTextModel (SD1, SD2 diffusers folders); pooled = the model's pooler output (EOS state).

    `clip_skip` follows diffusers: the number of final layers skipped, the kept output still going through the
    final layer norm. A1111's "Clip skip: 2" is clip_skip=1 here, its "1" is 0.
    """

    def __init__(self, model: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, clip_skip: int = 0):
        config = model.config
        _check_clip_skip(clip_skip, config.num_hidden_layers)
        if tokenizer.model_max_length > config.max_position_embeddings:
            raise ValueError(
                f"tokenizer.model_max_length {tokenizer.model_max_length} exceeds the text model's "
                f"{config.max_position_embeddings} positions; build the tokenizer with "
                f"model_max_length={config.max_position_embeddings}"
            )
        special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        super().__init__(model, tokenizer, special, tokenizer.model_max_length)
        self.clip_skip = clip_skip

    @classmethod
    def from_config(cls, config: CLIPTextConfig, tokenizer: PreTrainedTokenizerBase, clip_skip: int = 0):
        """Random weights in the right shapes, for a checkpoint loader to fill."""
        return cls(CLIPTextModel(config), tokenizer, clip_skip)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def _encode(self, ids, attention_mask):
        # Some text encoders (e.g. AltDiffusion's) are trained with padding masked; diffusers reads this flag.
        masked = bool(getattr(self.model.config, "use_attention_mask", False))
        output = self.model(
            ids, attention_mask=attention_mask if masked else None, output_hidden_states=self.clip_skip > 0
        )
        if self.clip_skip == 0:
            tokens = output.last_hidden_state
        else:
            tokens = _clip_text_transformer(self.model).final_layer_norm(output.hidden_states[-1 - self.clip_skip])
        return TextEncoding(tokens, output.pooler_output, attention_mask if masked else None)

    def state_dict_for_model(self, state_dict):
        """transformers 5 dropped the `text_model.` level that checkpoints (saved by 4.x) carry, and the old
        persistent `position_ids` buffer is no longer part of the state: bring keys to the installed layout."""
        wants_prefix = hasattr(self.model, "text_model")
        adapted = {}
        for key, tensor in state_dict.items():
            bare = key.removeprefix("text_model.")
            if bare == "embeddings.position_ids":
                continue
            adapted["text_model." + bare if wants_prefix else bare] = tensor
        return adapted


def _clip_text_transformer(model: CLIPTextModel) -> nn.Module:
    """The module holding `final_layer_norm`: the model itself in transformers 5, `model.text_model` before."""
    return getattr(model, "text_model", model)


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """open_clip text tower; the defaults are SD 2.x's ViT-H-14 (OpenCLIP bigG for SDXL: 1280, 20, 32, 1280)."""

    width: int = 1024
    heads: int = 16
    layers: int = 24
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int = 1024   # width of the pooled vector after text_projection
    activation: str = "gelu"     # "gelu" (LAION-trained towers) or "quick_gelu" (OpenAI-trained)

    def __post_init__(self):
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


_ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def build_open_clip_text_model(config: OpenCLIPTextConfig) -> TextTransformer:
    """The text tower alone (no vision tower), with exactly the keys SD2 checkpoints hold under
    `cond_stage_model.model.`: token_embedding, positional_embedding, transformer.resblocks.N, ln_final,
    text_projection."""
    return TextTransformer(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        output_dim=config.projection_dim,
        act_layer=_ACTIVATIONS[config.activation],
    )


class OpenCLIPTextEncoder(TextEncoder):
    """open_clip's TextTransformer as SD2 runs it (CompVis FrozenOpenCLIPEmbedder): tokens from the layer
    `clip_skip` before the last (SD2: the penultimate, clip_skip=1) through ln_final; padding is id 0.

    pooled = ln_final(last layer) at the EOS position @ text_projection, as open_clip's encode_text (SDXL).
    """

    PAD_ID = 0  # open_clip's tokenizer pads with zeros, and SD2 was trained that way

    def __init__(self, model: TextTransformer, tokenizer: SimpleTokenizer | None = None, clip_skip: int = 1):
        if not isinstance(model, TextTransformer):
            raise ValueError(f"model must be open_clip.transformer.TextTransformer, got {type(model).__name__}")
        _check_clip_skip(clip_skip, len(model.transformer.resblocks))
        tokenizer = tokenizer or open_clip_tokenizer(model.context_length)
        special = SpecialTokens(tokenizer.sot_token_id, tokenizer.eot_token_id, self.PAD_ID)
        super().__init__(model, tokenizer, special, model.context_length)
        self.clip_skip = clip_skip

    @classmethod
    def from_config(
        cls, config: OpenCLIPTextConfig = OpenCLIPTextConfig(), tokenizer: SimpleTokenizer | None = None,
        clip_skip: int = 1,
    ):
        return cls(build_open_clip_text_model(config), tokenizer, clip_skip)

    @property
    def hidden_size(self) -> int:
        return self.model.width

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_positions(self) -> int:
        return self.model.num_pos

    def _token_ids(self, prompts):
        return [self.tokenizer.encode(prompt) for prompt in prompts]

    def _encode(self, ids, attention_mask):
        # Causal attention only: open_clip's text tower never masks padding (attention_mask is unused).
        model, length = self.model, ids.shape[1]
        causal = model.attn_mask[:length, :length]
        x = model.token_embedding(ids) + model.positional_embedding[:length]  # (B, T, W)
        blocks = model.transformer.resblocks
        kept = len(blocks) - self.clip_skip
        for block in blocks[:kept]:
            x = block(x, attn_mask=causal)
        tokens = model.ln_final(x)
        for block in blocks[kept:]:  # the skipped layers still feed the pooled vector
            x = block(x, attn_mask=causal)
        rows = torch.arange(ids.shape[0], device=ids.device)
        eos_states = model.ln_final(x)[rows, _first_positions(ids, self.special.eos)]  # (B, W)
        return TextEncoding(tokens, _project(eos_states, model.text_projection))


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor) -> torch.Tensor:
    """open_clip stores text_projection as a bare matrix, or as a Linear when it has a bias."""
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


class T5TextEncoder(TextEncoder):
    """transformers' T5EncoderModel: tokens = last_hidden_state with padding masked; no pooled vector.

    T5 has relative positions, so the window is a choice of the pipeline (DeepFloyd IF: 77, SD3: 256); it
    defaults to the tokenizer's model_max_length when that is a real limit.
    """

    def __init__(self, model: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        max_length = max_length or tokenizer.model_max_length
        if not 2 <= max_length <= 100_000:  # tokenizers without a limit report ~1e30
            raise ValueError(f"max_length {max_length} is not a usable window; pass max_length (e.g. 77 or 256)")
        special = SpecialTokens(None, tokenizer.eos_token_id, tokenizer.pad_token_id)
        super().__init__(model, tokenizer, special, max_length)

    @classmethod
    def from_config(cls, config: T5Config, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        return cls(T5EncoderModel(config), tokenizer, max_length)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _encode(self, ids, attention_mask):
        tokens = self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        return TextEncoding(tokens, None, attention_mask)

    def state_dict_for_model(self, state_dict):
        """The input embedding is stored once (`shared.weight` or `encoder.embed_tokens.weight`, whichever the
        saver kept of the tied pair); the module lists both names."""
        adapted = dict(state_dict)
        tied = ("shared.weight", "encoder.embed_tokens.weight")
        for name, twin in (tied, tied[::-1]):
            if name not in adapted and twin in adapted:
                adapted[name] = adapted[twin]
        return adapted


def _checked_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it as [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError('prompts is empty; pass at least one prompt ("" for an unconditional one)')
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}] is a {type(prompt).__name__}, not a string")
    return list(prompts)


def _check_clip_skip(clip_skip: int, layers: int) -> None:
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise ValueError(
            f"clip_skip must be an integer in [0, {layers - 1}] (layers skipped from the end; "
            f"A1111's 'Clip skip: N' is N - 1), got {clip_skip!r}"
        )


def _first_positions(ids: torch.Tensor, token: int) -> torch.Tensor:
    """Index of the first `token` in each row (B,); rows must hold one (argmax returns the first maximum)."""
    return (ids == token).int().argmax(dim=1)


def _mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) int64 mask, 1 on the first `lengths[b]` positions of row b."""
    positions = torch.arange(width, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).long()


# Tokenizers -------------------------------------------------------------------------------------------------------

_CLIP_VOCAB_SIZE = 49408
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _openai_clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary, derived from the BPE merges open_clip ships: the 256 byte symbols, their
    end-of-word forms, one token per merge in rank order, then the two special tokens."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merge_count = _CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + merge_count]]  # line 0 is a version header
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(max_length: int = 77, pad_token: str = _CLIP_EOS) -> CLIPTokenizer:
    """The transformers CLIP tokenizer of openai/clip-vit-large-patch14 (SD1), built offline.

    SD1 pads with <|endoftext|>; SD2's diffusers tokenizer pads with "!" (id 0), so pass pad_token="!" for it.
    transformers then treats "!" as a special token, so "!!!" becomes three "!" ids instead of the "!!!" token:
    that is what diffusers feeds SD2 too, though open_clip (SD2's training tokenizer) keeps "!!!" whole.
    """
    vocab, merges = _openai_clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length
    )


def compact_clip_tokenizer(texts: Sequence[str], max_length: int = 77,
                           whole_characters: bool = False) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary keeps only what `texts` need: the 512 byte symbols, the merges that build
    their tokens, and the two special tokens (ids in CLIP's order, specials last).

    The given texts tokenize exactly as with the full 49,408-token vocabulary (BPE applies the lowest-ranked merge
    present, and every merge those texts use is kept in its relative order); other words fall back to smaller
    pieces. A model trained on a closed world then needs a token table of hundreds of rows, not 49,408.

    `whole_characters`: every non-ASCII character of `texts` becomes one token of its own (ids after the specials).
    CLIP's BPE cuts most CJK characters into UTF-8 byte pieces ("青い四角の左に赤い丸" is 21 tokens, 丸 two of
    them, 青 and 角 sharing a piece), so a small text encoder must first learn to spell; as characters it is 10
    tokens, each a unit. ASCII text tokenizes as before.
    """
    vocab, merges = _openai_clip_vocabulary()
    full = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
    characters = sorted({c for text in texts for c in text if not c.isascii()}) if whole_characters else []
    bpe_texts = {"".join(" " if c in characters else c for c in text) for text in texts}
    needed = {token for text in bpe_texts for token in full.tokenize(text)}
    kept_merges = []
    for first, second in reversed(merges):  # a token's parts come from lower-ranked merges, visited later
        if first + second in needed:
            needed.update((first, second))
            kept_merges.append((first, second))
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(pair) for pair in reversed(kept_merges)] + [_CLIP_BOS, _CLIP_EOS]
    tokenizer = CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)}, merges=kept_merges[::-1],
        pad_token=_CLIP_EOS, model_max_length=max_length,
    )
    # added tokens are matched in the raw text before BPE runs, and saved with the tokenizer
    tokenizer.add_tokens([AddedToken(c, normalized=False) for c in characters])
    return tokenizer


def open_clip_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """open_clip's own tokenizer (same vocabulary; it also runs ftfy, which e.g. maps full-width "！" to "!"
    where transformers' tokenizer keeps it)."""
    return SimpleTokenizer(context_length=context_length)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load a diffusers folder's `tokenizer/` (or `tokenizer_2/`, `tokenizer_3/`) directory offline."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(path, "is not a folder; pass a diffusers pipeline's tokenizer/ directory")
    files = {child.name for child in path.iterdir()}
    try:
        if "tokenizer_class" in _read_json(path / "tokenizer_config.json"):
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        if {"vocab.json", "merges.txt"} <= files:
            return CLIPTokenizer.from_pretrained(path, local_files_only=True)
        if files & {"tokenizer.json", "spiece.model"}:
            return T5Tokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise CheckpointError(path, f"tokenizer files could not be read ({error})") from error
    raise CheckpointError(
        path, "holds no tokenizer files; expected vocab.json + merges.txt (CLIP), tokenizer.json or spiece.model (T5)"
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
