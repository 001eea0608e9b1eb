"""Experiment: the /unskill/key.N and preact.N Identity outputs replaced by renaming their source tensors."""
import sys, shutil
from pathlib import Path
import onnx
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
m = onnx.load(str(dst / "model.onnx"), load_external_data=False)
g = m.graph
outputs = {o.name for o in g.output}
rename = {}
keep = []
for n in g.node:
    if n.op_type == "Identity" and n.name.startswith("/unskill/") and n.input[0] not in outputs and n.input[0] not in rename:
        rename[n.input[0]] = n.output[0]
    else:
        keep.append(n)
for n in keep:
    for i, x in enumerate(n.input):
        if x in rename: n.input[i] = rename[x]
    for i, x in enumerate(n.output):
        if x in rename: n.output[i] = rename[x]
for vi in g.value_info:
    if vi.name in rename: vi.name = rename[vi.name]
del g.node[:]; g.node.extend(keep)
onnx.save(m, str(dst / "model.onnx"))
print(len(rename), "identities removed")
