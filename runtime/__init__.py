"""Torch-free runtime: load an exported model, generate, and guard with KSD hypercubes.

    from unskill.runtime import load
    gen = load("out/smollm2", stats=["math.npz"])
    print(gen.generate(["What is 12*7?"])[0].text)
"""

from __future__ import annotations

from .errors import UnskillError
from .generator import ABSTAIN_MESSAGE, GenerationParams, Generator, Result
from .graph_guard import GraphGuard, graph_guard_applies
from .ksd import KSDGuard
from .manifest import Manifest, load_manifest
from .sampling import SamplingParams
from .session import OnnxLM
from .statsfile import StatsFile, load_stats
from .tokenizer import TextTokenizer

__all__ = ["ABSTAIN_MESSAGE", "GenerationParams", "Generator", "KSDGuard", "Manifest", "OnnxLM", "Result",
           "SamplingParams", "StatsFile", "TextTokenizer", "UnskillError", "load", "load_manifest", "load_stats"]


def load(model_dir, stats=(), alpha: float | None = None, alpha_mode: str = "k", layers=None, device: str = "auto",
         threads: int | None = None, abstain_message: str = ABSTAIN_MESSAGE, graph_guard: bool = True,
         rule: str | None = None) -> Generator:
    """A ready Generator for an exported directory, guarded by the given stats files (none: plain generation).
    Without alpha, layers and rule each stats file's calibrated rule guards (`unskill guard` stores it); a file
    without one is an error. rule="paper" (or an alpha or layers) takes the paper's cube (last layer, alpha 1 x k).
    A graph that carries its guard (`unskill edit guard`) is guarded by its own `guard.refuse` outputs when no
    stats or the same stats files are given; graph_guard=False (or other stats) runs the NumPy guard, the
    reference."""
    model = OnnxLM(model_dir, device=device, threads=threads)
    tokenizer = TextTokenizer(model_dir, model.manifest)
    explicit = alpha is not None or layers is not None or alpha_mode != "k" or rule == "paper"
    if graph_guard and graph_guard_applies(model.manifest, list(stats), explicit):
        return Generator(model, tokenizer, GraphGuard(model.manifest, model.output_names), abstain_message)
    stats_files = [load_stats(path, model.manifest) for path in stats]
    guard = (KSDGuard(stats_files, model.manifest, alpha, alpha_mode, layers, rule=rule,
                      where=[str(path) for path in stats]) if stats_files else None)
    if guard and not set(guard.output_names) <= model.output_names:
        raise UnskillError(f"{model_dir}: the graph lacks the guard's key outputs {guard.output_names[:3]}; "
                           "slim it with key_last kept (no --no-guard)")
    return Generator(model, tokenizer, guard, abstain_message)
