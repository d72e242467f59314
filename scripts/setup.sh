# Create (or reuse) the project venv, install vlmprobe with its pinned requirements and put
# the venv first on PATH. Source it from the project root: `source scripts/setup.sh`.
# It returns non-zero if any step fails, so `source scripts/setup.sh && dvc repro` stops there.
VLMPROBE_VENV="${VLMPROBE_VENV:-.venv}"
{ [ -x "$VLMPROBE_VENV/bin/python" ] || python3 -m venv "$VLMPROBE_VENV"; } &&
  "$VLMPROBE_VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt &&
  "$VLMPROBE_VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . &&
  export PATH="$PWD/$VLMPROBE_VENV/bin:$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
