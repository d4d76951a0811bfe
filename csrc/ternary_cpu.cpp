// The CPU kernels of the packed ternary layer (ops.packed_linear_reference computes the same
// thing, bit for bit) and of a float16-weight linear for the lm_head. Built at first use by
// cpu_kernels.py through torch.utils.cpp_extension with -march=native, so the instruction set
// paths below are chosen at compile time for the machine that runs them:
//   AVX-512 VNNI  vpdpbusd: 64 unsigned 2-bit codes x 64 int8 activations -> 16 int32 sums
//   AVX2          vpmaddubsw + vpmaddwd: the same product, 32 bytes at a time
//   NEON          sdot (where the dot product extension is there) or widening multiplies
//   scalar        everything else
//
// Weights stay in the Hugging Face offline layout that packed.py holds (bitlinear.pack_ternary):
// packed row r (K bytes) holds output rows r, r + R, r + 2R, r + 3R in bit pairs 0, 2, 4, 6 as
// codes c = w + 1 in {0, 1, 2}. One pass over a packed row therefore gives four output rows:
//     sum_k w_i[k] x[k] = sum_k c_i[k] x[k] - sum_k x[k]
// and the codes multiply as unsigned bytes against the signed int8 activations, exactly in int32
// (|sum| <= 2 * 128 * K). Nothing is unpacked or copied per call.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

// The four sums of one packed row (K bytes at w) against one int8 activation row x:
// acc[i] = sum_k code_i(w[k]) * x[k], i = 0..3 (code_i: bit pair i). Accumulators are named
// variables, not arrays, so that they stay in registers.
void codes_dot1(const uint8_t* w, const int8_t* x, int64_t K, int32_t* acc) {
  int64_t k = 0;
  int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  {
    const __m512i three = _mm512_set1_epi8(3);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (; k < K; k += 64) {
      const __mmask64 mask = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;  // the tail, masked
      const __m512i p = _mm512_maskz_loadu_epi8(mask, w + k);
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + k);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(p, three), xv);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(p, 2), three), xv);
      a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(_mm512_srli_epi16(p, 4), three), xv);
      a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(_mm512_srli_epi16(p, 6), three), xv);
    }
    s0 = _mm512_reduce_add_epi32(a0), s1 = _mm512_reduce_add_epi32(a1);
    s2 = _mm512_reduce_add_epi32(a2), s3 = _mm512_reduce_add_epi32(a3);
  }
#elif defined(__AVX2__)
  {
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    // pairs of u8 x s8 products in int16 (|c0 x0 + c1 x1| <= 512, no saturation), then int32
#define TERNARY_AVX2_DOT(a, c) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones))
    for (; k + 32 <= K; k += 32) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      TERNARY_AVX2_DOT(a0, _mm256_and_si256(p, three));
      TERNARY_AVX2_DOT(a1, _mm256_and_si256(_mm256_srli_epi16(p, 2), three));
      TERNARY_AVX2_DOT(a2, _mm256_and_si256(_mm256_srli_epi16(p, 4), three));
      TERNARY_AVX2_DOT(a3, _mm256_and_si256(_mm256_srli_epi16(p, 6), three));
    }
#undef TERNARY_AVX2_DOT
    auto hsum = [](__m256i a) {
      const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
      return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1)));
    };
    s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
  }
#elif defined(__ARM_NEON) && defined(__aarch64__)
  {
    const uint8x16_t three = vdupq_n_u8(3);
    int32x4_t a0 = vdupq_n_s32(0), a1 = a0, a2 = a0, a3 = a0;
#if defined(__ARM_FEATURE_DOTPROD)
#define TERNARY_NEON_DOT(a, c) a = vdotq_s32(a, vreinterpretq_s8_u8(c), xv)
#else  // widening products, pairs summed in int16 (|sum of 2| <= 512), then int32
#define TERNARY_NEON_DOT(a, c) a = vpadalq_s16(a, vmlal_s8(vmull_s8(vget_low_s8(vreinterpretq_s8_u8(c)), \
    vget_low_s8(xv)), vget_high_s8(vreinterpretq_s8_u8(c)), vget_high_s8(xv)))
#endif
    for (; k + 16 <= K; k += 16) {
      const uint8x16_t p = vld1q_u8(w + k);
      const int8x16_t xv = vld1q_s8(x + k);
      TERNARY_NEON_DOT(a0, vandq_u8(p, three));
      TERNARY_NEON_DOT(a1, vandq_u8(vshrq_n_u8(p, 2), three));
      TERNARY_NEON_DOT(a2, vandq_u8(vshrq_n_u8(p, 4), three));
      TERNARY_NEON_DOT(a3, vshrq_n_u8(p, 6));
    }
#undef TERNARY_NEON_DOT
    s0 = vaddvq_s32(a0), s1 = vaddvq_s32(a1), s2 = vaddvq_s32(a2), s3 = vaddvq_s32(a3);
  }
#endif
  for (; k < K; k++) {  // what the vector loop left (all of it without one)
    const int32_t p = w[k], xv = x[k];
    s0 += (p & 3) * xv, s1 += ((p >> 2) & 3) * xv, s2 += ((p >> 4) & 3) * xv, s3 += (p >> 6) * xv;
  }
  acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3;
}

// The same for four activation rows (x, x + xstride, x + 2 xstride, x + 3 xstride) ->
// acc[m * 4 + i]: prefill. With VNNI the codes are extracted once for the four rows (16
// accumulators in registers); elsewhere four passes of codes_dot1 (the packed row is in L1).
void codes_dot4(const uint8_t* w, const int8_t* x, int64_t xstride, int64_t K, int32_t* acc) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const __m512i three = _mm512_set1_epi8(3);
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
          a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define TERNARY_VNNI_ROW(m, b0, b1, b2, b3)                           \
  {                                                                   \
    const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + m * xstride + k); \
    b0 = _mm512_dpbusd_epi32(b0, c0, xv);                             \
    b1 = _mm512_dpbusd_epi32(b1, c1, xv);                             \
    b2 = _mm512_dpbusd_epi32(b2, c2, xv);                             \
    b3 = _mm512_dpbusd_epi32(b3, c3, xv);                             \
  }
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;
    const __m512i p = _mm512_maskz_loadu_epi8(mask, w + k);
    const __m512i c0 = _mm512_and_si512(p, three), c1 = _mm512_and_si512(_mm512_srli_epi16(p, 2), three),
                  c2 = _mm512_and_si512(_mm512_srli_epi16(p, 4), three),
                  c3 = _mm512_and_si512(_mm512_srli_epi16(p, 6), three);
    TERNARY_VNNI_ROW(0, a00, a01, a02, a03)
    TERNARY_VNNI_ROW(1, a10, a11, a12, a13)
    TERNARY_VNNI_ROW(2, a20, a21, a22, a23)
    TERNARY_VNNI_ROW(3, a30, a31, a32, a33)
  }
#undef TERNARY_VNNI_ROW
  const __m512i all[16] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33};
  for (int j = 0; j < 16; j++) acc[j] = _mm512_reduce_add_epi32(all[j]);
#else
  for (int m = 0; m < 4; m++) codes_dot1(w, x + m * xstride, K, acc + 4 * m);
#endif
}

}  // namespace

// ops.packed_linear_reference, computed the same way: the RMSNorm through ATen (the same
// function F.rms_norm calls), per-token int8 quantization with s_x = 127 / max|x| (which torch
// computes as reciprocal(max|x|) * 127; round half to even, as torch.round), the exact integer
// product, y * (row_scale / s_x) in float32, the epilogue (0 none, 1 + residual,
// 2 relu(gate)^2 * up), then x's dtype. Built with
// -ffp-contract=off so no multiply and add fuse into an FMA that the reference does not do.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor norm_weight, torch::Tensor packed, torch::Tensor row_scale,
                            torch::Tensor residual, int64_t out_features, int64_t epilogue, double eps) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && packed.scalar_type() == torch::kUInt8, "packed_linear: bad shapes");
  const auto dtype = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1), R = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && row_scale.numel() == 4 * R, "packed_linear: x, packed, row_scale disagree");
  if (norm_weight.numel())
    x = norm_weight * at::rms_norm(x.to(torch::kFloat), {K}, c10::nullopt, eps).to(dtype);
  auto xf = x.to(torch::kFloat).contiguous();
  auto pk = packed.contiguous();
  auto rs = row_scale.to(torch::kFloat).contiguous();
  torch::Tensor res;
  if (epilogue == 1) res = residual.to(torch::kFloat).contiguous();

  // int8 activations, their per-row sums and scales
  std::vector<int8_t> xq(M * K);
  std::vector<int32_t> xsum(M);
  std::vector<float> sx(M);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      const float* row = xp + m * K;
      float amax = 0.0f;
      for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(row[k]));
      const float s = (1.0f / std::max(amax, 1e-5f)) * 127.0f;  // as torch computes 127.0 / tensor
      int32_t sum = 0;
      for (int64_t k = 0; k < K; k++) {
        const float q = std::min(std::max(std::nearbyint(row[k] * s), -128.0f), 127.0f);
        xq[m * K + k] = static_cast<int8_t>(q);
        sum += static_cast<int32_t>(q);
      }
      sx[m] = s;
      xsum[m] = sum;
    }
  });

  auto out = torch::empty({M, out_features}, xf.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = pk.data_ptr<uint8_t>();
  const float* sp = rs.data_ptr<float>();
  const float* rp = epilogue == 1 ? res.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    int32_t acc[16];
    for (int64_t r = r0; r < r1; r++) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {   // four activation rows per pass over the packed row
        const int nm = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (nm == 4)
          codes_dot4(wp + r * K, xq.data() + m0 * K, K, K, acc);
        else
          for (int m = 0; m < nm; m++) codes_dot1(wp + r * K, xq.data() + (m0 + m) * K, K, acc + 4 * m);
        for (int m = 0; m < nm; m++) {
          const int64_t mm = m0 + m;
          float y[4];
          for (int i = 0; i < 4; i++)
            y[i] = static_cast<float>(acc[m * 4 + i] - xsum[mm]) * (sp[r + i * R] / sx[mm]);
          if (epilogue == 2) {   // rows [0, out) gate, [out, 2 out) up, R = out / 2
            for (int i = 0; i < 2; i++) {
              const float g = y[i] > 0.0f ? y[i] : 0.0f;
              op[mm * out_features + r + i * R] = (g * g) * y[i + 2];
            }
          } else {
            for (int i = 0; i < 4; i++) {
              const int64_t j = r + i * R;
              if (j < out_features)
                op[mm * out_features + j] = epilogue == 1 ? y[i] + rp[mm * out_features + j] : y[i];
            }
          }
        }
      }
    }
  });
  return dtype == torch::kFloat ? out : out.to(dtype);
}

// y (M, N) float32 = x (M, K) float32 @ w (N, K)^T with float16 weights (the lm_head),
// accumulated in float32: each weight is widened exactly (F16C / NEON vcvt), never x rounded.
torch::Tensor linear_f16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.scalar_type() == torch::kHalf && x.size(1) == w.size(1),
              "linear_f16: x (M, K) and float16 w (N, K)");
  auto xf = x.to(torch::kFloat).contiguous();
  auto wc = w.contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = wc.size(0);
  auto out = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const at::Half* wp = wc.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const at::Half* row = wp + n * K;
      for (int64_t m = 0; m < M; m++) {
        const float* xr = xp + m * K;
        int64_t k = 0;
        float s = 0.0f;
#if defined(__AVX512F__)
        __m512 a = _mm512_setzero_ps();
        for (; k + 16 <= K; k += 16)
          a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k))),
                              _mm512_loadu_ps(xr + k), a);
        s = _mm512_reduce_add_ps(a);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        __m256 a = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8)
          a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))),
                              _mm256_loadu_ps(xr + k), a);
        float t[8];
        _mm256_storeu_ps(t, a);
        for (int i = 0; i < 8; i++) s += t[i];
#elif defined(__ARM_NEON) && defined(__aarch64__)
        float32x4_t a = vdupq_n_f32(0.0f);
        for (; k + 4 <= K; k += 4)
          a = vfmaq_f32(a, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(row + k)))),
                        vld1q_f32(xr + k));
        s = vaddvq_f32(a);
#endif
        for (; k < K; k++) s += static_cast<float>(row[k]) * xr[k];
        op[m * N + n] = s;
      }
    }
  });
  return out;
}

// which vector path this build took, for the notice and the benchmark
std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512-vnni";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
  return "neon-dotprod";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_linear", &packed_linear, "the packed ternary layer (ops.packed_linear_reference)");
  m.def("linear_f16", &linear_f16, "x float32 @ w^T with float16 weights, float32 sums");
  m.def("isa", &isa, "the vector instructions this build uses");
}
