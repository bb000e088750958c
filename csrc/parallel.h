// The CPU kernels' thread pool: parallel_for over chunks that the threads claim one at a time.
//
// Why not OpenMP (what these kernels used until issue 14): a decode step is ~300 short parallel
// regions (a few hundred µs each), and an OpenMP region ends in a barrier that every thread of
// the team must reach, the ones that never got a core included. Beside another busy process a
// worker is often descheduled when a region starts; the caller then finishes all the work and
// waits for that worker to be scheduled again (a scheduler slice, ~1-3 ms), at every region,
// while libgomp's waiting threads spin for ~300k iterations before they sleep, burning the
// time the preempted thread needed. Measured here: see benchmarks/RESULTS.md, "Under load".
//
// Here the caller claims chunks too, and a region ends when every *claimed* chunk is done: a
// worker that was not running when the region started claims nothing and is not waited for.
// Workers spin ~50 µs for the next region (the serial gaps inside a decode step are shorter),
// then sleep on a futex. A worker preempted in the middle of a chunk still holds the region up
// until it runs again; where that happens often enough that the helpers no longer pay, the
// pool runs regions on the caller alone for a while and then tries again (parallel.cpp).
//
// Threads: the calling thread's omp_get_max_threads() (what torch.set_num_threads sets), so the
// kernels follow torch's setting; 1 runs everything in the caller. One region at a time: a
// second thread calling in meanwhile (or a nested call) runs its region alone, serially.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace grpo_fast {

// Threads a region may use now (>= 1).
int parallel_threads();

// The calling thread's regions on libgomp's team (torch's) instead of the pool: for code that
// runs torch ops between our regions (the sampler's per-module decode and its prefill). There,
// libgomp's worker spins on the second core for ~300k iterations after every torch op, the
// pool's helper rarely gets that core, and the pool runs its regions alone; libgomp's worker is
// awake and takes half of each region. Beside a busy process the thread governor has then set
// torch (and so these regions) to one thread, where no barrier can collapse. Off by default;
// returns the previous setting.
bool set_openmp_regions(bool on);
// Whether the calling thread's regions run on libgomp's team (set_openmp_regions).
bool openmp_regions();

// fn(ctx, i) for every i in [0, n), spread over the pool; returns when all are done.
void parallel_run(int64_t n, void (*fn)(void*, int64_t), void* ctx, int max_threads);

// f(i) for i in [0, n): the chunk index i is the unit of work (make it a few µs or more).
// max_threads: at most this many threads take part (0 = parallel_threads()); n <= 1 or one
// thread runs inline.
template <typename F>
void parallel_for(int64_t n, F&& f, int max_threads = 0) {
  if (n <= 0) return;
  if (n == 1) return static_cast<void>(f(int64_t{0}));
  using Fn = std::remove_reference_t<F>;
  parallel_run(n, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); },
               const_cast<void*>(static_cast<const void*>(&f)), max_threads);
}

// How many chunks to cut `total` items into for `threads` threads: chunks of about
// `target_items` (callers size them at ~30 µs of work: the most a preempted worker can hold
// back is the chunk it is in), and at least 8 per thread where there are that many items, so
// the threads finish within a small share of a region of each other. One thread: one chunk.
inline int64_t chunk_count(int64_t total, int threads, int64_t target_items) {
  if (total <= 0) return 0;
  if (threads <= 1) return 1;
  const int64_t by_size = (total + target_items - 1) / (target_items < 1 ? 1 : target_items);
  const int64_t balance = total < 8 * threads ? total : 8 * threads;
  return by_size > balance ? by_size : balance;
}

// Items [begin, end) of chunk i of `chunks` equal chunks of [0, total).
inline std::pair<int64_t, int64_t> chunk_range(int64_t i, int64_t chunks, int64_t total) {
  return {total * i / chunks, total * (i + 1) / chunks};
}

// f(begin, end) over [0, total), cut into chunk_count(total, threads, target_items) equal ranges
// spread over the pool (the chunk_count / chunk_range pattern in one call).
template <typename F>
void parallel_for_ranges(int64_t total, int64_t target_items, F&& f) {
  const int64_t chunks = chunk_count(total, parallel_threads(), target_items);
  parallel_for(chunks, [&](int64_t c) {
    const auto [begin, end] = chunk_range(c, chunks, total);
    f(begin, end);
  });
}

}  // namespace grpo_fast
