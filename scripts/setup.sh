#!/usr/bin/env bash
# Creates .venv and installs semiseg with its dependencies, CPU-safe:
#  1. torch is pinned and installed first, so nothing later resolves a CUDA build on a CPU machine
#     (set SEMISEG_TORCH to choose another spec, e.g. a CUDA build on a GPU machine);
#  2. elasticdeform is built from source, because the registry's wheel is compiled against
#     NumPy 1.x and fails to import under NumPy 2 ("_ARRAY_API not found").
#  3. with --test, also Debian's chromium for the browser test of the HTML reports.
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

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $torch_spec first (no CUDA packages on a CPU machine)"
  "${pip[@]}" "$torch_spec"
fi

echo "[setup] installing semiseg and its dependencies (elasticdeform from source)"
"${pip[@]}" --no-binary elasticdeform -e ".[dev]"
if (( with_test_tools )); then
  echo "[setup] installing MONAI (the reference of the prediction benchmark and its test)"
  "${pip[@]}" -e ".[bench]"
fi

if (( with_test_tools )) && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing chromium (Debian package) for the report browser test"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq chromium >/dev/null
fi

"$venv/bin/python" - <<'PY'
import elasticdeform.torch  # noqa: F401  (fails here, not mid-study, if the build is wrong)
import numpy, torch, ray, optuna, mlflow
print(f"[setup] ok: torch {torch.__version__}, numpy {numpy.__version__}, ray {ray.__version__}, "
      f"optuna {optuna.__version__}, mlflow {mlflow.__version__}")
PY
