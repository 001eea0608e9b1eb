"""8-bit grid as two 4-bit digits: w = s*(u-128), u = 16a + b -> 16s*(a-8) + s*(b-0), one MatMulNBits over [x, x]."""
import sys, time
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
sys.path.insert(0, "/work/main")
from unskill.exporter.grid import round_8bit, packed_zero_points
K, N = int(sys.argv[2]), int(sys.argv[3])
threads = int(sys.argv[1]); import os; ZP = not os.environ.get("NOZP")
rng = np.random.default_rng(0)
w = rng.standard_normal((K, N)).astype(np.float32) * 0.02
x = rng.standard_normal((1, 1, K)).astype(np.float32)
def session(nodes, inits):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
def bench(sess):
    for _ in range(20): y = sess.run(None, {"x": x})[0]
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(30): sess.run(None, {"x": x})
        ts.append((time.perf_counter() - t) / 30)
    return y, np.median(ts) * 1e6
for block in (32, 128):
    g = round_8bit(w, block)
    blocks = -(-K // block)
    s8 = session([helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=block, accuracy_level=4)],
                 [numpy_helper.from_array(g.packed, "q"), numpy_helper.from_array(g.scales, "s")])
    y8, t8 = bench(s8)
    u = g.packed.reshape(N, blocks, block)  # uint8 q+128
    a, b = u >> 4, u & 15
    q4 = np.concatenate([a, b], axis=1)   # [N, 2*blocks, block]
    q4p = np.ascontiguousarray(q4[..., 0::2] | (q4[..., 1::2] << 4))
    sc = g.scales.reshape(N, blocks)
    s4 = np.concatenate([16 * sc, sc], axis=1).astype(np.float32).reshape(-1)
    zp = np.concatenate([np.full((N, blocks), 8, np.uint8), np.zeros((N, blocks), np.uint8)], axis=1)
    # K must place the second copy at a block boundary: pad x to blocks*block
    kp = blocks * block
    nodes = []
    xin = "x"
    if kp != K:
        nodes.append(helper.make_node("Pad", ["x", "pads"], ["xp"]))
        xin = "xp"
    nodes += [helper.make_node("Concat", [xin, xin], ["x2"], axis=-1),
              helper.make_node("MatMulNBits", (["x2", "q", "s", "zp"] if ZP else ["x2", "q", "s"]), ["y"], domain="com.microsoft", K=2 * kp, N=N, bits=4, block_size=block, accuracy_level=4)]
    inits = [numpy_helper.from_array(q4p, "q"), numpy_helper.from_array(s4, "s"), numpy_helper.from_array(packed_zero_points(zp, 4), "zp")]
    if kp != K:
        inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, kp - K], np.int64), "pads"))
    sd = session(nodes, inits)
    yd, td = bench(sd)
    ref = x[0] @ w
    print(f"K {K} N {N} block {block} threads {threads}: 8-bit {t8:7.0f} us, 2x4-bit digits {td:7.0f} us ({t8/td:.2f}x); "
          f"max |digits - 8bit| / max|y| = {np.abs(yd - y8).max() / np.abs(y8).max():.1e}, 8bit vs fp64 ref {np.abs(y8[0]-ref).max()/np.abs(ref).max():.1e}")
