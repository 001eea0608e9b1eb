"""unskill: make an LLM forget one skill without training, and run it with plain onnxruntime.

Subpackages, one job each:
    unskill.exporter  Hugging Face model / GGUF -> ONNX with per-layer FFL outputs (needs the `export` extra)
    unskill.stats     probe an exported model with datasets -> stats .npz (no torch)
    unskill.runtime   decode loop + KSD guard on onnxruntime and NumPy (no torch)
"""

__version__ = "0.1.0"
