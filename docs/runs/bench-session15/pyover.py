"""Share of a decode step spent outside session.run (through the Generator, as decode.py runs it)."""
import sys, time, statistics
from unskill.runtime import load, GenerationParams
model_dir, threads = sys.argv[1], int(sys.argv[2])
gen = load(model_dir, device="cpu", threads=threads)
inside = [0.0]
sess = gen.model.session
orig = sess.run_with_iobinding
def timed(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); inside[0] += time.perf_counter() - t; return r
sess.run_with_iobinding = timed
P = "Write a short story about a robot who learns to paint."
gen.generate([P], GenerationParams(max_new_tokens=8, ignore_eos=True))
rows = []
for _ in range(5):
    inside[0] = 0.0
    t = time.perf_counter(); gen.generate([P], GenerationParams(max_new_tokens=1, ignore_eos=True)); t1 = time.perf_counter() - t; in1 = inside[0]
    inside[0] = 0.0
    t = time.perf_counter(); gen.generate([P], GenerationParams(max_new_tokens=129, ignore_eos=True)); tn = time.perf_counter() - t; inn = inside[0]
    step = (tn - t1) / 128; run = (inn - in1) / 128
    rows.append((step * 1e3, run * 1e3, (step - run) * 1e3))
for r in rows: print("step %.3f ms, in run %.3f ms, outside %.3f ms" % r)
print("median outside share %.1f %%" % (100 * statistics.median(r[2] / r[0] for r in rows)))
