// Declarations of the featcal._C operators (bindings.cpp exposes them to Python).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace featcal {

// Solves (A + ridge I) X = B for symmetric positive definite A (..., d, d) and B = [B_1 ... B_k]
// (each (..., d, m_i), taken side by side without a concatenated copy). Returns X (..., d, m),
// a transposed view of a (..., m, d) contiguous buffer, and per system
// the jitter step that factorised it: 0 for none, k for jitter[k - 1] x mean diagonal,
// jitter.size() + 1 for the eigendecomposition pseudo-inverse.
std::tuple<at::Tensor, at::Tensor> ridge_solve(const at::Tensor& A, const std::vector<at::Tensor>& B,
                                               double ridge, const std::vector<double>& jitter);

// The same through ATen's cholesky_ex and in-place triangular solves (cuSOLVER and cuBLAS on
// CUDA) on any device.
std::tuple<at::Tensor, at::Tensor> ridge_solve_aten(const at::Tensor& A, const std::vector<at::Tensor>& B,
                                                    double ridge, const std::vector<double>& jitter);

// A += G / n with n = max(||G||_F, eps), in one pass over A after one over G; returns n.
// Leaves A untouched and returns 0 when n is 0.
double assemble(at::Tensor& A, const at::Tensor& G, double eps);

}  // namespace featcal
