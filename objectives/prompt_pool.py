"""Active prompt selection for prompted reward models (UniFL, arXiv 2404.05595, Sec. 3.3): train on
prompts that are diverse and whose reward is not yet saturated, instead of sampling the pool blindly.

The pool keeps a running mean of each prompt's reward loss (lower is better; 0 means every hinge
target is met). `select(k)` takes unseen prompts first, drops saturated ones while enough others
remain, and picks greedily: the least-rewarded prompt, then whichever maximizes its loss rank plus
its word-set distance to the prompts already chosen (so near-duplicates are not trained together).
"""

from __future__ import annotations

from pathlib import Path

import torch


def read_prompts(source) -> list[str]:
    """A list of prompts, or a text file with one prompt per line (blank lines skipped)."""
    if isinstance(source, (list, tuple)):
        prompts = [str(p).strip() for p in source if str(p).strip()]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the prompt pool is empty")
    return prompts


def word_distance(a: str, b: str) -> float:
    """1 - Jaccard similarity of the lower-cased word sets: 0 for the same words, 1 for none shared."""
    wa, wb = set(a.lower().split()), set(b.lower().split())
    return 1.0 - len(wa & wb) / max(len(wa | wb), 1)


class PromptPool:
    def __init__(self, prompts: list[str], saturation: float = 0.0, momentum: float = 0.9, diversity: float = 1.0):
        self.prompts = list(prompts)
        self.saturation, self.momentum, self.diversity = saturation, momentum, diversity
        self.loss = [None] * len(self.prompts)  # running mean reward loss; None = never tried

    def select(self, k: int, generator: torch.Generator | None = None) -> list[str]:
        k = min(k, len(self.prompts))
        order = torch.randperm(len(self.prompts), generator=generator).tolist()  # random tie-breaks
        unseen = [i for i in order if self.loss[i] is None]
        if len(unseen) >= k:
            return [self.prompts[i] for i in unseen[:k]]
        seen = [i for i in order if self.loss[i] is not None]
        open_ = [i for i in seen if self.loss[i] > self.saturation]
        candidates = open_ if len(open_) + len(unseen) >= k else seen
        ranked = sorted(candidates, key=lambda i: self.loss[i])
        rank = {i: r / max(len(ranked) - 1, 1) for r, i in enumerate(ranked)}  # 1 = worst rewarded
        chosen = list(unseen)
        while len(chosen) < k:
            remaining = [i for i in ranked if i not in chosen]

            def score(i):
                spread = min((word_distance(self.prompts[i], self.prompts[j]) for j in chosen), default=1.0)
                return rank[i] + self.diversity * spread

            chosen.append(max(remaining, key=score))
        return [self.prompts[i] for i in chosen]

    def update(self, prompts: list[str], losses: torch.Tensor) -> None:
        for prompt, value in zip(prompts, losses.detach().float().cpu().tolist()):
            i = self.prompts.index(prompt)
            self.loss[i] = value if self.loss[i] is None else self.momentum * self.loss[i] + (1 - self.momentum) * value

    def state_dict(self) -> dict:
        return {"loss": torch.tensor([float("nan") if v is None else v for v in self.loss])}

    def load_state_dict(self, state: dict) -> None:
        self.loss = [None if v != v else v for v in state["loss"].tolist()]  # NaN marks "never tried"
