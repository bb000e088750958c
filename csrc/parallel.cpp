// The CPU kernels' thread pool (see parallel.h for why it is not OpenMP).
//
// Protocol. One 64-bit ticket holds the current region: (n << 32) | next chunk. Every thread
// claims with fetch_add and runs chunk i while i < n; a claim of i >= n touches nothing. The
// region's function and context are written before the ticket is stored (release) and read
// only after a valid claim (acquire), and the caller does not return before `done` reaches n,
// so they are alive for every valid claim. Workers wait for a new region on `epoch_` (spin,
// then futex); the caller wakes sleepers only when there are some. The caller waits for chunks
// still in flight by spinning briefly, then on a futex the last worker wakes.
//
// Solo mode. Beside other busy processes a worker can be descheduled while it holds a chunk,
// and then the caller waits for it: a second thread can make a region slower than the caller
// alone. The caller measures every region (its own time per chunk, so the time it would have
// taken alone, against the time it took) and over windows of ~2 ms of regions compares the two;
// when the helpers saved less than 10%, regions run on the caller alone for the next 50 ms,
// after which a window runs with all threads again to see whether the cores are free.
#include "parallel.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define GF_PAUSE() _mm_pause()
#else
#define GF_PAUSE() std::this_thread::yield()
#endif

namespace grpo_fast {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kWorkerSpin = std::chrono::microseconds(50);  // a worker's wait before it sleeps
constexpr auto kCallerSpin = std::chrono::microseconds(20);  // the caller's, for chunks in flight
constexpr double kWindowSeconds = 2e-3;  // regions measured before a decision
constexpr double kSoloSeconds = 50e-3;   // how long a solo decision holds
constexpr double kMinGain = 0.9;         // helpers must bring a region below 90% of solo time

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

bool adaptive_default() {  // GRPO_FAST_THREADS_ADAPTIVE=0: always use every thread
  const char* v = std::getenv("GRPO_FAST_THREADS_ADAPTIVE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

class Pool {
 public:
  // Never destroyed: workers sleep in a futex until the process exits (joining them from a
  // static destructor during interpreter shutdown could hang). A forked child starts a fresh
  // pool (its parent's workers do not exist there; the old object is left behind).
  static Pool& get() {
    Pool* pool = instance().load(std::memory_order_acquire);
    if (pool != nullptr) return *pool;
    static std::mutex m;
    std::lock_guard<std::mutex> lock(m);
    static const bool registered = [] {
      pthread_atfork(nullptr, nullptr, [] { instance().store(nullptr); });
      return true;
    }();
    (void)registered;
    pool = instance().load(std::memory_order_acquire);
    if (pool == nullptr) {
      pool = new Pool();
      instance().store(pool, std::memory_order_release);
    }
    return *pool;
  }

  void run(int64_t n, void (*fn)(void*, int64_t), void* ctx, int threads) {
    std::unique_lock<std::mutex> lock(region_, std::try_to_lock);
    if (!lock.owns_lock() || threads <= 1) {  // busy (another thread, or nested) or one thread
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    const Clock::time_point start = Clock::now();
    if (adaptive_ && start < solo_until_) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    ensure_workers(threads - 1);
    fn_ = fn;
    ctx_ = ctx;
    active_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(static_cast<uint64_t>(n) << 32, std::memory_order_release);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&epoch_);
    int64_t mine = 0;
    const Clock::duration busy = work(&mine);
    wait_done(static_cast<uint32_t>(n));
    if (adaptive_) judge(start, busy, mine, n);
  }

 private:
  static std::atomic<Pool*>& instance() {
    static std::atomic<Pool*> pool{nullptr};
    return pool;
  }

  // Claim and run chunks of the current region until none is left; returns the time spent in
  // them (counted into *count when given).
  Clock::duration work(int64_t* count = nullptr) {
    Clock::duration busy{0};
    for (;;) {
      const uint64_t t = ticket_.fetch_add(1, std::memory_order_acq_rel);
      const int64_t n = static_cast<int64_t>(t >> 32), i = static_cast<int64_t>(t & 0xffffffffu);
      if (i >= n) return busy;
      const Clock::time_point t0 = count ? Clock::now() : Clock::time_point{};
      fn_(ctx_, i);
      if (count) {
        busy += Clock::now() - t0;
        ++*count;
      }
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == static_cast<uint32_t>(n) &&
          caller_sleeping_.load(std::memory_order_seq_cst))
        futex_wake_all(&done_);
    }
  }

  // The caller, out of chunks, waits for those still in flight on other threads.
  void wait_done(uint32_t n) {
    const Clock::time_point until = Clock::now() + kCallerSpin;
    for (int k = 0; done_.load(std::memory_order_acquire) < n; ++k) {
      if ((k & 63) != 0 || Clock::now() < until) {
        GF_PAUSE();
        continue;
      }
      caller_sleeping_.store(true, std::memory_order_seq_cst);
      const uint32_t d = done_.load(std::memory_order_seq_cst);
      if (d < n) futex_wait(&done_, d);
      caller_sleeping_.store(false, std::memory_order_relaxed);
    }
  }

  // Solo mode (see the top of the file): `busy` is the caller's time in its `mine` chunks of n.
  void judge(Clock::time_point start, Clock::duration busy, int64_t mine, int64_t n) {
    const Clock::time_point end = Clock::now();
    window_took_ += seconds(end - start);
    window_alone_ += mine > 0 ? seconds(busy) * static_cast<double>(n) / static_cast<double>(mine)
                              : seconds(end - start);
    if (window_took_ < kWindowSeconds) return;
    if (window_took_ > kMinGain * window_alone_)
      solo_until_ = end + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(kSoloSeconds));
    window_took_ = window_alone_ = 0.0;
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
  }

  void loop(int id) {
    uint32_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t now = epoch_.load(std::memory_order_acquire);
      if (now == seen) {
        const Clock::time_point until = Clock::now() + kWorkerSpin;
        for (int k = 0; (now = epoch_.load(std::memory_order_acquire)) == seen; ++k) {
          if ((k & 63) == 0 && Clock::now() > until) break;
          GF_PAUSE();
        }
      }
      while (now == seen) {  // sleep until the next region
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        futex_wait(&epoch_, seen);
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        now = epoch_.load(std::memory_order_acquire);
      }
      seen = now;
      if (id < active_.load(std::memory_order_relaxed)) work();
    }
  }

  std::mutex region_;                    // one region at a time
  std::vector<std::thread> workers_;     // detached; only their count matters
  std::atomic<uint64_t> ticket_{0};      // (n << 32) | next chunk
  std::atomic<uint32_t> done_{0};        // chunks finished in the current region (a futex word)
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<uint32_t> epoch_{0};       // bumped per region (the workers' futex word)
  std::atomic<int> sleepers_{0};
  std::atomic<int> active_{0};           // workers that take part in the current region
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  // solo mode, touched by the caller (under region_) only
  const bool adaptive_ = adaptive_default();
  double window_took_ = 0.0, window_alone_ = 0.0;
  Clock::time_point solo_until_{};
};

}  // namespace

int parallel_threads() {
#ifdef _OPENMP
  const int t = omp_get_max_threads();
#else
  const int t = static_cast<int>(std::thread::hardware_concurrency());
#endif
  return t < 1 ? 1 : t;
}

namespace {
thread_local bool t_openmp_regions = false;
}  // namespace

bool set_openmp_regions(bool on) {
  const bool was = t_openmp_regions;
  t_openmp_regions = on;
  return was;
}

bool openmp_regions() { return t_openmp_regions; }

void parallel_run(int64_t n, void (*fn)(void*, int64_t), void* ctx, int max_threads) {
  int threads = parallel_threads();
  if (max_threads > 0 && max_threads < threads) threads = max_threads;
  if (static_cast<int64_t>(threads) > n) threads = static_cast<int>(n);
#ifdef _OPENMP
  if (t_openmp_regions && threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
#endif
  Pool::get().run(n, fn, ctx, threads);
}

}  // namespace grpo_fast
