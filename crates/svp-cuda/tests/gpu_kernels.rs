//! Every GPU operation against the CPU engine, over many shapes. On a machine
//! without a GPU (or a build without the `cuda` feature) each test checks
//! that asking for one fails with one line, and says "skipped: no CUDA
//! device"; with a GPU they compare values (tools/gpu-check.sh runs them).

use ndarray::{Array2, ArrayView2};
use svp_cuda::{CudaError, Gpu};

/// The GPU, or `None` after printing why the comparisons are skipped.
fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            // Whatever the reason, it is one line and a typed error, not a panic.
            let line = e.to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
            assert!(matches!(
                e,
                CudaError::NotCompiled | CudaError::LibraryMissing { .. } | CudaError::NoDevice { .. }
            ));
            eprintln!("skipped: no CUDA device ({line})");
            None
        }
    }
}

/// Reproducible values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn download(gpu: &Gpu, b: &svp_cuda::GpuBuffer) -> Vec<f32> {
    let mut out = vec![0.0; b.len()];
    gpu.download(b, &mut out).unwrap();
    out
}

/// Largest |a - b| relative to the reference's scale.
fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * scale, "{what}: element {i}: GPU {g}, CPU {w}");
    }
}

/// cuBLAS may use TF32 or another summation order: within 1e-5 of the
/// largest value for these sizes (k <= 1100, entries in [-1, 1)).
const GEMM_TOLERANCE: f32 = 1e-5;

#[test]
fn gemm_matches_the_cpu_for_every_transpose_and_many_shapes() {
    let Some(gpu) = gpu() else { return };
    let shapes = [(1, 1, 1), (1, 7, 3), (5, 1, 9), (17, 33, 65), (128, 1024, 784), (128, 10, 1024), (64, 1100, 3)];
    for &(m, n, k) in &shapes {
        for (transpose_a, transpose_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let c0 = values(m * n, 3);
            let (alpha, beta) = (0.75, 0.5);
            let a_shape = if transpose_a { (k, m) } else { (m, k) };
            let b_shape = if transpose_b { (n, k) } else { (k, n) };
            let a_cpu = ArrayView2::from_shape(a_shape, &a).unwrap();
            let b_cpu = ArrayView2::from_shape(b_shape, &b).unwrap();
            let a_op = if transpose_a { a_cpu.t() } else { a_cpu };
            let b_op = if transpose_b { b_cpu.t() } else { b_cpu };
            let mut want = Array2::from_shape_vec((m, n), c0.clone()).unwrap();
            svp_tensor::gemm(alpha, a_op, b_op, beta, want.view_mut());

            let (a_gpu, b_gpu) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
            let mut c_gpu = gpu.upload(&c0).unwrap();
            gpu.gemm(transpose_a, transpose_b, m, n, k, alpha, &a_gpu, &b_gpu, beta, &mut c_gpu).unwrap();
            let what = format!("gemm {m}x{n}x{k} transposes {transpose_a}/{transpose_b}");
            assert_close(&download(&gpu, &c_gpu), want.as_slice().unwrap(), GEMM_TOLERANCE, &what);
        }
    }
}

#[test]
fn gemm_rejects_buffers_too_small_before_launching() {
    let Some(gpu) = gpu() else { return };
    let a = gpu.zeros(5).unwrap();
    let b = gpu.zeros(6).unwrap();
    let mut c = gpu.zeros(4).unwrap();
    let e = gpu.gemm(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c).unwrap_err();
    assert_eq!(e.to_string(), "gemm A: 2 x 3 needs 6 elements, the buffer has 5");
}

#[test]
fn bias_relu_and_their_gradients_match_the_cpu_exactly() {
    let Some(gpu) = gpu() else { return };
    for &(rows, cols) in &[(1, 1), (3, 5), (128, 1024), (257, 10)] {
        let x = values(rows * cols, 4);
        let bias = values(cols, 5);
        for relu in [false, true] {
            let want: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = v + bias[i % cols];
                    if relu { s.max(0.0) } else { s }
                })
                .collect();
            let mut x_gpu = gpu.upload(&x).unwrap();
            gpu.add_bias(&mut x_gpu, &gpu.upload(&bias).unwrap(), rows, cols, relu).unwrap();
            // One rounding each way: the same bits.
            assert_eq!(download(&gpu, &x_gpu), want, "add_bias {rows}x{cols} relu {relu}");
        }

        let output: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        let grad = values(rows * cols, 6);
        let want: Vec<f32> = grad.iter().zip(&output).map(|(g, o)| if *o > 0.0 { *g } else { 0.0 }).collect();
        let mut grad_gpu = gpu.upload(&grad).unwrap();
        gpu.relu_backward(&mut grad_gpu, &gpu.upload(&output).unwrap(), rows * cols).unwrap();
        assert_eq!(download(&gpu, &grad_gpu), want, "relu_backward {rows}x{cols}");

        let want: Vec<f32> =
            (0..cols).map(|c| (0..rows).map(|r| grad[r * cols + c] as f64).sum::<f64>() as f32).collect();
        let mut sums = gpu.zeros(cols).unwrap();
        gpu.column_sums(&gpu.upload(&grad).unwrap(), rows, cols, &mut sums).unwrap();
        // Summed in f32 on the GPU against f64 here: rows * 2^-24 of the scale.
        assert_close(&download(&gpu, &sums), &want, rows as f32 * 6e-8 * 2.0, &format!("column_sums {rows}x{cols}"));
    }
}

/// The device list and the error for a missing device are one line each.
#[test]
fn devices_are_listed_or_the_reason_given() {
    match svp_cuda::devices() {
        Ok(list) => {
            for d in &list {
                assert!(!d.to_string().contains('\n'));
            }
            let e = Gpu::open(list.len()).err().expect("a device past the last cannot open");
            assert_eq!(
                e.to_string(),
                format!("there is no CUDA device {}: this machine has {}", list.len(), list.len())
            );
        }
        Err(e) => {
            assert!(matches!(e, CudaError::NotCompiled | CudaError::LibraryMissing { .. }), "{e}");
            eprintln!("skipped: no CUDA device ({e})");
        }
    }
}

/// The kernels compile with NVRTC alone, for Jetson Orin (8.7), Ampere
/// (8.0) and Hopper (9.0): a machine with NVRTC but no GPU (CI installs it
/// from PyPI) catches a kernel that does not compile.
#[test]
fn kernels_compile_with_nvrtc_for_jetson_and_desktop_gpus() {
    for arch in [(8, 7), (8, 0), (9, 0)] {
        match svp_cuda::compile_kernels(arch) {
            Ok(ptx) => {
                for kernel in
                    ["layer_norm_forward", "layer_norm_backward_rows", "softmax_xent", "fa_gradient", "adam", "sgd"]
                {
                    assert!(ptx.contains(&format!(".entry {kernel}")), "{kernel} missing from the PTX for {arch:?}");
                }
                let target = format!(".target sm_{}{}", arch.0, arch.1);
                assert!(ptx.contains(&target), "PTX for {arch:?} lacks {target}");
            }
            Err(e @ (CudaError::NotCompiled | CudaError::LibraryMissing { .. })) => {
                eprintln!("skipped: no NVRTC ({e})");
                return;
            }
            Err(e) => panic!("the kernels do not compile for {arch:?}: {e}"),
        }
    }
}

/// Empty buffers exist (the driver refuses to allocate zero bytes, so they
/// hold one element it never shows), and copies of nothing do nothing.
#[test]
fn empty_buffers_and_empty_copies_work() {
    let Some(gpu) = gpu() else { return };
    let mut empty = gpu.zeros(0).unwrap();
    assert_eq!((empty.len(), empty.is_empty()), (0, true));
    gpu.write(&mut empty, &[]).unwrap();
    gpu.download(&empty, &mut []).unwrap();
    let uploaded = gpu.upload(&[]).unwrap();
    assert!(uploaded.is_empty());
    gpu.copy(&uploaded, &mut empty, 0).unwrap();
    let e = gpu.download(&empty, &mut [0.0]).unwrap_err().to_string();
    assert!(e.contains("the buffer has 0 elements"), "{e}");
}
