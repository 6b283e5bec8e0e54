#!/usr/bin/env bash
# Compiles svp's GPU kernels with NVRTC on a machine with no GPU: NVRTC is a
# library, and NVIDIA's PyPI wheel carries it (CUDA 12.9 here, as JetPack 6
# has CUDA 12.x). Installs it into target/nvrtc (no system change), then runs
# the kernel-compile test, which fails on a kernel that does not compile for
# Jetson Orin (8.7), Ampere (8.0) or Hopper (9.0).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/nvrtc
wheel=nvidia-cuda-nvrtc-cu12==12.9.86
if [ ! -e "$dir/lib/libnvrtc.so" ]; then
    [ -x "$dir/venv/bin/pip" ] || python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps "$wheel" -d "$dir/wheel"
    python3 - "$dir" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
lib = os.path.join(d, "lib")
os.makedirs(lib, exist_ok=True)
with zipfile.ZipFile(glob.glob(os.path.join(d, "wheel", "*.whl"))[0]) as z:
    for name in z.namelist():
        if "/lib/libnvrtc" in name:
            with open(os.path.join(lib, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
    # cudarc looks for libnvrtc.so by that name.
    ln -sf "$(basename "$(ls "$dir"/lib/libnvrtc.so.[0-9]* | head -1)")" "$dir/lib/libnvrtc.so"
fi
LD_LIBRARY_PATH="$PWD/$dir/lib:${LD_LIBRARY_PATH:-}" \
    cargo test -p svp-cuda --features cuda --locked --test gpu_kernels kernels_compile -- --nocapture 2>&1 |
    tee target/nvrtc/check.log
# The test skips without NVRTC; here NVRTC is installed, so a skip is a fault.
if grep -q "skipped: no NVRTC" target/nvrtc/check.log; then
    echo "nvrtc-check: NVRTC was installed but not found" >&2
    exit 1
fi
