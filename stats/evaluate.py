"""Token-level skill metrics and KSD abstention rates: what `unskill eval` reports.

Token metrics score the reference completion given the prompt (plain text, no chat template), teacher
forced: top-1 next-token accuracy and mean negative log-likelihood over the completion tokens only.
Meaningful even for small models that cannot solve the task in generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from unskill.runtime.errors import UnskillError
from unskill.runtime.ksd import KSDGuard
from unskill.runtime.session import OnnxLM, left_pad
from unskill.runtime.tokenizer import TextTokenizer

from .datasets import Dataset


@dataclass
class TokenScore:
    task: str
    items: int
    tokens: int
    top1: float
    nll: float
    abstain_rate: float | None = None
    top1_with_abstain: float | None = None   # abstained items count as all-wrong

    def as_dict(self) -> dict:
        return asdict(self)


def _scored_sequences(tokenizer: TextTokenizer, dataset: Dataset, max_tokens: int):
    """(ids, index of the first completion token) per item; the completion is cut to fit max_tokens."""
    sequences = []
    for item in dataset.items:
        if not item.completion:
            raise UnskillError(f"{dataset.name}: token metrics need reference completions")
        prompt = tokenizer.encode_text(item.context)
        completion = tokenizer.tokenizer.encode(item.completion, add_special_tokens=False).ids
        ids = (prompt + completion)[:max_tokens]
        if len(prompt) >= len(ids):
            continue   # nothing of the completion fits
        sequences.append((ids, len(prompt)))
    if not sequences:
        raise UnskillError(f"{dataset.name}: no item fits in {max_tokens} tokens")
    return sequences


def token_metrics(model: OnnxLM, tokenizer: TextTokenizer, dataset: Dataset, batch_size: int = 4,
                  max_tokens: int = 512, guard: KSDGuard | None = None, chat: bool = True,
                  progress: bool = True) -> TokenScore:
    sequences = _scored_sequences(tokenizer, dataset, min(max_tokens, model.manifest.max_context))
    hits, nll = [], []
    pad = model.manifest.pad_token_id
    for start in tqdm(range(0, len(sequences), batch_size), desc=f"eval {dataset.name}", unit="batch",
                      disable=not progress):
        batch = sequences[start:start + batch_size]
        ids, mask = left_pad([s for s, _ in batch], pad)
        logits, _, _ = model.forward(ids, mask, model.empty_past(len(batch)), all_logits=True)
        for row, (seq, first) in enumerate(batch):
            offset = ids.shape[1] - len(seq)   # left padding
            predicted = logits[row, offset + first - 1: offset + len(seq) - 1]   # position t predicts t+1
            target = np.asarray(seq[first:])
            shifted = predicted - predicted.max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            hits.append(predicted.argmax(-1) == target)
            nll.append(-log_probs[np.arange(target.size), target])
    all_hits, all_nll = np.concatenate(hits), np.concatenate(nll)
    score = TokenScore(dataset.name, len(sequences), int(all_hits.size), float(all_hits.mean()), float(all_nll.mean()))
    if guard is not None:
        abstained = abstentions(model, tokenizer, dataset, guard, chat, batch_size)
        score.abstain_rate = float(abstained.mean())
        kept = [h for h, a in zip(hits, abstained) if not a]
        score.top1_with_abstain = float(sum(h.sum() for h in kept) / all_hits.size)
    return score


def prompt_keys(model: OnnxLM, tokenizer: TextTokenizer, dataset: Dataset, outputs: list[str], chat: bool = True,
                batch_size: int = 8) -> dict[str, np.ndarray]:
    """Key vectors at the last prompt token, (items, F) per requested output: one prefill per item,
    whatever the number of hypercubes checked on it."""
    sequences = [tokenizer.encode_prompt(item.prompt, chat) for item in dataset.items]
    collected = {name: [] for name in outputs}
    for start in range(0, len(sequences), batch_size):
        ids, mask = left_pad(sequences[start:start + batch_size], model.manifest.pad_token_id)
        _, _, keys = model.forward(ids, mask, model.empty_past(ids.shape[0]), outputs, logits=False)
        for name in outputs:
            collected[name].append(keys[name][:, -1, :])
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def abstentions(model: OnnxLM, tokenizer: TextTokenizer, dataset: Dataset, guard: KSDGuard, chat: bool = True,
                batch_size: int = 8) -> np.ndarray:
    """Per item: would KSD abstain at the prompt?"""
    keys = prompt_keys(model, tokenizer, dataset, guard.output_names, chat, batch_size)
    return np.array([hit is not None for hit in guard.check(keys)])
