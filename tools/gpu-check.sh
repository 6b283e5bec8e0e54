#!/usr/bin/env bash
# The GPU check of issue 21, in two halves:
#   tools/gpu-check.sh build   here (Rust): the release `svp` with `--features
#                              cuda` and the GPU test binaries (kernels, and
#                              the device trainer against the CPU), into
#                              target/gpu-check/
#   tools/gpu-check.sh run     on the lent GPU machine (no Rust there; carry
#                              target/gpu-check), in one go:
#                                1. the device list;
#                                2. every kernel and backend op against the
#                                   CPU, SVP and BP steps against the CPU's,
#                                   a short run's accuracy against the CPU's;
#                                3. samples/s of svp's SVP and BP on the
#                                   reference MLP (784-1024x3-10, Adam) at
#                                   batch 128 and 1024, and PyTorch's BP on
#                                   the same GPU;
#                                4. GPU memory against depth, SVP and BP.
# The device tool call: run(command="tools/gpu-check.sh run",
#                           carry=["target/gpu-check"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check

# The executable of test target $2 of package $1, built with `--features cuda`.
test_binary() {
    cargo test --release --locked -p "$1" --features cuda --target-dir target/cuda --test "$2" --no-run \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$2"
}

case "${1:-}" in
build)
    cargo build --release --locked -p svp-cli --features cuda --target-dir target/cuda
    mkdir -p "$out"
    cp target/cuda/release/svp "$out/svp"
    cp "$(test_binary svp-cuda gpu_kernels)" "$out/gpu_kernels"
    cp "$(test_binary svp-integration-tests device)" "$out/device_tests"
    # Under the device tool's 64 MiB carry limit.
    strip "$out/svp" "$out/gpu_kernels" "$out/device_tests"
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
        found=$(find "$site/nvidia" /usr/local/cuda*/lib64 -name "lib$name.so.[0-9]*" 2>/dev/null | sort | tail -1 || true)
        [ -n "$found" ] && ln -sf "$found" "$libs/lib$name.so"
    done
    builtins=$(find "$site/nvidia" /usr/local/cuda*/lib64 -name 'libnvrtc-builtins.so*' 2>/dev/null | head -1 || true)
    export LD_LIBRARY_PATH="$libs:${builtins:+$(dirname "$builtins"):}${LD_LIBRARY_PATH:-}"
    status=0
    echo "== svp devices"
    "$out/svp" devices
    echo "== GPU kernels against the CPU"
    "$out/gpu_kernels" --nocapture --test-threads 1 || status=1
    echo "== the device trainer on the GPU against the CPU (ops, steps, a short run's accuracy)"
    "$out/device_tests" --nocapture --test-threads 1 || status=1
    echo "== samples/s on the reference MLP (784-1024x3-10, Adam), svp on the GPU"
    for batch in 128 1024; do
        for method in svp bp; do
            if "$out/svp" memory --device cuda --methods "$method" --depths 3 --width 1024 --batch "$batch" \
                --steps 300 --optimizer adam --csv "$out/speed.csv" --plot "$out/speed.svg" >"$out/speed.log" 2>&1; then
                python3 - "$out/speed.csv" "$batch" <<'PY'
import csv, sys
row = next(csv.DictReader(open(sys.argv[1])))
b = int(sys.argv[2])
print(f"svp {row['method']:<3} batch {b:>4}: {float(row['steps_per_s']) * b:>10.0f} samples/s")
PY
            else
                echo "svp $method batch $batch: $(tail -1 "$out/speed.log")"
                status=1
            fi
        done
    done
    echo "== PyTorch's BP on the same GPU"
    for batch in 128 1024; do python3 tools/torch_mlp_gpu_bench.py --batch "$batch" || status=1; done
    echo "== svp eval on the GPU (a committed int8 model, widened to f32) and on the CPU"
    "$out/svp" eval models/device-mlp.svpm --data embedded --device cuda || status=1
    "$out/svp" eval models/device-mlp.svpm --data embedded
    echo "== GPU memory against depth (width 1024, batch 128, SGD)"
    "$out/svp" memory --device cuda --depths 1,2,4,8,16,32 --csv "$out/memory-gpu.csv" --plot "$out/memory-gpu.svg" || status=1
    exit $status
    ;;
*)
    echo "usage: tools/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
