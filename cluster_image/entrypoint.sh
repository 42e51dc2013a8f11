#!/bin/sh
# The node image's entrypoint: run entrypoint.py with the image's Python. See entrypoint.py for the
# environment variables it reads. GPU_PROXY_PYTHON overrides the Python (tests run it with theirs).
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec "${GPU_PROXY_PYTHON:-python3}" "$here/entrypoint.py" "$@"
