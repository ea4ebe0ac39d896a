# Sourced by the GPU scripts. On a GPU machine without network, what it lacks comes as wheels beside
# the tree (.whl/); they are installed into /tmp/site, which goes first on the import path with the
# tree's src/. Once per run: a script sourced from another sees KILN_GPU_ENV and keeps what it set.
site=/tmp/site
if [ -z "${KILN_GPU_ENV:-}" ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  fi
  export KILN_GPU_ENV=1 PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
fi
