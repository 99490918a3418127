// Output buffers for the kernels, kept for reuse when their array is freed.
//
// The objective writes tens of MB of gradients per step. Memory freshly mapped for them costs
// a page fault per 4 KiB page on first touch (the kernel zeroes each page, one more pass over
// the bytes), and glibc returns blocks this large to the system when they are freed, so a
// training loop would pay that every step. Blocks of 1 MiB and more are therefore kept here
// when the array that owns them dies, and handed out again for the same size (a training
// loop asks for the same shapes every step); newly mapped ones are advised into huge pages.
// At most kMaxCached bytes are kept; the rest go back to the system.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace py = pybind11;

namespace fastlvm {
namespace {

constexpr size_t kMinPooled = size_t(1) << 20;
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMaxCached = size_t(256) << 20;

struct Pool {
  std::mutex lock;
  std::multimap<size_t, void*> free_blocks;  // by size
  std::unordered_map<void*, size_t> sizes;   // every pooled block handed out
  size_t cached = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: arrays may die after static destructors run
  return *p;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

void* take(size_t bytes) {
  if (bytes < kMinPooled) {
    void* p = std::aligned_alloc(64, round_up(std::max<size_t>(bytes, 1), 64));
    if (!p) throw std::bad_alloc();
    return p;
  }
  size_t size = round_up(bytes, kHuge);
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> g(P.lock);
    auto it = P.free_blocks.find(size);
    if (it != P.free_blocks.end()) {
      void* p = it->second;
      P.free_blocks.erase(it);
      P.cached -= size;
      P.sizes[p] = size;
      return p;
    }
  }
  void* p = std::aligned_alloc(kHuge, size);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);  // advice only: fewer faults where the kernel allows it
#endif
  std::lock_guard<std::mutex> g(P.lock);
  P.sizes[p] = size;
  return p;
}

void give(void* p) {
  Pool& P = pool();
  std::unique_lock<std::mutex> g(P.lock);
  auto it = P.sizes.find(p);
  if (it == P.sizes.end()) {  // a small block
    g.unlock();
    std::free(p);
    return;
  }
  size_t size = it->second;
  P.sizes.erase(it);
  if (P.cached + size > kMaxCached) {
    g.unlock();
    std::free(p);
    return;
  }
  P.free_blocks.emplace(size, p);
  P.cached += size;
}

py::array empty(const std::vector<py::ssize_t>& shape, const py::dtype& dtype) {
  size_t n = 1;
  for (auto s : shape) {
    if (s < 0) throw py::value_error("negative dimension");
    n *= size_t(s);
  }
  void* p = take(n * size_t(dtype.itemsize()));
  py::capsule owner(p, [](void* q) { give(q); });
  return py::array(dtype, shape, {}, p, owner);
}

}  // namespace

void register_buffers(py::module_& m) {
  m.def("empty", &empty, py::arg("shape"), py::arg("dtype"),
        "an uninitialised C-contiguous array whose memory is reused after it is freed");
  m.def(
      "cached_bytes",
      [] {
        std::lock_guard<std::mutex> g(pool().lock);
        return pool().cached;
      },
      "bytes of freed output buffers kept for reuse");
}

}  // namespace fastlvm
