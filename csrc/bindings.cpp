// pybind11 module tkd_core._C: the INT8 GEMM entry points, called by tkd_core/int8_gemm.py, and
// the CPU encoder ops of tkd_core/infer.py.
// No torch headers: tensors cross as raw addresses (t.data_ptr(), uintptr_t) plus sizes and
// strides, validated in Python first. Long-running calls release the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <new>
#include <stdexcept>

#include "encoder_cpu.h"
#include "int8_gemm_cpu.h"
#include "out_pool.h"
#ifdef TKD_WITH_CUDA
#include "int8_gemm_cuda.h"
#endif

namespace py = pybind11;

template <typename T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// DLPack's ABI (dlpack.h, the legacy "dltensor" capsule torch.from_dlpack takes): how a pooled
// output block (out_pool.h) becomes a torch tensor whose storage, when freed, gives it back.
struct DLDevice { int32_t device_type; int32_t device_id; };  // kDLCPU = 1
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };  // kDLInt 0, kDLFloat 2
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
struct Lease {
  DLManagedTensor m;
  int64_t shape[2], strides[2], block_bytes;
};

// rows x cols float32 (is_int = false) or int32, C-contiguous, as a DLPack capsule
static py::object pooled_output(int64_t rows, int64_t cols, bool is_int) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("pooled_output: negative shape");
  int64_t block = 0;
  void* p = tkd::outpool::take(rows * cols * 4, &block);
  if (p == nullptr) throw std::bad_alloc();
  auto* l = new Lease{};
  l->shape[0] = rows;
  l->shape[1] = cols;
  l->strides[0] = cols;
  l->strides[1] = 1;
  l->block_bytes = block;
  l->m.dl_tensor = DLTensor{p, DLDevice{1, 0}, 2,
                            DLDataType{static_cast<uint8_t>(is_int ? 0 : 2), 32, 1}, l->shape,
                            l->strides, 0};
  l->m.manager_ctx = l;
  l->m.deleter = [](DLManagedTensor* self) {
    auto* lease = static_cast<Lease*>(self->manager_ctx);
    tkd::outpool::give_back(lease->m.dl_tensor.data, lease->block_bytes);
    delete lease;
  };
  // A capsule torch never consumed (still named "dltensor") ends the lease itself.
  PyObject* cap = PyCapsule_New(&l->m, "dltensor", [](PyObject* c) {
    if (PyCapsule_IsValid(c, "dltensor")) {
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
      m->deleter(m);
    }
  });
  if (cap == nullptr) {
    l->m.deleter(&l->m);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "tkd INT8 GEMM extension: exact AVX-512 VNNI/AVX2/scalar CPU kernels, tensor-core CUDA kernel";
#ifdef TKD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", &tkd::cpu_isa,
        "ISA of the CPU path in use: 'avx512vnni', 'avx2' or 'scalar'");
  m.def("cpu_isa_code", &tkd::cpu_isa_code, "the same as a code: 2, 1 or 0");
  m.def("set_cpu_isa", &tkd::set_cpu_isa, py::arg("isa"),
        "'scalar' / 'avx2' force a path (for tests), 'auto' restores detection");
  m.def("pooled_output", &pooled_output, py::arg("rows"), py::arg("cols"), py::arg("is_int"),
        "a (rows, cols) float32 / int32 block from the output pool, as a DLPack capsule");
  m.def("output_pool_release", &tkd::outpool::release, "frees the idle blocks; returns bytes");
  m.def("output_pool_set_max_idle", &tkd::outpool::set_max_idle, py::arg("bytes"),
        "caps the idle bytes kept; returns the previous cap");
  m.def("output_pool_stats", [] {
    const tkd::outpool::Stats s = tkd::outpool::stats();
    py::dict d;
    d["idle_bytes"] = s.idle_bytes;
    d["idle_blocks"] = s.idle_blocks;
    d["leased_bytes"] = s.leased_bytes;
    d["leased_blocks"] = s.leased_blocks;
    d["max_idle_bytes"] = s.max_idle_bytes;
    d["reuses"] = s.reuses;
    d["allocs"] = s.allocs;
    return d;
  });
  m.def("packed_b_bytes", &tkd::packed_b_bytes, py::arg("N"), py::arg("K"), py::arg("isa"));
  m.def("gemm_threads", &tkd::gemm_threads, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("nthreads"));
  m.def("pack_b", [](uintptr_t b, int64_t N, int64_t K, int64_t sn, int64_t sk, uintptr_t out,
                     int isa, int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::pack_b(ptr<const int8_t>(b), N, K, sn, sk, ptr<void>(out), isa, nthreads);
  });
  py::class_<tkd::LinearPlan>(m, "LinearPlan")
      .def(py::init([](uintptr_t bp, int isa, int64_t N, int64_t K, uintptr_t w_scale,
                       uintptr_t bias, int act) {
             return tkd::LinearPlan{ptr<const void>(bp), isa, N, K, ptr<const float>(w_scale),
                                    ptr<const float>(bias), act};
           }),
           py::arg("packed"), py::arg("isa"), py::arg("N"), py::arg("K"), py::arg("w_scale"),
           py::arg("bias"), py::arg("act"))
      .def("__call__", [](const tkd::LinearPlan& p, uintptr_t x, int dtype, int64_t sm,
                          int64_t M, uintptr_t out, int64_t nthreads) {
        py::gil_scoped_release nogil;
        tkd::linear_plan_run(p, ptr<const void>(x), dtype, sm, M, ptr<float>(out), p.N,
                             nthreads);
      });
  m.def("attention_fwd", [](uintptr_t qkv, int64_t ld, uintptr_t offsets, int64_t B, int64_t H,
                            int64_t D, float scale, uintptr_t out, int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::attention_fwd(ptr<const float>(qkv), ld, ptr<const int64_t>(offsets), B, H, D, scale,
                       ptr<float>(out), nthreads);
  });
  m.def("add_layer_norm", [](uintptr_t x, uintptr_t r, uintptr_t gamma, uintptr_t beta,
                             float eps, uintptr_t out, int64_t rows, int64_t N,
                             int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::add_layer_norm(ptr<const float>(x), ptr<const float>(r), ptr<const float>(gamma),
                        ptr<const float>(beta), eps, ptr<float>(out), rows, N, nthreads);
  });
  m.def("activation", [](uintptr_t v, int64_t n, int act, int isa) {
    tkd::activation(ptr<float>(v), n, act, isa);
  });
  m.def("quantize_rows", [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t sm,
                            uintptr_t q, uintptr_t scale, int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::quantize_rows(ptr<const void>(x), dtype, M, K, sm, ptr<int8_t>(q), ptr<float>(scale),
                       nthreads);
  });
  m.def("gemm_int8", [](uintptr_t a, int64_t sm, int64_t sk, uintptr_t bp, int isa, int64_t M,
                        int64_t N, int64_t K, uintptr_t out, int64_t ldc, uintptr_t a_scale,
                        uintptr_t b_scale, uintptr_t bias, int act, int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::gemm_int8(ptr<const int8_t>(a), sm, sk, ptr<const void>(bp), isa, M, N, K,
                   ptr<void>(out), ldc, ptr<const float>(a_scale), ptr<const float>(b_scale),
                   ptr<const float>(bias), act, nthreads);
  });
  m.def("linear_dynamic", [](uintptr_t x, int dtype, int64_t sm, uintptr_t bp, int isa,
                             int64_t M, int64_t N, int64_t K, uintptr_t out, int64_t ldc,
                             uintptr_t x_scale, uintptr_t w_scale, uintptr_t bias, int act,
                             int64_t nthreads) {
    py::gil_scoped_release nogil;
    tkd::linear_dynamic(ptr<const void>(x), dtype, sm, ptr<const void>(bp), isa, M, N, K,
                        ptr<float>(out), ldc, ptr<float>(x_scale), ptr<const float>(w_scale),
                        ptr<const float>(bias), act, nthreads);
  });
#ifdef TKD_WITH_CUDA
  m.def("gemm_cuda", [](uintptr_t a, uintptr_t b, int64_t M, int64_t N, int64_t K, int64_t lda,
                        int64_t ldb, uintptr_t out, int64_t ldc, int out_kind, uintptr_t a_scale,
                        uintptr_t b_scale, uintptr_t bias, uintptr_t stream) {
    int err;
    {
      py::gil_scoped_release nogil;
      err = tkd_int8_gemm_cuda(ptr<const int8_t>(a), ptr<const int8_t>(b), M, N, K, lda, ldb,
                               ptr<void>(out), ldc, out_kind, ptr<const float>(a_scale),
                               ptr<const float>(b_scale), ptr<const float>(bias), stream);
    }
    if (err != 0) throw std::runtime_error(std::string("tkd int8_gemm CUDA launch failed: ") +
                                           tkd_cuda_error_string(err));
  });
#endif
}
