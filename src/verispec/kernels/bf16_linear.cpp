// verispec's bfloat16 linear layer for x86 CPUs with AVX2 and FMA but no bf16 instructions.
//
// Why: there, PyTorch multiplies bf16 matrices with a generic kernel whose cost grows with every
// row (a [8960, 1536] layer, 2 threads: 1.65 ms at 1 row, 5.9 ms at 4, 22.8 ms at 16, 424 ms
// at 300; scripts/linear_cost.py), so a verification pass over a few tokens costs as many one-token passes, and
// speculative decoding cannot pay. This kernel reads each weight row once per tile of input
// rows, widens it to float32 in registers and multiplies it into several rows at once.
//
// Row invariance (exact mode relies on it): an output element is always computed by the same
// sequence of operations, whatever the number of rows and however the rows are tiled or the
// output split between threads: 8 float32 lanes, lane j takes k = j mod 8 in order with one
// FMA each, then a fixed horizontal sum, the K mod 8 tail by scalar FMAs in order, the bias
// added last, one rounding to bf16. So row r of an m-row product equals the one-row product
// bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

inline __m256 load_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 odd = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, odd);
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(odd, s)));
}

// RO weight rows times RM input rows: RO*RM accumulators, each weight chunk widened once.
template <int RO, int RM>
void tile(const float* x, int64_t K, const uint16_t* w, const float* bias, float* out, int64_t O) {
  __m256 acc[RO][RM];
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[RO];
    for (int i = 0; i < RO; ++i) wv[i] = load_bf16(w + i * K + k);
    for (int j = 0; j < RM; ++j) {
      __m256 xv = _mm256_loadu_ps(x + j * K + k);
      for (int i = 0; i < RO; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < RO; ++i)
    for (int j = 0; j < RM; ++j) {
      float s = horizontal_sum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s = std::fma(bf16_to_float(w[i * K + t]), x[j * K + t], s);
      out[j * O + i] = bias ? s + bias[i] : s;
    }
}

constexpr int kRows = 3;  // weight rows per tile
constexpr int kRowsAlone = 8;  // weight rows per tile for a one-row input (memory-bound: more loads in flight)
constexpr int kRowsPair = 5;  // for two input rows (5 x 2 accumulators + 5 weights + 1 input)
constexpr int kCols = 4;  // input rows per tile (3 x 4 accumulators + 3 weights + 1 input: 16 registers)

template <int RO>
void rows_times_all(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                    float* out, int64_t O) {
  int64_t m = 0;
  for (; m + kCols <= M; m += kCols) tile<RO, kCols>(x + m * K, K, w, bias, out + m * O, O);
  switch (M - m) {
    case 1: tile<RO, 1>(x + m * K, K, w, bias, out + m * O, O); break;
    case 2: tile<RO, 2>(x + m * K, K, w, bias, out + m * O, O); break;
    case 3: tile<RO, 3>(x + m * K, K, w, bias, out + m * O, O); break;
    default: break;
  }
}

// Every output row in blocks of RO weight rows (the last O mod RO one by one), split between
// threads by block. The tile sizes by row count were measured (2 threads, AVX2 EPYC): at 1 and 2
// rows the product is bound by reading the weight, and more weight rows in flight read faster.
template <int RO>
void all_outputs(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                 float* out, int64_t O) {
  const int64_t blocks = (O + RO - 1) / RO;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o = blk * RO;
      if (o + RO <= O) {
        rows_times_all<RO>(x, M, K, w + o * K, bias ? bias + o : nullptr, out + o, O);
      } else {
        for (int64_t r = o; r < O; ++r) rows_times_all<1>(x, M, K, w + r * K, bias ? bias + r : nullptr, out + r, O);
      }
    }
  });
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "verispec::bf16_linear: CPU tensors only");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2, "verispec::bf16_linear: a 2-D bf16 weight");
  TORCH_CHECK(x.size(-1) == weight.size(1), "verispec::bf16_linear: x's last dimension ", x.size(-1),
              " does not match the weight's ", weight.size(1));
  const int64_t K = weight.size(1), O = weight.size(0);
  at::Tensor w = weight.contiguous();
  at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == O, "verispec::bf16_linear: bias of ", bias->numel(), " for ", O, " outputs");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({M, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (M == 1) {
    all_outputs<kRowsAlone>(xp, M, K, wp, bp, op, O);
  } else if (M == 2) {
    all_outputs<kRowsPair>(xp, M, K, wp, bp, op, O);
  } else if (M > 2) {
    all_outputs<kRows>(xp, M, K, wp, bp, op, O);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(verispec, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(verispec, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}
