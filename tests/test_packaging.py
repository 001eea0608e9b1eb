"""One import package `unskill` with three subpackages; the runtime never pulls in torch or the exporter."""

import subprocess
import sys
import zipfile


def test_runtime_and_stats_import_without_torch_or_exporter():
    code = ("import sys, unskill.runtime, unskill.runtime.io, unskill.runtime.engine, unskill.runtime.server, "
            "unskill.ksd_run, unskill.stats_eval, unskill.stats.probe, unskill.evals.sandbox, unskill.evals.evaluate; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('unskill.exporter', 'transformers'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wheel_holds_only_the_unskill_package(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(repo)], check=True)
    wheel = next(tmp_path.glob("unskill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"unskill"}
    for module in ("unskill/__init__.py", "unskill/cli.py", "unskill/runtime/generator.py",
                   "unskill/stats/probe.py", "unskill/exporter/graph.py"):
        assert module in names
