// Python bindings of featcal._C.
#include <torch/extension.h>

#include "featcal.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "featcal._C: in-place Cholesky ridge solves and the fused assemble step";
  m.def("ridge_solve", &featcal::ridge_solve, "(A + ridge I) X = B by Cholesky in one workspace",
        py::arg("A"), py::arg("B"), py::arg("ridge"), py::arg("jitter"));
  m.def("ridge_solve_aten", &featcal::ridge_solve_aten,
        "ridge_solve through ATen (the CUDA path)", py::arg("A"),
        py::arg("B"), py::arg("ridge"), py::arg("jitter"));
  m.def("assemble", &featcal::assemble, "A += G / max(||G||_F, eps); returns the divisor",
        py::arg("A"), py::arg("G"), py::arg("eps"));
}
