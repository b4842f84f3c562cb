"""Class descriptions for CoFT+'s initial pseudo-labels (paper Sec. 3.3, "LLM-generated prompts").

Several descriptive sentences per class are embedded by CLIP's text encoder; their unit-norm
embeddings are averaged per class and used ONLY for the zero-shot pseudo-labels that start the
method (S*). Three sources, in this order:
1. `user`: descriptions the caller gives, JSON `{"class name": ["sentence", ...], ...}`;
2. `llm`: an OpenAI-compatible chat-completions endpoint, when one is configured
   (COFT_LLM_BASE_URL, COFT_LLM_MODEL, COFT_LLM_API_KEY, COFT_LLM_TIMEOUT_S);
3. `template-ensemble`: the built-in templates (coft.prompts.TEMPLATE_ENSEMBLE), also the fallback
   whenever the LLM fails (unreachable, timeout, an answer that is not the JSON asked for).
`resolve_descriptions` says which source was used and, after a fallback, why.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from coft.prompts import TEMPLATE_ENSEMBLE, class_text_features, template_features

USER, LLM, ENSEMBLE = "user", "llm", "template-ensemble"
MAX_SENTENCE_CHARS = 300


class DescriptionError(ValueError):
    """Descriptions that cannot be used: not the expected JSON shape, or a class without any."""


@dataclass(frozen=True)
class LLMEndpoint:
    """An OpenAI-compatible endpoint: POST {base_url}/chat/completions (base_url usually ends in /v1)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "LLMEndpoint | None":
        """The endpoint COFT_LLM_BASE_URL and COFT_LLM_MODEL name, or None when either is unset."""
        environ = os.environ if environ is None else environ
        base_url, model = environ.get("COFT_LLM_BASE_URL"), environ.get("COFT_LLM_MODEL")
        if not base_url or not model:
            return None
        return cls(base_url, model, environ.get("COFT_LLM_API_KEY") or None,
                   float(environ.get("COFT_LLM_TIMEOUT_S", "30")))


@dataclass
class ResolvedDescriptions:
    source: str  # USER, LLM or ENSEMBLE
    sentences: dict[str, list[str]]  # class -> the sentences embedded (templates filled in for ENSEMBLE)
    fallback_reason: str | None = None  # why the LLM was not used, when it was configured


def validate_descriptions(values: object, class_names: Sequence[str]) -> dict[str, list[str]]:
    """{class: [sentence, ...]} for exactly the given classes, each with at least one sentence."""
    if not isinstance(values, dict):
        raise DescriptionError("descriptions must be a JSON object {class name: [sentences]}")
    missing = [name for name in class_names if name not in values]
    unknown = sorted(set(values) - set(class_names))
    if missing or unknown:
        parts = ([f"missing classes: {', '.join(missing)}"] if missing else []) + (
            [f"unknown classes: {', '.join(unknown)}"] if unknown else [])
        raise DescriptionError("descriptions do not match the classes (" + "; ".join(parts) + ")")
    result = {}
    for name in class_names:
        sentences = values[name]
        if isinstance(sentences, str):
            sentences = [sentences]
        if (not isinstance(sentences, list) or not sentences
                or not all(isinstance(s, str) and s.strip() for s in sentences)):
            raise DescriptionError(f"descriptions of {name!r} must be a non-empty list of non-blank strings")
        result[name] = [s.strip()[:MAX_SENTENCE_CHARS] for s in sentences]
    return result


def load_descriptions(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, list[str]]:
    try:
        values = json.loads(Path(path).read_text())
    except ValueError as error:
        raise DescriptionError(f"{path} is not valid JSON: {error}") from error
    return validate_descriptions(values, class_names)


def ask_llm(endpoint: LLMEndpoint, class_names: Sequence[str], per_class: int = 5) -> dict[str, list[str]]:
    """Ask the endpoint for `per_class` descriptions of each class; raises on any failure."""
    import httpx

    prompt = (
        f"Write {per_class} short, visually descriptive sentences for each of these image classes, "
        "describing how a photo of it looks. Every sentence must contain the class name exactly as given. "
        "Answer with a JSON object only, mapping each class name to a list of sentences.\n"
        f"Classes: {json.dumps(list(class_names))}"
    )
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    body = {"model": endpoint.model, "temperature": 0,
            "messages": [{"role": "system", "content": "You write image-classification prompts as JSON."},
                         {"role": "user", "content": prompt}]}
    response = httpx.post(endpoint.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                          timeout=endpoint.timeout_s)
    response.raise_for_status()
    content = response.json()["choices"][0]["message"]["content"]
    return validate_descriptions(_json_in(content), class_names)


def _json_in(content: str) -> object:
    """The JSON object of a chat answer, tolerating a ```json fence or words around it."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", content, re.DOTALL)
    text = fenced.group(1) if fenced else content[content.find("{"): content.rfind("}") + 1]
    try:
        return json.loads(text)
    except ValueError as error:
        raise DescriptionError(f"the LLM's answer is not JSON: {content[:200]!r}") from error


def resolve_descriptions(class_names: Sequence[str], descriptions: dict[str, list[str]] | None = None,
                         llm: LLMEndpoint | None = None, per_class: int = 5) -> ResolvedDescriptions:
    """User descriptions if given, else the LLM if configured and answering, else the template ensemble."""
    if descriptions is not None:
        return ResolvedDescriptions(USER, validate_descriptions(descriptions, class_names))
    reason = None
    if llm is not None:
        try:
            return ResolvedDescriptions(LLM, ask_llm(llm, class_names, per_class))
        except Exception as error:  # noqa: BLE001 - any failure of a remote service means: fall back
            reason = f"{type(error).__name__}: {error}"[:500]
    ensemble = {name: [t.format(name) for t in TEMPLATE_ENSEMBLE] for name in class_names}
    return ResolvedDescriptions(ENSEMBLE, ensemble, reason)


@torch.no_grad()
def description_features(backbone, resolved: ResolvedDescriptions, class_names: Sequence[str]) -> torch.Tensor:
    """[C, D] unit-norm class embeddings: the mean of each class's unit-norm sentence embeddings."""
    features = []
    for name in class_names:
        # A sentence per "template" without a slot: class_text_features formats "{}" only.
        features.append(class_text_features(backbone, [name], [s.replace("{", "{{").replace("}", "}}")
                                                               for s in resolved.sentences[name]])[0])
    return F.normalize(torch.stack(features), dim=-1)


def initial_class_features(backbone, class_names: Sequence[str], method: str, config,
                           descriptions: dict[str, list[str]] | None = None,
                           llm: LLMEndpoint | None = None) -> tuple[torch.Tensor, dict[str, str | None]]:
    """Class embeddings for the initial pseudo-labels, and where their prompts came from: given
    descriptions in any method; for CoFT+ without them, the LLM's (else the template ensemble);
    otherwise the configured template (or ensemble)."""
    if descriptions is None and method != "coft+":
        settings = config.pseudo_labels
        return (template_features(backbone, class_names, settings),
                {"prompt_source": "template-ensemble" if settings.ensemble else "template"})
    resolved = resolve_descriptions(class_names, descriptions, llm, config.coft_plus.llm_descriptions_per_class)
    return (description_features(backbone, resolved, class_names),
            {"prompt_source": resolved.source, "prompt_fallback_reason": resolved.fallback_reason})
