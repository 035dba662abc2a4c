// verispec's int4 weight-only linear layer for x86 CPUs with AVX2 and FMA (a quantized draft's products).
//
// Why: on CPUs without AVX-512, PyTorch's int4 kernel (_weight_int4pack_mm_for_cpu) runs at
// about a quarter of the speed its 4-bit weights could be read at: the int4 Qwen2.5-Coder-0.5B
// draft's one-token step spent 45 of its 84 ms in it on the 2-core AVX2 EPYC (its weights, a
// quarter of bf16's bytes, took 53 ms as bf16 through bf16_linear.cpp). This kernel widens
// the 4-bit codes to float32 in registers and multiplies them into up to 4 input rows at once.
//
// Layout (quantize.Int4Linear makes it): for output row n and group g of 32 inputs, 16 bytes of
// codes; byte j holds input 32g + j in its low nibble and input 32g + 16 + j in its high one.
// W[n, 32g + i] = q * scale[n, g] + low[n, g], scale and low float32 [N, K / 32]. So
//     y[m, n] = sum_g scale[n, g] * (sum_i q_i x[m, 32g + i]) + sum_g low[n, g] * s[m, g],
// with s[m, g] the sum of row m's inputs over group g, computed once a call. The codes' dot with
// the inputs is exact integer-times-float work; only the groups' sums are rounded. A draft's
// numbers only move its acceptance, so no row invariance is promised (unlike bf16_linear.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 odd = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, odd);
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(odd, s)));
}

// The 32 codes of one group as 32 bytes 0..15: inputs 0-15 in the low lane, 16-31 in the high one.
inline __m256i widen(const uint8_t* codes) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
}

// sum_i a[i] * b[i], a in float16
inline float dot(const uint16_t* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                          _mm256_loadu_ps(b + i), acc);
  float s = horizontal_sum(acc);
  for (; i < n; ++i) s += _cvtsh_ss(a[i]) * b[i];
  return s;
}

// RO weight rows times RM input rows. Per group: the codes (unsigned) times the row's int8 inputs
// by maddubs (pairs summed in int16: at most 2 * 15 * 127, no saturation), pairs of those summed
// in int32, then one float FMA by scale * the row's group scale. Each group's codes are widened
// once for all RM rows.
template <int RO, int RM>
void tile(const int8_t* xq, const float* xscale, const int32_t* xqsum, const float* xsum, int64_t K, const uint8_t* codes,
          const uint16_t* scale, const uint16_t* zero, const float* bias, float* out, int64_t O) {
  const int64_t G = K / kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RO][RM];
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < RO; ++i) {
      const __m256i q = widen(codes + i * (K / 2) + g * (kGroup / 2));
      const float s = _cvtsh_ss(scale[i * G + g]);
      for (int j = 0; j < RM; ++j) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * K + g * kGroup));
        // minus 8 * the inputs' sum: the codes centred on 8, so the activations' rounding is
        // weighted by w - zero (about w) rather than by w - low (about twice as large)
        const __m256i pairs = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones),
                                               _mm256_set1_epi32(xqsum[j * G + g]));
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pairs), _mm256_set1_ps(s * xscale[j * G + g]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) {
      float y = horizontal_sum(acc[i][j]) + dot(zero + i * G, xsum + j * G, G);
      out[j * O + i] = bias ? y + bias[i] : y;
    }
}

constexpr int kCols = 4;  // input rows per tile

template <int RO>
void rows_times_all(const int8_t* x, const float* xscale, const int32_t* xqsum, const float* xsum, int64_t M, int64_t K, const uint8_t* codes,
                    const uint16_t* scale, const uint16_t* zero, const float* bias, float* out, int64_t O) {
  const int64_t G = K / kGroup;
  int64_t m = 0;
  for (; m + kCols <= M; m += kCols)
    tile<RO, kCols>(x + m * K, xscale + m * G, xqsum + m * G, xsum + m * G, K, codes, scale, zero, bias, out + m * O, O);
  switch (M - m) {
    case 1: tile<RO, 1>(x + m * K, xscale + m * G, xqsum + m * G, xsum + m * G, K, codes, scale, zero, bias, out + m * O, O); break;
    case 2: tile<RO, 2>(x + m * K, xscale + m * G, xqsum + m * G, xsum + m * G, K, codes, scale, zero, bias, out + m * O, O); break;
    case 3: tile<RO, 3>(x + m * K, xscale + m * G, xqsum + m * G, xsum + m * G, K, codes, scale, zero, bias, out + m * O, O); break;
    default: break;
  }
}

// Every output row in blocks of RO weight rows (the last O mod RO one by one), split between threads by block.
template <int RO>
void all_outputs(const int8_t* x, const float* xscale, const int32_t* xqsum, const float* xsum, int64_t M, int64_t K, const uint8_t* codes,
                 const uint16_t* scale, const uint16_t* zero, const float* bias, float* out, int64_t O) {
  const int64_t G = K / kGroup, blocks = (O + RO - 1) / RO;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o = blk * RO;
      if (o + RO <= O) {
        rows_times_all<RO>(x, xscale, xqsum, xsum, M, K, codes + o * (K / 2), scale + o * G, zero + o * G,
                           bias ? bias + o : nullptr, out + o, O);
      } else {
        for (int64_t r = o; r < O; ++r)
          rows_times_all<1>(x, xscale, xqsum, xsum, M, K, codes + r * (K / 2), scale + r * G, zero + r * G,
                            bias ? bias + r : nullptr, out + r, O);
      }
    }
  });
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Each group of 32 inputs -> 32 int8 (round to nearest), its scale, the int8s' sum and the inputs' sum.
template <typename T>
void quantize_rows(const T* x, int64_t groups, int8_t* xq, float* xscale, int32_t* xqsum, float* xsum) {
  float v[kGroup];
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < kGroup; ++i) {
      v[i] = to_float(x[g * kGroup + i]);
      amax = std::max(amax, std::fabs(v[i]));
      sum += v[i];
    }
    const float inv = amax > 0.f ? 127.f / amax : 1.f;
    int32_t qsum = 0;
    for (int i = 0; i < kGroup; ++i) {
      xq[g * kGroup + i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
      qsum += xq[g * kGroup + i];
    }
    xqsum[g] = qsum;
    xscale[g] = amax > 0.f ? amax / 127.f : 1.f;
    xsum[g] = sum;
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "verispec::int4_linear: CPU tensors only");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "verispec::int4_linear: 2-D uint8 codes");
  const int64_t O = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(K % kGroup == 0, "verispec::int4_linear: the input size must be a multiple of ", kGroup);
  TORCH_CHECK(x.size(-1) == K, "verispec::int4_linear: x's last dimension ", x.size(-1), " does not match the codes' ", K);
  const int64_t G = K / kGroup;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf && scale.numel() == O * G &&
              zero.numel() == O * G, "verispec::int4_linear: float16 scale and zero of [", O, ", ", G, "]");
  at::Tensor c = codes.contiguous(), sc = scale.contiguous(), zr = zero.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "verispec::int4_linear: float32 or bfloat16 inputs, not ", x.scalar_type());
  at::Tensor xr = x.reshape({-1, K}).contiguous();
  const int64_t M = xr.size(0);
  // each row quantized to int8 per group of 32 (scale: the group's largest magnitude / 127), its
  // groups' sums kept in float32 for the codes' offsets; plain loops and one workspace: a draft
  // step makes ~170 such calls, and a few ATen ops each would cost more than the quantizing itself
  at::Tensor work = at::empty({M * K + M * G * 12}, x.options().dtype(at::kByte));
  int8_t* xq = reinterpret_cast<int8_t*>(work.data_ptr<uint8_t>());
  float* xscale = reinterpret_cast<float*>(xq + M * K);
  float* xsum = xscale + M * G;
  int32_t* xqsum = reinterpret_cast<int32_t*>(xsum + M * G);
  if (x.scalar_type() == at::kFloat) quantize_rows(xr.data_ptr<float>(), M * G, xq, xscale, xqsum, xsum);
  else quantize_rows(xr.data_ptr<at::BFloat16>(), M * G, xq, xscale, xqsum, xsum);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == O, "verispec::int4_linear: bias of ", bias->numel(), " for ", O, " outputs");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  auto args = std::make_tuple(static_cast<const int8_t*>(xq), static_cast<const float*>(xscale), static_cast<const int32_t*>(xqsum), static_cast<const float*>(xsum), M, K, c.data_ptr<uint8_t>(),
                              reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), reinterpret_cast<const uint16_t*>(zr.data_ptr<at::Half>()), bp, out.data_ptr<float>(), O);
  // weight rows per tile, measured (2 threads, AVX2 EPYC): more rows in flight when few input rows share them
  if (M == 1) std::apply(all_outputs<2>, args);
  else if (M == 2) std::apply(all_outputs<2>, args);
  else if (M > 2) std::apply(all_outputs<1>, args);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(verispec, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(verispec, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}
