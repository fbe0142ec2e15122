"""Captions -> UNet conditioning, as kohya sd-scripts encodes them (``strategy_base._get_input_ids``,
``train_util.get_hidden_states``, ``strategy_sdxl``), and the text-encoder output cache.

- SD 1.x/2.x: one CLIP text encoder (``--clip_skip n``: the n-th last layer through the final layer norm).
  SDXL: the penultimate layers of both encoders, concatenated, plus the second encoder's pooled projection
  and the size/crop ``time_ids`` (original size, crop top-left and target size of each image).
- ``--max_token_length 150/225`` (kohya's long captions): the caption is tokenised to N+2 tokens and cut
  into N/75 chunks "<BOS> 75 tokens <EOS>" that are encoded one by one; the hidden states are joined back
  as <BOS> + 75 + 75 (+ 75) + <EOS> (N+2 positions). With SD 2.x/SDXL tokenizers (pad ≠ eos) a chunk that
  ends mid-caption ends with <EOS>, and an empty chunk starts "<BOS> <EOS>", as kohya does. The pooled
  SDXL embedding is the first chunk's. A caption longer than the limit is cut, with a one-time notice.
- ``--cache_text_encoder_outputs`` (``_to_disk``): every caption is encoded once before training, which
  needs a frozen text encoder and captions that do not change between epochs. On disk: kohya's
  ``<stem>_te_outputs.npz`` beside the image with ``hidden_state1`` (SDXL also ``hidden_state2``,
  ``pool2``), plus ``caption``, so a file of an edited caption (or another ``--max_token_length``) is
  encoded again instead of reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHUNK = 75  # caption tokens per CLIP window (77 minus <BOS> and <EOS>)


class TextConditioner:
    def __init__(self, models, clip_skip: int | None, resolution, max_token_length: int | None = None):
        self.models = models
        self.clip_skip = clip_skip
        self.resolution = resolution
        self.max_length = (max_token_length or CHUNK) + 2
        self.warned_truncation = False

    # --- tokens ------------------------------------------------------------------------------------
    def ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """(B, chunks, 77) token ids, kohya's chunking."""
        window = tokenizer.model_max_length
        full = tokenizer(captions, truncation=True, max_length=1 << 20).input_ids  # uncut, to count
        if not self.warned_truncation and any(len(ids) > self.max_length for ids in full):
            longest = max(len(ids) for ids in full) - 2
            print(f"note: a caption has {longest} tokens; the text encoder sees the first {self.max_length - 2} "
                  f"(kohya cuts the same way; --max_token_length 150 or 225 allows longer captions)")
            self.warned_truncation = True
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                        return_tensors="pt").input_ids
        if self.max_length <= window:
            return ids.unsqueeze(1)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        chunks = []
        for start in range(1, self.max_length - window + 2, window - 2):
            chunk = torch.cat([ids[:, :1], ids[:, start:start + window - 2], ids[:, -1:]], dim=1)
            if pad != eos:
                ends_mid = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
                chunk[ends_mid, -1] = eos
                chunk[chunk[:, 1] == pad, 1] = eos
            chunks.append(chunk)
        return torch.stack(chunks, dim=1)

    # --- hidden states -----------------------------------------------------------------------------
    def _hidden(self, encoder, ids: torch.Tensor, layer: int | None, final_norm: bool):
        """Encode (B, n, 77) ids chunk by chunk; returns (B, n*75+2, D) states and the per-chunk output."""
        b, n, window = ids.shape
        flat = ids.reshape(b * n, window)
        if layer is None:
            out = encoder(flat)
            states = out[0]
        else:
            out = encoder(flat, output_hidden_states=True)
            states = out.hidden_states[layer]
            if final_norm:
                states = encoder.text_model.final_layer_norm(states)
        states = states.reshape(b, n * window, -1)
        if n > 1:
            parts = [states[:, :1]] + [states[:, k * window + 1:k * window + window - 1] for k in range(n)]
            states = torch.cat(parts + [states[:, -1:]], dim=1)
        return states, out

    def encode(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, SDXL pooled embedding or None) of ``captions``."""
        m = self.models
        if not m.is_sdxl:
            skip = self.clip_skip if self.clip_skip and self.clip_skip > 1 else None
            ids = self.ids(m.tokenizers[0], captions).to(device)
            hidden, _ = self._hidden(m.text_encoders[0], ids, None if skip is None else -skip, True)
            return hidden, None
        te1, te2 = m.text_encoders
        hidden1, _ = self._hidden(te1, self.ids(m.tokenizers[0], captions).to(device), -2, False)
        ids2 = self.ids(m.tokenizers[1], captions).to(device)
        hidden2, out2 = self._hidden(te2, ids2, -2, False)
        pooled = out2.text_embeds.reshape(ids2.shape[0], ids2.shape[1], -1)[:, 0]
        return torch.cat([hidden1, hidden2], dim=-1), pooled

    def time_ids(self, items, batch: int, device, dtype) -> torch.Tensor:
        """SDXL's size conditioning per image: original (h, w), crop (top, left), target (h, w)."""
        from .buckets import crop_ltrb

        rows = []
        for k in range(batch):
            item = items[k] if items is not None else None
            if item is None or item.bucket is None:
                w, h = self.resolution
                rows.append([h, w, 0, 0, h, w])
                continue
            left, top, _, _ = crop_ltrb(item.bucket, item.size)
            rows.append([item.size[1], item.size[0], top, left, item.bucket[1], item.bucket[0]])
        return torch.tensor(rows, dtype=dtype, device=device)

    def __call__(self, captions: list[str], device, items=None) -> tuple[torch.Tensor, dict | None]:
        cached = [getattr(it, "text_outputs", None) for it in items] if items is not None else [None]
        if all(c is not None for c in cached):
            hidden = torch.stack([c[0] for c in cached]).to(device)
            pooled = torch.stack([c[1] for c in cached]).to(device) if cached[0][1] is not None else None
        else:
            hidden, pooled = self.encode(captions, device)
        if not self.models.is_sdxl:
            return hidden, None
        return hidden, {"text_embeds": pooled, "time_ids": self.time_ids(items, len(captions), device, hidden.dtype)}


# --- the text-encoder output cache -----------------------------------------------------------------------
def check_cacheable(subsets) -> None:
    """kohya's ``is_text_encoder_output_cacheable``: captions must be the same every epoch."""
    for subset in subsets:
        changing = [name for name in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                      "caption_dropout_every_n_epochs", "enable_wildcard", "token_warmup_step")
                    if getattr(subset, name)]
        if changing:
            from .errors import ArgumentError

            raise ArgumentError(f"--cache_text_encoder_outputs: subset {str(subset.image_dir)!r} sets {changing[0]}, "
                             "so its captions change every epoch and cannot be cached; remove one or the other")


def outputs_path(item) -> Path:
    return item.image.with_name(item.image.stem + "_te_outputs.npz")


def _read(path: Path, caption: str, sdxl: bool, length: int, skip_check: bool = False):
    import numpy as np

    if not path.is_file():
        return None
    keys = {"hidden_state1", "hidden_state2", "pool2", "caption"} if sdxl else {"hidden_state1", "caption"}
    try:
        with np.load(path) as npz:
            if not skip_check:  # --skip_cache_check: an existing file is used as it is (kohya)
                if not keys <= set(npz.files) or str(npz["caption"]) != caption:
                    return None
                if npz["hidden_state1"].shape[0] != length:
                    return None
            if sdxl:
                hidden = torch.cat([torch.from_numpy(npz["hidden_state1"]), torch.from_numpy(npz["hidden_state2"])], -1)
                return hidden, torch.from_numpy(npz["pool2"].copy())
            return torch.from_numpy(npz["hidden_state1"].copy()), None
    except Exception:  # truncated or foreign file (BadZipFile, EOFError, OSError, ...): encode again
        return None


def _write(path: Path, caption: str, hidden: torch.Tensor, pooled, split: int | None) -> None:
    import numpy as np

    from .saving import atomic_write

    arrays = {"caption": np.array(caption)}
    if split is None:
        arrays["hidden_state1"] = hidden.float().numpy()
    else:
        arrays["hidden_state1"] = hidden[..., :split].float().numpy()
        arrays["hidden_state2"] = hidden[..., split:].float().numpy()
        arrays["pool2"] = pooled.float().numpy()

    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, save)


@torch.no_grad()
def cache_outputs(items, conditioner: TextConditioner, device, to_disk: bool, caption_of, batch: int = 8,
                  skip_check: bool = False) -> dict:
    """Set ``item.text_outputs`` = (hidden, pooled or None) for every item, encoding ``caption_of(item)``;
    returns {"encoded": n, "reused": n}."""
    sdxl = conditioner.models.is_sdxl
    split = conditioner.models.text_encoders[0].config.hidden_size if sdxl else None
    length = conditioner.max_length
    todo, reused = [], 0
    for item in items:
        found = _read(outputs_path(item), caption_of(item), sdxl, length, skip_check) if to_disk else None
        if found is not None:
            item.text_outputs = found
            reused += 1
        else:
            todo.append(item)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        hidden, pooled = conditioner.encode([caption_of(it) for it in chunk], device)
        for k, item in enumerate(chunk):
            item.text_outputs = (hidden[k].cpu(), pooled[k].cpu() if pooled is not None else None)
            if to_disk:
                _write(outputs_path(item), caption_of(item), *item.text_outputs, split)
    return {"encoded": len(todo), "reused": reused}
