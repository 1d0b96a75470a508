# Shared by scripts/: a virtual environment in $VENV (default .venv) with pdgate installed.
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

pdgate_env() {  # $1: the pip target, e.g. '.' or '.[test]'
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  "$VENV/bin/pip" install -q -e "$1"
}
