// verispec's int4 weight-only linear layer for x86 CPUs with AVX2 and FMA (a quantized draft's products).
//
// Why: on CPUs without AVX-512 PyTorch's int4 kernel (_weight_int4pack_mm_for_cpu) is bound by
// its arithmetic, not by reading the 4-bit weights: one row through Qwen2.5-Coder-0.5B's layers
// on the 2-core AVX2 EPYC (scripts/int4_cost.py, 2 threads, ms, torch's / this one's): 4864x896
// 0.39 / 0.17, 896x4864 0.39 / 0.14, the LM head 151936x896 11.6 / 6.3; 4 rows through 8960x1536
// 2.5 / 1.3. The int4 draft's one-token step (scripts/draft_step_cost.py, context 300) 59 -> 40 ms.
// This kernel multiplies the codes into int8-rounded inputs with AVX2's byte products (maddubs),
// as GGUF's CPU kernels do, instead of widening them to floats.
//
// Layout (quantize.Int4Linear makes it): for output row n and group g of 32 inputs, 16 bytes of
// codes; byte j holds input 32g + j in its low nibble and input 32g + 16 + j in its high one;
// W[n, 32g + i] = (q - 8) * scale[n, g] + zero[n, g], scale and zero float16 [N, K / 32]. Each
// input row is rounded to int8 per group of 32 (scale d: the group's largest magnitude / 127), so
//     y[m, n] = sum_g scale d (sum_i q_i x8_i - 8 sum_i x8_i) + sum_g zero s[m, g],
// with s the group's float sum: the inputs' rounding is the one approximation (about 0.6% of a
// product's norm on random data), weighted by w - zero. A draft's numbers only move its
// acceptance, so no row invariance is promised (unlike bf16_linear.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 odd = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, odd);
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(odd, s)));
}

// One row's inputs as the kernel reads them (prepare_rows makes them):
//  q      int8 inputs, rounded per group of 32 to the group's scale d (its largest magnitude / 127);
//         a pair of groups g, g+1 stored as [g 0-15 | g+1 0-15 | g 16-31 | g+1 16-31], the order
//         in which 32 bytes of codes (two groups) come apart into low and high nibbles
//  dpair  per pair, 8 floats: d_g four times, then d_g+1 four times (the lanes' groups)
//  d      per group, its scale (for an odd last group, which is read on its own)
//  sum    per group, the inputs' float sum (the codes' zero term)
//  corr   per group, 8 d times the int8s' sum (the codes are read as 0..15 and centred on 8 after)
struct Rows {
  const int8_t* q;
  const float *dpair, *d, *sum, *corr;
  int64_t K, G, P;  // inputs, groups, pairs of groups (per row)
};

inline float half_dot(const uint16_t* a, const float* b, int64_t n) {  // sum_i a[i] * b[i], a in float16
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                          _mm256_loadu_ps(b + i), acc);
  float s = horizontal_sum(acc);
  for (; i < n; ++i) s += _cvtsh_ss(a[i]) * b[i];
  return s;
}

// RO weight rows times RM input rows. For each pair of groups: 32 bytes of codes split into low
// and high nibbles (64 unsigned codes), times the int8 inputs by maddubs (pairs in int16, at most
// 2 * 15 * 127; the two halves added: at most 7620, no saturation), summed to int32 by madd (lanes
// 0-3 group g, 4-7 group g+1), then one float FMA by weight scale * input scale per lane. Codes
// widened once for all RM rows. y = sum_g scale (codes . q) d - scale corr + zero sum.
template <int RO, int RM>
void tile(const Rows& x, const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, float* out,
          int64_t O) {
  const int64_t K = x.K, G = x.G, P = x.P;
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F);
  const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[RO][RM];
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    for (int i = 0; i < RO; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * (K / 2) + p * kGroup));
      const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      int32_t two;
      std::memcpy(&two, scale + i * G + 2 * p, sizeof two);
      const __m256 ws = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_set1_epi32(two)), lanes);
      for (int j = 0; j < RM; ++j) {
        const int8_t* xq = x.q + j * K + p * 2 * kGroup;
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + kGroup));
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a), _mm256_maddubs_epi16(hi, b));
        const __m256 d = _mm256_mul_ps(ws, _mm256_loadu_ps(x.dpair + (j * P + p) * 8));
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), d, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) {
      float y = horizontal_sum(acc[i][j]);
      if (G % 2) {  // the odd last group, on its own: 32 codes, natural input order
        const int64_t g = G - 1;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i * (K / 2) + g * (kGroup / 2)));
        const __m128i n4 = _mm_set1_epi8(0x0F);
        const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), n4), _mm_and_si128(v, n4));
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + j * K + g * kGroup));
        const __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
        y += horizontal_sum(_mm256_cvtepi32_ps(pairs)) * _cvtsh_ss(scale[i * G + g]) * x.d[j * G + g];
      }
      y += half_dot(zero + i * G, x.sum + j * G, G) - half_dot(scale + i * G, x.corr + j * G, G);
      out[j * O + i] = y;
    }
}

constexpr int kCols = 4;  // input rows per tile

inline Rows from(const Rows& x, int64_t m) {  // the rows of x from row m on
  return Rows{x.q + m * x.K, x.dpair + m * x.P * 8, x.d + m * x.G, x.sum + m * x.G, x.corr + m * x.G, x.K, x.G, x.P};
}

template <int RO>
void rows_times_all(const Rows& x, int64_t M, const uint8_t* codes, const uint16_t* scale, const uint16_t* zero,
                    float* out, int64_t O) {
  int64_t m = 0;
  for (; m + kCols <= M; m += kCols) tile<RO, kCols>(from(x, m), codes, scale, zero, out + m * O, O);
  switch (M - m) {
    case 1: tile<RO, 1>(from(x, m), codes, scale, zero, out + m * O, O); break;
    case 2: tile<RO, 2>(from(x, m), codes, scale, zero, out + m * O, O); break;
    case 3: tile<RO, 3>(from(x, m), codes, scale, zero, out + m * O, O); break;
    default: break;
  }
}

// Every output row in blocks of RO weight rows (the last O mod RO one by one), split between threads by block.
template <int RO>
void all_outputs(const Rows& x, int64_t M, const uint8_t* codes, const uint16_t* scale, const uint16_t* zero,
                 float* out, int64_t O) {
  const int64_t K = x.K, G = x.G, blocks = (O + RO - 1) / RO;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o = blk * RO;
      if (o + RO <= O) {
        rows_times_all<RO>(x, M, codes + o * (K / 2), scale + o * G, zero + o * G, out + o, O);
      } else {
        for (int64_t r = o; r < O; ++r)
          rows_times_all<1>(x, M, codes + r * (K / 2), scale + r * G, zero + r * G, out + r, O);
      }
    }
  });
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Rows' inputs -> the Rows arrays (see Rows), in the workspace `work`; plain loops: a draft step
// makes ~170 calls, and a few ATen ops each would cost more than the quantizing itself.
template <typename T>
Rows prepare_rows(const T* x, int64_t M, int64_t K, uint8_t* work) {
  const int64_t G = K / kGroup, P = G / 2;
  int8_t* q = reinterpret_cast<int8_t*>(work);
  float* dpair = reinterpret_cast<float*>(work + M * K);
  float* d = dpair + M * P * 8;
  float *sum = d + M * G, *corr = sum + M * G;
  float v[kGroup];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const T* in = x + m * K + g * kGroup;
      float amax = 0.f, total = 0.f;
      for (int i = 0; i < kGroup; ++i) {
        v[i] = to_float(in[i]);
        amax = std::max(amax, std::fabs(v[i]));
        total += v[i];
      }
      const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = amax > 0.f ? 127.f / amax : 1.f;
      // where input i of group g goes: natural order for an odd last group, else the pair's order
      int8_t* dst = q + m * K + (g < 2 * P ? (g / 2) * 2 * kGroup + (g % 2) * 16 : g * kGroup);
      const int64_t second = g < 2 * P ? kGroup : 16;  // offset of inputs 16-31 from inputs 0-15
      int32_t qsum = 0;
      for (int i = 0; i < kGroup; ++i) {
        const int8_t c = static_cast<int8_t>(std::nearbyint(v[i] * inv));
        dst[i < 16 ? i : second + i - 16] = c;
        qsum += c;
      }
      if (g < 2 * P)
        for (int l = 0; l < 4; ++l) dpair[(m * P + g / 2) * 8 + (g % 2) * 4 + l] = scale;
      d[m * G + g] = scale;
      sum[m * G + g] = total;
      corr[m * G + g] = 8.f * scale * static_cast<float>(qsum);
    }
  return Rows{q, dpair, d, sum, corr, K, G, P};
}

// The bias is left to the caller (quantize._WeightOnly adds it, for every weight-only layer alike).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero) {
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
  const int64_t P = G / 2;
  at::Tensor work = at::empty({M * K + (M * P * 8 + M * G * 3) * 4}, x.options().dtype(at::kByte));
  const Rows rows = x.scalar_type() == at::kFloat ? prepare_rows(xr.data_ptr<float>(), M, K, work.data_ptr<uint8_t>())
                    : prepare_rows(xr.data_ptr<at::BFloat16>(), M, K, work.data_ptr<uint8_t>());
  at::Tensor out = at::empty({M, O}, x.options().dtype(at::kFloat));
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const auto* zp = reinterpret_cast<const uint16_t*>(zr.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  // weight rows per tile, measured (2 threads, AVX2 EPYC): 1, 2 and 4 were level at one input row, 4 slower on the LM head
  if (M <= 2) all_outputs<2>(rows, M, cp, sp, zp, op, O);
  else all_outputs<1>(rows, M, cp, sp, zp, op, O);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(verispec, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero) -> Tensor");
}

TORCH_LIBRARY_IMPL(verispec, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}
