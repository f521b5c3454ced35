// (A + ridge I) X = B for symmetric positive definite A by Cholesky (docs/algorithm.md s.7):
// factorise in a workspace the solver owns, retry a failed factorisation with growing diagonal
// jitter, and solve the systems that still fail by an eigendecomposition pseudo-inverse.
// X is computed in place of a copy of the right-hand sides (several, side by side: one
// factorisation serves every module of a group), laid out (m, d) so that X^T (the new weights)
// is contiguous. The CPU path calls LAPACK potrf/potrs with one d x d workspace for the whole
// batch; the ATen path (cuSOLVER on CUDA) factorises small systems as one batch.
#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>

#include "featcal.h"

extern "C" {
// LAPACK, as exported by the library torch links.
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info);
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda, float* b,
             const int* ldb, int* info);
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda, double* b,
             const int* ldb, int* info);
}

namespace featcal {
namespace {

// 'U' on a column-major view of a row-major matrix reads its lower triangle, the one
// torch.linalg.cholesky reads.
const char kUpper = 'U';

bool potrf(int n, float* a) {
  int info = 0;
  spotrf_(&kUpper, &n, a, &n, &info);
  return info == 0;
}
bool potrf(int n, double* a) {
  int info = 0;
  dpotrf_(&kUpper, &n, a, &n, &info);
  return info == 0;
}
void potrs(int n, int nrhs, const float* a, float* b) {
  int info = 0;
  spotrs_(&kUpper, &n, &nrhs, a, &n, b, &n, &info);
  TORCH_CHECK(info == 0, "ridge_solve: LAPACK spotrs rejected argument ", -info);
}
void potrs(int n, int nrhs, const double* a, double* b) {
  int info = 0;
  dpotrs_(&kUpper, &n, &nrhs, a, &n, b, &n, &info);
  TORCH_CHECK(info == 0, "ridge_solve: LAPACK dpotrs rejected argument ", -info);
}

// The inputs flattened to one batch dimension: A (batch, d, d) as given, and Xt (batch, m, d),
// a contiguous copy of the right-hand sides side by side, transposed, in the compute dtype
// (float64 if A or any B is, else float32).
struct Problem {
  at::Tensor A;
  at::Tensor Xt;
  std::vector<int64_t> x_shape;  // A's batch dimensions, then (m, d)
  std::vector<int64_t> a_shape;  // A's shape, for messages
};

Problem prepare(const at::Tensor& A, const std::vector<at::Tensor>& Bs) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), "ridge_solve: A must be square (..., d, d), got shape ",
              A.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), "ridge_solve: A must be floating point, got ", A.scalar_type());
  TORCH_CHECK(!Bs.empty(), "ridge_solve: no right-hand side given");
  const auto batch_dims = A.sizes().slice(0, A.dim() - 2);
  const int64_t d = A.size(-1);
  bool wide = A.scalar_type() == at::kDouble;
  int64_t m = 0;
  for (const auto& B : Bs) {
    TORCH_CHECK(B.dim() == A.dim() && B.sizes().slice(0, A.dim() - 2).equals(batch_dims) && B.size(-2) == d,
                "ridge_solve: B of shape ", B.sizes(), " does not fit A of shape ", A.sizes(),
                " (expected (..., d, m) with A's batch dimensions)");
    TORCH_CHECK(at::isFloatingType(B.scalar_type()), "ridge_solve: B must be floating point, got ", B.scalar_type());
    TORCH_CHECK(A.device() == B.device(), "ridge_solve: A is on ", A.device(), " but B is on ", B.device());
    wide = wide || B.scalar_type() == at::kDouble;
    m += B.size(-1);
  }
  TORCH_CHECK(d <= INT_MAX && m <= INT_MAX, "ridge_solve: d = ", d, " and m = ", m, " must fit LAPACK's int");
  const auto A3 = A.reshape({-1, d, d});
  auto Xt = at::empty({A3.size(0), m, d}, A.options().dtype(wide ? at::kDouble : at::kFloat));
  int64_t start = 0;
  for (const auto& B : Bs) {
    Xt.narrow(1, start, B.size(-1)).copy_(B.reshape({-1, d, B.size(-1)}).transpose(1, 2));
    start += B.size(-1);
  }
  std::vector<int64_t> x_shape(batch_dims.begin(), batch_dims.end());
  x_shape.push_back(m);
  x_shape.push_back(d);
  return {A3, Xt, x_shape, A.sizes().vec()};
}

std::tuple<at::Tensor, at::Tensor> finish(const Problem& p, const at::Tensor& steps) {
  return {p.Xt.view(p.x_shape).transpose(-1, -2), steps};
}

// ws = Ai + shift I (ws holds one system, or several as (n, d, d)).
void fill(at::Tensor& ws, const at::Tensor& Ai, double shift) {
  ws.copy_(Ai);
  if (shift != 0) ws.diagonal(0, -2, -1).add_(shift);
}

void check_finite(const at::Tensor& ws, at::IntArrayRef shape) {
  // The sum of finite entries may overflow: only then look at every entry.
  const bool finite = std::isfinite(ws.sum().item<double>()) || at::isfinite(ws).all().item<bool>();
  TORCH_CHECK(finite, "ridge_solve: A of shape ", shape, " contains NaN or Inf");
}

// Jitter unit of one system: mean |diagonal| of Ai + ridge I, at least the dtype's tiny.
double jitter_scale(const at::Tensor& Ai, double ridge) {
  const double tiny = Ai.scalar_type() == at::kDouble ? DBL_MIN : FLT_MIN;
  return std::max((Ai.diagonal().to(at::kDouble) + ridge).abs().mean().item<double>(), tiny);
}

// After Ai + ridge I failed to factorise: factorises Ai + (ridge + jitter[k] x mean diagonal) I
// in ws for k = 0, 1, ...; returns the step that succeeded (k + 1) or jitter.size() + 1.
template <typename Factor>
int64_t retry_with_jitter(at::Tensor& ws, const at::Tensor& Ai, double ridge, const std::vector<double>& jitter,
                          Factor&& factor) {
  const double scale = jitter_scale(Ai, ridge);
  for (size_t k = 0; k < jitter.size(); ++k) {
    fill(ws, Ai, ridge + jitter[k] * scale);
    if (factor(ws)) return static_cast<int64_t>(k) + 1;
  }
  return static_cast<int64_t>(jitter.size()) + 1;
}

// xt (m, d) <- (pinv(Ai + ridge I) xt^T)^T, dropping eigenvalues below d * eps * max|eigenvalue|.
void pinv_solve(at::Tensor& ws, const at::Tensor& Ai, double ridge, at::Tensor xt) {
  fill(ws, Ai, ridge);
  auto [evals, evecs] = at::linalg_eigh(ws);
  const double eps = ws.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON;
  auto tol = evals.abs().max() * (static_cast<double>(ws.size(-1)) * eps);
  auto inv = at::where(evals.abs() > tol, evals.reciprocal(), at::zeros_like(evals));
  xt.copy_(at::matmul(at::matmul(xt, evecs) * inv, evecs.t()));
}

template <typename T>
void solve_lapack(const Problem& p, double ridge, const std::vector<double>& jitter, int64_t* steps) {
  const int64_t batch = p.A.size(0);
  const int d = static_cast<int>(p.A.size(-1)), m = static_cast<int>(p.Xt.size(1));
  auto ws = at::empty({d, d}, p.Xt.options());
  auto factor = [d](at::Tensor& w) { return potrf(d, w.data_ptr<T>()); };
  for (int64_t i = 0; i < batch; ++i) {
    const auto Ai = p.A[i];
    auto xt = p.Xt[i];
    fill(ws, Ai, ridge);
    check_finite(ws, p.a_shape);
    steps[i] = factor(ws) ? 0 : retry_with_jitter(ws, Ai, ridge, jitter, factor);
    if (steps[i] > static_cast<int64_t>(jitter.size()))
      pinv_solve(ws, Ai, ridge, xt);
    else
      potrs(d, m, ws.data_ptr<T>(), xt.data_ptr<T>());
  }
}

// Systems up to this size are factorised together (batched potrf) on the ATen path.
constexpr int64_t kBatchedMaxDim = 512;

}  // namespace

std::tuple<at::Tensor, at::Tensor> ridge_solve(const at::Tensor& A, const std::vector<at::Tensor>& B,
                                               double ridge, const std::vector<double>& jitter) {
  if (!A.device().is_cpu()) return ridge_solve_aten(A, B, ridge, jitter);
  auto p = prepare(A, B);
  auto steps = at::zeros({p.A.size(0)}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES(p.Xt.scalar_type(), "ridge_solve",
                             [&] { solve_lapack<scalar_t>(p, ridge, jitter, steps.data_ptr<int64_t>()); });
  return finish(p, steps);
}

std::tuple<at::Tensor, at::Tensor> ridge_solve_aten(const at::Tensor& A, const std::vector<at::Tensor>& B,
                                                    double ridge, const std::vector<double>& jitter) {
  auto p = prepare(A, B);
  const int64_t batch = p.A.size(0), d = p.A.size(-1);
  const int64_t chunk = d <= kBatchedMaxDim ? batch : 1;
  auto steps = at::zeros({batch}, at::kLong);
  auto* step = steps.data_ptr<int64_t>();
  // Column-major matrices, the layout cuSOLVER and LAPACK factorise in place.
  auto ws = at::empty({chunk, d, d}, p.Xt.options()).transpose(1, 2);
  auto info = at::empty({chunk}, p.Xt.options().dtype(at::kInt));
  // One device-to-host copy per chunk: the factorisations' info and whether the chunk is finite.
  auto factor = [&p](at::Tensor& w, at::Tensor& inf) {
    const auto finite = at::isfinite(w).all().to(at::kInt).reshape({1});
    at::linalg_cholesky_ex_out(w, inf, w, /*upper=*/false, /*check_errors=*/false);
    const auto host = at::cat({inf, finite}).cpu();
    TORCH_CHECK(host[-1].item<int>() == 1, "ridge_solve: A of shape ", at::IntArrayRef(p.a_shape),
                " contains NaN or Inf");
    return host.narrow(0, 0, inf.size(0));
  };
  for (int64_t start = 0; start < batch; start += chunk) {
    const int64_t n = std::min(chunk, batch - start);
    auto w = ws.narrow(0, 0, n);
    auto inf = info.narrow(0, 0, n);
    auto As = p.A.narrow(0, start, n);
    auto xt = p.Xt.narrow(0, start, n);
    fill(w, As, ridge);
    const auto failed = factor(w, inf).ne(0);
    std::vector<int64_t> pinv;
    for (int64_t j = 0; j < n; ++j) {
      if (!failed[j].item<bool>()) continue;
      auto wj = w[j];
      auto inf_j = inf.narrow(0, j, 1).squeeze(0);
      auto single = [&inf_j](at::Tensor& x) {
        at::linalg_cholesky_ex_out(x, inf_j, x, false, false);
        return inf_j.item<int>() == 0;
      };
      step[start + j] = retry_with_jitter(wj, As[j], ridge, jitter, single);
      if (step[start + j] > static_cast<int64_t>(jitter.size())) {
        wj.fill_(0);
        wj.diagonal().fill_(1);  // a placeholder factor; this system is solved by pinv below
        pinv.push_back(j);
      }
    }
    // X = L^-T (L^-1 B), both triangular solves in place on X (column-major (d, m) matrices).
    auto x = xt.transpose(1, 2);
    at::linalg_solve_triangular_out(x, w, x, /*upper=*/false);
    at::linalg_solve_triangular_out(x, w.mT(), x, /*upper=*/true);
    for (auto j : pinv) {
      auto wj = w[j];
      pinv_solve(wj, As[j], ridge, xt[j]);
    }
  }
  return finish(p, steps);
}

}  // namespace featcal
