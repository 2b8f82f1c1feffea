// AdaRound's soft quantized weight and its rounding regulariser in one pass over the weight, and
// the gradient with respect to V in one more (see mmquant/ptq/adaround.py for the math and the
// composed-torch reference that the tests hold these kernels to).
//
//   sig = sigmoid(V), u = sig * (zeta - gamma) + gamma, h = clamp(u, 0, 1)
//   q   = floor + h + z,  w = s * (clamp(q, qmin, qmax) - z)
//   reg = sum(1 - |2h - 1|^beta)                 (only when beta > 0)
//
// Backward, as autograd differentiates the composed ops (clamp passes the gradient where its
// input lies inside [min, max], ends included):
//   dw/dh   = s               where qmin <= q <= qmax, else 0
//   dreg/dh = -2 beta |2h-1|^(beta-1) sign(2h-1)
//   dh/dV   = (zeta - gamma) sig (1 - sig) where 0 <= u <= 1, else 0
//
// Every tensor is contiguous float32; s and z hold one value per channel (C of them) of the axis
// whose elements are `inner` apart (C = 1: one value for the whole tensor). The tensor is walked
// as segments of `inner` elements sharing one channel, each an `omp simd` loop: built with
// -ffast-math (setup.py; with -mavx2 -mfma where the build machine has them) GCC turns expf / logf
// into glibc's vector versions (libmvec), 8 lanes per instruction on AVX2. V is clamped to
// [-30, 30] before the exponential: h is already saturated at |V| > 2.4, and no infinity can
// arise, which -ffast-math assumes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

namespace {

constexpr float kZeta = 1.1f;
constexpr float kGamma = -0.1f;
constexpr int64_t kGrain = 16384;     // elements per parallel task

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// segments [seg_begin, seg_end) of `inner` elements; channel of segment k is k % C
template <typename F>
void for_segments(int64_t n, int64_t inner, const F& f) {
  const int64_t segs = n / inner;
  at::parallel_for(0, segs, std::max<int64_t>(1, kGrain / inner), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k, k * inner, (k + 1) * inner);
  });
}

inline float clampv(float v) { return v < -30.0f ? -30.0f : (v > 30.0f ? 30.0f : v); }

// a^b for a in [0, 1], as exp(b log a): libmvec's vector logf + expf take about a sixth of the time
// of its vector powf (measured: 2.4M elements, one thread, 12 ms -> 2 ms). a is raised to 1e-30 so
// that no infinity arises (-ffast-math assumes none), and the exponent is held above -80: a vector
// expf falls back to its scalar path for the whole vector when one lane would underflow into
// denormals (measured 4x slower on real weights). So a^b is at least e^-80 = 1.8e-35 instead of 0,
// which changes 1 - a^b by nothing in float32 and a gradient term by at most 2 beta * 1.8e-35.
inline float pow01(float a, float b) {
  const float e = b * std::log(a < 1e-30f ? 1e-30f : a);
  return std::exp(e < -80.0f ? -80.0f : e);
}

// one segment (one channel's scale sc and zero point zc); returns its regulariser sum (WithReg)
template <bool WithReg>
float forward_segment(const float* __restrict vp, const float* __restrict fp, float* __restrict wp, int64_t len,
                      float sc, float zc, float lo, float hi, float b) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) {
    const float u = (kZeta - kGamma) / (1.0f + std::exp(-clampv(vp[i]))) + kGamma;
    const float h = u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);
    float q = fp[i] + h + zc;
    q = q < lo ? lo : (q > hi ? hi : q);
    wp[i] = (q - zc) * sc;
    if constexpr (WithReg) acc += 1.0f - pow01(std::fabs(2.0f * h - 1.0f), b);
  }
  return acc;
}

template <bool WithReg>
void backward_segment(const float* __restrict gp, const float* __restrict vp, const float* __restrict fp,
                      float* __restrict out, int64_t len, float sc, float zc, float lo, float hi, float b,
                      float gr) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-clampv(vp[i])));
    const float u = sig * (kZeta - kGamma) + kGamma;
    const float q = fp[i] + u + zc;
    float dh = (q >= lo && q <= hi) ? gp[i] * sc : 0.0f;
    if constexpr (WithReg) {
      // d/dh (1 - |2h-1|^beta) = -2 beta |2h-1|^(beta-1) sign(2h-1); 0 at h = 1/2
      const float t = 2.0f * u - 1.0f;
      const float a = std::fabs(t);
      const float d = a > 0.0f ? -2.0f * b * pow01(a, b - 1.0f) * (t > 0.0f ? 1.0f : -1.0f) : 0.0f;
      dh += gr * d;
    }
    // the rectifying clamp passes the gradient only inside [0, 1]
    out[i] = (u >= 0.0f && u <= 1.0f) ? dh * (kZeta - kGamma) * sig * (1.0f - sig) : 0.0f;
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> soft_forward(torch::Tensor v, torch::Tensor floor_, torch::Tensor s,
                                                      torch::Tensor z, double qmin, double qmax, int64_t inner,
                                                      double beta) {
  check(v, "v"); check(floor_, "floor"); check(s, "s"); check(z, "z");
  const int64_t n = v.numel(), C = s.numel();
  TORCH_CHECK(floor_.numel() == n && z.numel() == C && inner >= 1 && n % inner == 0,
              "soft_forward: bad shapes");
  auto w = torch::empty_like(v);
  const int64_t segs = n / inner;
  auto partial = torch::zeros({segs}, torch::kFloat64);
  const float* vp = v.data_ptr<float>();
  const float* fp = floor_.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  double* pp = partial.data_ptr<double>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), b = static_cast<float>(beta);
  const bool with_reg = beta > 0;
  for_segments(n, inner, [&](int64_t k, int64_t begin, int64_t end) {
    pp[k] = with_reg ? forward_segment<true>(vp + begin, fp + begin, wp + begin, end - begin, sp[k % C],
                                             zp[k % C], lo, hi, b)
                     : forward_segment<false>(vp + begin, fp + begin, wp + begin, end - begin, sp[k % C],
                                              zp[k % C], lo, hi, b);
  });
  const double reg = with_reg ? partial.sum().item<double>() : 0.0;
  return {w, torch::tensor(static_cast<float>(reg))};
}

torch::Tensor soft_backward(torch::Tensor grad_w, torch::Tensor v, torch::Tensor floor_, torch::Tensor s,
                            torch::Tensor z, double qmin, double qmax, int64_t inner, double beta,
                            double grad_reg) {
  check(grad_w, "grad_w"); check(v, "v"); check(floor_, "floor"); check(s, "s"); check(z, "z");
  const int64_t n = v.numel(), C = s.numel();
  TORCH_CHECK(floor_.numel() == n && grad_w.numel() == n && z.numel() == C && inner >= 1 && n % inner == 0,
              "soft_backward: bad shapes");
  auto gv = torch::empty_like(v);
  const float* gp = grad_w.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* fp = floor_.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* out = gv.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), b = static_cast<float>(beta);
  const float gr = (beta > 0) ? static_cast<float>(grad_reg) : 0.0f;
  const bool with_reg = beta > 0 && grad_reg != 0;
  for_segments(n, inner, [&](int64_t k, int64_t begin, int64_t end) {
    if (with_reg)
      backward_segment<true>(gp + begin, vp + begin, fp + begin, out + begin, end - begin, sp[k % C], zp[k % C],
                             lo, hi, b, gr);
    else
      backward_segment<false>(gp + begin, vp + begin, fp + begin, out + begin, end - begin, sp[k % C], zp[k % C],
                              lo, hi, b, gr);
  });
  return gv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("soft_forward", &soft_forward, "AdaRound soft weight and regulariser (fused)");
  m.def("soft_backward", &soft_backward, "gradient of the soft weight and regulariser with respect to V");
}
