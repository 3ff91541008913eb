"""Active prompt selection as UniFL does it (arXiv 2404.05595, Sec. 3.3), offline, before training:

1. a semantic filter drops prompts with too little content. UniFL's is a scene-graph parser that
   keeps prompts with more than one relation; here it is a hook, `module:function` taking a prompt
   and returning keep/drop (`--filter`), whose default, ours, keeps prompts of at least `min_words`
   words (no parser ships offline; a user with one plugs it in here);
2. near-duplicates are removed by text-embedding similarity as UniFL does it: the prompts are
   shuffled (seeded), then taken in that order, and one whose cosine similarity with an already kept
   prompt exceeds `threshold` (0.8, UniFL's) is dropped. Shuffling first means no part of the file
   is favoured when two prompts collide;
3. the first `size` survivors of the shuffle are the pool the training draws from (written in file
   order).

The online ranked pool (`objectives/prompt_pool.py`, `prompt_order: ranked`) is ours, not UniFL's.

    acpo prompts select --preset digits-t2i --in candidates.txt --out pool.txt --size 20 --seed 0

The embedding is the base model's own text encoder (CLIP's pooled output for Stable Diffusion;
the digits-t2i stand-in's frozen random encoder offline), so "similar" means similar to the model
that will be conditioned on it.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F


def min_words(prompt: str, count: int = 3) -> bool:
    """The default semantic filter: at least `count` words."""
    return len(prompt.split()) >= count


def names_a_digit(prompt: str) -> bool:
    """The digits-t2i filter: the prompt asks for a digit (prompt agreement is undefined otherwise)."""
    from assets.digits_networks import prompted_digit

    try:
        prompted_digit(prompt)
    except ValueError:
        return False
    return min_words(prompt, 2)


def load_filter(name: str):
    """`module:function` -> the callable (`objectives.prompt_select:names_a_digit`)."""
    module, _, function = name.partition(":")
    if not module or not function:
        raise ValueError(f"--filter: expected module:function, got {name!r}")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--filter: cannot load {name!r} ({error})") from None


def remove_near_duplicates(prompts: list[str], embeddings: torch.Tensor, threshold: float) -> list[int]:
    """Indices kept, in the given order: each prompt unless its cosine with a kept one is above `threshold`."""
    unit = F.normalize(embeddings.float(), dim=-1)
    kept: list[int] = []
    for i in range(len(prompts)):
        if not kept or (unit[kept] @ unit[i]).max().item() <= threshold:
            kept.append(i)
    return kept


THRESHOLD = 0.8  # UniFL's near-duplicate cosine


def select_prompts(prompts: list[str], embed, size: int, seed: int = 0, threshold: float = THRESHOLD, keep=min_words) -> list[str]:
    """UniFL's three steps; `embed(prompts) -> [N, D]`. Returns at most `size` prompts, in file order."""
    filtered = [p for p in dict.fromkeys(p.strip() for p in prompts) if p and keep(p)]
    if not filtered:
        raise ValueError("every prompt was dropped by the semantic filter")
    order = torch.randperm(len(filtered), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [filtered[i] for i in order]
    kept = [order[i] for i in remove_near_duplicates(shuffled, embed(shuffled), threshold)][:size]
    return [filtered[i] for i in sorted(kept)]


def text_embedder(base, batch_size: int = 256):
    """`prompts -> [N, D]` from a text model's frozen encoder: the pooled output (CLIP's sentence
    embedding, taken at the end-of-text token)."""

    @torch.no_grad()
    def embed(prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            ids = base.tokenizer(prompts[start:start + batch_size], padding="max_length", max_length=base.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(base.text_encoder.device)
            encoded = base.text_encoder(ids)  # CLIPTextModel's pooled output; SD3's CLIP with projection: its projection of it
            out.append((encoded.text_embeds if hasattr(encoded, "text_embeds") else encoded.pooler_output).float().cpu())
        return torch.cat(out)

    return embed
