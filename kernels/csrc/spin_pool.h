// A small thread pool for the short parallel calls of batch-1 decode, whose work is a few microseconds per call.
//
// OpenMP under OMP_WAIT_POLICY=PASSIVE (the engine's setting: see serving/__init__.py) wakes a sleeping thread at
// the start of every parallel region and waits for its static share at the end: about 25 us per region on a VM,
// more than the work itself, so a second core made 120 one-row linears slower than one core did. Here the caller
// starts on the work at once and helpers claim chunks from a shared counter as they arrive; a helper spins for a
// short while after each call (the next one usually comes within tens of microseconds), then sleeps. The caller
// never waits for a helper that has not started: it only waits for chunks a helper has already claimed, so a
// helper that is descheduled (another process on its core) costs at most one chunk, not the whole call.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

class SpinPool {
 public:
  // NOTE: long enough to span the Python work between two linears of a decode step, short enough that an idle
  // engine, or another process on that core, loses little.
  static constexpr auto kSpin = std::chrono::microseconds(50);

  explicit SpinPool(int num_helpers) {
    for (int i = 0; i < num_helpers; ++i) std::thread([this] { helper_loop(); }).detach();
    num_helpers_ = num_helpers;
  }

  int num_threads() const { return num_helpers_ + 1; }

  // Runs fn(chunk) for every chunk in [0, num_chunks) on the calling thread and whichever helpers join, and
  // returns once all have run. Chunks must not throw. A call made while another thread's call is running (or from
  // inside a chunk) runs all of its chunks on its own thread.
  void run(int64_t num_chunks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || num_helpers_ == 0) {
      for (int64_t c = 0; c < num_chunks; ++c) fn(c);
      return;
    }
    Job job{&fn, num_chunks};
    job_.store(&job);
    generation_.fetch_add(1);
    if (num_sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wakeup_.notify_all();
    }
    work(job);
    wait_until([&] { return job.num_done.load() == num_chunks; });  // only chunks a helper claimed are left
    job_.store(nullptr);
    wait_until([&] { return num_inside_.load() == 0; });  // no helper may still hold a pointer to `job`
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t num_chunks;
    std::atomic<int64_t> next{0};  // next unclaimed chunk
    std::atomic<int64_t> num_done{0};  // chunks that have run
  };

  // NOTE: a short spin (a claimed chunk takes a microsecond or two), then yield: a helper that was preempted
  // mid-chunk may be waiting for this very core, and spinning on it would keep it out for a whole time slice.
  template <typename Pred>
  static void wait_until(Pred done) {
    for (int polls = 0; !done(); ++polls) {
      if (polls < 512) cpu_relax();
      else std::this_thread::yield();
    }
  }

  static void work(Job& job) {
    for (int64_t c = job.next.fetch_add(1); c < job.num_chunks; c = job.next.fetch_add(1)) {
      (*job.fn)(c);
      job.num_done.fetch_add(1);
    }
  }

  void helper_loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      int polls = 0;
      while (generation_.load() == seen) {
        cpu_relax();
        if (++polls % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(mutex_);
          num_sleeping_.fetch_add(1);
          wakeup_.wait(lock, [&] { return generation_.load() != seen; });
          num_sleeping_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      num_inside_.fetch_add(1);  // before reading job_: run() waits for this count before its job goes away
      if (Job* job = job_.load()) work(*job);
      num_inside_.fetch_sub(1);
    }
  }

  int num_helpers_ = 0;
  std::mutex busy_;  // held by the thread whose call the helpers serve
  std::atomic<uint64_t> generation_{0};  // bumped once per run()
  std::atomic<Job*> job_{nullptr};  // the running call's job; null between calls
  std::atomic<int> num_inside_{0};  // helpers between reading job_ and leaving it
  std::atomic<int> num_sleeping_{0};
  std::mutex mutex_;
  std::condition_variable wakeup_;
};

// The process's pool, sized to torch's thread count (rebuilt when that changes). After a fork the child's helpers
// are gone, so it starts a pool of its own; old pools are left running or leaked, never joined.
SpinPool& spin_pool(int num_threads) {
  static SpinPool* pool = nullptr;
  static std::once_flag fork_hook;
  std::call_once(fork_hook, [] { pthread_atfork(nullptr, nullptr, [] { pool = nullptr; }); });
  if (pool == nullptr || pool->num_threads() != num_threads) pool = new SpinPool(std::max(0, num_threads - 1));
  return *pool;
}

}  // namespace
