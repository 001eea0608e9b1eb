"""Exact int4/int8 MatMulNBits from weights that already lie on a block-quantization grid.

The packaged models are dequantized GGUF files: SmolLM2's projections are Q4_1 (w = d*q + m, q in 0..15,
blocks of 32 along the input dimension) and its tied embedding Q8_0 (w = d*q, q in -128..127); Gemma-3's
Q4_K_M mixes Q4_K (w = scale*q - min per 32-block), Q5_0, Q6_K (16-blocks) and Q8_0. Re-quantizing such
weights onto a fresh round-to-nearest grid rounds them a second time (about 5 points of token-level top-1
on SmolLM2). This module recovers each tensor's grid from the fp32 weights themselves (no GGUF needed, any
architecture) and writes MatMulNBits on that grid.

MatMulNBits computes sum_k x_k * scale_b * (q_k - zero_point_b). Its zero point must be an integer to
reach MLAS's fast kernels: float zero points (which the op accepts and which would represent Q4_1's min
exactly) fall back to dequantizing the whole weight on every call in onnxruntime 1.32, ~75x slower per
MatMul (benchmarks/README.md, "int4"). So a block's min goes in two parts: the integer multiple of its
scale into the zero point, the remainder r_b (zero for symmetric grids such as Q8_0 / Q5_0) is added
through X_b = sum of x over block b: as a correction y += X @ R (R fp32 [K/block, N], "matmul" form,
exact to float rounding) or as two 4-bit digit rows of R in the same MatMulNBits ("digits" form, the
default: fewer nodes, R to 1/238), which reads x' = [x, M, M, M] with M = the block means of x (one
AveragePool and one Concat per input tensor). See replace_with_grid_matmuls and digit_layout.

Our own code: onnxruntime's MatMulNBitsQuantizer (RTN, HQQ, GPTQ) always chooses its own scales; none of its
algorithms takes a given grid, and none writes a residual. Tensors that fit no grid go to it (quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import drop_unused_initializers

# Tried in order: the first (bits, block) whose grid every block of a tensor fits wins. Q4_1/Q4_K fit 4-bit
# 32-blocks; Q5_0/Q8_0 need 8 bits; Q6_K has a scale per 16 weights.
CANDIDATES = ((4, 32), (8, 32), (8, 16))
# A weight matches its grid point within this fraction of the block's largest magnitude: a few float32 ulps
# (the GGUF dequantization rounds d*q + m once in float32).
TOLERANCE = 1e-6
# Node names: the fp32 residual-correction MatMuls (quantize.py keeps the quantizer off them), the block sums.
CORRECTION = "/grid_correction"
BLOCK_MEANS = "/grid_digits/means"
DIGITS = 2   # signed 4-bit digits per residual: R = 16 * d1 + d0, |R| <= 119 (1 digit: |R| <= 7)
POOL = 32    # x' carries block means (AveragePool over 32), so the digit rows' scales are 32x the sums' units
REBLOCK = ("source", "head", "all")   # which 8-bit grids round_8bit re-rounds (quantize --block-8bit)
BLOCK_8BIT = 128


@dataclass
class GridWeight:
    """One MatMul weight [K, N] as MatMulNBits inputs: w[k, n] = scales[n, b] * (q[n, k] - 2**(bits-1))
    + residual[b, n] for k in block b."""
    bits: int
    block: int
    packed: np.ndarray            # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray            # float32 [N * K/block]
    residual: np.ndarray | None   # float32 [K/block, N], None where every block's min is on its integer grid

    def dequantized(self) -> np.ndarray:
        """The fp32 weight [K, N] these inputs stand for (tests compare it with the source)."""
        n, blocks, _ = self.packed.shape
        if self.bits == 4:
            q = np.stack([self.packed & 15, self.packed >> 4], axis=-1).reshape(n, blocks, self.block)
        else:
            q = self.packed
        scales = self.scales.reshape(n, blocks, 1)
        weight = scales * (q.astype(np.float32) - 2 ** (self.bits - 1))
        if self.residual is not None:
            weight = weight + self.residual.T[:, :, None]
        return weight.reshape(n, blocks * self.block).T


def fit_grid(weight: np.ndarray, bits: int, block: int) -> GridWeight | None:
    """The grid of a [K, N] weight with blocks of `block` along K, or None where a block has more than
    2**bits levels or a weight off its block's grid."""
    k, n = weight.shape
    if k % block:
        return None
    levels = 2 ** bits - 1
    blocks = weight.T.reshape(n, k // block, block).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    size = np.maximum(np.abs(low), np.abs(high))
    step = _grid_step(blocks, size)
    steps = np.rint((blocks - low[..., None]) / step[..., None])
    if steps.max() > levels:
        return None
    top = steps.max(-1)
    step = np.where(top > 0, (high - low) / np.maximum(top, 1), step)    # refined: span / levels used
    steps = np.rint((blocks - low[..., None]) / step[..., None])
    # The block min goes into the zero point as an integer number of steps; what is left is the residual.
    offset = np.rint(low / step)
    center = 2 ** (bits - 1)
    offset = np.clip(offset, -center, levels - center - top)             # keep q within 0..levels
    q = steps + (center + offset)[..., None]
    scales = step.astype(np.float32)
    residual = (low - offset * scales.astype(np.float64)).astype(np.float32)
    residual = np.where(np.abs(residual) <= TOLERANCE * size, 0, residual).astype(np.float32)
    rebuilt = scales[..., None] * (q.astype(np.float32) - center) + residual[..., None]
    if np.any(np.abs(rebuilt - blocks) > TOLERANCE * size[..., None] + 1e-30):
        return None
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)) if bits == 4 else q
    return GridWeight(bits, block, np.ascontiguousarray(packed), scales.reshape(-1),
                      np.ascontiguousarray(residual.T) if residual.any() else None)


def _grid_step(blocks: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Per block, the largest step that every gap between its sorted values is a whole multiple of (a float
    Euclid over the gaps; 1 where all values are equal). Values on a grid differ by multiples of its step."""
    tolerance = 1e-5 * size
    gaps = np.diff(np.sort(blocks, axis=-1), axis=-1)
    step = np.zeros_like(size)
    for index in range(gaps.shape[-1]):
        step = _float_gcd(step, np.where(gaps[..., index] > tolerance, gaps[..., index], 0.0), tolerance)
    return np.where(step > 0, step, np.where(size > 0, size, 1.0))


def _float_gcd(a: np.ndarray, b: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Elementwise Euclid on floats: a remainder within `tolerance` of 0 (or of the divisor) counts as 0."""
    a, b = np.maximum(a, b), np.minimum(a, b)
    for _ in range(40):
        live = b > tolerance
        if not live.any():
            break
        remainder = np.fmod(a, np.where(live, b, 1.0))
        remainder = np.where((remainder <= tolerance) | (remainder >= b - tolerance), 0.0, remainder)
        a, b = np.where(live, b, a), np.where(live, remainder, 0.0)
    return a


def round_8bit(weight: np.ndarray, block: int) -> GridWeight:
    """A [K, N] weight rounded to symmetric 8-bit blocks of `block` along K (scale = block max / 127; a partial
    last block is zero-padded, as MatMulNBits pads it). For 8-bit source grids whose 32- or 16-blocks cost
    more than the rounding: MLAS's 8-bit kernel reads 1 + 4/block bytes a weight and runs ~25 % faster at
    block 128 than at 32 (Gemma-3's 262,144 x 640 head: 8.2 -> 6.5 ms at 1 thread), and the second rounding
    is at most half a step of 1/127 of a 128-block's largest weight."""
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float64)
    padded[:k] = weight
    grouped = padded.T.reshape(n, blocks, block)
    scales = np.abs(grouped).max(-1) / 127
    scales = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.rint(grouped / scales[..., None]), -127, 127) + 128
    return GridWeight(8, block, np.ascontiguousarray(q.astype(np.uint8)), scales.astype(np.float32).reshape(-1), None)


def find_grid(weight: np.ndarray, candidates=CANDIDATES) -> GridWeight | None:
    for bits, block in candidates:
        grid = fit_grid(weight, bits, block)
        if grid is not None:
            return grid
    return None


def replace_with_grid_matmuls(model: onnx.ModelProto, accuracy_level: int, max_bits: int = 8,
                              residual_form: str = "digits", digits: int = DIGITS,
                              reblock_8bit: str = "source") -> dict:
    """Every MatMul whose initializer weight lies on a grid of at most `max_bits` becomes MatMulNBits (plus
    its residual correction where needed). Returns {weight name: "4-bit/32", ...} and "off-grid" names.

    residual_form "matmul": y = MatMulNBits(x) + X @ R, exact to float rounding, but 2 nodes per MatMul and
    2 per input (660 more on SmolLM2). "digits" (4-bit/32 grids): no node per MatMul; the input gets copies
    of its block means appended, x' = [x, M, M, ...] (per input tensor one AveragePool and one Concat), and
    each MatMulNBits reads those extra rows with R as two signed 4-bit digits (scales 16u and u times 32,
    u = max |R| of 32 blocks / 119): the residual to 1/238 of its largest value in 32 blocks, well under
    the int8 activation rounding of accuracy level 4. (Block sums from a MatMulNBits with a 0/1 matrix
    instead cost 3x the AveragePool, 10 % of an int4 SmolLM2 step.)"""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    candidates = tuple(c for c in CANDIDATES if c[0] <= max_bits)
    outputs = {output.name for output in graph.output}   # the LM head is the MatMul that writes one (logits)
    block_sums: dict[tuple[str, object], str] = {}    # (input, block or "digits") -> X or x', shared per input
    report: dict[str, str] = {}
    # The replacement nodes take the MatMul's place in the list: they read only its input (and block sums made
    # at the input's first MatMul), so the graph stays topologically sorted.
    nodes, used = [], set()
    for node in graph.node:
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        grid = find_grid(numpy_helper.to_array(init), candidates) if init is not None and len(init.dims) == 2 else None
        if grid is None:
            if init is not None:
                report[init.name] = "off-grid"
            nodes.append(node)
            continue
        report[init.name] = f"{grid.bits}-bit/{grid.block}" + (" + residual" if grid.residual is not None else "")
        head = node.output[0] in outputs
        if grid.bits == 8 and (reblock_8bit == "all" or reblock_8bit == "head" and head):   # see round_8bit
            grid = round_8bit(numpy_helper.to_array(init), BLOCK_8BIT)
            report[init.name] += f" -> 8-bit/{BLOCK_8BIT}"
        if grid.residual is not None and residual_form == "digits" and (grid.bits, grid.block) == (4, 32):
            nodes.extend(_digit_nodes(graph, node, grid, tuple(init.dims), accuracy_level, block_sums, digits))
        else:
            nodes.extend(_grid_nodes(graph, node, grid, tuple(init.dims), accuracy_level, block_sums))
        used.add(init.name)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph, only=used)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return report


def _grid_nodes(graph, node, grid: GridWeight, shape, accuracy_level: int, block_sums: dict) -> list:
    k, n = shape
    base = node.name or node.output[0]
    names = {key: f"{base}/grid_{key}" for key in ("q", "scales", "residual", "main", "correction")}
    graph.initializer.extend([numpy_helper.from_array(grid.packed, names["q"]),
                              numpy_helper.from_array(grid.scales, names["scales"])])
    main_out = node.output[0] if grid.residual is None else names["main"]
    nodes = [helper.make_node("MatMulNBits", [node.input[0], names["q"], names["scales"]], [main_out],
                              name=f"{base}/grid", domain="com.microsoft", K=k, N=n, bits=grid.bits,
                              block_size=grid.block, accuracy_level=accuracy_level)]
    if grid.residual is None:
        return nodes
    key = (node.input[0], grid.block)
    if key not in block_sums:
        # X_b = sum of the input over block b: [B, S, K] -> [B, S, K/block, block] -> [B, S, K/block].
        # Every MatMul input in our graphs is rank 3 (batch, sequence, features).
        stem = f"{node.input[0]}/block_sums{grid.block}"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, k // grid.block, grid.block], np.int64), f"{stem}/shape"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/axis")])
        nodes += [helper.make_node("Reshape", [node.input[0], f"{stem}/shape"], [f"{stem}/blocks"], name=f"{stem}/reshape"),
                  helper.make_node("ReduceSum", [f"{stem}/blocks", f"{stem}/axis"], [stem], name=f"{stem}/sum",
                                   keepdims=0)]
        block_sums[key] = stem
    graph.initializer.append(numpy_helper.from_array(grid.residual, names["residual"]))
    nodes += [helper.make_node("MatMul", [block_sums[key], names["residual"]], [names["correction"]],
                               name=f"{base}{CORRECTION}"),
              helper.make_node("Add", [names["main"], names["correction"]], [node.output[0]], name=f"{base}/grid_add")]
    return nodes


def largest_whole(digits: int) -> int:
    """The largest |R| in units that `digits` signed 4-bit digits (-8..7 each) hold: 7, 119, ..."""
    return 7 * (16 ** digits - 1) // 15


def digit_layout(blocks: int, digits: int = DIGITS) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """Where the digit rows sit in x' = [x, M, M, ..., M] (M = the `blocks` block means of x, `copies` times):
    every (digit, page of 32 blocks) needs one 32-row MatMulNBits block of its own (its own scale) that holds
    the page's means contiguously. Returns the length of one copy of M (`blocks`, or 32 * pages where M is
    zero-padded to whole pages because plain copies would take more rows), copies and
    [(block, digit, page, first row), ...], block and row counted from the start of the extra rows (K is a
    multiple of 32, so they start on a block boundary; the last block may be partial, MatMulNBits pads it).
    SmolLM2: 18 blocks -> 3 copies (54 rows), 48 -> 3 copies (144 rows); Gemma-3: 20 -> 3, 64 -> 2."""
    pages = -(-blocks // 32)
    for length in (blocks, 32 * pages):
        for copies in range(1, 5):
            rows, wanted, placed = copies * length, {(d, p) for d in range(digits) for p in range(pages)}, []
            for block in range(-(-rows // 32)):
                top = min(block * 32 + 32, rows)
                fits = [(d, p, c * length + 32 * p) for d, p in sorted(wanted) for c in range(copies)
                        if block * 32 <= c * length + 32 * p and c * length + min(32 * p + 32, blocks) <= top]
                if fits:
                    digit, page, first = fits[0]
                    wanted.discard((digit, page))
                    placed.append((block, digit, page, first - block * 32))
            if not wanted:
                return length, copies, placed
    raise AssertionError(f"no digit layout for {blocks} blocks")   # unreachable: padded pages fit 2 copies


def residual_digits(residual: np.ndarray, digits: int = DIGITS) -> tuple[np.ndarray, np.ndarray, int]:
    """R [nb, N] as extra MatMulNBits blocks over x' = [x, M x copies] (digit_layout): packed uint8
    [N, extra blocks, 16], scales [N, extra blocks] and copies. R = unit * (16 * high + low) per column and
    page of 32 blocks (unit = max |R| / 119, digits in -8..7), so a high-digit block has scale 16 * unit * 32,
    a low-digit block unit * 32 (x' holds means, not sums); rows of no digit hold q = 8 (weight 0)."""
    nb, n = residual.shape
    length, copies, placed = digit_layout(nb, digits)
    pages = -(-nb // 32)
    padded = np.zeros((pages * 32, n), np.float64)
    padded[:nb] = residual
    per_page = padded.T.reshape(n, pages, 32)
    unit = np.abs(per_page).max(-1) / largest_whole(digits)
    unit = np.where(unit > 0, unit, 1.0)
    rest, values = np.rint(per_page / unit[..., None]), []
    for _ in range(digits):                          # least significant first, each in -8..7
        low = np.mod(rest + 8, 16) - 8
        values.insert(0, low)
        rest = (rest - low) / 16
    extra_blocks = -(-copies * length // 32)
    q = np.full((n, extra_blocks, 32), 8, np.uint8)   # MatMulNBits' default zero point 8: weight 0
    scales = np.zeros((n, extra_blocks), np.float32)
    for block, digit, page, first in placed:
        count = min(32, nb - 32 * page)
        q[:, block, first:first + count] = (values[digit][:, page, :count] + 8).astype(np.uint8)
        scales[:, block] = (16 ** (digits - 1 - digit) * POOL * unit[:, page]).astype(np.float32)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(packed), scales, copies * length


def _extended_input(graph, name: str, k: int, block_sums: dict, digits: int) -> tuple[str, list]:
    """x' = [x, M x copies] (M = AveragePool of x over 32-blocks, zero-padded where digit_layout says): its
    name and the two (or three) nodes that make it (none where an earlier MatMul of the same input made it)."""
    stem = f"{name}/grid_digits"
    if (name, "digits") in block_sums:
        return stem, []
    block_sums[(name, "digits")] = stem
    # Rank-3 x [B, S, K] pools as 1-D [N, C, L]: one cheap node (a MatMulNBits with a 0/1 matrix cost ~3x,
    # Reshape + ReduceSum a node more); the means are exact, 1/32 of the sums (a power of two).
    blocks = k // 32
    length, copies, _ = digit_layout(blocks, digits)
    means = f"{stem}/means"
    nodes = [helper.make_node("AveragePool", [name], [means], name=f"{name}{BLOCK_MEANS}",
                              kernel_shape=[32], strides=[32])]
    if length > blocks:
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, length - blocks], np.int64),
                                                         f"{stem}/pads"))
        nodes.append(helper.make_node("Pad", [means, f"{stem}/pads"], [f"{stem}/padded"], name=f"{stem}/pad"))
        means = f"{stem}/padded"
    nodes.append(helper.make_node("Concat", [name, *[means] * copies], [stem], name=f"{stem}/concat", axis=-1))
    return stem, nodes


def _digit_nodes(graph, node, grid: GridWeight, shape, accuracy_level: int, block_sums: dict, digits: int) -> list:
    k, n = shape
    base = node.name or node.output[0]
    packed, scales, extra = residual_digits(grid.residual, digits)
    extended, nodes = _extended_input(graph, node.input[0], k, block_sums, digits)
    blocks = k // 32
    graph.initializer.extend([
        numpy_helper.from_array(np.concatenate([grid.packed, packed], axis=1), f"{base}/grid_q"),
        numpy_helper.from_array(np.concatenate([grid.scales.reshape(n, blocks), scales], axis=1).reshape(-1),
                                f"{base}/grid_scales")])
    nodes.append(helper.make_node("MatMulNBits", [extended, f"{base}/grid_q", f"{base}/grid_scales"], [node.output[0]],
                                  name=f"{base}/grid", domain="com.microsoft", K=k + extra, N=n, bits=4,
                                  block_size=32, accuracy_level=accuracy_level))
    return nodes
