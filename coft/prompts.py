"""Text side: fixed-template class embeddings, and the learnable positive/negative prompts.

The learnable prompts follow CoOp: `[V1 ... VM][CLASS].` with M context vectors shared by all
classes, fed to CLIP's frozen text transformer in place of the token embeddings of M placeholder
words. CoFT learns two such contexts per model: a positive one (what the class looks like) and a
negative one (a learned, per-class threshold for "this label is clean").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from coft.backbone import Backbone

# Built-in template ensemble: the fallback when no class descriptions are available.
TEMPLATE_ENSEMBLE = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a noisy photo of a {}.",
    "a large {}.",
    "a small {}.",
]


def _text_modules(clip: nn.Module) -> nn.Module:
    """open_clip keeps the text tower on the CLIP object itself, or under `.text` (CustomTextCLIP)."""
    return clip.text if hasattr(clip, "text") else clip


@torch.no_grad()
def class_text_features(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D] unit-norm class embeddings, averaged over templates (one template: no averaging)."""
    features = []
    for name in class_names:
        tokens = backbone.tokenizer([t.format(name) for t in templates]).to(backbone.device)
        with backbone.autocast():
            embedded = backbone.model.encode_text(tokens).float()
        features.append(F.normalize(F.normalize(embedded, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(features)


class PromptLearner(nn.Module):
    """Positive and negative learnable contexts for C classes, on a frozen CLIP text encoder."""

    def __init__(self, backbone: Backbone, class_names: Sequence[str], context_tokens: int, init_std: float,
                 generator: torch.Generator | None = None, init_phrase: str = ""):
        """`init_phrase` (CoOp's "a photo of a"): start both contexts from its word embeddings, so the
        untrained model is the zero-shot one; its token count then sets the context length."""
        super().__init__()
        clip = backbone.model
        text = _text_modules(clip)
        width = text.token_embedding.weight.shape[1]
        phrase_embedding = None
        if init_phrase.strip():
            phrase_tokens = backbone.tokenizer([init_phrase.strip()])[0]
            length = int((phrase_tokens != 0).sum())  # start-of-text, the words, end-of-text; then padding
            phrase_tokens = phrase_tokens[1:length - 1]
            with torch.no_grad():
                phrase_embedding = text.token_embedding(phrase_tokens.to(backbone.device)).float()
            context_tokens = len(phrase_tokens)
        placeholder = " ".join(["X"] * context_tokens)
        tokens = backbone.tokenizer([f"{placeholder} {name}." for name in class_names])
        self._check_fits(tokens, backbone.tokenizer, class_names, context_tokens)
        self.register_buffer("tokens", tokens.to(backbone.device), persistent=False)
        with torch.no_grad():
            embedded = text.token_embedding(self.tokens)
        # Start-of-text before the context, class name + '.' + end-of-text (+ padding) after it.
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + context_tokens:].clone(), persistent=False)
        shape = (context_tokens, width)
        positive = torch.randn(shape, generator=generator).to(backbone.device) * init_std
        negative = torch.randn(shape, generator=generator).to(backbone.device) * init_std
        if phrase_embedding is not None:  # the noise still tells the two models apart
            positive, negative = phrase_embedding + positive, phrase_embedding + negative
        self.positive = nn.Parameter(positive)
        self.negative = nn.Parameter(negative)
        self._clip = [clip]  # a list, so the frozen CLIP is not registered as a submodule of ours

    @staticmethod
    def _check_fits(tokens: torch.Tensor, tokenizer, class_names: Sequence[str], context_tokens: int) -> None:
        context_length = tokens.shape[1]
        for name, row in zip(class_names, tokens):
            if row[-1] != 0:  # no padding left: the prompt was truncated
                raise ValueError(f"class name {name!r} does not fit CLIP's context length {context_length} "
                                 f"after {context_tokens} prompt tokens; shorten it or use fewer context tokens")

    def forward(self, which: str) -> torch.Tensor:
        """[C, D] unit-norm text features of the positive or negative prompts."""
        return self._encode([{"positive": self.positive, "negative": self.negative}[which]])[0]

    def both(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) [C, D] text features, from one pass of the text encoder over all 2C prompts."""
        positive, negative = self._encode([self.positive, self.negative])
        return positive, negative

    def _encode(self, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        num_classes = self.prefix.shape[0]
        embedded = torch.cat([torch.cat([self.prefix, context.unsqueeze(0).expand(num_classes, -1, -1), self.suffix],
                                        dim=1) for context in contexts])
        tokens = self.tokens.repeat(len(contexts), 1)
        features = F.normalize(encode_text_embeddings(self._clip[0], embedded, tokens), dim=-1)
        return list(features.split(num_classes))


def encode_text_embeddings(clip: nn.Module, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text, starting after the token embedding lookup."""
    text = _text_modules(clip)
    cast_dtype = text.transformer.get_cast_dtype()
    x = embedded.to(cast_dtype) + text.positional_embedding.to(cast_dtype)
    x = text.transformer(x, attn_mask=text.attn_mask)
    x = text.ln_final(x)
    pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
    pooled = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
    projection = text.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
