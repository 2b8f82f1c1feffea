// Inner loop of BitSplit's coordinate-descent sweep over one block of input columns, for the
// ternary plane being updated (see update_plane_response in mmquant/ptq/bitsplit_solver.py, which
// holds the math and the Python reference of this loop).
//
// Layout: every tensor is contiguous, the block's columns on the middle axis.
//   h    [g, B, C]  (G r^T - d^T) restricted to the block: the gradient term of each column
//   q    [g, B, C]  the plane's current values in {-1, 0, 1}, updated in place
//   inv  [g, B, C]  1 / (step_c * G_ii), 0 for dead columns
//   gb   [g, B, B]  the block of the Gram matrix
//   step [g, C]     alpha_c * 2^m: change of the residual per unit of q
// Column k of the block is solved for all channels at once: q <- clip(round(q - h * inv), -1, 1);
// the columns after k in the block then see the change through h[k2] += gb[k2, k] * dq * step.
// Rounding is to nearest, ties to even, as torch.round.
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
void sweep_block_impl(T* h, T* q, const T* inv, const T* gb, const T* step, int64_t g, int64_t B,
                      int64_t C) {
  std::vector<T> dq(C);
  for (int64_t gi = 0; gi < g; ++gi) {
    T* hg = h + gi * B * C;
    T* qg = q + gi * B * C;
    const T* ig = inv + gi * B * C;
    const T* gg = gb + gi * B * B;
    const T* sg = step + gi * C;
    for (int64_t k = 0; k < B; ++k) {
      T* hk = hg + k * C;
      T* qk = qg + k * C;
      const T* ik = ig + k * C;
      bool changed = false;
      for (int64_t c = 0; c < C; ++c) {
        T t = std::nearbyint(qk[c] - hk[c] * ik[c]);
        t = t > T(1) ? T(1) : (t < T(-1) ? T(-1) : t);
        T d = t - qk[c];
        if (d != T(0)) {
          changed = true;
          qk[c] = t;
        }
        dq[c] = d * sg[c];
      }
      if (!changed) continue;
      for (int64_t k2 = k + 1; k2 < B; ++k2) {
        const T gk = gg[k2 * B + k];
        if (gk == T(0)) continue;
        T* h2 = hg + k2 * C;
        for (int64_t c = 0; c < C; ++c) h2[c] += gk * dq[c];
      }
    }
  }
}

void sweep_block(torch::Tensor h, torch::Tensor q, torch::Tensor inv, torch::Tensor gb, torch::Tensor step) {
  TORCH_CHECK(h.device().is_cpu(), "sweep_block: CPU tensors only");
  TORCH_CHECK(h.dim() == 3 && q.sizes() == h.sizes() && inv.sizes() == h.sizes(),
              "sweep_block: h, q, inv must all be [g, B, C]");
  const int64_t g = h.size(0), B = h.size(1), C = h.size(2);
  TORCH_CHECK(gb.dim() == 3 && gb.size(0) == g && gb.size(1) == B && gb.size(2) == B, "sweep_block: gb must be [g, B, B]");
  TORCH_CHECK(step.dim() == 2 && step.size(0) == g && step.size(1) == C, "sweep_block: step must be [g, C]");
  for (const auto& t : {h, q, inv, gb, step}) {
    TORCH_CHECK(t.is_contiguous(), "sweep_block: tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == h.scalar_type(), "sweep_block: tensors must share one dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "sweep_block", [&] {
    sweep_block_impl<scalar_t>(h.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), inv.data_ptr<scalar_t>(),
                               gb.data_ptr<scalar_t>(), step.data_ptr<scalar_t>(), g, B, C);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep_block", &sweep_block, "BitSplit: coordinate descent over one block of columns (in place)");
}
