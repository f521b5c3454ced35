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
    const double n = std::max(at::linalg_vector_norm(G, 2, c10::nullopt, false, at::kDouble).item<double>(), eps);
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
