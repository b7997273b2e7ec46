// The forward pass of the runtime on the GPU: activations in f32, weights as stored.
// `common.cuh` is prepended by the loader. Every kernel has a CPU twin in
// `src/gpu/twins.rs` that makes the same operations in the same order (the tests compare
// the twins with the CPU runtime; `xtask gpu-check` compares each kernel with its twin).
//
// Weight type codes (`wt`): 0 = f32, 1 = f16, 2 = bf16, 3 = int8 stored as q + 128,
// 4 = int8. int8 rows carry f32 scales, `ceil(cols / group)` per row.

#define WT_U8OFF 3
#define WT_I8 4

// Element `e` of a weight array of type `wt`, as f32 (int8 without its scale).
__device__ __forceinline__ float wload(const unsigned char* w, int wt, long long e) {
    if (wt == WT_U8OFF) {
        return (float)((int)w[e] - 128);
    }
    if (wt == WT_I8) {
        return (float)(signed char)w[e];
    }
    return load_as_f32(w, e, wt);
}

// Elements `e..e+8` (e a multiple of 8, the array 16-byte aligned) with wide loads.
__device__ __forceinline__ void wload8(const unsigned char* w, int wt, long long e, float* v) {
    if (wt == DT_F32) {
        const float4* p = (const float4*)(w + 4 * e);
        float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else if (wt == DT_F16 || wt == DT_BF16) {
        uint4 u = *(const uint4*)(w + 2 * e);
        unsigned int s[4] = {u.x, u.y, u.z, u.w};
        for (int k = 0; k < 4; k++) {
            unsigned short lo = (unsigned short)(s[k] & 0xffffu);
            unsigned short hi = (unsigned short)(s[k] >> 16);
            v[2 * k] = wt == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            v[2 * k + 1] = wt == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
    } else {
        uint2 u = *(const uint2*)(w + e);
        unsigned int s[2] = {u.x, u.y};
        for (int k = 0; k < 8; k++) {
            unsigned int b = (s[k / 4] >> (8 * (k % 4))) & 0xffu;
            v[k] = wt == WT_U8OFF ? (float)((int)b - 128) : (float)(signed char)b;
        }
    }
}

// Rows of an embedding table: out[i][j] = table[tokens[i]][j] (int8 times its scale).
// One block per token.
extern "C" __global__ void embed_rows(
    const unsigned char* __restrict__ table,
    int wt,
    const float* __restrict__ scales,
    int group,
    const unsigned int* __restrict__ tokens,
    int h,
    float* __restrict__ out)
{
    const long long i = blockIdx.x;
    const long long row = tokens[i];
    const int ng = (h + group - 1) / group;
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        float v = wload(table, wt, row * h + j);
        if (wt == WT_U8OFF || wt == WT_I8) {
            v = __fmul_rn(v, scales[row * ng + j / group]);
        }
        out[i * h + j] = v;
    }
}

// transformers' LlamaRMSNorm in f32: out = w * (x * (1 / sqrt(mean(x^2) + eps))). One block
// per row; thread k sums x[k], x[k + 256], ... in order, then the block's tree.
extern "C" __global__ void rms_norm(
    const float* __restrict__ x,
    const float* __restrict__ w,
    int h,
    float eps,
    float* __restrict__ out)
{
    __shared__ float sh[BLOCK];
    const long long base = (long long)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        float v = x[base + j];
        ss = __fadd_rn(ss, __fmul_rn(v, v));
    }
    ss = block_sum(ss, sh);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)h), eps)));
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        out[base + j] = __fmul_rn(w[j], __fmul_rn(x[base + j], r));
    }
}

// Splits a batch of fused QKV rows into rotated queries (q[i][head][d]) and appends the
// rotated keys and the values to one layer's cache (k_cache[group][pos][d], `cap`
// positions per group) at positions p0 + i. `order` 0: [q heads; k; v]; 1: per group
// [its q heads; k; v]. cos/sin: `t × hd/2`. Rotate-half RoPE. Grid (t, heads + 2 kv_heads).
extern "C" __global__ void rope_qkv(
    const float* __restrict__ qkv,
    int heads,
    int kv_heads,
    int hd,
    int order,
    const float* __restrict__ cos_t,
    const float* __restrict__ sin_t,
    int p0,
    int cap,
    float* __restrict__ q,
    float* __restrict__ k_cache,
    float* __restrict__ v_cache)
{
    const int i = blockIdx.x;
    const int slot = blockIdx.y;
    const int per = heads / kv_heads;
    const int width = (heads + 2 * kv_heads) * hd;
    const int half = hd / 2;
    // Which head this block moves (kind 0 q, 1 k, 2 v; index) and where it starts.
    int kind, idx;
    if (slot < heads) {
        kind = 0; idx = slot;
    } else if (slot < heads + kv_heads) {
        kind = 1; idx = slot - heads;
    } else {
        kind = 2; idx = slot - heads - kv_heads;
    }
    int at;
    if (order == 0) {
        at = kind == 0 ? idx * hd : kind == 1 ? (heads + idx) * hd : (heads + kv_heads + idx) * hd;
    } else {
        at = kind == 0 ? ((idx / per) * (per + 2) + idx % per) * hd
           : kind == 1 ? (idx * (per + 2) + per) * hd
                       : (idx * (per + 2) + per + 1) * hd;
    }
    const float* src = qkv + (long long)i * width + at;
    float* dst;
    if (kind == 0) {
        dst = q + ((long long)i * heads + idx) * hd;
    } else {
        float* c = kind == 1 ? k_cache : v_cache;
        dst = c + ((long long)idx * cap + p0 + i) * hd;
    }
    if (kind == 2) {
        for (int j = threadIdx.x; j < hd; j += BLOCK) {
            dst[j] = src[j];
        }
        return;
    }
    for (int j = threadIdx.x; j < half; j += BLOCK) {
        const float a = src[j], b = src[j + half];
        const float c = cos_t[i * half + j], s = sin_t[i * half + j];
        dst[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        dst[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// Causal grouped-query attention of queries at positions p0..p0+t against one layer's
// cache: out[i][h] = softmax(q k^T / sqrt(hd)) v over positions 0..=p0+i. One block per
// (head, query); `scores` holds `t × heads × (p0 + t)` floats of scratch. Decoding is t = 1.
extern "C" __global__ void attention(
    const float* __restrict__ q,
    const float* __restrict__ k_cache,
    const float* __restrict__ v_cache,
    int heads,
    int kv_heads,
    int hd,
    int p0,
    int t,
    int cap,
    float* __restrict__ scores,
    float* __restrict__ out)
{
    __shared__ float sh[BLOCK];
    const int hh = blockIdx.x;
    const int i = blockIdx.y;
    const int g = hh / (heads / kv_heads);
    const int n = p0 + i + 1;
    const float scale = __fsqrt_rn((float)hd);
    const float* qv = q + ((long long)i * heads + hh) * hd;
    const float* kg = k_cache + (long long)g * cap * hd;
    const float* vg = v_cache + (long long)g * cap * hd;
    float* sc = scores + ((long long)i * heads + hh) * (p0 + t);
    float mx = __int_as_float(0xff800000);
    for (int p = threadIdx.x; p < n; p += BLOCK) {
        float s = 0.0f;
        for (int d = 0; d < hd; d++) {
            s = __fadd_rn(s, __fmul_rn(qv[d], kg[(long long)p * hd + d]));
        }
        s = __fdiv_rn(s, scale);
        sc[p] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < n; p += BLOCK) {
        float e = expf(__fsub_rn(sc[p], mx));
        sc[p] = e;
        sum = __fadd_rn(sum, e);
    }
    sum = block_sum(sum, sh);
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += BLOCK) {
        float o = 0.0f;
        for (int p = 0; p < n; p++) {
            o = __fadd_rn(o, __fmul_rn(__fdiv_rn(sc[p], sum), vg[(long long)p * hd + d]));
        }
        out[((long long)i * heads + hh) * hd + d] = o;
    }
}

// SwiGLU: act[i][j] = silu(gate[i][j]) * up[i][j] of rows [gate (ffn); up (ffn)].
extern "C" __global__ void silu_mul(
    const float* __restrict__ gu,
    long long t,
    int ffn,
    float* __restrict__ act)
{
    const long long n = t * ffn;
    for (long long e = blockIdx.x * (long long)BLOCK + threadIdx.x; e < n;
         e += (long long)gridDim.x * BLOCK) {
        const long long i = e / ffn;
        const int j = (int)(e % ffn);
        const float g = gu[i * 2 * ffn + j];
        const float u = gu[i * 2 * ffn + ffn + j];
        act[e] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
    }
}

// The residual: x += o.
extern "C" __global__ void add_into(float* __restrict__ x, const float* __restrict__ o, long long n)
{
    for (long long e = blockIdx.x * (long long)BLOCK + threadIdx.x; e < n;
         e += (long long)gridDim.x * BLOCK) {
        x[e] = __fadd_rn(x[e], o[e]);
    }
}

// Tokens per pass of `matvec` over a row: each weight is read once per 4 tokens.
#define TOK 4

// y[i][r] = sum_c w[r][c] x[i][c] for t tokens, in f32. One warp per row, 8 rows per block.
// The row is read in chunks of `chunk` (8: wide loads; 1 when cols or the group is not a
// multiple of 8) values: lane l takes chunks l, l + 32, ... and adds each chunk's dot
// product (in order; times its group's scale for int8) to its sum; the 32 sums are then
// added by an xor butterfly (offsets 16, 8, 4, 2, 1).
extern "C" __global__ void matvec(
    const unsigned char* __restrict__ w,
    int wt,
    const float* __restrict__ scales,
    int group,
    int chunk,
    const float* __restrict__ x,
    int t,
    long long rows,
    int cols,
    float* __restrict__ y)
{
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (BLOCK / 32) + (threadIdx.x >> 5);
    if (r >= rows) {
        return;
    }
    const bool int8 = wt == WT_U8OFF || wt == WT_I8;
    const int ng = (cols + group - 1) / group;
    const int chunks = cols / chunk;
    const long long base = r * cols;
    for (int i0 = 0; i0 < t; i0 += TOK) {
        const int nt = min(TOK, t - i0);
        float acc[TOK] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int c = lane; c < chunks; c += 32) {
            const int c0 = c * chunk;
            float v[8];
            if (chunk == 8) {
                wload8(w, wt, base + c0, v);
            } else {
                v[0] = wload(w, wt, base + c0);
            }
            const float s = int8 ? scales[r * ng + c0 / group] : 1.0f;
            for (int k = 0; k < nt; k++) {
                const float* xi = x + (long long)(i0 + k) * cols + c0;
                float d = 0.0f;
                for (int j = 0; j < chunk; j++) {
                    d = __fadd_rn(d, __fmul_rn(v[j], xi[j]));
                }
                if (int8) {
                    d = __fmul_rn(d, s);
                }
                acc[k] = __fadd_rn(acc[k], d);
            }
        }
        for (int k = 0; k < nt; k++) {
            float a = acc[k];
            for (int off = 16; off > 0; off >>= 1) {
                a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, off));
            }
            if (lane == 0) {
                y[(long long)(i0 + k) * rows + r] = a;
            }
        }
    }
}

// The index of the largest of n values, the lowest of equals (greedy decoding's pick).
// One block: thread k scans k, k + 256, ... (keeping its first value and any larger
// one), then the block's tree keeps the larger value, or the lower index on ties.
extern "C" __global__ void argmax(const float* __restrict__ x, int n, int* __restrict__ out)
{
    __shared__ float sv[BLOCK];
    __shared__ int si[BLOCK];
    float best = __int_as_float(0xff800000);
    int bi = -1;
    for (int j = threadIdx.x; j < n; j += BLOCK) {
        if (bi < 0 || x[j] > best) {
            best = x[j];
            bi = j;
        }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = sv[threadIdx.x + s];
            const int oi = si[threadIdx.x + s];
            const int mi = si[threadIdx.x];
            if (oi >= 0 && (mi < 0 || ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < mi))) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = si[0];
    }
}
