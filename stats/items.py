"""What every dataset becomes: `Item`s in a `Dataset`. A leaf module, so the built-in probe sets and the
dataset readers (which also hand out the built-in sets) import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    prompt: str
    completion: str = ""
    group: str = ""                  # MMLU subject (few-shot examples come from it); XQuAD paragraph; instructions label
    tests: tuple[str, ...] = ()      # MBPP asserts, run by the pass@1 metric
    setup: str = ""                  # MBPP test_setup_code, run before the asserts

    @property
    def context(self) -> str:
        """The text the completion follows: a completion starting with a space (MMLU " A", XQuAD answers)
        continues the prompt's line; any other starts on a new line."""
        return self.prompt if self.completion[:1].isspace() else self.prompt + "\n"


@dataclass
class Dataset:
    name: str
    items: list[Item]
    grouped: bool = False            # items of a group share their prompt's start: sample whole groups

    @property
    def prompts(self) -> list[str]:
        return [item.prompt for item in self.items]

    def __len__(self) -> int:
        return len(self.items)
