//! [`Backend`] on an NVIDIA GPU: svp-cuda's cuBLAS GEMM and NVRTC kernels.

use super::{AdamScalars, Backend, CudaError};
use svp_cuda::{Gpu, GpuBuffer};

impl Backend for Gpu {
    type Buffer = GpuBuffer;

    fn zeros(&self, len: usize) -> Result<GpuBuffer, CudaError> {
        Gpu::zeros(self, len)
    }

    fn write(&self, dst: &mut GpuBuffer, values: &[f32]) -> Result<(), CudaError> {
        Gpu::write(self, dst, values)
    }

    fn read(&self, src: &GpuBuffer, out: &mut [f32]) -> Result<(), CudaError> {
        Gpu::download(self, src, out)
    }

    fn copy(&self, src: &GpuBuffer, dst: &mut GpuBuffer, n: usize) -> Result<(), CudaError> {
        Gpu::copy(self, src, dst, n)
    }

    fn gemm(
        &self,
        transpose_a: bool,
        transpose_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &GpuBuffer,
        b: &GpuBuffer,
        beta: f32,
        c: &mut GpuBuffer,
    ) -> Result<(), CudaError> {
        Gpu::gemm(self, transpose_a, transpose_b, m, n, k, alpha, a, b, beta, c)
    }

    fn linear(
        &self,
        x: &GpuBuffer,
        w: &GpuBuffer,
        bias: &GpuBuffer,
        out: &mut GpuBuffer,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        Gpu::gemm(self, false, true, rows, out_dim, in_dim, 1.0, x, w, 0.0, out)?;
        Gpu::add_bias(self, out, bias, rows, out_dim, relu)
    }

    fn relu_backward(&self, grad: &mut GpuBuffer, output: &GpuBuffer, n: usize) -> Result<(), CudaError> {
        Gpu::relu_backward(self, grad, output, n)
    }

    fn column_sums(&self, x: &GpuBuffer, rows: usize, cols: usize, sums: &mut GpuBuffer) -> Result<(), CudaError> {
        Gpu::column_sums(self, x, rows, cols, sums)
    }

    fn layer_norm_forward(
        &self,
        z: &mut GpuBuffer,
        bias: &GpuBuffer,
        gamma: &GpuBuffer,
        beta: &GpuBuffer,
        rstd: &mut GpuBuffer,
        out: &mut GpuBuffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        Gpu::layer_norm_forward(self, z, bias, gamma, beta, rstd, out, rows, d, relu)
    }

    fn layer_norm_backward(
        &self,
        xhat: &GpuBuffer,
        rstd: &GpuBuffer,
        gamma: &GpuBuffer,
        beta: &GpuBuffer,
        dy: &mut GpuBuffer,
        dgamma: &mut GpuBuffer,
        dbeta: &mut GpuBuffer,
        dbias: &mut GpuBuffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        Gpu::layer_norm_backward(self, xhat, rstd, gamma, beta, dy, dgamma, dbeta, dbias, rows, d, relu)
    }

    fn softmax_xent(
        &self,
        logits: &GpuBuffer,
        labels: &GpuBuffer,
        grad: &mut GpuBuffer,
        stats: &mut GpuBuffer,
        slot: usize,
        rows: usize,
        classes: usize,
    ) -> Result<(), CudaError> {
        Gpu::softmax_xent(self, logits, labels, grad, stats, slot, rows, classes)
    }

    fn fa_normalize(
        &self,
        v: &GpuBuffer,
        normed: &mut GpuBuffer,
        norms: &mut GpuBuffer,
        rows: usize,
        d: usize,
        center: bool,
    ) -> Result<(), CudaError> {
        Gpu::fa_normalize(self, v, normed, norms, rows, d, center)
    }

    fn fa_difference(
        &self,
        sim: &GpuBuffer,
        target: &mut GpuBuffer,
        stats: &mut GpuBuffer,
        slot: usize,
        b: usize,
    ) -> Result<(), CudaError> {
        Gpu::fa_difference(self, sim, target, stats, slot, b)
    }

    fn fa_gradient(
        &self,
        dnormed: &mut GpuBuffer,
        normed: &GpuBuffer,
        norms: &GpuBuffer,
        dv: &mut GpuBuffer,
        rows: usize,
        d: usize,
        center: bool,
        weight: f32,
    ) -> Result<(), CudaError> {
        Gpu::fa_gradient(self, dnormed, normed, norms, dv, rows, d, center, weight)
    }

    fn sgd(
        &self,
        params: &mut GpuBuffer,
        grad: &GpuBuffer,
        n: usize,
        lr: f32,
        weight_decay: f32,
    ) -> Result<(), CudaError> {
        Gpu::sgd(self, params, grad, n, lr, weight_decay)
    }

    fn memory_in_use(&self) -> Option<usize> {
        Gpu::memory_in_use(self).ok()
    }

    fn adam(
        &self,
        params: &mut GpuBuffer,
        grad: &GpuBuffer,
        m: &mut GpuBuffer,
        v: &mut GpuBuffer,
        n: usize,
        scalars: AdamScalars,
    ) -> Result<(), CudaError> {
        Gpu::adam(self, params, grad, m, v, n, scalars)
    }
}
