import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tiny_models helper

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("UNSKILL_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "gsm8k").is_dir():
        pytest.skip(f"benchmark data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """kind -> (hf_dir, onnx_dir), built and exported once per session."""
    pytest.importorskip("optimum.exporters.onnx")
    from tiny_models import build_tiny

    from unskill.exporter.export import export_model

    cache = {}

    def get(kind: str, fused: bool = True):
        """fused=False: optimum's plain graph (`unskill export --no-fuse`), the reference of the fusion tests."""
        if (kind, fused) not in cache:
            root = tmp_path_factory.mktemp(f"tiny_{kind}")
            hf_dir = cache[kind, not fused][0] if (kind, not fused) in cache else build_tiny(kind, root / "hf")
            export_model(str(hf_dir), root / "onnx", progress=False, fused=fused)
            cache[kind, fused] = (hf_dir, root / "onnx")
        return cache[kind, fused]

    return get


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The real packaged SmolLM2 exported once (about a minute); UNSKILL_SMOLLM2_ONNX reuses an export."""
    reuse = os.environ.get("UNSKILL_SMOLLM2_ONNX")
    if reuse:
        return Path(reuse)
    pytest.importorskip("optimum.exporters.onnx")
    from unskill.exporter.export import export_model

    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    export_model("smollm2-135m", out, progress=False)
    return out


@pytest.fixture(scope="session")
def llama_stats(tiny_export, tmp_path_factory):
    """KSD stats of twelve apple questions on the tiny llama: (StatsFile, path)."""
    from unskill.runtime import load
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    forget = Dataset("probe", [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?") for i in range(12)])
    stats = probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False))
    return stats, stats.save(tmp_path_factory.mktemp("stats") / "apples.npz")


@pytest.fixture(scope="session")
def smollm2_math_stats(smollm2_export, tmp_path_factory):
    """KSD stats of the built-in math probes on the real SmolLM2 (a few seconds)."""
    from unskill.runtime import load
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    generator = load(smollm2_export, device="cpu")
    stats = probe(generator.model, generator.tokenizer, load_dataset("builtin:math"), config=ProbeConfig(progress=False))
    return stats.save(tmp_path_factory.mktemp("smollm2_stats") / "math.npz")


@pytest.fixture(scope="session")
def smollm2_edits(smollm2_export, tmp_path_factory):
    """NA (3 %, hash noise) and pruned (2 %) copies of the SmolLM2 export from one small math-vs-code stats
    file, plus that file: {"export", "na", "pruned", "stats"}. Built once per session (about a minute)."""
    from unskill.exporter.neuron_adjust import neuron_adjust
    from unskill.exporter.prune import prune
    from unskill.runtime import load
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    root = tmp_path_factory.mktemp("smollm2_edits")
    generator = load(smollm2_export, device="cpu")
    stats = probe(generator.model, generator.tokenizer, load_dataset("builtin:math", limit=24),
                  load_dataset("builtin:code", limit=24), ProbeConfig(progress=False)).save(root / "math_code.npz")
    neuron_adjust(smollm2_export, stats, 0.03, root / "na")
    prune(smollm2_export, stats, 0.02, root / "pruned", progress=False)
    return {"export": Path(smollm2_export), "na": root / "na", "pruned": root / "pruned", "stats": stats}
