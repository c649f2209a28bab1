// The kernels' job pool (thread_pool.h): a work-stealing queue of contiguous job segments, the
// pool's helper threads, and the decision how many workers a call gets.
#include "thread_pool.h"

#include <c10/util/ParallelGuard.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include <pthread.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // _mm_pause only (baseline SSE2)
#define MOBILEMOE_X86 1
#else
#define MOBILEMOE_X86 0
#endif

namespace mobilemoe_threads {
namespace {

inline void cpu_relax() {
#if MOBILEMOE_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// The jobs of one call, split into one contiguous segment per worker. A worker runs its own
// segment front to back, so it streams through neighbouring weights and the prefetchers stay
// ahead (interleaving single jobs between threads restarts every stream at each ~10 KB job),
// touching only its own cache line. A worker whose segment is empty steals single jobs from the
// back of the others, so an unequal or absent worker (never scheduled on a busy machine) stalls
// nobody.
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
// just does its share. An OpenMP region instead waits at its closing barrier for every team
// thread, which on an oversubscribed machine costs milliseconds per region (BENCHMARKS.md, "Kernel
// design measurements"). Helpers spin MOBILEMOE_POOL_SPIN_US (300) after each task, then sleep on a
// condition variable. Also works in a fork()ed child (GNU OpenMP does not).
// MOBILEMOE_KERNEL_THREADING=omp selects at::parallel_for (OpenMP) instead.
class JobPool {
 public:
  using Fn = JobFn;
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

// Read at every parallel call, so a test can switch runners in-process.
bool use_job_pool() {
  const char* env = std::getenv("MOBILEMOE_KERNEL_THREADING");
  return !(env && std::strcmp(env, "omp") == 0);
}

// Calls below this much work (weight bytes + MACs/12, ~10 us on one core) run on one thread:
// waking and synchronising helpers would cost more than they save. MOBILEMOE_PARALLEL_WORK
// overrides it (read once) for other machines.
double parallel_work_threshold() {
  static const double v = [] {
    const char* e = std::getenv("MOBILEMOE_PARALLEL_WORK");
    return e ? std::atof(e) : double(1 << 18);
  }();
  return v;
}

}  // namespace

bool run_parallel(int64_t njobs, int nworkers, const JobFn& fn) {
  if (use_job_pool()) return JobPool::instance().run(njobs, nworkers, fn);
  JobQueue queue(njobs, nworkers);  // OpenMP: each team thread claims jobs from the shared queue
  at::parallel_for(0, nworkers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      int64_t j;
      while (queue.next(static_cast<int>(w), j)) fn(j, static_cast<int>(w));
    }
  });
  return true;
}

int workers_for(int64_t njobs, double work) {
  if (work < parallel_work_threshold()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), njobs)));
}

}  // namespace mobilemoe_threads
