"""unskill: make an LLM forget one skill without training, and run it with plain onnxruntime.

Subpackages, one job each:
    unskill.exporter  Hugging Face model / GGUF -> ONNX with per-layer FFL outputs, graph edits (`export` extra)
    unskill.stats     probe an exported model with datasets -> stats .npz (no torch)
    unskill.evals     evaluation harness, tasks, sandbox, bypass benchmark, report (no torch)
    unskill.runtime   decode loop + KSD guard on onnxruntime and NumPy (no torch)
The commands live beside this file: unskill.cli registers every `unskill` subcommand; `ksd-run` is
unskill.ksd_run.
"""

__version__ = "0.1.0"
