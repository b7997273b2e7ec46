// Shared by every kernel: dtype codes and exact conversions, written with PTX `cvt` and bit
// operations so that no CUDA header is needed (NVRTC compiles these as they are).
// Codes: 0 = f32, 1 = f16, 2 = bf16.

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Nearest-even, as the CPU (`half::f16::from_f32`) rounds.
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Nearest-even with NaN kept quiet: the same bit operations as `half::bf16::from_f32`.
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);
    }
    unsigned int round_bit = 0x8000u;
    if ((u & round_bit) != 0 && (u & (3u * round_bit - 1u)) != 0) {
        return (unsigned short)((u >> 16) + 1u);
    }
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float load_as_f32(const unsigned char* p, long long i, int dt) {
    if (dt == DT_F32) {
        return ((const float*)p)[i];
    }
    unsigned short h = ((const unsigned short*)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// `s` rounded to the dtype and back.
__device__ __forceinline__ float round_to(float s, int dt) {
    if (dt == DT_BF16) {
        return bf16_to_f32(f32_to_bf16(s));
    }
    if (dt == DT_F16) {
        return f16_to_f32(f32_to_f16(s));
    }
    return s;
}

// Smallest positive value of the dtype.
__device__ __forceinline__ float tiny_of(int dt) {
    if (dt == DT_BF16) {
        return __uint_as_float(1u << 16);
    }
    if (dt == DT_F16) {
        return f16_to_f32((unsigned short)1);
    }
    return __uint_as_float(1u);
}

__device__ __forceinline__ bool finite_f32(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Block-wide reductions over 256 threads through shared memory.
#define BLOCK 256

__device__ __forceinline__ float block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] += sh[threadIdx.x + s];
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ long long block_min_ll(long long v, long long* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && sh[threadIdx.x + s] < sh[threadIdx.x]) {
            sh[threadIdx.x] = sh[threadIdx.x + s];
        }
        __syncthreads();
    }
    long long r = sh[0];
    __syncthreads();
    return r;
}
