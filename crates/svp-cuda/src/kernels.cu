// svp's GPU kernels, compiled by NVRTC for the opened device's architecture.
// Sizes arrive as int: the host checks they fit before launching. Row-major
// matrices, as on the CPU. Every reduction runs in a fixed order (one block,
// a tree over 256 threads), so a GPU run gives the same bits every time.

// Kernels that reduce within a block are launched with exactly this many
// threads per block (a power of two, for the tree).
#define BLOCK 256

// The sum of `v` over the block's threads, in a fixed tree order; every
// thread gets it. `shared` holds BLOCK values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
    int t = threadIdx.x;
    shared[t] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) {
            shared[t] += shared[t + s];
        }
        __syncthreads();
    }
    T total = shared[0];
    __syncthreads();
    return total;
}

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

// One block per row: z += bias, then LayerNorm (xhat left in z, 1/std in
// rstd), then out = act(gamma * xhat + beta) with act ReLU or the identity.
extern "C" __global__ void layer_norm_forward(float* z, const float* bias, const float* gamma, const float* beta,
                                              float* rstd, float* out, int d, int relu) {
    __shared__ float shared[BLOCK];
    float* zr = z + (size_t)blockIdx.x * d;
    float* outr = out + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float v = zr[j] + bias[j];
        zr[j] = v;
        s += v;
    }
    float mean = block_sum(s, shared) / (float)d;
    float q = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float c = zr[j] - mean;
        q += c * c;
    }
    float var = block_sum(q, shared) / (float)d;
    float r = 1.0f / sqrtf(var + 1e-5f);
    if (threadIdx.x == 0) {
        rstd[blockIdx.x] = r;
    }
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float x = (zr[j] - mean) * r;
        zr[j] = x;
        float y = gamma[j] * x + beta[j];
        outr[j] = (relu && !(y > 0.0f)) ? 0.0f : y;
    }
}

// The gradient wrt the activation's input, from dy wrt its output (the
// input recomputed as gamma * xhat + beta, as the forward computed it).
__device__ float act_grad(float dy, float x, float g, float b, int relu) {
    return (relu && !(g * x + b > 0.0f)) ? 0.0f : dy;
}

// LayerNorm backward, first half, one thread per column: dbeta and dgamma
// from dy (still wrt the block's output). Runs before layer_norm_backward_rows
// overwrites dy.
extern "C" __global__ void layer_norm_backward_columns(const float* xhat, const float* gamma, const float* beta,
                                                       const float* dy, float* dgamma, float* dbeta, int rows, int d,
                                                       int relu) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < d) {
        float sb = 0.0f, sg = 0.0f;
        for (int r = 0; r < rows; ++r) {
            size_t i = (size_t)r * d + c;
            float g = act_grad(dy[i], xhat[i], gamma[c], beta[c], relu);
            sb += g;
            sg += g * xhat[i];
        }
        dbeta[c] = sb;
        dgamma[c] = sg;
    }
}

// LayerNorm backward, second half, one block per row: dy (wrt the block's
// output) becomes the gradient wrt z = x W^T + b, in place.
extern "C" __global__ void layer_norm_backward_rows(const float* xhat, const float* rstd, const float* gamma,
                                                    const float* beta, float* dy, int d, int relu) {
    __shared__ float shared[BLOCK];
    const float* xr = xhat + (size_t)blockIdx.x * d;
    float* dr = dy + (size_t)blockIdx.x * d;
    float s = 0.0f, sx = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float dxhat = act_grad(dr[j], xr[j], gamma[j], beta[j], relu) * gamma[j];
        dr[j] = dxhat;
        s += dxhat;
        sx += dxhat * xr[j];
    }
    float mean = block_sum(s, shared) / (float)d;
    float mean_x = block_sum(sx, shared) / (float)d;
    float r = rstd[blockIdx.x];
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        dr[j] = r * (dr[j] - mean - xr[j] * mean_x);
    }
}

// Softmax cross-entropy, one block for the whole batch: grad (rows x
// classes) = d mean loss / d logits; stats[0] = mean loss, stats[1] = rows
// whose first largest logit is the label's. Labels arrive as floats (exact
// below 2^24).
extern "C" __global__ void softmax_xent(const float* logits, const float* labels, float* grad, float* stats, int rows,
                                        int classes) {
    __shared__ double loss_shared[BLOCK];
    __shared__ int correct_shared[BLOCK];
    double loss = 0.0;
    int correct = 0;
    float inv_rows = 1.0f / (float)rows;
    for (int r = threadIdx.x; r < rows; r += BLOCK) {
        const float* v = logits + (size_t)r * classes;
        float* g = grad + (size_t)r * classes;
        int y = (int)labels[r];
        float best = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY macro)
        int arg = 0;
        for (int j = 0; j < classes; ++j) {
            if (v[j] > best) {
                best = v[j];
                arg = j;
            }
        }
        correct += arg == y;
        float z = 0.0f;
        for (int j = 0; j < classes; ++j) {
            g[j] = expf(v[j] - best);
            z += g[j];
        }
        loss += (double)(logf(z) - (v[y] - best));
        float inv_z = inv_rows / z;
        for (int j = 0; j < classes; ++j) {
            g[j] *= inv_z;
        }
        g[y] -= inv_rows;
    }
    loss = block_sum(loss, loss_shared);
    correct = block_sum(correct, correct_shared);
    if (threadIdx.x == 0) {
        stats[0] = (float)(loss / rows);
        stats[1] = (float)correct;
    }
}

// Feature alignment, one thread per row: normed = the row (mean-centred if
// asked) over (its norm + 1e-8); norms = that norm.
extern "C" __global__ void fa_normalize(const float* v, float* normed, float* norms, int rows, int d, int center) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) {
        const float* vr = v + (size_t)r * d;
        float* nr = normed + (size_t)r * d;
        float mean = 0.0f;
        if (center) {
            for (int j = 0; j < d; ++j) {
                mean += vr[j];
            }
            mean /= (float)d;
        }
        float sq = 0.0f;
        for (int j = 0; j < d; ++j) {
            float c = vr[j] - mean;
            nr[j] = c;
            sq += c * c;
        }
        float norm = sqrtf(sq);
        float inv = 1.0f / (norm + 1e-8f);
        for (int j = 0; j < d; ++j) {
            nr[j] *= inv;
        }
        norms[r] = norm;
    }
}

// Feature alignment, one block: target (S(v_prev), n = b*b values) becomes
// D = S(v) - S(v_prev), and stats[0] = sum of D^2 times inv_b2.
extern "C" __global__ void fa_difference(const float* sim, float* target, float* stats, int n, float inv_b2) {
    __shared__ double shared[BLOCK];
    double sq = 0.0;
    for (int i = threadIdx.x; i < n; i += BLOCK) {
        float dd = sim[i] - target[i];
        target[i] = dd;
        sq += (double)dd * (double)dd;
    }
    sq = block_sum(sq, shared);
    if (threadIdx.x == 0) {
        stats[0] = (float)(sq * (double)inv_b2);
    }
}

// Feature alignment, one thread per row: from dnormed = dL/dN, the gradient
// through the normalization, added (times weight) to dv.
extern "C" __global__ void fa_gradient(float* dnormed, const float* normed, const float* norms, float* dv, int rows,
                                       int d, int center, float weight) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) {
        float* dn = dnormed + (size_t)r * d;
        const float* nr = normed + (size_t)r * d;
        float norm = norms[r];
        if (norm > 0.0f) {
            float dot = 0.0f;
            for (int j = 0; j < d; ++j) {
                dot += nr[j] * dn[j];
            }
            float proj = dot / norm;
            float inv = 1.0f / (norm + 1e-8f);
            for (int j = 0; j < d; ++j) {
                dn[j] = dn[j] * inv - nr[j] * proj;
            }
        } else {
            for (int j = 0; j < d; ++j) {
                dn[j] /= 1e-8f;
            }
        }
        float mean = 0.0f;
        if (center) {
            for (int j = 0; j < d; ++j) {
                mean += dn[j];
            }
            mean /= (float)d;
        }
        float* out = dv + (size_t)r * d;
        for (int j = 0; j < d; ++j) {
            out[j] += weight * (dn[j] - mean);
        }
    }
}

__device__ float flush(float x) {
    return fabsf(x) < 1.17549435e-38f ? 0.0f : x;
}

// Adam (AdamW with l2 = 0 and decay = 1 - lr * wd), elementwise, the CPU's
// arithmetic (svp_optim::AdamStep::element).
extern "C" __global__ void adam(float* p, const float* g, float* m, float* v, int n, float beta1, float beta2,
                                float eps, float l2, float decay, float step, float inv_bc2_sqrt) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float w = p[i];
        float gi = g[i] + l2 * w;
        float mi = flush(beta1 * m[i] + (1.0f - beta1) * gi);
        float vi = flush(beta2 * v[i] + (1.0f - beta2) * gi * gi);
        float denom = sqrtf(vi) * inv_bc2_sqrt + eps;
        p[i] = w * decay - step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

// Plain SGD with L2 decay, elementwise, the CPU's arithmetic.
extern "C" __global__ void sgd(float* p, const float* g, int n, float lr, float weight_decay) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        p[i] -= lr * (g[i] + weight_decay * p[i]);
    }
}
