"""Weight quantization of an exported model: int8 (dynamic MatMulInteger) or int4 (MatMulNBits, blocks of 32).

The key and pre-activation outputs survive: quantization changes the MatMul nodes only. The quantized
manifest lists the fp32 fingerprint under `stats_compatible`, so KSD stats taken on the fp32 model load on
it; benchmarks/quantized.py measures whether they still separate the skills.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest

from .edit import load_exported, save_edited

MODES = ("int8", "int4")


def quantize(model_dir: str | Path, out_dir: str | Path, mode: str = "int8") -> Manifest:
    if mode not in MODES:
        raise UnskillError(f"quantization mode {mode!r}: use one of {MODES}")
    model, manifest = load_exported(model_dir)
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / "q.onnx"
            # Per-channel keeps the FFL columns' scales apart; MatMul only: attention math stays fp32.
            quantize_dynamic(model, target, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=True)
            quantized = onnx.load(str(target))
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
        quantizer.process()
        quantized = quantizer.model.model
    compatible = [*(manifest.stats_compatible or []), manifest.fingerprint]
    edit = {"method": "quantize", "mode": mode, "ratio": 0.0}
    return save_edited(quantized, manifest, model_dir, out_dir, edit, stats_compatible=compatible)
