// The fused assemble step of a module group (docs/algorithm.md s.6): A += G_t / n_t with
// n_t = max(||G_t||_F, eps), folded into one buffer as each task's Gram arrives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "featcal.h"

namespace featcal {
namespace {

constexpr int64_t kGrain = 1 << 16;
// Elements of G converted to float64 at a time off the CPU fast path (32 MiB).
constexpr int64_t kBandElements = 1 << 22;

// Sum of squares in double; eight independent partial sums let the compiler vectorise it.
template <typename T>
double sum_of_squares(const T* g, int64_t numel) {
  return at::parallel_reduce(
      0, numel, kGrain, 0.0,
      [g](int64_t begin, int64_t end, double total) {
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = begin;
        for (; i + 8 <= end; i += 8)
          for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(g[i + k]) * g[i + k];
        for (; i < end; ++i) total += static_cast<double>(g[i]) * g[i];
        for (double a : acc) total += a;
        return total;
      },
      std::plus<double>());
}

template <typename T>
void add_scaled(T* a, const T* g, int64_t numel, T scale) {
  at::parallel_for(0, numel, kGrain, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) a[i] += scale * g[i];
  });
}

}  // namespace

double assemble(at::Tensor& A, const at::Tensor& G, double eps) {
  TORCH_CHECK(A.sizes().equals(G.sizes()), "assemble: A of shape ", A.sizes(), " and G of shape ", G.sizes(),
              " differ");
  TORCH_CHECK(A.scalar_type() == G.scalar_type(), "assemble: A is ", A.scalar_type(), " but G is ",
              G.scalar_type());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "assemble: A and G must be float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(A.device() == G.device(), "assemble: A is on ", A.device(), " but G is on ", G.device());
  if (!A.device().is_cpu() || !A.is_contiguous() || !G.is_contiguous()) {
    // float64 sums of squares a band of rows at a time (no float64 copy of G), one host sync;
    // a matrix G is banded as it is, whatever its strides.
    const auto rows = G.dim() == 2 ? G : G.reshape({-1, G.size(-1)});
    const int64_t band = std::max<int64_t>(1, kBandElements / std::max<int64_t>(1, rows.size(1)));
    auto total = at::zeros({}, G.options().dtype(at::kDouble));
    for (int64_t start = 0; start < rows.size(0); start += band)
      total.add_(at::linalg_vector_norm(rows.narrow(0, start, std::min(band, rows.size(0) - start)), 2,
                                        c10::nullopt, false, at::kDouble)
                     .square());
    const double n = std::max(std::sqrt(total.item<double>()), eps);
    if (n > 0) A.add_(G, 1.0 / n);
    return n;
  }
  double n = 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "assemble", [&] {
    const auto* g = G.data_ptr<scalar_t>();
    n = std::max(std::sqrt(sum_of_squares(g, G.numel())), eps);
    if (n > 0) add_scaled(A.data_ptr<scalar_t>(), g, A.numel(), static_cast<scalar_t>(1.0 / n));
  });
  return n;
}

}  // namespace featcal
