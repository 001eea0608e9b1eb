import sys, time
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
N = 49152
def run(K, block, bits=4, zp=False, threads=1):
    rng = np.random.default_rng(0)
    blocks = -(-K // block)
    per = block * bits // 8
    q = rng.integers(0, 256, (N, blocks, per), dtype=np.uint8)
    s = (rng.random(N * blocks).astype(np.float32) + 0.5) * 1e-3
    ins = ["x", "q", "s"]; inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")]
    if zp:
        z = rng.integers(0, 256, (N, -(-blocks * bits // 8)), dtype=np.uint8); ins.append("z"); inits.append(numpy_helper.from_array(z, "z"))
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    for _ in range(20): sess.run(None, {"x": x})
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(30): sess.run(None, {"x": x})
        ts.append((time.perf_counter() - t) / 30)
    return np.median(ts) * 1e6
for K, block, bits, zp in [(576, 128, 8, False), (576, 32, 8, False), (576, 128, 4, False), (576, 32, 4, False), (1152, 128, 4, False), (1152, 32, 4, False), (1152, 128, 4, True), (1152, 32, 4, True), (576,32,4,True)]:
    print(K, block, bits, "zp" if zp else "  ", f"{run(K, block, bits, zp):7.0f} us", flush=True)
