#pragma once
// Minimal test framework for harness tests (tests/cuda_harness/test_*.cpp, selftest.cpp).
//
//   #include "cuda/my_kernels.cuh"   // the simulator itself is injected by build.sh (-include)
//   #include "harness_test.h"
//   SELK_TEST(my_case) { ...; selk_sim::launch(grid, block, smem, kernel, args...); SELK_CHECK(...); }
//   SELK_SUBCASE(my_crash) { ... }   // only runs as `binary --case my_crash` (see run_self)
//
// The binary runs every SELK_TEST and exits non-zero if one fails. `--case NAME` runs one
// test or subcase, `--list` lists them. SELK_SIM_SEED (env) picks the schedule, see tools/cuda_sim/cuda_sim.h.
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace selk_test {

struct Case {
  const char* name;
  void (*fn)();
  bool subcase;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}

struct Reg {
  Reg(const char* n, void (*f)(), bool sub) { registry().push_back({n, f, sub}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_at(const char* file, int line, const std::string& what) {
  throw Failure(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

inline const char* sanitizer_mode() {
#if defined(SELK_SIM_TSAN)
  return "tsan";
#elif defined(SELK_SIM_ASAN)
  return "asan";
#else
  return "plain";
#endif
}

// Element-wise |got - want| <= atol + rtol * |want|; NaN only matches NaN.
template <class A, class B>
inline void check_close(const char* file, int line, const A& got, const B& want, double rtol, double atol) {
  if (got.size() != want.size())
    fail_at(file, line, "size " + std::to_string(got.size()) + " != " + std::to_string(want.size()));
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    const bool ok = (std::isnan(g) && std::isnan(w)) || std::fabs(g - w) <= atol + rtol * std::fabs(w);
    if (!ok) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "mismatch at [%zu]: got %.9g want %.9g (rtol %g atol %g)", i, g, w, rtol, atol);
      fail_at(file, line, buf);
    }
  }
}

// Runs fn, expecting a selk_sim::SimError whose message contains `needle`; returns the message.
inline std::string expect_sim_error(const char* file, int line, const std::string& needle,
                                    const std::function<void()>& fn) {
  try {
    fn();
  } catch (const selk_sim::SimError& e) {
    const std::string msg = e.what();
    if (msg.find(needle) == std::string::npos) fail_at(file, line, "SimError without \"" + needle + "\": " + msg);
    return msg;
  }
  fail_at(file, line, "expected a selk_sim::SimError containing \"" + needle + "\", none was thrown");
}

struct ProcResult {
  int status;          // exit code, or 128 + signal
  std::string output;  // stdout and stderr
};

// Runs this executable again as `exe --case NAME` (for cases that are meant to crash or to
// make a sanitizer report), capturing its output.
inline ProcResult run_self(const std::string& case_name) {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) throw Failure("readlink /proc/self/exe failed");
  exe[n] = 0;
  const std::string cmd = std::string("'") + exe + "' --case " + case_name + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) throw Failure("popen failed");
  ProcResult r{0, {}};
  char buf[4096];
  size_t k;
  while ((k = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, k);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  return r;
}

inline int main(int argc, char** argv) {
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--list")) {
      for (auto& c : registry()) std::printf("%s%s\n", c.name, c.subcase ? " (subcase)" : "");
      return 0;
    }
    if (!std::strcmp(argv[i], "--case") && i + 1 < argc) only = argv[++i];
  }
  if (!only.empty()) {
    for (auto& c : registry()) {
      if (only == c.name) {
        c.fn();  // no catching: a subcase may be meant to die
        std::printf("[case %s done]\n", c.name);
        return 0;
      }
    }
    std::fprintf(stderr, "no case named %s\n", only.c_str());
    return 2;
  }
  int failed = 0, passed = 0;
  std::fprintf(stderr, "[%s mode, SELK_SIM_SEED=%llu]\n", sanitizer_mode(),
               static_cast<unsigned long long>(selk_sim::config().seed));
  for (auto& c : registry()) {
    if (c.subcase) continue;
    try {
      c.fn();
      ++passed;
      std::fprintf(stderr, "PASS %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::fprintf(stderr, "FAIL %s: %s\n", c.name, e.what());
    }
  }
  std::fprintf(stderr, "%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

}  // namespace selk_test

#define SELK_TEST(name)                                                          \
  static void selk_test_##name();                                                \
  static ::selk_test::Reg selk_test_reg_##name(#name, &selk_test_##name, false); \
  static void selk_test_##name()
#define SELK_SUBCASE(name)                                                      \
  static void selk_test_##name();                                               \
  static ::selk_test::Reg selk_test_reg_##name(#name, &selk_test_##name, true); \
  static void selk_test_##name()

#define SELK_CHECK(cond) ((cond) ? (void)0 : ::selk_test::fail_at(__FILE__, __LINE__, "check failed: " #cond))
#define SELK_CHECK_MSG(cond, msg) \
  ((cond) ? (void)0 : ::selk_test::fail_at(__FILE__, __LINE__, std::string("check failed: " #cond ": ") + (msg)))
#define SELK_CHECK_CLOSE(got, want, rtol, atol) ::selk_test::check_close(__FILE__, __LINE__, got, want, rtol, atol)
#define SELK_EXPECT_SIM_ERROR(needle, ...) \
  ::selk_test::expect_sim_error(__FILE__, __LINE__, needle, [&]() { __VA_ARGS__; })

#ifndef SELK_TEST_NO_MAIN
int main(int argc, char** argv) { return ::selk_test::main(argc, argv); }
#endif
