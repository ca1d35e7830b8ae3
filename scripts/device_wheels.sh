#!/usr/bin/env bash
# The wheels a device call carries (the lent GPU machine has torch, transformers, peft and accelerate, Python 3.12,
# and no package index). A call carries at most 64 MiB, so the two sets are kept small:
#
#   bash scripts/device_wheels.sh gpu   # .whl/: diffusers, the studio's server, pydantic; bitsandbytes (CUDA
#                                       #   libraries only) unpacked in .whl/bnb. About 20 MB.
#   bash scripts/device_wheels.sh cpu   # .whl_cpu/: OpenVINO slimmed to its CPU plugin and its IR and PyTorch
#                                       #   front ends (31 MB of its 59), NNCF and its small dependencies (not
#                                       #   scipy, 35 MB: the int8 step runs only where the host has it). About 37 MB.
#
# Versions are those of this checkout's .venv, so the device runs what the tests ran here. Both folders are ignored
# by git (.git/info/exclude); scripts/gpu_check.sh installs whichever it finds.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
     --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

version() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
pinned() { local p; for p in "$@"; do echo "$p==$(version "$p")"; done; }

exclude() {
    grep -qxF "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >> .git/info/exclude
}

case "${1:-}" in
gpu)
    mkdir -p .whl
    "${PIP[@]}" -d .whl $(pinned diffusers fastapi starlette uvicorn websockets pydantic pydantic_core \
        pydantic-settings annotated-types typing-inspection python-dotenv importlib_metadata opentelemetry-api peft)
    # bitsandbytes for --quantize int8|nf4 on CUDA: its wheel carries libraries for every CUDA; keep 13.x and CPU.
    tmp=$(mktemp -d)
    # Its wheels are tagged manylinux_2_24 (not in PIP's list): without that tag pip fell back to a 2023 release
    # whose CUDA set-up fails at import and takes diffusers down with it (2026-12-04: a whole GPU call lost).
    "${PIP[@]}" --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes>=0.45"
    rm -rf .whl/bnb && mkdir -p .whl/bnb
    .venv/bin/python -m zipfile -e "$tmp"/bitsandbytes-*.whl .whl/bnb
    find .whl/bnb/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
        ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
    rm -rf "$tmp"
    exclude .whl
    ;;
cpu)
    mkdir -p .whl_cpu
    "${PIP[@]}" -d .whl_cpu $(pinned nncf) openvino-telemetry networkx pydot pyparsing rich markdown-it-py mdurl \
        pygments tabulate
    tmp=$(mktemp -d)
    "${PIP[@]}" -d "$tmp" "openvino==$(version openvino)"
    wheel=$(ls "$tmp"/openvino-*.whl)
    # The CPU plugin, the IR and PyTorch front ends are what lcm-live uses; the GPU and NPU plugins, the GPU's kernel
    # cache and the other front ends are 28 MB of the wheel. pip installs what the archive holds.
    .venv/bin/python - "$wheel" ".whl_cpu/$(basename "$wheel")" <<'EOF'
import re
import sys
import zipfile

drop = re.compile(r"openvino/(libs/(libopenvino_intel_(gpu|npu)_plugin\.so|cache\.json|"
                  r"libopenvino_(onnx|tensorflow|tensorflow_lite|paddle|gguf|jax)_frontend\.so.*)|"
                  r"frontend/(tensorflow|onnx|paddle|jax)/.*)$")
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.match(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith("/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines()
                            if line and not drop.match(line.split(b",")[0].decode()))
        dst.writestr(item, data)
EOF
    rm -rf "$tmp"
    exclude .whl_cpu
    ;;
*)
    echo "usage: bash scripts/device_wheels.sh gpu|cpu" >&2
    exit 2
    ;;
esac
[[ $1 == gpu ]] && du -sh .whl || du -sh .whl_cpu
