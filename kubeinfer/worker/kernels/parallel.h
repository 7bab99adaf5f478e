// The decode kernels' thread pool: many small parallel loops (a batch-1 decode step runs ~150 of a few
// to a few hundred microseconds each), where an OpenMP region's fork and join barrier cost as much as
// the work, and far more when the machine is oversubscribed: the join waits for every thread, also
// one the OS has not scheduled yet (measured on a 2-core VM with other processes busy: two OpenMP
// threads made int4 decode 25x slower than one).
//
// Here the caller never waits for a thread that has not started. The work is cut into chunks that
// threads claim one at a time from a shared counter (llama.cpp's ggml threadpool does the same);
// the caller claims chunks too, so a helper that is not running simply claims none, and the caller
// waits only for chunks a helper has already claimed. Helpers spin for a while after each loop
// (the next one usually comes within microseconds), then sleep until woken.
//
// One pool per loaded module (each ISA tier's build has its own, hidden visibility), with torch's
// intra-op thread count less one helpers (the caller is the other thread); run() from one thread at
// a time (the engine's); a nested run() (from inside a chunk) runs serially.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace kubeinfer {

class ChunkPool {
 public:
  // Never destroyed: joining helpers from a static destructor at exit is a hang risk, and the OS ends
  // them with the process anyway. A child forked after the pool started has no helpers (fork copies
  // only the calling thread), so there every loop runs on the caller.
  static ChunkPool& instance() {
    static ChunkPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { forked_child_ = true; });
      return new ChunkPool;
    }();
    return *pool;
  }

  // f(chunk) for chunk in [0, chunks), spread over the pool's threads and the caller.
  template <typename F>
  void run(int64_t chunks, F&& f) {
    const int threads = at::get_num_threads();
    if (chunks <= 1 || threads <= 1 || in_chunk_ || forked_child_ || at::in_parallel_region() || solo()) {
      for (int64_t c = 0; c < chunks; ++c) f(c);
      return;
    }
    std::lock_guard<std::mutex> one_caller(run_mutex_);
    resize(threads - 1);
    using Body = std::remove_reference_t<F>;
    struct Thunk {
      static void call(void* ctx, int64_t c) { (*static_cast<Body*>(ctx))(c); }
    };
    fn_.store(&Thunk::call, std::memory_order_seq_cst);
    ctx_.store(const_cast<void*>(static_cast<const void*>(&f)), std::memory_order_seq_cst);
    total_.store(chunks, std::memory_order_seq_cst);
    done_.store(0, std::memory_order_seq_cst);
    const uint64_t gen = ++generation_;
    counter_.store(gen << 32, std::memory_order_seq_cst);  // publishes the task: chunk 0 of this generation
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    in_chunk_ = true;
    int64_t mine = 0;
    const auto own_start = std::chrono::steady_clock::now();
    for (int64_t c; (c = claim(gen, chunks)) >= 0; ++mine) f(c);
    in_chunk_ = false;
    done_.fetch_add(mine, std::memory_order_seq_cst);
    // Only chunks a helper already claimed are waited for: a chunk's work, unless the OS took the
    // helper off its core mid-chunk. Then the caller waits for its next time slice (milliseconds
    // on a busy machine), and the loops run on the caller alone for a while (solo()).
    if (done_.load(std::memory_order_seq_cst) < chunks) {
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; done_.load(std::memory_order_seq_cst) < chunks; ++spins) {
        if (spins < 4096) _mm_pause();
        else std::this_thread::yield();
      }
      // A wait is long when it exceeds what a helper's last chunk can take: kLongWaitUs beyond twice
      // the caller's own mean chunk. Waiting out one chunk of a prefill-sized loop (a millisecond)
      // is no sign of preemption, and counting it as one had run every such loop on one thread.
      const auto now = std::chrono::steady_clock::now();
      const auto chunk_time = (start - own_start) / std::max<int64_t>(1, mine);
      if (now - start > std::chrono::microseconds(kLongWaitUs) + 2 * chunk_time &&
          ++window_long_waits_ >= kLongWaitsToSolo)
        go_solo();
    }
    counter_.store((gen << 32) | kClosed, std::memory_order_seq_cst);
    // The helpers' share of the chunks over the last kWindow loops: on a busy machine they are seldom
    // on a core when a loop starts, and take little of it while their spinning still costs the
    // caller CPU time. Below kMinShare of what an even split would give them, go solo.
    window_chunks_ += chunks;
    window_helped_ += chunks - mine;
    if (++window_runs_ == kWindow) {
      if (window_helped_ * threads < window_chunks_ * (threads - 1) * kMinSharePercent / 100) go_solo();
      window_runs_ = window_chunks_ = window_helped_ = window_long_waits_ = 0;
    }
  }

 private:
  static constexpr uint64_t kClosed = 0xffffffffu;
  using Fn = void (*)(void*, int64_t);

  // The next unclaimed chunk of generation gen, or -1 when none is left (or gen is over).
  int64_t claim(uint64_t gen, int64_t chunks) {
    uint64_t v = counter_.load(std::memory_order_seq_cst);
    for (;;) {
      const uint64_t idx = v & kClosed;
      if ((v >> 32) != gen || idx == kClosed || static_cast<int64_t>(idx) >= chunks) return -1;
      if (counter_.compare_exchange_weak(v, v + 1, std::memory_order_seq_cst)) return static_cast<int64_t>(idx);
    }
  }

  void helper(int index) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a while for the next task, then sleep.
      uint64_t v = counter_.load(std::memory_order_seq_cst);
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; (v >> 32) == seen && !stopping(index); ++spins) {
        // Mostly pause, now and then a yield: on an oversubscribed machine the waiting helper hands its
        // time slice to whoever is runnable there (the caller itself, maybe); on a quiet one a yield
        // returns at once.
        if ((spins & 31) == 31) std::this_thread::yield();
        else _mm_pause();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinUs)) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return (counter_.load(std::memory_order_seq_cst) >> 32) != seen || stopping(index); });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          spins = 0;
        }
        v = counter_.load(std::memory_order_seq_cst);
      }
      if (stopping(index)) return;
      const uint64_t gen = v >> 32;
      seen = gen;
      // The task's fields belong to gen as long as gen still has chunks to claim: they are rewritten
      // only after every chunk of gen is done, and then a claim for gen fails.
      const Fn fn = fn_.load(std::memory_order_seq_cst);
      void* ctx = ctx_.load(std::memory_order_seq_cst);
      const int64_t chunks = total_.load(std::memory_order_seq_cst);
      int64_t mine = 0;
      in_chunk_ = true;
      for (int64_t c; (c = claim(gen, chunks)) >= 0; ++mine) fn(ctx, c);
      in_chunk_ = false;
      if (mine) done_.fetch_add(mine, std::memory_order_seq_cst);  // once: the caller waits for the total
    }
  }

  bool stopping(int index) const { return index >= active_.load(std::memory_order_seq_cst); }

  void resize(int helpers) {
    if (static_cast<int>(workers_.size()) == helpers) return;
    active_.store(0, std::memory_order_seq_cst);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
    active_.store(helpers, std::memory_order_seq_cst);
    for (int i = 0; i < helpers; ++i) workers_.emplace_back([this, i] { helper(i); });
  }

  // After a second wait that long for a preempted helper within kWindow loops (a chunk's work is
  // tens of microseconds), or when the helpers took too small a share of the chunks, the next
  // kSoloRuns loops (about two batch-1 decode steps) run on the caller alone: on an oversubscribed
  // machine one thread beat two that kept waiting for each other (the fork-join cost this pool
  // avoids, paid instead whenever the OS preempts a helper holding a chunk). Then two are tried
  // again. One long wait alone is no reason: on a quiet 2-core VM a helper is preempted now and then
  // (a daemon's time slice), and going solo for 1024 loops on each had cost the second core for
  // ~8 steps at a time.
  static constexpr int kLongWaitUs = 250, kLongWaitsToSolo = 2;
  static constexpr int kSoloRuns = 256;
  static constexpr int kWindow = 128, kMinSharePercent = 50;
  int64_t window_runs_ = 0, window_chunks_ = 0, window_helped_ = 0, window_long_waits_ = 0;  // under run_mutex_
  void go_solo() {
    solo_runs_.store(kSoloRuns, std::memory_order_relaxed);
    window_runs_ = window_chunks_ = window_helped_ = window_long_waits_ = 0;
  }
  bool solo() {
    if (solo_runs_.load(std::memory_order_relaxed) <= 0) return false;
    solo_runs_.fetch_sub(1, std::memory_order_relaxed);
    return true;
  }
  std::atomic<int> solo_runs_{0};

  static constexpr int kSpinUs = 200;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<int> active_{0}, sleepers_{0};
  // The claim counter and the done count each own a cache line: every claim and every finished
  // helper writes one of them, and sharing a line with the task's fields (read by every claim) made
  // each chunk cost a line transfer between the cores.
  alignas(64) std::atomic<uint64_t> counter_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<Fn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> total_{0};
  uint64_t generation_ = 0;
  static thread_local bool in_chunk_;
  static inline bool forked_child_ = false;
};

inline thread_local bool ChunkPool::in_chunk_ = false;

// f(begin, end) over [0, n) in runs of about `grain` items, on the pool.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, F&& f) {
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  ChunkPool::instance().run(chunks, [&](int64_t c) { f(c * grain, std::min(n, (c + 1) * grain)); });
}

// Whether this thread is running a decode stack's forward (decode_stack.cpp), whose GEMVs run on the
// pool; set by DecodeStackScope.
inline bool& in_decode_stack() {
  thread_local bool inside = false;
  return inside;
}

struct DecodeStackScope {
  DecodeStackScope() { in_decode_stack() = true; }
  ~DecodeStackScope() { in_decode_stack() = false; }
  DecodeStackScope(const DecodeStackScope&) = delete;
  DecodeStackScope& operator=(const DecodeStackScope&) = delete;
};

// parallel_chunks for the kernels inside a layer (norms, rotary, SwiGLU, decode attention), on the
// threads of the ops around them: the pool inside a decode stack, torch's OpenMP threads elsewhere
// (a bf16 model's linears, a step's prefill GEMMs). OpenMP's threads spin for a while after each
// region, and the pool's helper spins after each loop: woken beside each other, three threads
// shared two cores, and a bf16 offline run went from 558 to 601 tok/s when these ran on OpenMP.
template <typename F>
void layer_chunks(int64_t n, int64_t grain, F&& f) {
  if (in_decode_stack()) {
    parallel_chunks(n, grain, std::forward<F>(f));
    return;
  }
  grain = std::max<int64_t>(1, grain);
  at::parallel_for(0, (n + grain - 1) / grain, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c * grain, std::min(n, (c + 1) * grain));
  });
}

// Threads claim runs of whole rows: two runs per thread (at least 16 KB of weights each), so each
// thread reads long sequential streams the hardware prefetcher follows, with a spare run per thread
// for balance (parallel.h: a thread that is not running takes none, so an oversubscribed machine
// never makes the caller wait for it). Measured on the 2-core Zen 4 VM, int4 gate|up of SmolLM2
// (884 KB) streamed from DRAM with two threads: runs of 16 KB 15.5 GB/s, a run per thread 22, two
// per thread 21-26, 4 KB runs 8. Within a run each row is read start to end (four interleaved rows
// had read the LM head at a quarter of the speed).
//
// On the pool for GEMV-sized calls (at most kPoolRows activation rows: a decode or verification
// step, whose loops are tens of microseconds and cost least to start there) and inside a decode
// stack; prefill-sized calls run on torch's OpenMP threads, beside the step's other ops (parallel.h's
// layer_chunks): a five-row verification lost speed on OpenMP, and a 512-row call on the pool between
// OpenMP ops doubled in time from call to call (docs/benchmarks.md, "CPU, part 8" and "Speculative").
constexpr int64_t kPoolRows = 16;

template <typename F>
void for_rows(int64_t N, int64_t row_bytes, int64_t activation_rows, F&& f) {
  const int64_t runs = 2 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>({4, 16384 / std::max<int64_t>(1, row_bytes), (N + runs - 1) / runs});
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) f(n);
  };
  if (activation_rows <= kPoolRows) parallel_chunks(N, grain, body);
  else layer_chunks(N, grain, body);
}

}  // namespace kubeinfer
