#!/usr/bin/env bash
# Create .ls-venv with Label Studio 1.23.2 in its own virtualenv (its pins clash with ours).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .ls-venv/bin/label-studio ] && .ls-venv/bin/python -c "import label_studio, sys; sys.exit(label_studio.__version__ != '1.23.2')" 2>/dev/null; then
  echo "Label Studio 1.23.2 already in .ls-venv"
  exit 0
fi
rm -rf .ls-venv
python3 -m venv .ls-venv
.ls-venv/bin/pip install -q --disable-pip-version-check label-studio==1.23.2
.ls-venv/bin/python -c "import label_studio; print('label-studio', label_studio.__version__)"
