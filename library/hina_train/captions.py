"""Caption processing per training sample, as kohya sd-scripts' ``BaseDataset.process_caption`` does it.

In order:
1. ``caption_prefix`` + " " + caption + " " + ``caption_suffix``;
2. caption dropout: the whole caption becomes "" with probability ``caption_dropout_rate``, and in every
   epoch divisible by ``caption_dropout_every_n_epochs`` (epochs counted from 1, as kohya counts them);
3. ``enable_wildcard``: a multi-line caption file gives one line at random, and each ``{a|b|c}`` becomes one
   of its choices at random (``{{``/``}}`` are literal braces); without it only the first line is read;
4. tags (split at ``caption_separator``, default ","): the fixed head is the first ``keep_tokens`` tags, or,
   when ``keep_tokens_separator`` occurs in the caption, the part before it (a second occurrence also fixes
   a tail); with token warm-up (``token_warmup_step`` s > 0; below 1 a share of the run's steps) only the
   first ⌊step·(n − token_warmup_min)/s⌋ + token_warmup_min of the n flexible tags are kept until step s;
   the flexible tags are then shuffled (``shuffle_caption``) and each dropped with
   probability ``caption_tag_dropout_rate``; the tags are joined with ", ";
5. ``secondary_separator`` is replaced by ``caption_separator`` (so "a;;b" stays one tag through shuffling).

Randomness comes from the micro-batch's ``torch.Generator``, so a resumed run draws the same captions.
"""

from __future__ import annotations

import math

import torch


def _tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def split_fixed_flexible(caption: str, keep_tokens: int, keep_tokens_separator: str | None,
                         separator: str = ",") -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail) tags of ``caption``, kohya's rule."""
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed, flexible = caption.split(keep_tokens_separator, 1)
        tail: list[str] = []
        if keep_tokens_separator in flexible:
            flexible, tail_text = flexible.split(keep_tokens_separator, 1)
            tail = _tags(tail_text, separator)
        return _tags(fixed, separator), _tags(flexible, separator), tail
    tags = [t.strip() for t in caption.strip().split(separator)]
    if keep_tokens > 0:
        return tags[:keep_tokens], tags[keep_tokens:], []
    return [], tags, []


def _pick(choices: list[str], generator: torch.Generator) -> str:
    return choices[int(torch.randint(len(choices), (), generator=generator))]


def expand_wildcards(caption: str, generator: torch.Generator) -> str:
    """kohya's wildcards: one line of a multi-line caption, then every ``{a|b}`` replaced by one choice."""
    import re

    if "\n" in caption:
        caption = _pick(caption.split("\n"), generator)
    open_mark, close_mark = "\u2985", "\u2986"  # stand-ins for escaped braces, made unique as kohya does
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: _pick(m.group(1).split("|"), generator), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_tag_count(n_tags: int, subset, step: int, max_train_steps: int) -> int:
    """kohya's token warm-up: how many of the ``n_tags`` flexible tags a caption keeps at ``step``."""
    warmup = subset.token_warmup_step
    if warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    if not warmup or step >= warmup:
        return n_tags
    return math.floor(step * ((n_tags - subset.token_warmup_min) / warmup)) + subset.token_warmup_min


def process_caption(caption: str, subset, generator: torch.Generator, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption a sample trains with this time (see the module docstring). ``subset`` carries kohya's
    per-subset caption settings; ``epoch`` counts from 1."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    rate = subset.caption_dropout_rate
    dropped = rate > 0 and float(torch.rand((), generator=generator)) < rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every and every > 0 and epoch % every == 0):
        return ""
    if getattr(subset, "enable_wildcard", False):
        caption = expand_wildcards(caption, generator)
    separator = subset.caption_separator
    warmup = getattr(subset, "token_warmup_step", 0)
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or warmup > 0:
        fixed, flexible, tail = split_fixed_flexible(caption, subset.keep_tokens, subset.keep_tokens_separator,
                                                     separator)
        if warmup > 0:
            flexible = flexible[:warmup_tag_count(len(flexible), subset, step, max_train_steps)]
        if subset.shuffle_caption:
            flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
        tag_rate = subset.caption_tag_dropout_rate
        if tag_rate > 0:
            keep = (torch.rand(len(flexible), generator=generator) >= tag_rate).tolist()
            flexible = [t for t, k in zip(flexible, keep) if k]
        caption = ", ".join(fixed + flexible + tail)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, separator)
    return caption


def check_rates(values: dict, where: str) -> None:
    """Caption settings of one subset must be in range; raises ValueError naming the value."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = values.get(name, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}{name} {value!r} must be a number from 0 to 1")
    value = values.get("caption_dropout_every_n_epochs", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}caption_dropout_every_n_epochs {value!r} must be an integer >= 0 (0: off)")
    value = values.get("caption_separator", ",")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}caption_separator {value!r} must be a non-empty string")
