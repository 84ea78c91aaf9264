#!/usr/bin/env bash
# The fast suite on another transformers release, in a throw-away venv: `floor` (the declared minimum), `newest` (the
# newest release on the registry, even outside the declared range) or an exact version such as 5.20.2.
#
# A release inside the declared range must pass (exit 1 otherwise). A release outside it is run too, and its result is
# printed as the signal to extend the range (or to fix piofvlm.transformers_compat first); it never fails this script.
set -uo pipefail
cd "$(dirname "$0")/.."
which=${1:?usage: scripts/suite_on_transformers.sh floor|newest|VERSION}
python=${PYTHON:-python3}
floor=$(sed -nE 's/.*"transformers>=([0-9.]+),<([0-9.]+)".*/\1/p' pyproject.toml)
case "$which" in
  floor) spec="transformers==$floor" ;;
  newest) spec="transformers" ;;
  *) spec="transformers==$which" ;;
esac
venv=".venv-tf-$which"
rm -rf "$venv"
"$python" -m venv "$venv" || exit 1
"$venv/bin/pip" install -q --upgrade pip || exit 1
"$venv/bin/pip" install -q torch==2.13.0 || exit 1
# constraints.txt pins torch only: every other dependency is what the registry serves today within the declared ranges.
# The same extras as `make test` (lmms-eval, quantization, the server): without them their tests skip, and a release
# that breaks one of those paths would pass here (transformers 5.25's rewritten serving did, 2026-12-06).
"$venv/bin/pip" install -q --no-deps lmms-eval==0.7.3 || exit 1
"$venv/bin/pip" install -q -c constraints.txt -e ".[dev,eval,quant,serve]" || exit 1
if [ "$which" = newest ]; then
  # --upgrade past the declared range on purpose: this run tells whether the range can be extended.
  "$venv/bin/pip" install -q -c constraints.txt --upgrade transformers 2>&1 | grep -v "^WARNING: Location" | grep -v "incompatible" || true
else
  "$venv/bin/pip" install -q -c constraints.txt "$spec" || exit 1
fi
version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
status=$("$venv/bin/python" -W ignore -c "from piofvlm import transformers_compat as c; print(c.version_status())")
echo "== fast suite on transformers $version ($status; declared range: $(grep -oE '"transformers[^"]*"' pyproject.toml))"
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
code=$?
rm -rf "$venv"
if [ "$status" != tested ]; then
  if [ $code -eq 0 ]; then verdict="passes: the declared range can be extended to it (add it to the table of docs/versions.md)"
  else verdict="FAILS: teach piofvlm.transformers_compat what moved before extending the range"; fi
  echo "== transformers $version is outside the declared range and the fast suite $verdict"
  exit 0
fi
echo "== transformers $version (inside the declared range): fast suite exit code $code"
exit $code
