#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks (it has no network) into .whl/, for Python 3.12 x86-64.
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# and export PYTHONPATH=/tmp/site (see /work/.library/device/README.md). pydantic-core is pinned to the
# version that pydantic release requires: a mismatch fails at import.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection pydantic-settings python-dotenv \
            fastapi starlette uvicorn click h11 anyio opentelemetry-api typing-extensions prometheus-client gguf \
            annotated-doc regex tqdm pyzmq msgspec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -la .whl
