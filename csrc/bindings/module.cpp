// The Python module `trail._C`. It holds no functions: importing it loads this library, whose
// static initialisers register the ops (torch.ops.trail.*) and classes (torch.classes.trail.*).
// Limited API only, so one build serves every CPython >= 3.9 of a platform.
#include <Python.h>

static struct PyModuleDef trail_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "trail native library: see torch.ops.trail", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&trail_c_module); }
