#!/usr/bin/env bash
# Create (or check) the reference venv that runs the OFFICIAL funasr code for golden outputs.
#
#   bash tools/setup_reference_env.sh            # -> .venv-ref in the repo root
#   VENV=/some/where bash tools/setup_reference_env.sh
#
# Idempotent: an existing venv with the pinned versions is left as it is. torch==2.13.0 comes from a local wheel
# file where there is one ($TORCH_WHEEL, ./.whl/, /opt/wheels/), else from the package index (see below), and the
# later installs are constrained so nothing can replace it.
# The main package never imports torch; only tools/reference.py runs in this venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-ref}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
# Everything that shapes the golden numbers is pinned (funasr code, the Qwen3 implementation, the fbank
# backend used when torchaudio is absent, the MP3 resampler).
PACKAGES=(
  "funasr==1.4.16"
  "transformers==5.24.0"
  "kaldi-native-fbank==1.23.0"
  "librosa==0.11.0"
  "scikit-learn==1.9.1"  # the official ClusterBackend's (speaker clustering goldens)
  "umap-learn==0.5.12"
  "onnxruntime"
)

say() { printf '[setup_reference_env] %s\n' "$*"; }
# pip here warns once per package about absent local index folders; keep the rest of its stderr
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"

if [[ -x "$VENV/bin/python" ]]; then
  say "venv exists: $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  say "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
  quiet_pip "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

have_torch="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ "${have_torch%%+*}" == "$TORCH_VERSION" ]]; then
  say "torch $have_torch already installed"
else
  wheel=""
  for cand in "${TORCH_WHEEL:-}" "$ROOT"/.whl/torch-"$TORCH_VERSION"*-cp"$pyver"-*.whl \
              /opt/wheels/torch-"$TORCH_VERSION"*-cp"$pyver"-*.whl; do
    if [[ -n "$cand" && -f "$cand" ]]; then wheel="$cand"; break; fi
  done
  if [[ -n "$wheel" ]]; then
    say "installing torch from $wheel"
    quiet_pip "${PIP[@]}" install --quiet "$wheel"
  else
    # PyTorch's CPU-only index first (~190 MB); where it cannot be reached, PyPI's default build (on Linux x86-64
    # the CUDA one: ~3.5 GB with its nvidia-* dependencies; macOS and Linux ARM wheels are CPU builds)
    say "no local torch $TORCH_VERSION wheel: installing it from the package index (PyPI, or PyTorch's CPU index)"
    quiet_pip "${PIP[@]}" install --quiet --retries 1 --timeout 30 \
      --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  fi
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"

missing=()
for spec in "${PACKAGES[@]}"; do
  name="${spec%%==*}"
  want="${spec#*==}"
  [[ "$want" == "$spec" ]] && want=""
  got="$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)"
  if [[ -z "$got" || ( -n "$want" && "$got" != "$want" ) ]]; then
    missing+=("$spec")
  else
    say "$name $got already installed"
  fi
done
if (( ${#missing[@]} )); then
  say "installing ${missing[*]}"
  quiet_pip "${PIP[@]}" install --quiet -c "$constraints" "${missing[@]}"
fi

"$PY" - <<'EOF'
import funasr, torch, transformers
import funasr.utils.fbank as fb
backend = "torchaudio" if fb._HAS_TORCHAUDIO else "kaldi-native-fbank"
print(f"[setup_reference_env] ready: torch {torch.__version__}, funasr {funasr.__version__}, "
      f"transformers {transformers.__version__}, fbank backend {backend}")
EOF
