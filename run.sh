#!/usr/bin/env bash
# Sets up a virtual environment with the verified stack (constraints.txt), then runs one of:
#   ./run.sh            the demo: HRNet-W18 M2MRF-C trained and evaluated on synthetic fundus data
#   ./run.sh test       the whole test suite, both tiers (add -m "not slow" for the fast tier only)
#   ./run.sh ARGS...    python -m m2mrf_jax.main ARGS... (e.g. --config=configs/idrid_c.py --workdir=DIR)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -f "$VENV/.installed" ] || [ setup.cfg -nt "$VENV/.installed" ] \
    || [ constraints.txt -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  touch "$VENV/.installed"
fi
. "$VENV/bin/activate"
case "${1:-demo}" in
  demo) exec python -m m2mrf_jax.main --config=configs/demo.py --workdir="${WORKDIR:-workdir/demo}" ;;
  test) shift; exec python -m pytest -n 2 -m "slow or not slow" --durations=15 "$@" ;;
  *) exec python -m m2mrf_jax.main "$@" ;;
esac
