// Float casts (f32 / f16 / bf16 to f32 / f16 / bf16), nearest-even, the GPU twin of
// `quantize::cast_value`. `common.cuh` is prepended by the loader.
//
// Grid-stride over `n` values. `overflow` counts finite values that became infinite,
// `status[0]` gets the smallest index of a non-finite input, and `err` three partial sums
// per block (max |err|, sum err^2, sum x^2).

extern "C" __global__ void cast_float(
    const unsigned char* __restrict__ src,
    int from,
    unsigned char* __restrict__ dst,
    int to,
    long long n,
    unsigned long long* __restrict__ overflow,
    float* __restrict__ err,
    long long* __restrict__ status)
{
    __shared__ float shf[BLOCK];
    __shared__ long long shl[BLOCK];
    float emax = 0.0f, esum = 0.0f, xsum = 0.0f;
    unsigned long long over = 0;
    long long bad = 0x7fffffffffffffffLL;
    const long long stride = (long long)gridDim.x * BLOCK;
    for (long long i = (long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        float x = load_as_f32(src, i, from);
        float back = x;
        if (to == DT_F32) {
            ((float*)dst)[i] = x;
        } else if (to == DT_F16) {
            unsigned short h = f32_to_f16(x);
            ((unsigned short*)dst)[i] = h;
            back = f16_to_f32(h);
        } else {
            unsigned short h = f32_to_bf16(x);
            ((unsigned short*)dst)[i] = h;
            back = bf16_to_f32(h);
        }
        if (!finite_f32(x)) {
            if (i < bad) {
                bad = i;
            }
        } else if (!finite_f32(back)) {
            over += 1;
        } else {
            float d = fabsf(back - x);
            emax = fmaxf(emax, d);
            esum += d * d;
        }
        xsum += x * x;
    }
    if (over != 0) {
        atomicAdd(overflow, over);
    }
    bad = block_min_ll(bad, shl);
    emax = block_max(emax, shf);
    esum = block_sum(esum, shf);
    xsum = block_sum(xsum, shf);
    if (threadIdx.x == 0) {
        if (bad != 0x7fffffffffffffffLL) {
            atomicMin((unsigned long long*)&status[0], (unsigned long long)bad);
        }
        err[3 * blockIdx.x] = emax;
        err[3 * blockIdx.x + 1] = esum;
        err[3 * blockIdx.x + 2] = xsum;
    }
}
