"""Time one 8-bit MatMulNBits LM head [576 -> 49152] at several block sizes and accuracy levels (1 thread)."""
import sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
sys.path.insert(0, "/work/main")
from unskill.exporter.grid import round_8bit
K, N = 576, 49152
rng = np.random.default_rng(0)
w = rng.standard_normal((K, N)).astype(np.float32) * 0.02
x = rng.standard_normal((1, 1, K)).astype(np.float32)
ref = x[0] @ w
for bits in (8, 4):
  for block in (32, 64, 128, 256):
    for level in (4, 0):
        if bits == 4 and block != 32 and block!=128: continue
        if bits == 8:
            g = round_8bit(w, block); q, s = g.packed, g.scales
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            blocks = -(-K // block); pad = np.zeros((blocks*block, N), np.float32); pad[:K] = w
            gr = pad.T.reshape(N, blocks, block); sc = np.abs(gr).max(-1)/7; qq = (np.clip(np.rint(gr/sc[...,None]), -8, 7)+8).astype(np.uint8)
            q = qq[..., 0::2] | (qq[..., 1::2] << 4); s = sc.astype(np.float32).reshape(-1)
        node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=level)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])],
                                  [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
        sess = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
        for _ in range(20): y = sess.run(None, {"x": x})[0]
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(50): sess.run(None, {"x": x})
            ts.append((time.perf_counter() - t) / 50)
        err = np.abs(y[0, 0] - ref[0]).max() / np.abs(ref).max()
        print(f"bits {bits} block {block:4d} level {level}: {np.median(ts)*1e6:8.0f} us  rel err {err:.2e}")
