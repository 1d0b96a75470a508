# Shared by scripts/: a virtual environment in $VENV (default .venv) with pdgate installed from
# the lock files, so every machine runs the versions CI tested (scripts/lock refreshes them).
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

_pdgate_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
}

pdgate_env() {  # $1: the lock file, e.g. requirements.lock (serving) or requirements-test.lock
  _pdgate_venv
  "$VENV/bin/pip" install -q -r "$1"
  "$VENV/bin/pip" install -q --no-deps -e .
}

pdgate_tools() {  # tools outside the locks, e.g. pip-tools for scripts/lock
  _pdgate_venv
  "$VENV/bin/pip" install -q "$@"
}
