#pragma once
// CUDA-semantics simulator: runs CUDA kernel bodies on the CPU, compiled by g++ -std=c++20
// with -DSELK_CUDA_SIM and injected with `-include tools/cuda_sim/cuda_sim.h` (no production
// header includes it). Each CUDA thread is a cooperative fiber (hand-written x86-64 context
// switch); the threads of one block run on one OS thread, interleaving only at barriers and
// warp collectives; blocks run one after another. See README.md next to this file.
//
//   selk_sim::launch(grid, block, dyn_smem_bytes, kernel, args...);
//
// Device pointers are plain host pointers. Errors (divergent barrier, deadlock, warp-collective
// mismatch, bad launch configuration, dynamic shared memory overflow) throw selk_sim::SimError.
// Single-OS-thread use only: launch from one thread at a time.
#if !defined(SELK_CUDA_SIM)
#error "cuda_sim.h is the CPU CUDA harness: compile with -DSELK_CUDA_SIM"
#endif
#if defined(__CUDACC__)
#error "cuda_sim.h must not be compiled by nvcc"
#endif
#if !defined(__x86_64__) || !defined(__linux__)
#error "cuda_sim.h: the fiber context switch is written for x86-64 Linux"
#endif
#if __cplusplus < 202002L
#error "cuda_sim.h needs C++20"
#endif

#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Sanitizer detection and fiber annotations.
#if defined(__SANITIZE_THREAD__)
#define SELK_SIM_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SELK_SIM_ASAN 1
#endif
#if defined(__has_feature)
#if __has_feature(thread_sanitizer) && !defined(SELK_SIM_TSAN)
#define SELK_SIM_TSAN 1
#endif
#if __has_feature(address_sanitizer) && !defined(SELK_SIM_ASAN)
#define SELK_SIM_ASAN 1
#endif
#endif
#if defined(SELK_SIM_TSAN)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(SELK_SIM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace selk_sim {

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct SimError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline uint64_t env_seed() {
  const char* e = std::getenv("SELK_SIM_SEED");
  return e ? std::strtoull(e, nullptr, 0) : 0;
}

struct Config {
  // 0: threads and blocks in index order; 1: reversed; other: pseudo-random permutations.
  // Default: $SELK_SIM_SEED, else 0.
  uint64_t seed = env_seed();
  // Fiber stack size; fiber stacks are (re)allocated at the next launch when this changes.
#if defined(SELK_SIM_TSAN) || defined(SELK_SIM_ASAN)
  size_t stack_bytes = 512 * 1024;
#else
  size_t stack_bytes = 64 * 1024;
#endif
  // Dynamic shared memory allowed without cudaFuncSetAttribute on a real GPU (48 KiB).
  // Raise it (up to 227 KiB on sm_90) in a test of a kernel whose host code opts in.
  size_t max_dyn_smem = 48 * 1024;
};

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0;
  uint64_t block_barriers = 0;    // __syncthreads* completions (one per block-wide barrier)
  uint64_t warp_collectives = 0;  // warp collective completions (one per warp)
  uint64_t switches = 0;          // scheduler -> fiber switches
};

namespace detail {

// ----- context switch ------------------------------------------------------------------------
// selk_sim_switch(save, to): store callee-saved regs and the return address below rsp,
// *save = rsp, rsp = to, load the target's regs, jump to its saved return address.
// `jmp` instead of `ret` (as Boost.Context does): a `ret` to a different fiber mispredicts every
// time; measured 40 ns vs 14 ns per round trip.
// Frame at a saved sp: [1]=r15 [2]=r14 [3]=r13 [4]=r12 [5]=rbx [6]=rbp [7]=return address.
// selk_sim_trampoline: first target of a new fiber; calls r13(r12) and never returns.
extern "C" void selk_sim_switch(void** save_sp, void* to_sp);
extern "C" void selk_sim_trampoline();
asm(R"(
  .pushsection .text
  .weak selk_sim_switch
  .hidden selk_sim_switch
  .type selk_sim_switch, @function
selk_sim_switch:
  leaq -56(%rsp), %rsp
  movq %rbp, 48(%rsp)
  movq %rbx, 40(%rsp)
  movq %r12, 32(%rsp)
  movq %r13, 24(%rsp)
  movq %r14, 16(%rsp)
  movq %r15, 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  movq 8(%rsp), %r15
  movq 16(%rsp), %r14
  movq 24(%rsp), %r13
  movq 32(%rsp), %r12
  movq 40(%rsp), %rbx
  movq 48(%rsp), %rbp
  movq 56(%rsp), %rax
  leaq 64(%rsp), %rsp
  jmp *%rax
  .size selk_sim_switch, .-selk_sim_switch

  .weak selk_sim_trampoline
  .hidden selk_sim_trampoline
  .type selk_sim_trampoline, @function
selk_sim_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size selk_sim_trampoline, .-selk_sim_trampoline
  .popsection
)");

// Relaxed atomic access for bookkeeping shared between fibers and the scheduler: free on x86,
// and invisible to ThreadSanitizer's race detection (so only kernel data races are reported).
template <class T>
inline T rd(const T& x) {
  return __atomic_load_n(&x, __ATOMIC_RELAXED);
}
template <class T, class U>
inline void wr(T& x, U v) {
  __atomic_store_n(&x, static_cast<T>(v), __ATOMIC_RELAXED);
}

#if defined(SELK_SIM_TSAN)
inline void tsan_release(void* a) { __tsan_release(a); }
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
#else
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

enum St : unsigned char { kReady, kBarrier, kWarp, kExited, kFailed };
enum WOp : unsigned char { kNone, kSyncwarp, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
enum BOp : unsigned char { kBarPlain, kBarCount, kBarAnd, kBarOr };

inline const char* wop_name(unsigned char op) {
  switch (op) {
    case kSyncwarp:
      return "__syncwarp";
    case kShfl:
      return "__shfl_sync";
    case kShflUp:
      return "__shfl_up_sync";
    case kShflDown:
      return "__shfl_down_sync";
    case kShflXor:
      return "__shfl_xor_sync";
    case kBallot:
      return "__ballot_sync";
    case kAny:
      return "__any_sync";
    case kAll:
      return "__all_sync";
    default:
      return "?";
  }
}

struct alignas(64) Fiber {
  void* sp = nullptr;            // saved stack pointer while suspended
  unsigned char* map = nullptr;  // mmap base (guard page first)
  size_t map_bytes = 0;
  unsigned char* stack_lo = nullptr;
  size_t stack_bytes = 0;
  size_t stagger = 0;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  unsigned char st = kReady;  // St, accessed with rd/wr
  // Site and operands of the barrier / warp collective this fiber waits at.
  const char* file = nullptr;
  unsigned line = 0;
  unsigned char op = kNone;
  unsigned char vsize = 0;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  uint64_t val = 0;
  uint64_t result = 0;
  std::exception_ptr exc;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
};

struct Sim {
  Config cfg;
  Stats stats;
  std::vector<std::unique_ptr<Fiber>> pool;
  size_t pool_stack_bytes = 0;
  bool pool_dirty = false;  // a block was abandoned (error): reset sanitizer fiber state

  void* main_sp = nullptr;
  Fiber* cur = nullptr;  // running fiber (rd/wr), nullptr in the scheduler
  void* main_tsan_fiber = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void* main_fake_stack = nullptr;

  // Current launch / block (written by the scheduler before a block's fibers start).
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  unsigned nthreads = 0;
  void (*invoke)(void*) = nullptr;
  void* invoke_ctx = nullptr;

  // Dynamic shared memory: [dyn, dyn + dyn_bytes) then a canary / ASan-poisoned tail.
  unsigned char* dyn_raw = nullptr;
  size_t dyn_cap = 0;
  size_t dyn_bytes = 0;
  unsigned char* dyn = nullptr;

  // Static __shared__ storage = this executable's TLS segment (see __shared__ below).
  unsigned char* tls_lo = nullptr;
  size_t tls_bytes = 0;
  bool tls_init = false;

  // ThreadSanitizer sync objects (addresses only).
  char block_sync = 0, end_sync = 0;
  char bar_sync[2] = {0, 0};
  char warp_sync[32][2] = {};
  unsigned bar_gen = 0;
  unsigned warp_gen[32] = {};

  // Per-block scheduler scratch.
  std::vector<unsigned> order;
  uint64_t rng = 0;
};

inline Sim g_sim;  // not thread_local: the executable's TLS segment is poisoned per block
inline Sim& sim() { return g_sim; }

[[noreturn]] inline void fail(const std::string& msg) { throw SimError("selk_sim: " + msg); }

inline std::string fmt3(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
inline std::string site(const char* file, unsigned line) {
  return std::string(file ? file : "?") + ":" + std::to_string(line);
}

inline Fiber* current_fiber(const char* what) {
  Fiber* f = rd(sim().cur);
  if (!f) fail(std::string(what) + " called outside a kernel launched by selk_sim::launch");
  return f;
}

// ----- fiber stacks and switching ------------------------------------------------------------
struct GuardRange {
  uintptr_t lo, hi;
};
inline GuardRange g_guards[1024];
inline std::atomic<int> g_nguards{0};
inline struct sigaction g_old_segv;

inline void segv_handler(int sig, siginfo_t* si, void* uc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
  const int n = g_nguards.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i) {
    if (a >= g_guards[i].lo && a < g_guards[i].hi) {
      static const char msg[] =
          "selk_sim: fiber stack overflow (a CUDA thread used more than selk_sim::config().stack_bytes "
          "of stack; raise it before the launch)\n";
      ssize_t r = write(2, msg, sizeof(msg) - 1);
      (void)r;
      break;
    }
  }
  // Hand over to the previous handler (or the default action) by re-faulting.
  sigaction(sig, &g_old_segv, nullptr);
  (void)uc;
}

inline void install_guard_handler() {
#if !defined(SELK_SIM_TSAN) && !defined(SELK_SIM_ASAN)
  static bool done = false;
  if (done) return;
  done = true;
  static unsigned char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof(altstack);
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
#endif
}

inline void free_fiber(Fiber* f) {
#if defined(SELK_SIM_TSAN)
  if (f->tsan_fiber) __tsan_destroy_fiber(f->tsan_fiber);
  f->tsan_fiber = nullptr;
#endif
#if defined(SELK_SIM_ASAN)
  if (f->map) __asan_unpoison_memory_region(f->stack_lo, f->stack_bytes);
#endif
  if (f->map) munmap(f->map, f->map_bytes);
  f->map = nullptr;
}

inline void ensure_pool(unsigned n) {
  Sim& s = sim();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t want = (std::max<size_t>(s.cfg.stack_bytes, 16 * 1024) + page - 1) / page * page;
  if (want != s.pool_stack_bytes) {
    for (auto& f : s.pool) free_fiber(f.get());
    s.pool.clear();
    g_nguards.store(0);
    s.pool_stack_bytes = want;
  }
  if (s.pool_dirty) {
    // A block was abandoned mid-flight: fibers still carry sanitizer state of dead frames.
    for ([[maybe_unused]] auto& f : s.pool) {
#if defined(SELK_SIM_TSAN)
      __tsan_destroy_fiber(f->tsan_fiber);
      f->tsan_fiber = __tsan_create_fiber(0);
#endif
#if defined(SELK_SIM_ASAN)
      __asan_unpoison_memory_region(f->stack_lo, f->stack_bytes);
      f->asan_fake_stack = nullptr;
#endif
      f->sp = nullptr;  // restart from fiber_entry
    }
    s.pool_dirty = false;
  }
  install_guard_handler();
  while (s.pool.size() < n) {
    auto f = std::make_unique<Fiber>();
    f->map_bytes = want + page;
    void* m = mmap(nullptr, f->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
    f->map = static_cast<unsigned char*>(m);
    mprotect(f->map, page, PROT_NONE);  // guard page below the stack
    f->stack_lo = f->map + page;
    f->stack_bytes = want;
    f->stagger = (s.pool.size() % 64) * 64;
    const int gi = g_nguards.load();
    if (gi < 1024) {
      g_guards[gi] = {reinterpret_cast<uintptr_t>(f->map), reinterpret_cast<uintptr_t>(f->map + page)};
      g_nguards.store(gi + 1);
    }
#if defined(SELK_SIM_TSAN)
    f->tsan_fiber = __tsan_create_fiber(0);
#endif
    s.pool.push_back(std::move(f));
  }
}

// Scheduler -> fiber f; returns when f suspends or finishes.
inline void resume(Fiber* f) {
  Sim& s = sim();
  wr(s.cur, f);
  ++s.stats.switches;
  void* const to = f->sp;  // read before the TSan switch: after it, accesses count as the fiber's
#if defined(SELK_SIM_TSAN)
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(SELK_SIM_ASAN)
  __sanitizer_start_switch_fiber(&s.main_fake_stack, f->stack_lo, f->stack_bytes);
#endif
  selk_sim_switch(&s.main_sp, to);
#if defined(SELK_SIM_ASAN)
  __sanitizer_finish_switch_fiber(s.main_fake_stack, nullptr, nullptr);
#endif
  wr(s.cur, static_cast<Fiber*>(nullptr));
}

// Fiber f -> scheduler.
inline void suspend(Fiber* f) {
  Sim& s = sim();
#if defined(SELK_SIM_TSAN)
  __tsan_switch_to_fiber(rd(s.main_tsan_fiber), __tsan_switch_to_fiber_no_sync);
#endif
#if defined(SELK_SIM_ASAN)
  __sanitizer_start_switch_fiber(&f->asan_fake_stack, s.main_stack_bottom, s.main_stack_size);
#endif
  selk_sim_switch(&f->sp, s.main_sp);
#if defined(SELK_SIM_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &s.main_stack_bottom, &s.main_stack_size);
#endif
}

// A fiber runs the kernel once per block for its thread index, then parks in suspend() until
// the next block (frames stay balanced, which keeps TSan's shadow stack and ASan's redzones
// consistent). A fiber abandoned mid-kernel by an error is re-initialised instead.
inline void fiber_entry(void* p) {
  Fiber* f = static_cast<Fiber*>(p);
  Sim& s = sim();
#if defined(SELK_SIM_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  for (;;) {
    tsan_acquire(&s.block_sync);
    try {
      s.invoke(s.invoke_ctx);
      wr(f->st, kExited);
    } catch (...) {
      f->exc = std::current_exception();
      wr(f->st, kFailed);
    }
    tsan_release(&s.end_sync);
    suspend(f);
  }
}

inline void init_fiber(Fiber* f) {
  // Stagger the stack tops: equal page offsets would put every fiber's hot frames in the same
  // L1/L2 cache sets (measured: ~3x slower switches).
  unsigned char* top = f->stack_lo + f->stack_bytes - f->stagger;
  void** s = reinterpret_cast<void**>(top - 16);  // rsp at the trampoline: 16-aligned
  void** sp = s - 8;
  sp[7] = reinterpret_cast<void*>(&selk_sim_trampoline);
  sp[6] = nullptr;                                // rbp
  sp[5] = nullptr;                                // rbx
  sp[4] = f;                                      // r12: argument
  sp[3] = reinterpret_cast<void*>(&fiber_entry);  // r13: function
  sp[2] = nullptr;                                // r14
  sp[1] = nullptr;                                // r15
  f->sp = sp;
}

// ----- shared memory -------------------------------------------------------------------------
inline void find_tls_segment() {
  Sim& s = sim();
  if (s.tls_init) return;
  s.tls_init = true;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        // The first object reported is the executable. If it has no PT_TLS (no __shared__
        // variable at all), there is nothing to poison: module id 1 then belongs to a library.
        Sim& sm = *static_cast<Sim*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data) {
            sm.tls_lo = static_cast<unsigned char*>(info->dlpi_tls_data);
            sm.tls_bytes = info->dlpi_phdr[i].p_memsz;
          }
        }
        return 1;
      },
      &s);
}

constexpr size_t kDynCanary = 64;
constexpr unsigned char kCanaryByte = 0xA5;

inline void prepare_dyn(size_t bytes) {
  Sim& s = sim();
  const size_t need = bytes + kDynCanary + 128;
  if (need > s.dyn_cap) {
#if defined(SELK_SIM_ASAN)
    if (s.dyn_raw) __asan_unpoison_memory_region(s.dyn_raw, s.dyn_cap);
#endif
    std::free(s.dyn_raw);
    s.dyn_cap = std::max<size_t>(need, 4096);
    s.dyn_raw = static_cast<unsigned char*>(std::malloc(s.dyn_cap));
    if (!s.dyn_raw) fail("out of memory for dynamic shared memory");
  }
  s.dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(s.dyn_raw) + 127) & ~uintptr_t(127));
  s.dyn_bytes = bytes;
#if defined(SELK_SIM_ASAN)
  __asan_unpoison_memory_region(s.dyn_raw, s.dyn_cap);
#endif
}

inline void poison_block_shared() {
  Sim& s = sim();
  if (s.tls_lo) std::memset(s.tls_lo, 0xFF, s.tls_bytes);
  std::memset(s.dyn, 0xFF, s.dyn_bytes);
#if defined(SELK_SIM_ASAN)
  // Everything past dyn_smem_bytes is unaddressable: ASan reports any overflow.
  unsigned char* end = s.dyn + ((s.dyn_bytes + 7) & ~size_t(7));
  __asan_poison_memory_region(end, static_cast<size_t>(s.dyn_raw + s.dyn_cap - end));
#else
  std::memset(s.dyn + s.dyn_bytes, kCanaryByte, kDynCanary);
#endif
}

inline void check_dyn_canary() {
#if !defined(SELK_SIM_ASAN)
  Sim& s = sim();
  for (size_t i = 0; i < kDynCanary; ++i) {
    if (s.dyn[s.dyn_bytes + i] != kCanaryByte) {
      fail("block " + fmt3(s.block_idx) + " wrote past the end of dynamic shared memory (dyn_smem_bytes = " +
           std::to_string(s.dyn_bytes) + ", byte " + std::to_string(s.dyn_bytes + i) + " changed)");
    }
  }
#endif
}

template <class T>
inline T* dynamic_shared() {
  static_assert(alignof(T) <= 16, "dynamic shared memory is 16-byte aligned");
  (void)current_fiber("SELK_EXTERN_SHARED");
  return reinterpret_cast<T*>(sim().dyn);
}

// ----- barriers and warp collectives (fiber side) --------------------------------------------
inline uint64_t block_barrier(BOp op, int pred, const std::source_location& loc) {
  Sim& s = sim();
  Fiber* f = current_fiber("__syncthreads");
  wr(f->file, loc.file_name());
  wr(f->line, loc.line());
  wr(f->op, op);
  wr(f->val, pred != 0 ? 1u : 0u);
  const unsigned gen = rd(s.bar_gen);
  tsan_release(&s.bar_sync[gen & 1]);
  wr(f->st, kBarrier);
  tsan_release(f);  // acquired by the scheduler only if it abandons the block
  suspend(f);
  tsan_acquire(&s.bar_sync[gen & 1]);
  return rd(f->result);
}

template <class T>
inline constexpr bool shfl_type_v =
    std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, long> ||
    std::is_same_v<T, unsigned long> || std::is_same_v<T, long long> || std::is_same_v<T, unsigned long long> ||
    std::is_same_v<T, float> || std::is_same_v<T, double>;

inline uint64_t warp_op(WOp op, unsigned mask, uint64_t bits, unsigned size, int arg, int width,
                        const std::source_location& loc) {
  Sim& s = sim();
  Fiber* f = current_fiber(wop_name(op));
  if (mask != 0xffffffffu) {
    fail(std::string(wop_name(op)) + " at " + site(loc.file_name(), loc.line()) + ": mask 0x" + [&] {
      char b[16];
      std::snprintf(b, sizeof b, "%08x", mask);
      return std::string(b);
    }() + " is not supported (the harness models full-warp collectives only)");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(wop_name(op)) + " at " + site(loc.file_name(), loc.line()) + ": width " + std::to_string(width) +
         " is not a power of two in [1, 32]");
  }
  wr(f->file, loc.file_name());
  wr(f->line, loc.line());
  wr(f->op, op);
  wr(f->mask, mask);
  wr(f->val, bits);
  wr(f->vsize, size);
  wr(f->arg, arg);
  wr(f->width, width);
  const unsigned w = f->linear / 32;
  const unsigned gen = rd(s.warp_gen[w]);
  if (op == kSyncwarp) tsan_release(&s.warp_sync[w][gen & 1]);
  wr(f->st, kWarp);
  tsan_release(f);  // acquired by the scheduler only if it abandons the block
  suspend(f);
  if (op == kSyncwarp) tsan_acquire(&s.warp_sync[w][gen & 1]);
  return rd(f->result);
}

template <class T>
inline uint64_t to_bits(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ----- scheduler -----------------------------------------------------------------------------
inline uint64_t next_rand(uint64_t& x) {  // splitmix64
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void make_order(std::vector<unsigned>& v, unsigned n, uint64_t seed, uint64_t& rng) {
  v.resize(n);
  for (unsigned i = 0; i < n; ++i) v[i] = i;
  if (seed == 1) {
    std::reverse(v.begin(), v.end());
  } else if (seed > 1) {
    for (unsigned i = n; i > 1; --i) std::swap(v[i - 1], v[next_rand(rng) % i]);
  }
}

// The block is given up (error): its suspended fibers are never resumed. Mark the pool for a
// sanitizer reset, and (TSan) make the scheduler happen-after everything the fibers did, so the
// next launch's reuse of that memory is not reported as a race.
inline void abandon_block() {
  Sim& s = sim();
  s.pool_dirty = true;
  for (unsigned i = 0; i < s.nthreads; ++i) tsan_acquire(s.pool[i].get());
  tsan_acquire(&s.end_sync);
}

inline void resolve_warp(unsigned w, unsigned lane0, unsigned nlanes) {
  Sim& s = sim();
  Fiber* first = s.pool[lane0].get();
  const unsigned char op = rd(first->op);
  const unsigned char vsize = rd(first->vsize);
  for (unsigned l = 1; l < nlanes; ++l) {
    Fiber* f = s.pool[lane0 + l].get();
    if (rd(f->op) != op || rd(f->vsize) != vsize) {
      abandon_block();
      fail("warp collective mismatch in block " + fmt3(s.block_idx) + ", warp " + std::to_string(w) + ": lane 0 " +
           fmt3(first->tid) + " is at " + wop_name(op) + " (" + site(rd(first->file), rd(first->line)) + "), lane " +
           std::to_string(l) + " " + fmt3(f->tid) + " at " + wop_name(rd(f->op)) + " (" +
           site(rd(f->file), rd(f->line)) + ")" + (rd(f->op) == op ? " with a different value type" : ""));
    }
  }
  uint64_t vals[32];
  for (unsigned l = 0; l < nlanes; ++l) vals[l] = rd(s.pool[lane0 + l]->val);
  const uint64_t poison = vsize >= 8 ? ~uint64_t(0) : ((uint64_t(1) << (8 * vsize)) - 1);
  uint64_t ballot = 0;
  bool any = false, all = true;
  for (unsigned l = 0; l < nlanes; ++l) {
    const bool p = vals[l] != 0;
    ballot |= uint64_t(p) << l;
    any |= p;
    all &= p;
  }
  for (unsigned l = 0; l < nlanes; ++l) {
    Fiber* f = s.pool[lane0 + l].get();
    const int width = rd(f->width);
    const int arg = rd(f->arg);
    const int seg_lo = static_cast<int>(l) / width * width;
    const int seg_hi = seg_lo + width;
    uint64_t r = 0;
    int src = -1;
    switch (op) {
      case kSyncwarp:
        break;
      case kBallot:
        r = ballot;
        break;
      case kAny:
        r = any;
        break;
      case kAll:
        r = all;
        break;
      case kShfl:
        src = seg_lo + (arg & (width - 1));
        break;
      case kShflUp:
        src = static_cast<int>(l) - arg;
        if (src < seg_lo) src = static_cast<int>(l);
        break;
      case kShflDown:
        src = static_cast<int>(l) + arg;
        if (src >= seg_hi) src = static_cast<int>(l);
        break;
      case kShflXor:
        src = static_cast<int>(l) ^ arg;
        if (src >= seg_hi) src = static_cast<int>(l);
        break;
      default:
        break;
    }
    if (src >= 0) {
      // A lane past the end of a partial last warp does not exist: its value is poison.
      r = (src < static_cast<int>(nlanes)) ? vals[src] : poison;
    }
    wr(f->result, r);
    wr(f->st, kReady);
  }
  wr(s.warp_gen[w], rd(s.warp_gen[w]) + 1);
  ++s.stats.warp_collectives;
}

inline std::string describe(Fiber* f) {
  switch (rd(f->st)) {
    case kBarrier:
      return "waits at __syncthreads (" + site(rd(f->file), rd(f->line)) + ")";
    case kWarp:
      return std::string("waits at ") + wop_name(rd(f->op)) + " (" + site(rd(f->file), rd(f->line)) + ")";
    case kExited:
      return "has exited";
    default:
      return "is runnable";
  }
}

inline void run_block() {
  Sim& s = sim();
  const unsigned n = s.nthreads;
  const unsigned nwarps = (n + 31) / 32;
  for (unsigned i = 0; i < n; ++i) {
    Fiber* f = s.pool[i].get();
    if (!f->sp) init_fiber(f);
    f->exc = nullptr;
    wr(f->st, kReady);
  }
  for (unsigned w = 0; w < nwarps; ++w) wr(s.warp_gen[w], 0u);
  wr(s.bar_gen, 0u);
  poison_block_shared();
  make_order(s.order, n, s.cfg.seed, s.rng);
  tsan_release(&s.block_sync);

  unsigned warp_arrived[32];
  for (;;) {
    unsigned n_exited = 0, n_bar = 0, n_warp = 0;
    for (unsigned w = 0; w < nwarps; ++w) warp_arrived[w] = 0;
    for (unsigned i : s.order) {
      Fiber* f = s.pool[i].get();
      if (rd(f->st) == kReady) resume(f);
      switch (rd(f->st)) {
        case kExited:
          ++n_exited;
          break;
        case kBarrier:
          ++n_bar;
          break;
        case kWarp:
          ++n_warp;
          ++warp_arrived[i / 32];
          break;
        case kFailed:
          tsan_acquire(&s.end_sync);
          abandon_block();
          std::rethrow_exception(f->exc);
        default:
          break;
      }
    }
    if (n_exited == n) break;
    // Every thread is now blocked or gone: complete what can complete, else report.
    if (n_warp > 0) {
      for (unsigned w = 0; w < nwarps; ++w) {
        const unsigned lane0 = w * 32;
        const unsigned nlanes = std::min(32u, n - lane0);
        if (warp_arrived[w] == 0) continue;
        if (warp_arrived[w] != nlanes) {
          Fiber* waiting = nullptr;
          Fiber* other = nullptr;
          for (unsigned l = 0; l < nlanes; ++l) {
            Fiber* f = s.pool[lane0 + l].get();
            if (rd(f->st) == kWarp) {
              if (!waiting) waiting = f;
            } else if (!other) {
              other = f;
            }
          }
          abandon_block();
          fail("warp collective mismatch (deadlock) in block " + fmt3(s.block_idx) + ", warp " + std::to_string(w) +
               ": thread " + fmt3(waiting->tid) + " " + describe(waiting) + " but thread " + fmt3(other->tid) + " " +
               describe(other) + "; " + std::to_string(warp_arrived[w]) + " of " + std::to_string(nlanes) +
               " lanes arrived");
        }
        resolve_warp(w, lane0, nlanes);
      }
      continue;
    }
    // Only __syncthreads waiters (and possibly exited threads) remain.
    Fiber* first = nullptr;
    for (unsigned i = 0; i < n && !first; ++i)
      if (rd(s.pool[i]->st) == kBarrier) first = s.pool[i].get();
    if (!first) fail("internal error: block " + fmt3(s.block_idx) + " has neither runnable nor waiting threads");
    if (n_exited > 0) {
      Fiber* gone = nullptr;
      for (unsigned i = 0; i < n && !gone; ++i)
        if (rd(s.pool[i]->st) == kExited) gone = s.pool[i].get();
      abandon_block();
      fail("divergent __syncthreads in block " + fmt3(s.block_idx) + ": " + std::to_string(n_bar) +
           " threads wait at a barrier (e.g. thread " + fmt3(first->tid) + " at " +
           site(rd(first->file), rd(first->line)) + ") but " + std::to_string(n_exited) +
           " threads have exited (e.g. thread " + fmt3(gone->tid) + ")");
    }
    const unsigned char bop = rd(first->op);
    uint64_t count = 0;
    for (unsigned i = 0; i < n; ++i) {
      Fiber* f = s.pool[i].get();
      const char* ff = rd(f->file);
      if (rd(f->line) != rd(first->line) || (ff != rd(first->file) && std::strcmp(ff, rd(first->file)) != 0) ||
          rd(f->op) != bop) {
        abandon_block();
        fail("divergent __syncthreads in block " + fmt3(s.block_idx) + ": thread " + fmt3(first->tid) + " waits at " +
             site(rd(first->file), rd(first->line)) + ", thread " + fmt3(f->tid) + " at " +
             site(rd(f->file), rd(f->line)));
      }
      count += rd(f->val);
    }
    uint64_t r = 0;
    if (bop == kBarCount) r = count;
    if (bop == kBarAnd) r = count == n;
    if (bop == kBarOr) r = count != 0;
    for (unsigned i = 0; i < n; ++i) {
      wr(s.pool[i]->result, r);
      wr(s.pool[i]->st, kReady);
    }
    wr(s.bar_gen, rd(s.bar_gen) + 1);
    ++s.stats.block_barriers;
  }
  tsan_acquire(&s.end_sync);
  check_dyn_canary();
}

inline void run_grid(dim3 grid, dim3 block, size_t dyn_smem, void (*invoke)(void*), void* ctx) {
  Sim& s = sim();
  if (rd(s.cur)) fail("selk_sim::launch called from inside a kernel (dynamic parallelism is not modelled)");
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    fail("invalid launch configuration: a grid or block dimension is 0");
  if (nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    fail("invalid launch configuration: block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
         std::to_string(block.z) + ") exceeds 1024 threads or the per-dimension limits (1024,1024,64)");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    fail("invalid launch configuration: grid exceeds (2^31-1, 65535, 65535)");
  if (dyn_smem > s.cfg.max_dyn_smem)
    fail("dynamic shared memory " + std::to_string(dyn_smem) + " B exceeds selk_sim::config().max_dyn_smem = " +
         std::to_string(s.cfg.max_dyn_smem) + " B (48 KiB without cudaFuncSetAttribute)");

  ensure_pool(static_cast<unsigned>(nthreads));
  find_tls_segment();
  prepare_dyn(dyn_smem);
#if defined(SELK_SIM_TSAN)
  wr(s.main_tsan_fiber, __tsan_get_current_fiber());
#endif
  s.grid = grid;
  s.block = block;
  s.nthreads = static_cast<unsigned>(nthreads);
  for (unsigned i = 0; i < s.nthreads; ++i) {
    Fiber* f = s.pool[i].get();
    f->linear = i;
    f->tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
#if defined(SELK_SIM_TSAN)
    // Race reports then say e.g. "Thread T64 'threadIdx (63,0,0)'".
    __tsan_set_fiber_name(f->tsan_fiber, ("threadIdx " + fmt3(f->tid)).c_str());
#endif
  }
  s.invoke = invoke;
  s.invoke_ctx = ctx;
  s.rng = s.cfg.seed * 0x2545F4914F6CDD1Dull + s.stats.launches;
  ++s.stats.launches;

  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> border;
  const bool permute = s.cfg.seed != 0;
  if (permute) {
    border.resize(nblocks);
    for (uint64_t b = 0; b < nblocks; ++b) border[b] = b;
    if (s.cfg.seed == 1)
      std::reverse(border.begin(), border.end());
    else
      for (uint64_t i = nblocks; i > 1; --i) std::swap(border[i - 1], border[next_rand(s.rng) % i]);
  }
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t b = permute ? border[k] : k;
    s.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block();
    ++s.stats.blocks;
    s.stats.threads += nthreads;
  }
}

template <class F>
void invoke_thunk(void* p) {
  (*static_cast<F*>(p))();
}

inline const uint3& thread_idx() { return current_fiber("threadIdx")->tid; }

}  // namespace detail

inline Config& config() { return detail::sim().cfg; }
inline void set_seed(uint64_t seed) { config().seed = seed; }
inline Stats& stats() { return detail::sim().stats; }

// Restores the previous seed on scope exit.
struct ScopedSeed {
  uint64_t old;
  explicit ScopedSeed(uint64_t seed) : old(config().seed) { set_seed(seed); }
  ~ScopedSeed() { set_seed(old); }
};

// Runs kernel(args...) for every thread of every block, like kernel<<<grid, block, dyn_smem>>>(args...)
// followed by a synchronize. Arguments are copied once at launch, as CUDA does.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t dyn_smem_bytes, Kernel kernel, Args&&... args) {
  static_assert((std::is_trivially_copyable_v<std::decay_t<Args>> && ...),
                "CUDA kernel arguments must be trivially copyable");
  auto tup = std::make_tuple(std::decay_t<Args>(std::forward<Args>(args))...);
  auto call = [&]() { std::apply(kernel, tup); };
  detail::run_grid(grid, block, dyn_smem_bytes, &detail::invoke_thunk<decltype(call)>, &call);
}

}  // namespace selk_sim

// =============================================================================================
// CUDA device-side surface (global namespace, as in CUDA).
using selk_sim::dim3;
using selk_sim::uint3;

#define __host__
#define __device__
#define __global__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Static shared memory: one block runs at a time on one OS thread, so a function-local
// `static thread_local` is per-block storage. All thread_local variables of the executable live
// in its TLS segment, which the harness fills with 0xFF bytes at every block start (so test
// executables must not use thread_local for anything else). `extern __shared__` does not
// compile: use SELK_EXTERN_SHARED (defined at the end of this file, and for nvcc in
// csrc/cuda/cuda_compat.cuh).
#define __shared__ static thread_local

#define threadIdx (::selk_sim::detail::thread_idx())
#define blockIdx (static_cast<const ::uint3&>(::selk_sim::detail::sim().block_idx))
#define blockDim (static_cast<const ::dim3&>(::selk_sim::detail::sim().block))
#define gridDim (static_cast<const ::dim3&>(::selk_sim::detail::sim().grid))
inline constexpr int warpSize = 32;

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::selk_sim::detail::block_barrier(::selk_sim::detail::kBarPlain, 0, loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::selk_sim::detail::block_barrier(::selk_sim::detail::kBarCount, pred, loc));
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::selk_sim::detail::block_barrier(::selk_sim::detail::kBarAnd, pred, loc));
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::selk_sim::detail::block_barrier(::selk_sim::detail::kBarOr, pred, loc));
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  ::selk_sim::detail::warp_op(::selk_sim::detail::kSyncwarp, mask, 0, 0, 0, 32, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(
      ::selk_sim::detail::warp_op(::selk_sim::detail::kBallot, mask, pred != 0, 4, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::selk_sim::detail::warp_op(::selk_sim::detail::kAny, mask, pred != 0, 4, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(::selk_sim::detail::warp_op(::selk_sim::detail::kAll, mask, pred != 0, 4, 0, 32, loc));
}

#define SELK_SIM_SHFL(NAME, OP, ARGT)                                                                                 \
  template <class T, std::enable_if_t<::selk_sim::detail::shfl_type_v<T>, int> = 0>                                   \
  inline T NAME(unsigned mask, T var, ARGT a, int width = 32,                                                         \
                std::source_location loc = std::source_location::current()) {                                         \
    return ::selk_sim::detail::from_bits<T>(::selk_sim::detail::warp_op(                                              \
        ::selk_sim::detail::OP, mask, ::selk_sim::detail::to_bits(var), sizeof(T), static_cast<int>(a), width, loc)); \
  }
SELK_SIM_SHFL(__shfl_sync, kShfl, int)
SELK_SIM_SHFL(__shfl_up_sync, kShflUp, unsigned int)
SELK_SIM_SHFL(__shfl_down_sync, kShflDown, unsigned int)
SELK_SIM_SHFL(__shfl_xor_sync, kShflXor, int)
#undef SELK_SIM_SHFL

inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics: exactly CUDA's overload set for these types (so e.g. atomicAdd(int64_t*, ...) or
// atomicMax(float*, ...) fail to compile here as under nvcc). Relaxed, as CUDA's are.
#define SELK_SIM_ATOMIC_INT(T)                                                                             \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                   \
  inline T atomicMin(T* p, T v) {                                                                          \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                          \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)); \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMax(T* p, T v) {                                                                          \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                          \
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)); \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                   \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                    \
    return cmp;                                                                                            \
  }                                                                                                        \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                       \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }
SELK_SIM_ATOMIC_INT(int)
SELK_SIM_ATOMIC_INT(unsigned int)
SELK_SIM_ATOMIC_INT(unsigned long long)
#undef SELK_SIM_ATOMIC_INT
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned int atomicSub(unsigned int* p, unsigned int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
// 64-bit signed min/max exist in CUDA (cc >= 5.0) for long long only, not for long (= int64_t).
inline long long atomicMin(long long* p, long long v) {
  long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline long long atomicMax(long long* p, long long v) {
  long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed); }
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v, std::memory_order_relaxed); }

// Integer / float helpers of the CUDA math API that kernels commonly use.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __float_as_int(float x) { return ::selk_sim::detail::from_bits<int>(::selk_sim::detail::to_bits(x)); }
inline unsigned int __float_as_uint(float x) {
  return ::selk_sim::detail::from_bits<unsigned int>(::selk_sim::detail::to_bits(x));
}
inline float __int_as_float(int x) { return ::selk_sim::detail::from_bits<float>(::selk_sim::detail::to_bits(x)); }
inline float __uint_as_float(unsigned int x) {
  return ::selk_sim::detail::from_bits<float>(::selk_sim::detail::to_bits(x));
}
inline long long __double_as_longlong(double x) {
  return ::selk_sim::detail::from_bits<long long>(::selk_sim::detail::to_bits(x));
}
inline double __longlong_as_double(long long x) {
  return ::selk_sim::detail::from_bits<double>(::selk_sim::detail::to_bits(x));
}

// Pointer to the current block's dynamic shared memory (dyn_smem_bytes of the launch), 16-byte
// aligned, poisoned with 0xFF bytes at block start. csrc/cuda/cuda_compat.cuh defines the nvcc form.
#define SELK_EXTERN_SHARED(type, name) type* name = ::selk_sim::detail::dynamic_shared<type>()
