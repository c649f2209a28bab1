// mobilemoe._C: threading, the linear and fused MoE operators, and the Python bindings.
// The ISA decision lives in dispatch.cpp, the per-ISA math in isa_*.cpp (layout: mm_common.h).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include <pthread.h>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "mm_common.h"
#include "dispatch.h"
#include "ops_api.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MOBILEMOE_X86 1
#include <immintrin.h>  // _mm_pause only (baseline SSE2)
#else
#define MOBILEMOE_X86 0
#endif

namespace {

constexpr int64_t TOKEN_CHUNK = 128;  // tokens per job: activations of a chunk stay in L2
constexpr int64_t TILE_BLOCK = 4;    // 16-row tiles per linear job

const mm_kernels* kernels() { return mobilemoe_api::current_isa().kernels; }

inline void cpu_relax() {
#if MOBILEMOE_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// The jobs of one call, split into one contiguous segment per worker. A worker runs its own
// segment front to back, so it streams through neighbouring weights (the hardware and software
// prefetchers stay ahead; interleaving single jobs between threads restarted every stream at each
// ~10 KB job and left decode GEMVs well below DRAM bandwidth), touching only its own cache line.
// A worker whose segment is empty steals single jobs from the back of the others, so an unequal
// or absent worker (never scheduled on a busy machine) costs no more than before.
class JobQueue {
 public:
  JobQueue(int64_t njobs, int nworkers) : n_(std::max(1, nworkers)), segs_(new Seg[n_]) {
    for (int w = 0; w < n_; ++w) {
      const uint64_t b = (uint64_t)(njobs * w / n_), e = (uint64_t)(njobs * (w + 1) / n_);
      segs_[w].fb.store((b << 32) | e, std::memory_order_relaxed);
    }
  }
  // Next job for worker w (own segment first, then stealing); false when every segment is empty.
  bool next(int w, int64_t& j) {
    if (pop(segs_[w % n_], true, j)) return true;
    for (int v = 1; v < n_; ++v)
      if (pop(segs_[(w + v) % n_], false, j)) return true;
    return false;
  }

 private:
  struct alignas(64) Seg {
    std::atomic<uint64_t> fb{0};  // front << 32 | back: the jobs [front, back) not yet claimed
  };
  static bool pop(Seg& s, bool front, int64_t& j) {
    uint64_t cur = s.fb.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = cur >> 32, b = cur & 0xFFFFFFFFu;
      if (f >= b) return false;
      const uint64_t nxt = front ? ((f + 1) << 32) | b : (f << 32) | (b - 1);
      if (s.fb.compare_exchange_weak(cur, nxt, std::memory_order_relaxed)) {
        j = (int64_t)(front ? f : b - 1);
        return true;
      }
    }
  }
  int n_;
  std::unique_ptr<Seg[]> segs_;
};

// Default threading: a small job pool. The caller and up to nworkers-1 helper threads claim
// jobs from a JobQueue; the caller waits only for jobs a helper has actually CLAIMED, so a
// helper the OS has not scheduled yet (busy or shared machine) never stalls a call -- the caller
// just does its share. An OpenMP region instead waits at its closing barrier for every team thread,
// which on an oversubscribed machine costs several ms per region: on the shared 2-core dev machine
// (load ~6) a decode MoE layer took 16 ms with at::parallel_for vs 0.2 ms with this pool (0.16 ms on
// one thread); on a quiet machine both give the same best times. Helpers spin ~300 us after each
// task, then sleep on a condition variable. Also works in a fork()ed child (GNU OpenMP does not).
// MOBILEMOE_KERNEL_THREADING=omp selects at::parallel_for (OpenMP) instead.
class JobPool {
 public:
  using Fn = std::function<void(int64_t, int)>;
  static int spin_micros() {
    static const int us = [] {
      const char* e = std::getenv("MOBILEMOE_POOL_SPIN_US");
      return e ? std::atoi(e) : 300;
    }();
    return us;
  }

  // The process-wide pool, created on first use and never destroyed (detached helpers outlive static
  // destructors). A fork()ed child gets a fresh pool: the parent's helpers do not exist there.
  static JobPool& instance() {
    JobPool* p = current_.load(std::memory_order_acquire);
    if (p == nullptr) {
      static std::once_flag atfork_once;
      std::call_once(atfork_once, [] {
        pthread_atfork(nullptr, nullptr, [] { current_.store(nullptr, std::memory_order_relaxed); });
      });
      JobPool* fresh = new JobPool();
      if (current_.compare_exchange_strong(p, fresh))
        p = fresh;
      else
        delete fresh;  // another thread won; `p` now holds its pool
    }
    return *p;
  }

  // Returns false (nothing run) when another thread is using the pool; the caller then runs serially.
  bool run(int64_t njobs, int nworkers, const Fn& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_helpers(nworkers - 1);
    JobQueue queue(njobs, nworkers);
    Task t;
    t.fn = &fn;
    t.njobs = njobs;
    t.max_workers = nworkers;
    t.queue = &queue;
    cur_.store(&t, std::memory_order_seq_cst);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.fetch_add(1, std::memory_order_seq_cst);
    }
    cv_.notify_all();
    {
      c10::ParallelGuard guard(true);  // ATen ops inside jobs run inline
      run_claimed(t, 0);
    }
    // Unpublish, then wait for claimed jobs and for every helper that may still hold &t.
    cur_.store(nullptr, std::memory_order_seq_cst);
    wait_until([&] { return t.done.load(std::memory_order_acquire) >= t.njobs; });
    wait_until([&] { return entering_.load(std::memory_order_seq_cst) == 0; });
    wait_until([&] { return t.refs.load(std::memory_order_seq_cst) == 0; });
    return true;
  }

 private:
  struct Task {
    const Fn* fn = nullptr;
    int64_t njobs = 0;
    int max_workers = 1;
    JobQueue* queue = nullptr;
    std::atomic<int64_t> done{0};
    std::atomic<int> refs{0}, next_worker{1};
  };

  // Run jobs from the queue until none are left; the shared `done` counter is touched once per
  // worker (a per-job atomic on a shared line cost as much as a decode-sized job).
  static void run_claimed(Task& t, int w) {
    int64_t j, n = 0;
    while (t.queue->next(w, j)) {
      (*t.fn)(j, w);
      ++n;
    }
    if (n) t.done.fetch_add(n, std::memory_order_release);
  }

  template <typename P>
  static void wait_until(const P& pred) {
    for (int i = 0; !pred(); ++i) {
      if (i < 4096)
        cpu_relax();
      else
        std::this_thread::yield();  // let a descheduled helper finish its claimed job
    }
  }

  void ensure_helpers(int n) {
    while ((int)helpers_ < n) {
      std::thread(&JobPool::helper_loop, this).detach();
      ++helpers_;
    }
  }

  void helper_loop() {
    c10::ParallelGuard guard(true);
    uint64_t seen = gen_.load(std::memory_order_seq_cst);
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_micros())) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
          break;
        }
      }
      seen = gen_.load(std::memory_order_seq_cst);
      // Hazard protocol: `entering_` covers the window between loading cur_ and taking a reference,
      // so run() cannot return (and destroy its Task) while a helper might still touch it.
      entering_.fetch_add(1, std::memory_order_seq_cst);
      Task* t = cur_.load(std::memory_order_seq_cst);
      if (t) t->refs.fetch_add(1, std::memory_order_seq_cst);
      entering_.fetch_sub(1, std::memory_order_seq_cst);
      if (!t) continue;
      const int w = t->next_worker.fetch_add(1, std::memory_order_relaxed);
      if (w < t->max_workers) run_claimed(*t, w);
      t->refs.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex run_mutex_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<Task*> cur_{nullptr};
  std::atomic<int> entering_{0};
  size_t helpers_ = 0;  // guarded by run_mutex_
  static inline std::atomic<JobPool*> current_{nullptr};
};

bool use_job_pool() {
  const char* env = std::getenv("MOBILEMOE_KERNEL_THREADING");
  return !(env && std::strcmp(env, "omp") == 0);
}

// Run fn(job, worker) for job in [0, njobs), dynamically scheduled over nworkers threads: the job
// pool above, or (MOBILEMOE_KERNEL_THREADING=omp) one at::parallel_for over the workers, each
// claiming jobs from a shared atomic counter (balances unequal jobs and a slow core).
// Worker ids < nworkers index per-worker scratch. Inside an enclosing parallel region: inline.
template <typename F>
void run_jobs(int64_t njobs, int nworkers, const F& fn) {
  if (njobs <= 0) return;
  if (nworkers <= 1 || njobs == 1 || at::in_parallel_region()) {
    for (int64_t j = 0; j < njobs; ++j) fn(j, 0);
    return;
  }
  if (use_job_pool()) {
    const JobPool::Fn f = [&fn](int64_t j, int w) { fn(j, w); };
    if (!JobPool::instance().run(njobs, nworkers, f))
      for (int64_t j = 0; j < njobs; ++j) fn(j, 0);  // pool busy (another calling thread)
    return;
  }
  JobQueue queue(njobs, nworkers);  // OpenMP
  at::parallel_for(0, nworkers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      int64_t j;
      while (queue.next(static_cast<int>(w), j)) fn(j, static_cast<int>(w));
    }
  });
}

// Below 256 KiB of "work" (weight bytes + MACs/12, ~10 us on one core) a call runs on one thread:
// waking and synchronising helpers would cost more than it saves. (1 MiB kept the ~0.5 MB QKV and O
// GEMVs of MobileMoE-S on one thread; 256 KiB made its decode 6% faster on a quiet machine, and
// 128 KiB or 64 KiB no faster.) MOBILEMOE_PARALLEL_WORK overrides it (read once), for other machines.
double parallel_work_threshold() {
  static const double v = [] {
    const char* e = std::getenv("MOBILEMOE_PARALLEL_WORK");
    return e ? std::atof(e) : double(1 << 18);
  }();
  return v;
}

int workers_for(int64_t njobs, double work = 1e300) {
  if (work < parallel_work_threshold()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), njobs)));
}

// fn(r) for every row r in [0, M), in jobs of `rows` consecutive rows over the pool (one thread
// when `work` is below the parallel threshold).
template <typename F>
void run_row_jobs(int64_t M, int64_t rows, double work, const F& fn) {
  const int64_t njobs = (M + rows - 1) / rows;
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int) {
    for (int64_t r = j * rows; r < std::min(M, (j + 1) * rows); ++r) fn(r);
  });
}

struct QAct {  // int8 activations of rows x [M, K]
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
};

void quantize_rows(const mm_kernels* k, const float* x, int64_t M, int64_t K, QAct& out) {
  const int64_t nkb = K / MM_QK;
  out.q.resize(M * K);
  out.d.resize(M * nkb);
  out.s.resize(M * nkb);
  run_row_jobs(M, 16, 8.0 * M * K, [&](int64_t r) {
    k->quant_row(x + r * K, K, out.q.data() + r * K, out.d.data() + r * nkb, out.s.data() + r * nkb);
  });
}

void check_packed_linear(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed linear weight must be a contiguous uint8 [tiles, tile_stride] tensor");
  TORCH_CHECK(K % MM_QK == 0 && K > 0, "in_features must be a positive multiple of 32, got ", K);
  TORCH_CHECK(packed.size(0) == (N + MM_TILE - 1) / MM_TILE, "packed weight has ", packed.size(0),
              " tiles, expected ", (N + MM_TILE - 1) / MM_TILE, " for ", N, " rows");
  TORCH_CHECK(packed.size(1) >= (K / MM_QK) * (MM_BLOCK_BYTES + 2 * MM_TILE), "packed tile stride too small");
}

// Linear jobs: tile blocks x token chunks (chunk-major so concurrent jobs share activations).
void linear_jobs(const mm_kernels* k, const uint8_t* W, int64_t tile_stride, int64_t N, int64_t K,
                 const QAct& a, int64_t M, float* out, int64_t ldo) {
  const int64_t nkb = K / MM_QK;
  const int64_t ntiles = (N + MM_TILE - 1) / MM_TILE;
  const int64_t ntb = (ntiles + TILE_BLOCK - 1) / TILE_BLOCK;
  const int64_t nch = (M + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
  const int64_t njobs = ntb * nch;
  const double work = (double)ntiles * tile_stride + (double)M * N * K / 12.0;
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int) {
    const int64_t c = j / ntb, tb = j % ntb;
    const int64_t m0 = c * TOKEN_CHUNK, m1 = std::min(M, m0 + TOKEN_CHUNK);
    const int64_t t0 = tb * TILE_BLOCK, t1 = std::min(ntiles, t0 + TILE_BLOCK);
    k->gemm(W, tile_stride, nkb, 1, t0, t1, a.q.data() + m0 * K, a.d.data() + m0 * nkb, a.s.data() + m0 * nkb,
            m1 - m0, out + m0 * ldo, ldo, N);
  });
}

at::Tensor linear_forward(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& x) {
  check_packed_linear(packed, N, K);
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == K && x.is_contiguous(),
              "x must be a contiguous float32 [M, ", K, "] tensor");
  const mm_kernels* k = kernels();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  QAct a;
  quantize_rows(k, x.data_ptr<float>(), M, K, a);
  linear_jobs(k, packed.data_ptr<uint8_t>(), packed.size(1), N, K, a, M, out.data_ptr<float>(), N);
  return out;
}

// Packed stacked experts: codes [E, tiles*tile_stride], scale rows fp16 [E, G, in + in/32] (per group
// [sn | smax], see mm_common.h).
struct ExpertSet {
  const uint8_t* codes;
  const uint16_t* scales;
  int64_t E, in, out, nkb, tile_stride, expert_bytes, G, scale_row;
};

ExpertSet expert_set(const at::Tensor& codes, const at::Tensor& scales, int64_t in, int64_t out) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "packed expert codes must be a contiguous uint8 [E, bytes] tensor");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.dim() == 3 && scales.is_contiguous(),
              "packed expert scales must be a contiguous float16 [E, out/32, in + in/32] tensor");
  TORCH_CHECK(in % MM_QK == 0 && out % MM_QK == 0, "expert in/out must be multiples of 32");
  ExpertSet s;
  s.E = codes.size(0);
  s.in = in;
  s.out = out;
  s.nkb = in / MM_QK;
  s.tile_stride = s.nkb * MM_BLOCK_BYTES;
  s.expert_bytes = (out / MM_TILE) * s.tile_stride;
  s.G = out / MM_QK;
  s.scale_row = in + s.nkb;
  TORCH_CHECK(codes.size(1) == s.expert_bytes, "packed expert codes: ", codes.size(1), " bytes per expert, expected ",
              s.expert_bytes);
  TORCH_CHECK(scales.size(0) == s.E && scales.size(1) == s.G && scales.size(2) == s.scale_row,
              "packed expert scales: shape ", scales.sizes(), ", expected [", s.E, ", ", s.G, ", ", s.scale_row,
              "] (repack with this version's pack_experts)");
  s.codes = codes.data_ptr<uint8_t>();
  s.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return s;
}

struct Scratch {  // per-worker buffers of one expert group: its int8 activations and block maxima
  std::vector<int8_t> q;
  std::vector<float> d, smax;
  std::vector<int32_t> s;
  void reserve(int64_t rows, int64_t K) {
    const int64_t nkb = K / MM_QK;
    if ((int64_t)q.size() < rows * K) q.resize(rows * K);
    if ((int64_t)d.size() < rows * nkb) {
      d.resize(rows * nkb);
      s.resize(rows * nkb);
    }
    if ((int64_t)smax.size() < nkb) smax.resize(nkb);
  }
};

// Rows [M, K] prepared for the expert kernels (mm_common.h): u = x * 127 / max|x|_b, xd = max|x|_b / 127.
struct RowPrep {
  std::vector<float> u, xd;
};

void prep_rows(const mm_kernels* k, const float* x, int64_t M, int64_t K, RowPrep& out) {
  const int64_t nkb = K / MM_QK;
  out.u.resize(M * K);
  out.xd.resize(M * nkb);
  run_row_jobs(M, 16, 4.0 * M * K, [&](int64_t r) {
    k->prep_row(x + r * K, K, out.u.data() + r * K, out.xd.data() + r * nkb);
  });
}

// One expert, one 32-wide output group g, rows [r0, r1) of the prepared rows (row r is idx[r], or r):
// each row is rounded to int8 against the group's normalised scale row sn with step
// xd[row, b] * smax[b], and dotted with the codes as they are.
void expert_group(const mm_kernels* k, const ExpertSet& X, int64_t e, int64_t g, const RowPrep& src,
                  const int64_t* idx, int64_t r0, int64_t r1, float* out, int64_t ldo, Scratch& sc) {
  const int64_t m = r1 - r0, K = X.in, nkb = X.nkb;
  sc.reserve(m, K);
  const uint16_t* sn = X.scales + (e * X.G + g) * X.scale_row;
  // The next group's scale row: it is read first by the next job, before any code bytes.
  for (int64_t off = 0; off < X.scale_row * 2; off += 64) __builtin_prefetch((const char*)(sn + X.scale_row) + off);
  for (int64_t b = 0; b < nkb; ++b) sc.smax[b] = mm_half_to_float(sn[K + b]);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = idx ? idx[r] : r;
    k->quant_scaled(src.u.data() + row * K, sn, K, sc.q.data() + (r - r0) * K, sc.s.data() + (r - r0) * nkb);
    const float* xd = src.xd.data() + row * nkb;
    float* d = sc.d.data() + (r - r0) * nkb;
    for (int64_t b = 0; b < nkb; ++b) d[b] = xd[b] * sc.smax[b];
  }
  k->gemm(X.codes + e * X.expert_bytes, X.tile_stride, nkb, 0, 2 * g, 2 * g + 2, sc.q.data(), sc.d.data(),
          sc.s.data(), m, out + r0 * ldo, ldo, X.out);
}

at::Tensor expert_forward(const at::Tensor& codes, const at::Tensor& scales, int64_t in, int64_t out, int64_t e,
                          const at::Tensor& x) {
  ExpertSet X = expert_set(codes, scales, in, out);
  TORCH_CHECK(e >= 0 && e < X.E, "expert index ", e, " out of range [0, ", X.E, ")");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == in && x.is_contiguous(),
              "x must be a contiguous float32 [M, ", in, "] tensor");
  const mm_kernels* k = kernels();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out}, x.options());
  const int64_t nch = (M + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
  const int64_t njobs = nch * X.G;
  const int nw = workers_for(njobs, (double)X.expert_bytes * 1.125 + (double)M * in * out / 12.0);
  std::vector<Scratch> scratch(nw);
  RowPrep xr;
  prep_rows(k, x.data_ptr<float>(), M, in, xr);
  float* yp = y.data_ptr<float>();
  run_jobs(njobs, nw, [&](int64_t j, int w) {
    const int64_t c = j / X.G, g = j % X.G;
    expert_group(k, X, e, g, xr, nullptr, c * TOKEN_CHUNK, std::min(M, (c + 1) * TOKEN_CHUNK), yp, out,
                 scratch[w]);
  });
  return y;
}

// rows [M, 2W] (contiguous fp32) -> out [M, W]: silu(first half) * second half, with the ISA's
// vectorized exp; large inputs in row slices spread over the job pool.
void swiglu_into(const mm_kernels* k, const float* g, int64_t M, int64_t W, float* o) {
  run_row_jobs(M, std::max<int64_t>(1, 16384 / W), 24.0 * M * W, [&](int64_t r) {
    k->silu_mul(g + r * 2 * W, g + r * 2 * W + W, o + r * W, W);
  });
}

at::Tensor swiglu_rows(const at::Tensor& gu, int64_t W) {
  at::Tensor h = at::empty({gu.size(0), W}, gu.options());
  swiglu_into(kernels(), gu.data_ptr<float>(), gu.size(0), W, h.data_ptr<float>());
  return h;
}

struct Job {
  int kind;  // 0 = routed expert group, 1 = shared linear tile block
  int64_t e, g, a0, a1;
};

// Buffers of the fused MoE operator, kept per calling thread and reused (capacity only grows): at
// decode a layer is ~0.1 ms, and allocating and zeroing a dozen buffers per call cost several us.
struct MoEWorkspace {
  std::vector<int64_t> offs, fill, token_of, slot_of;
  std::vector<Job> jobs;
  std::vector<Scratch> scratch;  // one per worker
  std::vector<float> gu, sgu, h, hs, y, ys;
  QAct xq, hq;
  RowPrep xr, hr;
};

// Resize without keeping old values cheaply: every element is written before it is read.
template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// The fused MoE layer. x [T, H]; ids/weights [T, k]; routed experts gate_up [E, H, 2I] and
// down [E, I, H] (packed); optional shared SwiGLU: fused gate/up PackedLinear [2S, H] and down [H, S].
at::Tensor moe_forward(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const at::Tensor& gu_codes, const at::Tensor& gu_scales, const at::Tensor& dn_codes,
                       const at::Tensor& dn_scales, int64_t I, const at::Tensor& sh_gu, const at::Tensor& sh_dn,
                       int64_t S) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [T, H]");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(ids.dtype() == at::kLong && ids.dim() == 2 && ids.size(0) == T && ids.is_contiguous(),
              "expert_ids must be contiguous int64 [T, k]");
  const int64_t kk = ids.size(1);
  TORCH_CHECK(weights.dtype() == at::kFloat && weights.sizes() == ids.sizes() && weights.is_contiguous(),
              "weights must be contiguous float32 [T, k]");
  ExpertSet GU = expert_set(gu_codes, gu_scales, H, 2 * I);
  ExpertSet DN = expert_set(dn_codes, dn_scales, I, H);
  TORCH_CHECK(GU.E == DN.E, "gate_up and down expert counts differ");
  const bool shared = S > 0;
  if (shared) {
    check_packed_linear(sh_gu, 2 * S, H);
    check_packed_linear(sh_dn, H, S);
  }
  const mm_kernels* k = kernels();
  const int64_t E = GU.E, A = T * kk;
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0) return out;
  // The calling thread's workspace, by reference: the job lambdas run on other threads too, and a
  // thread_local named inside them would resolve to each runner's own (empty) instance.
  thread_local MoEWorkspace tls_workspace;
  MoEWorkspace& ws = tls_workspace;

  // Group the T*k assignments by expert (stable counting sort). An id of -1 skips that
  // assignment (the offloading runtime runs a layer in batches of resident experts).
  const int64_t* idp = ids.data_ptr<int64_t>();
  int64_t* offs = sized(ws.offs, E + 1);
  int64_t* fill = sized(ws.fill, E);
  int64_t* token_of = sized(ws.token_of, A);
  int64_t* slot_of = sized(ws.slot_of, A);
  std::fill(offs, offs + E + 1, 0);
  for (int64_t a = 0; a < A; ++a) {
    TORCH_CHECK(idp[a] >= -1 && idp[a] < E, "expert id ", idp[a], " out of range [0, ", E, ")");
    if (idp[a] >= 0) offs[idp[a] + 1]++;
  }
  for (int64_t e = 0; e < E; ++e) offs[e + 1] += offs[e];
  std::copy(offs, offs + E, fill);
  for (int64_t a = 0; a < A; ++a) {
    slot_of[a] = -1;
    if (idp[a] < 0) continue;
    const int64_t p = fill[idp[a]]++;
    token_of[p] = a / kk;
    slot_of[a] = p;
  }
  const float* xp = x.data_ptr<float>();
  if (shared) quantize_rows(k, xp, T, H, ws.xq);
  prep_rows(k, xp, T, H, ws.xr);
  const int64_t R = offs[E];  // routed rows (assignments kept)
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += offs[e + 1] > offs[e];
  // Work estimate for the whole layer (decides one thread vs all): bytes of the chosen experts and
  // the shared expert, plus MACs/12.
  const double moe_work = (double)active * (GU.expert_bytes + DN.expert_bytes) * 1.125 +
                          (shared ? (double)sh_gu.numel() + (double)sh_dn.numel() : 0.0) +
                          (double)T * (3.0 * kk * H * I + (shared ? 3.0 * H * S : 0.0)) / 12.0;
  if ((int64_t)ws.scratch.size() < at::get_num_threads()) ws.scratch.resize(at::get_num_threads());
  const int64_t sh_tiles1 = (2 * S + MM_TILE - 1) / MM_TILE, sh_tiles2 = (H + MM_TILE - 1) / MM_TILE;
  // One stage's jobs: every chosen expert's output groups per token chunk, then the shared linear's
  // tile blocks per token chunk.
  auto build_jobs = [&](int64_t groups, int64_t sh_tiles) {
    ws.jobs.clear();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t a0 = offs[e]; a0 < offs[e + 1]; a0 += TOKEN_CHUNK)
        for (int64_t g = 0; g < groups; ++g) ws.jobs.push_back({0, e, g, a0, std::min(offs[e + 1], a0 + TOKEN_CHUNK)});
    if (shared)
      for (int64_t m0 = 0; m0 < T; m0 += TOKEN_CHUNK)
        for (int64_t t0 = 0; t0 < sh_tiles; t0 += TILE_BLOCK)
          ws.jobs.push_back({1, 0, t0, m0, std::min(T, m0 + TOKEN_CHUNK)});
    return (int64_t)ws.jobs.size();
  };

  // Stage 1: every chosen expert's gate_up (per output group) and the shared gate_up.
  float* gu = sized(ws.gu, R * 2 * I);
  float* sgu = sized(ws.sgu, shared ? T * 2 * S : 0);
  int64_t njobs = build_jobs(GU.G, sh_tiles1);
  run_jobs(njobs, workers_for(njobs, moe_work), [&](int64_t j, int w) {
    const Job& jb = ws.jobs[j];
    if (jb.kind == 0) {
      expert_group(k, GU, jb.e, jb.g, ws.xr, token_of, jb.a0, jb.a1, gu, 2 * I, ws.scratch[w]);
    } else {
      const int64_t nkb = H / MM_QK;
      const QAct& a = ws.xq;
      k->gemm(sh_gu.data_ptr<uint8_t>(), sh_gu.size(1), nkb, 1, jb.g, std::min(sh_tiles1, jb.g + TILE_BLOCK),
              a.q.data() + jb.a0 * H, a.d.data() + jb.a0 * nkb, a.s.data() + jb.a0 * nkb, jb.a1 - jb.a0,
              sgu + jb.a0 * 2 * S, 2 * S, 2 * S);
    }
  });

  // SwiGLU activations.
  float* h = sized(ws.h, R * I);
  swiglu_into(k, gu, R, I, h);
  prep_rows(k, h, R, I, ws.hr);
  if (shared) {
    float* hs = sized(ws.hs, T * S);
    swiglu_into(k, sgu, T, S, hs);
    quantize_rows(k, hs, T, S, ws.hq);
  }

  // Stage 2: down projections.
  float* y = sized(ws.y, R * H);
  float* ys = sized(ws.ys, shared ? T * H : 0);
  njobs = build_jobs(DN.G, sh_tiles2);
  run_jobs(njobs, workers_for(njobs, moe_work), [&](int64_t j, int w) {
    const Job& jb = ws.jobs[j];
    if (jb.kind == 0) {
      expert_group(k, DN, jb.e, jb.g, ws.hr, nullptr, jb.a0, jb.a1, y, H, ws.scratch[w]);
    } else {
      const int64_t nkb = S / MM_QK;
      const QAct& a = ws.hq;
      k->gemm(sh_dn.data_ptr<uint8_t>(), sh_dn.size(1), nkb, 1, jb.g, std::min(sh_tiles2, jb.g + TILE_BLOCK),
              a.q.data() + jb.a0 * S, a.d.data() + jb.a0 * nkb, a.s.data() + jb.a0 * nkb, jb.a1 - jb.a0,
              ys + jb.a0 * H, H, H);
    }
  });

  // Weighted combine (fixed order per token: shared, then slots 0..k-1).
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  run_row_jobs(T, 8, 4.0 * T * kk * H, [&](int64_t t) {
    float* o = op + t * H;
    if (shared)
      std::memcpy(o, ys + t * H, H * sizeof(float));
    else
      std::fill(o, o + H, 0.f);
    for (int64_t s = 0; s < kk; ++s) {
      if (slot_of[t * kk + s] < 0) continue;
      const float wt = wp[t * kk + s];
      const float* yr = y + slot_of[t * kk + s] * H;
      for (int64_t i = 0; i < H; ++i) o[i] += wt * yr[i];
    }
  });
  return out;
}

std::string active_isa() { return mobilemoe_api::current_isa().name; }

}  // namespace

// Exported for model.cpp (see ops_api.h).
namespace mobilemoe_api {
at::Tensor swiglu(const at::Tensor& gu, int64_t W) {
  TORCH_CHECK(gu.dtype() == at::kFloat && gu.dim() == 2 && gu.size(1) == 2 * W && gu.is_contiguous(),
              "swiglu expects a contiguous float32 [M, 2W] tensor");
  return swiglu_rows(gu, W);
}

at::Tensor linear(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& x) {
  return linear_forward(packed, N, K, x);
}
at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gu_codes,
               const at::Tensor& gu_scales, const at::Tensor& dn_codes, const at::Tensor& dn_scales, int64_t I,
               const at::Tensor& sh_gu, const at::Tensor& sh_dn, int64_t S) {
  return moe_forward(x, ids, weights, gu_codes, gu_scales, dn_codes, dn_scales, I, sh_gu, sh_dn, S);
}
void parallel_jobs(int64_t njobs, const std::function<void(int64_t)>& fn) {
  run_jobs(njobs, workers_for(njobs), [&](int64_t j, int) { fn(j); });
}
}  // namespace mobilemoe_api

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mobilemoe native INT4 (mobilemoe-int4-g32) CPU kernels";
  m.def("available_isas", &mobilemoe_api::available_isas, "ISAs this CPU can run, best first");
  m.def("active_isa", &active_isa, "ISA the next call will use (set_isa > MOBILEMOE_KERNEL_ISA > best)");
  m.def("set_isa", &mobilemoe_api::set_isa, "force an ISA ('' or 'auto' = env var / best; drops the cached choice)");
  m.def("linear_forward", &linear_forward, "y[M,N] = x[M,K] @ W.T on a packed linear weight");
  m.def("expert_forward", &expert_forward, "y[M,out] = x[M,in] @ W[e] on packed stacked experts");
  m.def("moe_forward", &moe_forward, "fused MoE layer (routed experts + optional shared SwiGLU)");
  register_native_model(m);
}
