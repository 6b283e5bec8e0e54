// svp's GPU kernels, compiled by NVRTC for the opened device's architecture.
// Sizes arrive as int: the host checks they fit before launching.

extern "C" __global__ void add_bias(float* x, const float* bias, int rows, int cols, int relu) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) {
        float v = x[i] + bias[i % cols];
        x[i] = (relu && !(v > 0.0f)) ? 0.0f : v;
    }
}

extern "C" __global__ void relu_backward(float* grad, const float* output, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !(output[i] > 0.0f)) {
        grad[i] = 0.0f;
    }
}

// One thread per column; neighbouring threads read neighbouring addresses.
extern "C" __global__ void column_sums(const float* x, float* sums, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) {
            s += x[r * cols + c];
        }
        sums[c] = s;
    }
}
