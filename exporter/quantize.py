"""Weight quantization of an exported model: int8 (dynamic MatMulInteger), int4 (MatMulNBits) or fp16 (GPU).

int4 uses onnxruntime's MatMulNBitsQuantizer: every MatMul with a constant weight (the LM head included) becomes
MatMulNBits with `block_size` weights per scale and the kernel's `accuracy_level` (4 = int8 activations, the
fastest CPU path; 0 = fp32 activations); `embeddings=True` also turns the token-embedding Gather into
GatherBlockQuantized. benchmarks/README.md ("int4") has speed and token-level accuracy per setting.

`grid="source"` (default) first writes every MatMul whose fp32 weights already lie on a block grid (the packaged
models are dequantized GGUF files: Q4_1, Q4_K, Q5_0, Q6_K, Q8_0) as MatMulNBits on that very grid
(exporter/grid.py), so those weights are not rounded a second time; only the rest goes through the quantizer
above. Block mins off the integer zero-point grid (Q4_1, Q4_K) leave a residual per block: "source" carries it
as two 4-bit digits in extra rows (to 1/238 of its size; the fast form), "exact" as an fp32 correction MatMul
(to float rounding; 420 more nodes, 1-4 % slower decode), "rtn" re-quantizes everything (the old way).
`grid_bits` caps the grids kept exactly (8: 5-, 6- and 8-bit grids become 8-bit MatMulNBits; 4: those go through
the 4-bit quantizer instead, smaller and faster, not exact). `block_8bit` re-rounds 8-bit grids to 8-bit blocks
of 128 (grid.round_8bit), which MLAS's 8-bit kernel runs ~25 % faster than the GGUF's 32: "head" (default) the
LM head alone (token-level top-1 as fp32's on 200 items a task, SmolLM2 and Gemma-3), "all" every 8-bit grid
(Gemma-3's Q5_0/Q6_K projections too: faster still, but MMLU 0.245 against 0.265), "source" none. The 4-bit
grids always stay exact. Finally the MatMulNBits that read one input are packed into one (pack.py).

The key and pre-activation outputs survive: quantization changes the MatMul nodes only. The quantized
manifest lists the fp32 fingerprint under `stats_compatible`, so KSD stats taken on the fp32 model load on it.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest

from .folder import load_exported, save_edited, stats_compatible_with
from .grid import REBLOCK
from .index import GraphIndex, remove_dead_nodes

MODES = ("int8", "int4", "fp16")
GRIDS = ("source", "exact", "rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """MatMul(x, Transpose(W)) -> MatMul(x, W.T) with W.T stored: optimum writes a tied LM head that way
    (the embedding transposed), which the MatMulNBits quantizer skips because its weight is no initializer.
    onnxruntime folds the Transpose at load anyway, so the fp32 graph gains nothing from keeping it. Our own
    pass: onnxruntime's quantizer has none. Returns how many MatMuls it rewrote."""
    from onnx import numpy_helper

    graph = model.graph
    index = GraphIndex(model)
    initializers, producer = index.init, index.producer
    folded = 0
    for node in graph.node:
        source = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{source.input[0]}/transposed"
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(weight.T.copy(), name)
            graph.initializer.append(initializers[name])
        node.input[1] = name
        folded += 1
    if folded:
        remove_dead_nodes(model)   # the Transposes nothing reads any more
    return folded


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute for the GPU path (onnxruntime.transformers' converter). keep_io_types: every
    graph input and output stays fp32 (a Cast at the edge), so the runtime, optimum and onnxruntime-genai feed
    and read it as the fp32 export, and the key outputs the KSD guard compares with fp32 stats stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .fuse import drop_attention_value_info

    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    return drop_attention_value_info(convert_float_to_float16(model, keep_io_types=True))


def to_int4(model: onnx.ModelProto, block_size: int, accuracy_level: int, embeddings: bool, symmetric: bool,
            grid: str, grid_bits: int, pack: bool = True, digits: int = 2,
            block_8bit: str = "head") -> tuple[onnx.ModelProto, dict]:
    """MatMulNBits everywhere: the source grid first (grid.py; `block_8bit` says which 8-bit grids it
    re-rounds to blocks of 128), onnxruntime's quantizer for the rest, then (pack) the projections that share
    an input packed into one node (pack.py). Returns the model and the edit record's settings."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .grid import CORRECTION, replace_with_grid_matmuls
    from .pack import pack_projections, unpack_projections

    # A packed fp32 projection (the default export) may join tensors on different source grids (Q4_K_M: a
    # Q6_K v beside Q4_K q/k), which no single grid fits: unpack, put each on its own grid, pack again below
    # (MatMulNBits with equal bits and blocks only).
    unpack_projections(model)
    fold_transposed_weights(model)   # the tied LM head becomes quantizable
    tensors = {}
    if grid != "rtn":
        form = "matmul" if grid == "exact" else "digits"
        tensors = Counter(replace_with_grid_matmuls(model, accuracy_level, max_bits=grid_bits,
                                                    residual_form=form, digits=digits,
                                                    reblock_8bit=block_8bit).values())
    # Gather weights are (vocab, hidden): blocks run along hidden (axis 1), as GatherBlockQuantized needs.
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    corrections = [node.name for node in model.graph.node if node.name.endswith(CORRECTION)]   # stay fp32
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, op_types_to_quantize=ops,
                                     nodes_to_exclude=corrections, quant_axes=(("MatMul", 0), ("Gather", 1)))
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    quantizer.process()
    quantized = quantizer.model.model
    settings = dict(block_size=block_size, accuracy_level=accuracy_level, embeddings=embeddings,
                    symmetric=symmetric, grid=grid, grid_tensors=dict(sorted(tensors.items())), block_8bit=block_8bit)
    if pack:
        settings["packed_projections"] = pack_projections(quantized)
    return quantized, settings


def quantize(model_dir: str | Path, out_dir: str | Path, mode: str = "int8", block_size: int = 32,
             accuracy_level: int = 4, embeddings: bool = False, symmetric: bool = True, grid: str = "source",
             grid_bits: int = 8, pack: bool = True, digits: int = 2, block_8bit: str = "head") -> Manifest:
    if mode not in MODES or grid not in GRIDS or grid_bits not in (4, 8):
        raise UnskillError(f"quantization mode {mode!r} / grid {grid!r} / grid bits {grid_bits}: "
                           f"use one of {MODES} / {GRIDS} / (4, 8)")
    if block_8bit not in REBLOCK:
        raise UnskillError(f"--block-8bit {block_8bit!r}: use one of {REBLOCK}")
    if block_size not in BLOCK_SIZES or accuracy_level not in ACCURACY_LEVELS:
        raise UnskillError(f"int4 block size {block_size} / accuracy level {accuracy_level}: "
                           f"use one of {BLOCK_SIZES} / {ACCURACY_LEVELS}")
    model, manifest = load_exported(model_dir)
    edit = {"method": "quantize", "mode": mode, "ratio": 0.0}
    if mode == "fp16":
        quantized = to_float16(model)
    elif mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / "q.onnx"
            # Per-channel keeps the FFL columns' scales apart; MatMul only: attention math stays fp32.
            quantize_dynamic(model, target, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=True)
            quantized = onnx.load(str(target))
    else:
        quantized, settings = to_int4(model, block_size, accuracy_level, embeddings, symmetric, grid, grid_bits,
                                      pack=pack, digits=digits, block_8bit=block_8bit)
        edit.update(settings)
    return save_edited(quantized, manifest, model_dir, out_dir, edit, stats_compatible=stats_compatible_with(manifest))
