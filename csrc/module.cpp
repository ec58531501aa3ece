// ued_fast._C: importing this module registers the C++ ops (TORCH_LIBRARY_FRAGMENT blocks in each
// csrc/*.cpp and csrc/*.cu) with the dispatcher. It defines no Python functions of its own.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ued_fast {
bool cuda_built() {
#ifdef UED_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def("cuda_built() -> bool", &ued_fast::cuda_built);
}
