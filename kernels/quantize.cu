// int8 weight-only quantization, the GPU twin of `src/quant/int8.rs` (same operations in
// the same order, so the same bits). `common.cuh` is prepended by the loader.
//
// One block of 256 threads per (row, group). `src` holds `rows` rows of `cols` values in
// dtype `dt`; `q` gets `q + 128` per value, `scales` one stored scale (as f32) per group,
// `err` three partial sums per group (max |err|, sum err^2, sum x^2), `status[0]` the
// smallest row-major index of a non-finite value and `status[1]` the smallest index
// row * groups + group of a group whose scale overflows `scale_dt` (both left at LLONG_MAX
// when all is well).

extern "C" __global__ void quantize_int8(
    const unsigned char* __restrict__ src,
    int dt,
    long long rows,
    int cols,
    int group,
    int scale_dt,
    unsigned char* __restrict__ q,
    float* __restrict__ scales,
    float* __restrict__ err,
    long long* __restrict__ status)
{
    __shared__ float shf[BLOCK];
    __shared__ long long shl[BLOCK];
    __shared__ float scale;
    const int ng = (cols + group - 1) / group;
    const long long b = blockIdx.x;
    const long long row = b / ng;
    const int g = (int)(b % ng);
    if (row >= rows) {
        return;
    }
    const long long base = row * (long long)cols + (long long)g * group;
    const int n = min(group, cols - g * group);

    float amax = 0.0f;
    long long bad = 0x7fffffffffffffffLL;
    for (int j = threadIdx.x; j < n; j += BLOCK) {
        float x = load_as_f32(src, base + j, dt);
        if (!finite_f32(x) && base + j < bad) {
            bad = base + j;
        }
        amax = fmaxf(amax, fabsf(x));
    }
    amax = block_max(amax, shf);
    bad = block_min_ll(bad, shl);
    if (threadIdx.x == 0) {
        float s = round_to(__fdiv_rn(amax, 127.0f), scale_dt);
        if (bad != 0x7fffffffffffffffLL) {
            atomicMin((unsigned long long*)&status[0], (unsigned long long)bad);
            s = 0.0f;
        } else if (!finite_f32(s)) {
            atomicMin((unsigned long long*)&status[1], (unsigned long long)b);
            s = 0.0f;
        } else if (s == 0.0f && amax > 0.0f) {
            s = tiny_of(scale_dt);
        }
        scale = s;
        scales[b] = s;
    }
    __syncthreads();
    const float s = scale;
    float emax = 0.0f, esum = 0.0f, xsum = 0.0f;
    for (int j = threadIdx.x; j < n; j += BLOCK) {
        float x = load_as_f32(src, base + j, dt);
        float qf = 0.0f;
        if (s != 0.0f) {
            qf = fminf(fmaxf(rintf(__fdiv_rn(x, s)), -127.0f), 127.0f);
        }
        q[base + j] = (unsigned char)((int)qf + 128);
        float d = __fsub_rn(__fmul_rn(qf, s), x);
        emax = fmaxf(emax, fabsf(d));
        esum += d * d;
        xsum += x * x;
    }
    emax = block_max(emax, shf);
    esum = block_sum(esum, shf);
    xsum = block_sum(xsum, shf);
    if (threadIdx.x == 0) {
        err[3 * b] = emax;
        err[3 * b + 1] = esum;
        err[3 * b + 2] = xsum;
    }
}
