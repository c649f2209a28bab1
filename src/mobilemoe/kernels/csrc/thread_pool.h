// The kernels' threads: one process-wide job pool that every operator (linear, MoE, attention,
// router, norms) runs its jobs on, so no second pool spins against it. Defined in thread_pool.cpp.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>

namespace mobilemoe_threads {

// fn(job, worker) with worker < nworkers (an index into per-worker scratch).
using JobFn = std::function<void(int64_t job, int worker)>;

// Runs fn on the pool (or, with MOBILEMOE_KERNEL_THREADING=omp, one at::parallel_for over the
// workers); returns false when nothing ran because another thread holds the pool.
bool run_parallel(int64_t njobs, int nworkers, const JobFn& fn);

// Threads worth waking for `njobs` jobs of `work` (weight bytes + MACs/12, roughly): 1 below the
// parallel threshold (MOBILEMOE_PARALLEL_WORK, default 256 KiB), else min(torch threads, njobs).
int workers_for(int64_t njobs, double work = 1e300);

// fn(job, worker) for job in [0, njobs), dynamically scheduled over nworkers threads. Serial (and
// inlined) for one worker, one job, or inside an enclosing parallel region.
template <typename F>
void run_jobs(int64_t njobs, int nworkers, const F& fn) {
  if (njobs <= 0) return;
  if (nworkers > 1 && njobs > 1 && !at::in_parallel_region() &&
      run_parallel(njobs, nworkers, [&fn](int64_t j, int w) { fn(j, w); }))
    return;
  for (int64_t j = 0; j < njobs; ++j) fn(j, 0);
}

// fn(job) for job in [0, njobs) on every available worker.
template <typename F>
void parallel_jobs(int64_t njobs, const F& fn) {
  run_jobs(njobs, workers_for(njobs), [&fn](int64_t j, int) { fn(j); });
}

// fn(r) for every row r in [0, M), in jobs of `rows` consecutive rows (one thread when `work` is
// below the parallel threshold).
template <typename F>
void run_row_jobs(int64_t M, int64_t rows, double work, const F& fn) {
  const int64_t njobs = (M + rows - 1) / rows;
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int) {
    for (int64_t r = j * rows; r < std::min(M, (j + 1) * rows); ++r) fn(r);
  });
}

}  // namespace mobilemoe_threads
