#!/usr/bin/env bash
# The GPU check of issue 21, in two halves:
#   tools/gpu-check.sh build   here (Rust): the release `svp` with `--features
#                              cuda` and the GPU kernel tests, into
#                              target/gpu-check/
#   tools/gpu-check.sh run     on the lent GPU machine (no Rust there; carry
#                              target/gpu-check): the device list, the kernel
#                              tests against the CPU, `svp train --device
#                              cuda`, and PyTorch's BP on the reference MLP at
#                              batch 128 and 1024 on the same GPU.
# The device tool call: run(command="tools/gpu-check.sh run",
#                           carry=["target/gpu-check"], timeout_s=300)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check

case "${1:-}" in
build)
    cargo build --release --locked -p svp-cli --features cuda --target-dir target/cuda
    mkdir -p "$out"
    cp target/cuda/release/svp "$out/svp"
    # The test binary's path, from cargo's own report.
    bin=$(cargo test --release --locked -p svp-cuda --features cuda --target-dir target/cuda --test gpu_kernels --no-run \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_kernels" and m.get("executable"):
        print(m["executable"])')
    cp "$bin" "$out/gpu_kernels"
    # Under the device tool's 64 MiB carry limit.
    strip "$out/svp" "$out/gpu_kernels"
    ls -l "$out"
    ;;
run)
    [ -x "$out/svp" ] || { echo "gpu-check: no $out/svp; run 'tools/gpu-check.sh build' here first" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # cuBLAS and NVRTC: PyTorch's wheels carry them (nvidia/*/lib); cudarc
    # looks for libcublas.so and libnvrtc.so by name, so link them there.
    libs=$PWD/$out/libs
    mkdir -p "$libs"
    site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
    for name in cublas cublasLt nvrtc; do
        found=$(find "$site/nvidia" /usr/local/cuda*/lib64 -name "lib$name.so*" 2>/dev/null | sort | tail -1 || true)
        [ -n "$found" ] && ln -sf "$found" "$libs/lib$name.so"
    done
    export LD_LIBRARY_PATH="$libs:$(dirname "$(find "$site/nvidia" -name 'libnvrtc-builtins.so*' 2>/dev/null | head -1)" 2>/dev/null):${LD_LIBRARY_PATH:-}"
    echo "== svp devices"
    "$out/svp" devices
    echo "== GPU kernels against the CPU"
    "$out/gpu_kernels" --nocapture --test-threads 1
    echo "== svp train --device cuda"
    "$out/svp" train --data embedded --epochs 1 --device cuda || true
    echo "== PyTorch BP, reference MLP"
    for b in 128 1024; do python3 tools/torch_mlp_gpu_bench.py --batch "$b"; done
    ;;
*)
    echo "usage: tools/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
