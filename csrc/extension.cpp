// The Python module based._C. It exposes no Python functions: importing it runs the static registrations
// below and in the other csrc/ files, which make the kernels callable as torch.ops.based.*.
#include <Python.h>

#include <torch/library.h>

// Schemas of every op, in one place; each op's file registers its kernels with TORCH_LIBRARY_IMPL.
TORCH_LIBRARY(based, m) {
  m.def("taylor_feature_map(Tensor x) -> Tensor");
  m.def("linear_attention_step(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, Tensor(b!) ksum, bool normalize, "
        "float eps) -> Tensor");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of based; importing registers torch.ops.based.*", -1, nullptr};
  return PyModule_Create(&module);
}
