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
from torch import nn

from coft.backbone import Backbone
from coft.config import PseudoLabelConfig
from coft.openclip import context_length, injected_embeddings, token_embedding

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


def template_features(backbone: Backbone, class_names: Sequence[str], settings: PseudoLabelConfig) -> torch.Tensor:
    """The classes' embeddings from the configured template, or the built-in template ensemble."""
    return class_text_features(backbone, class_names, TEMPLATE_ENSEMBLE if settings.ensemble else [settings.template])


class PromptLearner(nn.Module):
    """Positive and negative learnable contexts for C classes, on a frozen CLIP text encoder.

    Each class's prompt is tokenised with M placeholder words before its name; during the text
    tower's own `encode_text`, the placeholders' token embeddings are replaced by the context
    (coft.openclip.injected_embeddings), so every open_clip text tower (causal or not, with a class
    token, padding masks, a Hugging Face encoder) computes its prompts its own way.
    """

    def __init__(self, backbone: Backbone, class_names: Sequence[str], context_tokens: int, init_std: float,
                 generator: torch.Generator | None = None, init_phrase: str = ""):
        """`init_phrase` (CoOp's "a photo of a"): start both contexts from its word embeddings, so the
        untrained model is the zero-shot one; its token count then sets the context length. A context
        longer than the class names leave room for in the text tower is shortened to fit
        (`requested_context_tokens` keeps what was asked)."""
        super().__init__()
        clip = backbone.model
        embedding = token_embedding(clip)
        phrase_embedding = None
        if init_phrase.strip():
            phrase_tokens = word_tokens(backbone.tokenizer, init_phrase.strip())
            with torch.no_grad():
                phrase_embedding = embedding(phrase_tokens.to(backbone.device)).float()
            context_tokens = len(phrase_tokens)
        self.requested_context_tokens = context_tokens
        context_tokens = fitted_context_tokens(backbone, class_names, context_tokens)
        if phrase_embedding is not None:
            phrase_embedding = phrase_embedding[:context_tokens]
        placeholder = word_tokens(backbone.tokenizer, "X")
        if len(placeholder) != 1:
            raise ValueError("this tokenizer does not make one token of the placeholder word 'X'")
        tokens = backbone.tokenizer([" ".join(["X"] * context_tokens + [f"{name}."]) for name in class_names])
        self.register_buffer("tokens", tokens.to(backbone.device), persistent=False)
        self.register_buffer("positions", _first_positions(tokens, int(placeholder), context_tokens).to(
            backbone.device), persistent=False)
        shape = (context_tokens, embedding.weight.shape[1])
        positive = torch.randn(shape, generator=generator).to(backbone.device) * init_std
        negative = torch.randn(shape, generator=generator).to(backbone.device) * init_std
        if phrase_embedding is not None:  # the noise still tells the two models apart
            positive, negative = phrase_embedding + positive, phrase_embedding + negative
        self.positive = nn.Parameter(positive)
        self.negative = nn.Parameter(negative)
        self._clip = [clip]  # a list, so the frozen CLIP is not registered as a submodule of ours

    @property
    def context_tokens(self) -> int:
        return self.positive.shape[0]

    def forward(self, which: str) -> torch.Tensor:
        """[C, D] unit-norm text features of the positive or negative prompts."""
        return self._encode([{"positive": self.positive, "negative": self.negative}[which]])[0]

    def both(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) [C, D] text features, from one pass of the text encoder over all 2C prompts."""
        positive, negative = self._encode([self.positive, self.negative])
        return positive, negative

    def _encode(self, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        num_classes = self.tokens.shape[0]
        tokens = self.tokens.repeat(len(contexts), 1)
        positions = self.positions.repeat(len(contexts), 1)
        values = torch.cat([context.unsqueeze(0).expand(num_classes, -1, -1) for context in contexts])
        with injected_embeddings(self._clip[0], positions, values):
            features = self._clip[0].encode_text(tokens)
        return list(F.normalize(features, dim=-1).split(num_classes))


def word_tokens(tokenizer, text: str) -> torch.Tensor:
    """The token ids of `text` alone, without the tokenizer's start, end and padding tokens."""
    with_text, empty = tokenizer([text, ""])
    padding = empty[-1]
    length, empty_length = int((with_text != padding).sum()), int((empty != padding).sum())
    start = 0
    while start < empty_length and with_text[start] == empty[start]:
        start += 1
    return with_text[start:start + length - empty_length]


def fitted_context_tokens(backbone: Backbone, class_names: Sequence[str], requested: int) -> int:
    """The most context tokens (up to `requested`) that leave every class's prompt whole in the text
    tower's context (a SigLIP tower takes 64 tokens, a CLIP 77, the proxy 32)."""
    tokenizer = backbone.tokenizer
    empty = tokenizer([""])[0]
    specials = int((empty != empty[-1]).sum())  # start and end tokens around any text
    longest = max(len(word_tokens(tokenizer, f"{name}.")) for name in class_names)
    limit = context_length(backbone.model, tokenizer)
    room = limit - specials - longest
    if room < 0:
        raise ValueError(f"the longest class name does not fit the text tower's {limit} tokens; shorten it")
    return min(requested, room)


def _first_positions(tokens: torch.Tensor, placeholder: int, count: int) -> torch.Tensor:
    """[C, count]: where each row's first `count` placeholder tokens sit."""
    positions = []
    for row in tokens:
        found = (row == placeholder).nonzero().squeeze(1)[:count]
        if len(found) != count:
            raise ValueError("a prompt lost its context tokens to truncation")
        positions.append(found)
    return torch.stack(positions) if positions else torch.empty(0, count, dtype=torch.long)
