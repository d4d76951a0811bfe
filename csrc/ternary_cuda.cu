// The decoding kernel of the packed ternary layer on Hopper GPUs (sm_90 and newer), for one row of
// x: ops.packed_linear_reference's RMSNorm, int8 activations, exact integer product with the 2-bit
// codes, rescale and epilogue, in one launch. Built at first use by ternary_kernels.py through
// torch.utils.cpp_extension (needs nvcc); where it does not build, the Triton kernel runs.
//
// Why by hand: a decoding step is a chain of small kernels, so what counts is how soon each one's
// weights arrive. Every block copies all of its packed rows (a few to a few dozen KB) from global to
// shared memory with the bulk-copy engine (cp.async.bulk), one copy and one mbarrier per packed row,
// issued as the block starts and before it waits for the previous kernel (programmatic dependent
// launch), as no kernel writes the weights. The weights of a layer are thus all requested at once and
// stream in while the previous kernel still runs; the block then reads the input row, and each warp
// multiplies its packed rows as they land.
//
// Layout (bitlinear.pack_ternary): packed byte (r, k) holds the codes c = w + 1 of output rows
// r, r + R, r + 2R, r + 3R in bit pairs 0, 2, 4, 6. Four bytes along k make a word that lines up
// with four int8 activations, so word & 0x03030303 are row r's codes and dp4a multiplies them
// (unsigned) with the activations (signed). Rows r + iR are masked in place (0x0C0C0C0C, ...),
// which multiplies their sums by 4^i exactly; they are shifted back at the end. And since
// sum(x * w) = sum(x * c) - sum(x), each sum starts from minus the activations' sum.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int kMaxVec = 16;        // 16-byte words of the row a lane holds: K <= 32 * 16 * 16 = 8192
constexpr int kMaxWarps = 16;      // warps per block
constexpr int kMaxRowsPerWarp = 8; // packed rows per warp (4 outputs each: one lane per output)
constexpr int kMinWarps = 8;       // warps per block at least: each thread holds up to kMaxGroups x 8 inputs
constexpr int kMaxGroups = 4;      // of the row, 8192 / (32 * kMinWarps * 8)

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ int dp4a_us(uint32_t codes, int x, int acc) {   // unsigned bytes x signed bytes
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(codes), "r"(x), "r"(acc));
  return d;
}

__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t phase) {
  uint32_t done;
  asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
               "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(bar), "r"(phase) : "memory");
  return done;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// v summed (MAX = false) or maximized over the block; every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < warps ? scratch[lane] : 0.0f;   // 0: the identity of both (maxima of |x| here)
  r = MAX ? warp_max(r) : warp_sum(r);
  __syncthreads();   // scratch is reused by the next reduction
  return r;
}

struct Params {
  const void* x;          // (K,) in T
  const void* norm;       // (K,) in T or float32 (norm_is_float); null: no RMSNorm
  const uint8_t* w;       // (R, K) packed codes
  const float* scale;     // (4R,) row scales
  const void* residual;   // (N,) in T, for epilogue 1
  void* y;                // (N,) in T
  int K, R, N, epilogue, rows_per_block, rows_per_warp, norm_is_float;
  float eps;
};

// Eight consecutive elements of a row (16-byte aligned) as float32.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float* out) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(src);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_float<T>(h[e]);
  }
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void expect_bytes(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32) packed_gemv_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = p.K, K16 = K / 16, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rows = p.rows_per_block, first = blockIdx.x * rows;
  const int mine = min(rows, p.R - first);                                  // this block's packed rows
  unsigned char* wsm = smem;                                                // (rows, K) codes
  int* xw = reinterpret_cast<int*>(smem + static_cast<size_t>(rows) * K);  // (K / 4) activation words
  uint64_t* bars = reinterpret_cast<uint64_t*>(xw + K / 4);                 // one mbarrier per packed row
  float* scratch = reinterpret_cast<float*>(bars + rows);

  // 1. Ask for every packed row of the block, each into shared memory on its own mbarrier.
  const int r0 = warp * p.rows_per_warp, nr = max(0, min(p.rows_per_warp, mine - r0));   // this warp's rows
  if (lane == 0) {
    for (int j = 0; j < nr; ++j)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(bars + r0 + j)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
    for (int j = 0; j < nr; ++j) {
      const uint32_t bar = smem_addr(bars + r0 + j);
      expect_bytes(bar, K);
      bulk_copy(wsm + static_cast<size_t>(r0 + j) * K, p.w + static_cast<size_t>(first + r0 + j) * K, K, bar);
    }
  }
  __syncwarp();
  // The row scales of this lane's output (lane 4j + i: output r + iR of the warp's j-th packed row), for
  // relu^2 the scale of its up row too, and this thread's eighths of the norm weight (groups of 8 inputs
  // t, t + threads, ...): nothing writes them either.
  const int oj = lane >> 2, oi = lane & 3, r_out = first + r0 + oj;
  const bool has_out = oj < nr && (p.epilogue != 2 || oi < 2);
  const int o = r_out + oi * p.R;
  float s = 0.0f, s_up = 0.0f;
  if (has_out) {
    s = p.scale[o];
    if (p.epilogue == 2) s_up = p.scale[o + 2 * p.R];
  }
  const int groups = K / 8;
  float nw[kMaxGroups][8];
#pragma unroll
  for (int i = 0; i < kMaxGroups; ++i) {
    const int g = threadIdx.x + i * blockDim.x;
#pragma unroll
    for (int e = 0; e < 8; ++e) nw[i][e] = 1.0f;
    if (p.norm != nullptr && g < groups) {
      if (p.norm_is_float) load8(static_cast<const float*>(p.norm) + 8 * g, nw[i]);
      else load8(static_cast<const T*>(p.norm) + 8 * g, nw[i]);
    }
  }

  // 2. Programmatic dependent launch: wait for the previous kernel (which writes x and the residual),
  // then let the next one start and ask for its own weights.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  float res = 0.0f;
  if (has_out && p.epilogue == 1 && o < p.N) res = to_float<T>(static_cast<const T*>(p.residual)[o]);

  // 3. The input row, read by every block for itself (a few KB, in L2): RMSNorm the way bitlinear.rms_norm
  // rounds it (as the Triton kernel's _normalize), absmax, int8, four to a word in shared memory.
  float xv[kMaxGroups][8];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxGroups; ++i) {
    const int g = threadIdx.x + i * blockDim.x;
#pragma unroll
    for (int e = 0; e < 8; ++e) xv[i][e] = 0.0f;
    if (g < groups) load8(static_cast<const T*>(p.x) + 8 * g, xv[i]);
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += xv[i][e] * xv[i][e];
  }
  constexpr bool lowp = !std::is_same<T, float>::value;
  float amax = 0.0f;
  if (p.norm != nullptr) {
    const float rstd = 1.0f / sqrtf(block_reduce<false>(ss, scratch) / K + p.eps);
#pragma unroll
    for (int i = 0; i < kMaxGroups; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float v = xv[i][e] * rstd;
        if (lowp) v = round_to<T>(v);                           // F.rms_norm(x.float()).to(x.dtype)
        v = v * nw[i][e];
        if (lowp && !p.norm_is_float) v = round_to<T>(v);      // weight * normed, both in T
        xv[i][e] = v;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxGroups; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(xv[i][e]));
  const float s_x = 127.0f / fmaxf(block_reduce<true>(amax, scratch), 1e-5f);
#pragma unroll
  for (int i = 0; i < kMaxGroups; ++i) {
    const int g = threadIdx.x + i * blockDim.x;
    if (g < groups) {
      uint32_t word[2] = {0, 0};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float c = fminf(fmaxf(rintf(xv[i][e] * s_x), -128.0f), 127.0f);
        word[e / 4] |= (static_cast<uint32_t>(static_cast<int>(c)) & 0xffu) << (8 * (e % 4));
      }
      reinterpret_cast<int2*>(xw)[g] = make_int2(static_cast<int>(word[0]), static_cast<int>(word[1]));
    }
  }
  __syncthreads();

  // 4. This lane's activations (16-byte words lane, lane + 32, ...) in registers, and minus their sum.
  int4 xa[kMaxVec];
  int neg = 0;
#pragma unroll
  for (int v = 0; v < kMaxVec; ++v) {
    const int c = lane + 32 * v;
    xa[v] = c < K16 ? reinterpret_cast<const int4*>(xw)[c] : make_int4(0, 0, 0, 0);
    neg -= __dp4a(xa[v].x, 0x01010101, 0) + __dp4a(xa[v].y, 0x01010101, 0) + __dp4a(xa[v].z, 0x01010101, 0) +
           __dp4a(xa[v].w, 0x01010101, 0);
  }

  // 5. Each of the warp's packed rows as it lands: four exact sums, reduced over the warp.
  for (int j = 0; j < nr; ++j) {
    const uint32_t bar = smem_addr(bars + r0 + j);
    while (!mbarrier_try_wait(bar, 0)) {}
    const int4* wr = reinterpret_cast<const int4*>(wsm + static_cast<size_t>(r0 + j) * K);
    int a0 = neg, a1 = 4 * neg, a2 = 16 * neg, a3 = 64 * neg;
#pragma unroll
    for (int v = 0; v < kMaxVec; ++v) {
      const int c = lane + 32 * v;
      if (32 * v < K16 && c < K16) {
        const int4 wv = wr[c];
        const uint32_t ws[4] = {static_cast<uint32_t>(wv.x), static_cast<uint32_t>(wv.y),
                                static_cast<uint32_t>(wv.z), static_cast<uint32_t>(wv.w)};
        const int xs[4] = {xa[v].x, xa[v].y, xa[v].z, xa[v].w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          a0 = dp4a_us(ws[u] & 0x03030303u, xs[u], a0);
          a1 = dp4a_us(ws[u] & 0x0C0C0C0Cu, xs[u], a1);
          a2 = dp4a_us(ws[u] & 0x30303030u, xs[u], a2);
          a3 = dp4a_us(ws[u] & 0xC0C0C0C0u, xs[u], a3);
        }
      }
    }
    for (int off = 16; off; off >>= 1) {
      a0 += __shfl_xor_sync(0xffffffffu, a0, off);
      a1 += __shfl_xor_sync(0xffffffffu, a1, off);
      a2 += __shfl_xor_sync(0xffffffffu, a2, off);
      a3 += __shfl_xor_sync(0xffffffffu, a3, off);
    }
    if (oj == j && has_out) {   // 6. the epilogue, one output per lane (relu^2: gate and up of one output)
      const int sums[4] = {a0, a1 >> 2, a2 >> 4, a3 >> 6};
      const int c = oi == 0 ? sums[0] : oi == 1 ? sums[1] : oi == 2 ? sums[2] : sums[3];
      const float yv = __fmul_rn(static_cast<float>(c), __fdiv_rn(s, s_x));
      T* y = static_cast<T*>(p.y);
      if (p.epilogue == 2) {
        const int cu = oi == 0 ? sums[2] : sums[3];
        const float up = __fmul_rn(static_cast<float>(cu), __fdiv_rn(s_up, s_x));
        const float g = fmaxf(yv, 0.0f);
        y[o] = from_float<T>(__fmul_rn(__fmul_rn(g, g), up));
      } else if (o < p.N) {
        y[o] = from_float<T>(p.epilogue == 1 ? __fadd_rn(yv, res) : yv);
      }
    }
  }
}

int sm_count(int device) {
  static int counts[64] = {0};
  if (!counts[device]) AT_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

constexpr int kMaxBlockWeights = 128 * 1024;   // shared memory for one block's packed rows

// The layout of a launch for R packed rows of K bytes: rows per block, rows per warp, warps.
std::tuple<int64_t, int64_t, int64_t, int64_t> plan(int64_t R, int64_t K, int64_t sms) {
  int64_t rows = (R + sms - 1) / sms;
  rows = std::min<int64_t>({rows, kMaxBlockWeights / K, kMaxWarps * kMaxRowsPerWarp});
  rows = std::max<int64_t>(rows, 1);
  const int64_t per_warp = (rows + kMaxWarps - 1) / kMaxWarps;
  const int64_t warps = std::max<int64_t>((rows + per_warp - 1) / per_warp, kMinWarps);
  return {rows, per_warp, warps, (R + rows - 1) / rows};
}

template <typename T>
void launch(const Params& p, int blocks, int threads, size_t smem, bool pdl, cudaStream_t stream) {
  static uint64_t raised = 0;   // the devices this kernel may take that much shared memory on
  int device;
  AT_CUDA_CHECK(cudaGetDevice(&device));
  if (!(raised >> device & 1)) {
    AT_CUDA_CHECK(cudaFuncSetAttribute(packed_gemv_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       kMaxBlockWeights + 8192 + 2048));   // + the activation words
    raised |= uint64_t(1) << device;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  AT_CUDA_CHECK(cudaLaunchKernelEx(&config, packed_gemv_kernel<T>, p));
}

// y (1, N) = packed_linear(x (1, K), ...) for one row of x, written into y.
void packed_gemv(torch::Tensor x, torch::Tensor norm_weight, torch::Tensor packed, torch::Tensor row_scale,
                 torch::Tensor residual, torch::Tensor y, int64_t out_features, int64_t epilogue, double eps,
                 bool pdl) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(), "packed_gemv: x must be one contiguous row");
  const int64_t K = x.size(1), R = packed.size(0);
  TORCH_CHECK(K % 16 == 0 && K <= 32 * kMaxVec * 16 && packed.size(1) == K && packed.is_contiguous() &&
              reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0, "packed_gemv: unsupported packed weights");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.numel() == 4 * R, "packed_gemv: row_scale");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (norm_weight.numel() == 0 ||
              (norm_weight.is_contiguous() && reinterpret_cast<uintptr_t>(norm_weight.data_ptr()) % 16 == 0)),
              "packed_gemv: x and the norm weight must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [rows, per_warp, warps, blocks] = plan(R, K, sm_count(x.get_device()));
  Params p;
  p.x = x.data_ptr();
  p.norm = norm_weight.numel() ? norm_weight.data_ptr() : nullptr;
  p.norm_is_float = norm_weight.scalar_type() == torch::kFloat32;
  p.w = packed.data_ptr<uint8_t>();
  p.scale = row_scale.data_ptr<float>();
  p.residual = epilogue == 1 ? residual.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.K = K, p.R = R, p.N = out_features, p.epilogue = epilogue;
  p.rows_per_block = rows, p.rows_per_warp = per_warp, p.eps = static_cast<float>(eps);
  const size_t smem = rows * K + K + rows * 8 + 32 * 4;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case torch::kFloat32: launch<float>(p, blocks, warps * 32, smem, pdl, stream); break;
    case torch::kBFloat16: launch<__nv_bfloat16>(p, blocks, warps * 32, smem, pdl, stream); break;
    case torch::kFloat16: launch<__half>(p, blocks, warps * 32, smem, pdl, stream); break;
    default: TORCH_CHECK(false, "packed_gemv: x must be float32, bfloat16 or float16");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_gemv", &packed_gemv, "the packed ternary layer for one row of x (Hopper)");
  m.def("plan", &plan, "rows per block, rows per warp, warps, blocks for R packed rows of K bytes on sms SMs");
}
