#!/usr/bin/env bash
# Creates .venv and installs semiseg with its dependencies, CPU-safe, from wheels only:
#  1. torch is pinned and installed first, so nothing later resolves a CUDA build on a CPU machine
#     (set SEMISEG_TORCH to choose another spec, e.g. a CUDA build on a GPU machine);
#  2. semiseg with Ray, Optuna, MLflow and pytest (no compiler needed);
#  3. with --test, also the references the tests and benchmarks compare the library with:
#     elasticdeform (the `reference` extra), built from source because the registry's wheel is
#     compiled against NumPy 1.x and fails to import under NumPy 2 ("_ARRAY_API not found"), so
#     it needs a C compiler; MONAI (the `bench` extra); and Debian's chromium for the browser test
#     of the HTML reports.
set -euo pipefail
cd "$(dirname "$0")/.."
with_test_tools=0
for argument in "$@"; do
  case "$argument" in
    --test) with_test_tools=1 ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
venv="${SEMISEG_VENV:-.venv}"
torch_spec="${SEMISEG_TORCH:-torch==2.13.0}"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

step_started=$SECONDS
step() {  # one line per step, saying what it does (and how long it takes when that is long)
  step_started=$SECONDS
  echo "[setup] $*"
}
step_done() {
  echo "[setup]   done in $((SECONDS - step_started)) s"
}

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  step "installing $torch_spec first (the CPU build, no CUDA packages; about 200 MB, 1-2 minutes)..."
  "${pip[@]}" "$torch_spec"
  step_done
fi

step "installing semiseg and its dependencies (Ray, Optuna, MLflow; about a minute)..."
"${pip[@]}" -e ".[dev]"
step_done
if (( with_test_tools )); then
  step "installing the references of the tests and benchmarks: elasticdeform (built from source) and MONAI..."
  "${pip[@]}" --no-binary elasticdeform -e ".[reference,bench]"
  step_done
fi

if (( with_test_tools )) && ! command -v chromium >/dev/null 2>&1; then
  step "installing chromium (Debian package) for the report browser test..."
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq chromium >/dev/null
  step_done
fi

"$venv/bin/python" - "$with_test_tools" <<'PY'
import sys

if sys.argv[1] == "1":
    import elasticdeform.torch  # noqa: F401  (fails here, not mid-test, if the build is wrong)
import numpy, torch, ray, optuna, mlflow
print(f"[setup] ok: torch {torch.__version__}, numpy {numpy.__version__}, ray {ray.__version__}, "
      f"optuna {optuna.__version__}, mlflow {mlflow.__version__}")
PY
