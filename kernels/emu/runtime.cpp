// The emulator's runtime: CUDA threads as fibers, one block at a time per OS thread, blocks
// spread over a few OS threads; barriers, warp collectives, deadlock and divergence reports.
// Entry point for Rust: icdit_emu_launch (src/gpu/emu.rs). Design: docs/gpu-emulation.md.

#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

// ---- context switch -----------------------------------------------------------------------
// x86-64: a 20-instruction switch of the callee-saved registers and stack pointer. A lane
// arriving at a warp collective and switching away costs about 40 ns with it, 150 ns with
// glibc's swapcontext (which also saves the signal mask with a system call); the 512×1152×1152
// GEMM takes 0.7–1.6 s against 4.5–5.5 s. Elsewhere, or with ICDIT_EMU_UCONTEXT defined,
// ucontext.

extern "C" void icdit_fiber_main();

#if defined(__x86_64__) && !defined(ICDIT_EMU_UCONTEXT)
#define ICDIT_EMU_ASM_SWITCH 1
extern "C" void icdit_fiber_switch(void** save_sp, void* to_sp);
extern "C" void icdit_fiber_start();
// Saves rbp, rbx, r12–r15, MXCSR and the x87 control word on the old stack, stores the stack
// pointer in *save_sp, loads to_sp and restores the same from there. A new fiber's stack is
// prepared (fiber_init) so that the first switch "returns" into icdit_fiber_start.
asm(R"(
    .pushsection .text
    .globl icdit_fiber_switch
    .hidden icdit_fiber_switch
    .type icdit_fiber_switch, @function
icdit_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size icdit_fiber_switch, .-icdit_fiber_switch

    .globl icdit_fiber_start
    .hidden icdit_fiber_start
    .type icdit_fiber_start, @function
icdit_fiber_start:
    call icdit_fiber_main
    ud2
    .size icdit_fiber_start, .-icdit_fiber_start
    .popsection
)");
struct Ctx {
    void* sp;
};
#else
#include <ucontext.h>
struct Ctx {
    ucontext_t uc;
};
#endif

namespace icdit_emu {
namespace {

// Each fiber's stack: 64 KiB (kernels keep fragments and a few scalars; the C library's
// printf needs a few KiB) above a PROT_NONE guard page, so an overflow faults instead of
// corrupting a neighbour. Stacks are pooled across launches.
constexpr size_t kStackBytes = 64 * 1024;
std::mutex g_pool_mu;
std::vector<char*> g_pool;

size_t page_bytes() {
    static const size_t p = size_t(sysconf(_SC_PAGESIZE));
    return p;
}

char* stack_acquire() {
    {
        std::lock_guard<std::mutex> lock(g_pool_mu);
        if (!g_pool.empty()) {
            char* s = g_pool.back();
            g_pool.pop_back();
            return s;
        }
    }
    const size_t guard = page_bytes();
    void* p = mmap(nullptr, kStackBytes + guard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    if (mprotect(p, guard, PROT_NONE) != 0) {
        munmap(p, kStackBytes + guard);
        return nullptr;
    }
    return static_cast<char*>(p) + guard;
}

void stack_release(std::vector<char*>& stacks) {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    for (char* s : stacks) g_pool.push_back(s);
    stacks.clear();
}

enum State : uint8_t { READY, RUNNING, AT_BARRIER, IN_WARP_OP, DONE };

struct Fiber {
    Ctx ctx;
    char* stack;
    uint3 tid;
    unsigned linear;
    State state;
};

// Lanes of one warp waiting in one collective (disjoint masks may wait side by side).
struct Pending {
    uint32_t mask, arrived;
    const char* name;
    WarpOp* lanes[32];
};

struct Warp {
    uint32_t present;  // lanes that exist (a last partial warp has fewer)
    uint32_t ready;    // lanes that can run
    uint32_t exited;
    int npending;
    Pending pending[32];
};

// One OS thread's emulation state: the block it runs now.
struct Worker {
    void (*entry)(void* const*);
    void* const* args;
    unsigned nthreads;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char*> stacks;
    unsigned cur_warp = 0;  // the warp the scheduler keeps running while it can
    unsigned live = 0, at_barrier = 0, exited = 0;
    bool reverse = false;
    bool failed = false;
    std::string error;
    Ctx sched;
    unsigned char* dyn = nullptr;
    size_t dyn_bytes = 0;
};

__thread Worker* g_worker;
__thread Fiber* g_cur;

void push_ready(Worker& w, unsigned i) {
    w.fibers[i].state = READY;
    w.warps[i / 32].ready |= 1u << (i % 32);
}

// Scheduling order: the warp that ran last keeps running while any of its lanes can (lanes
// in index order), then the next warp with a runnable lane. One warp thus runs as far ahead
// of the others as the barriers allow, which is what exposes a missing __syncthreads in
// either direction (a warp reading what others have not written yet, or overwriting what
// they have not read yet). Odd blocks go in reverse order (last warp, last lane first).
Fiber* pop_ready(Worker& w) {
    const unsigned nwarps = unsigned(w.warps.size());
    for (unsigned k = 0; k < nwarps; ++k) {
        const unsigned wi = w.reverse ? (w.cur_warp + nwarps - k) % nwarps : (w.cur_warp + k) % nwarps;
        uint32_t& r = w.warps[wi].ready;
        if (!r) continue;
        const unsigned lane = w.reverse ? 31 - unsigned(__builtin_clz(r)) : unsigned(__builtin_ctz(r));
        r &= ~(1u << lane);
        w.cur_warp = wi;
        return &w.fibers[wi * 32 + lane];
    }
    return nullptr;
}

inline void switch_ctx(Ctx* from, Ctx* to) {
#ifdef ICDIT_EMU_ASM_SWITCH
    icdit_fiber_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

void fiber_init(Fiber& f) {
#ifdef ICDIT_EMU_ASM_SWITCH
    // Stack, from the top: the address the first switch returns to (icdit_fiber_start, at a
    // 16-byte boundary so the call it makes sees the ABI's alignment), rbp, rbx, r12–r15
    // (zero) and the control/status words of the thread creating it.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes - 16) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = reinterpret_cast<uint64_t>(&icdit_fiber_start);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, icdit_fiber_main, 0);
#endif
}

// Runs `to` in place of `from`; returns when something switches back to `from`.
inline void run(Fiber* from, Fiber* to) {
    g_cur = to;
    to->state = RUNNING;
    threadIdx = to->tid;
    switch_ctx(&from->ctx, &to->ctx);
}

inline void to_scheduler(Fiber* from) {
    g_cur = nullptr;
    switch_ctx(&from->ctx, &g_worker->sched);
}

// The fiber running now cannot go on: run the next runnable one, or give control back to the
// scheduler, which then finds the block finished or stuck.
void park(Fiber* self) {
    if (Fiber* next = pop_ready(*g_worker))
        run(self, next);
    else
        to_scheduler(self);
}

std::string where(const Worker& w, const Fiber* f) {
    char buf[96];
    if (f)
        snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u): ", blockIdx.x, blockIdx.y,
                 blockIdx.z, f->tid.x, f->tid.y, f->tid.z);
    else
        snprintf(buf, sizeof buf, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    (void)w;
    return buf;
}

[[noreturn]] void thread_exit() {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    Warp& warp = w.warps[f->linear / 32];
    const uint32_t bit = 1u << (f->linear % 32);
    f->state = DONE;
    --w.live;
    ++w.exited;
    warp.exited |= bit;
    for (int p = 0; p < warp.npending; ++p)
        if (warp.pending[p].mask & bit)
            fail("returned while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
                 warp.pending[p].arrived, warp.pending[p].name, warp.pending[p].mask);
    if (w.at_barrier > 0)
        fail("returned while %u thread(s) of the block wait at __syncthreads(): a barrier "
             "must be reached by every thread of the block",
             w.at_barrier);
    park(f);
    __builtin_unreachable();
}

std::string describe_stuck(const Worker& w) {
    std::string s = "deadlock: " + std::to_string(w.at_barrier) +
                    " thread(s) wait at __syncthreads(), " + std::to_string(w.exited) +
                    " returned";
    for (size_t i = 0; i < w.warps.size(); ++i)
        for (int p = 0; p < w.warps[i].npending; ++p) {
            const Pending& pd = w.warps[i].pending[p];
            char buf[160];
            snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x wait in %s for mask 0x%08x", i,
                     pd.arrived, pd.name, pd.mask);
            s += buf;
        }
    return s;
}

bool run_block(Worker& w, uint64_t linear_block) {
    const uint64_t gx = gridDim.x, gy = gridDim.y;
    blockIdx = uint3{unsigned(linear_block % gx), unsigned((linear_block / gx) % gy),
                     unsigned(linear_block / (gx * gy))};
    w.reverse = linear_block & 1;
    w.cur_warp = w.reverse ? unsigned(w.warps.size()) - 1 : 0;
    for (size_t i = 0; i < w.warps.size(); ++i) {
        const unsigned lanes = std::min(32u, w.nthreads - unsigned(i) * 32);
        w.warps[i].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        w.warps[i].ready = 0;
        w.warps[i].exited = 0;
        w.warps[i].npending = 0;
    }
    for (unsigned i = 0; i < w.nthreads; ++i) {
        fiber_init(w.fibers[i]);
        push_ready(w, i);
    }
    w.live = w.nthreads;
    w.at_barrier = w.exited = 0;
    w.failed = false;
    if (w.dyn_bytes) std::memset(w.dyn, 0xff, w.dyn_bytes);

    Fiber* first = pop_ready(w);
    g_cur = first;
    first->state = RUNNING;
    threadIdx = first->tid;
    switch_ctx(&w.sched, &first->ctx);
    g_cur = nullptr;
    if (w.failed) return false;
    if (w.live > 0) {
        w.error = where(w, nullptr) + describe_stuck(w);
        return false;
    }
    return true;
}

}  // namespace

// ---- the interface emu.h declares -----------------------------------------------------------

void fail(const char* fmt, ...) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!w.failed) {
        w.failed = true;
        w.error = where(w, f) + msg;
    }
    f->state = DONE;
    to_scheduler(f);
    __builtin_unreachable();
}

void syncthreads() {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    if (w.exited > 0)
        fail("__syncthreads() after %u thread(s) of the block returned: a barrier must be "
             "reached by every thread of the block",
             w.exited);
    if (++w.at_barrier == w.live) {
        // Last to arrive: release the others and go on.
        for (unsigned i = 0; i < w.nthreads; ++i)
            if (w.fibers[i].state == AT_BARRIER) push_ready(w, i);
        w.at_barrier = 0;
        return;
    }
    f->state = AT_BARRIER;
    park(f);
}

unsigned lane_id() { return g_cur->linear % 32; }

void* dynamic_shared() { return g_worker->dyn; }

void warp_collective(WarpOp* op) {
    Worker& w = *g_worker;
    Fiber* f = g_cur;
    const unsigned lane = f->linear % 32;
    const uint32_t bit = 1u << lane;
    Warp& warp = w.warps[f->linear / 32];
    if (!(op->mask & bit))
        fail("%s: mask 0x%08x does not include the calling lane %u", op->name, op->mask, lane);
    if (op->mask & ~warp.present)
        fail("%s: mask 0x%08x names lanes that do not exist (the block has %u threads)",
             op->name, op->mask, w.nthreads);
    if (op->mask & warp.exited)
        fail("%s: mask 0x%08x names lanes 0x%08x that already returned", op->name, op->mask,
             op->mask & warp.exited);
    Pending* p = nullptr;
    for (int i = 0; i < warp.npending; ++i) {
        Pending& q = warp.pending[i];
        if (!(q.mask & op->mask)) continue;
        if (q.mask != op->mask || (q.name != op->name && std::strcmp(q.name, op->name) != 0))
            fail("lane %u calls %s with mask 0x%08x while lanes 0x%08x of its warp wait in %s "
                 "with mask 0x%08x",
                 lane, op->name, op->mask, q.arrived, q.name, q.mask);
        p = &q;
        break;
    }
    if (!p) {
        p = &warp.pending[warp.npending++];
        p->mask = op->mask;
        p->arrived = 0;
        p->name = op->name;
        for (auto& l : p->lanes) l = nullptr;
    }
    p->lanes[lane] = op;
    p->arrived |= bit;
    if (p->arrived != p->mask) {
        f->state = IN_WARP_OP;
        park(f);
        return;  // the last lane has completed the operation for us
    }
    // Last to arrive: take the group off the warp's list, complete it, wake the others.
    WarpOp* lanes[32];
    std::memcpy(lanes, p->lanes, sizeof lanes);
    const uint32_t mask = p->mask;
    *p = warp.pending[--warp.npending];
    op->complete(lanes);
    const unsigned base = f->linear - lane;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1) && l != lane) push_ready(w, base + l);
}

}  // namespace icdit_emu

extern "C" void icdit_fiber_main() {
    using namespace icdit_emu;
    g_worker->entry(g_worker->args);
    thread_exit();
}

// ---- launch -------------------------------------------------------------------------------

namespace {

struct Launch {
    void (*entry)(void* const*);
    void* const* args;
    uint64_t nblocks;
    unsigned nthreads;
    size_t dyn_bytes;
    dim3 grid, block;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;

    void report(const std::string& e) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = e;
        failed = true;
    }
};

void run_worker(Launch& L) {
    using namespace icdit_emu;
    Worker w;
    w.entry = L.entry;
    w.args = L.args;
    w.nthreads = L.nthreads;
    w.fibers.resize(L.nthreads);
    w.warps.resize((L.nthreads + 31) / 32);
    for (unsigned i = 0; i < L.nthreads; ++i) {
        char* s = stack_acquire();
        if (!s) {
            stack_release(w.stacks);
            L.report("cannot map fiber stacks for " + std::to_string(L.nthreads) + " threads");
            return;
        }
        w.stacks.push_back(s);
        Fiber& f = w.fibers[i];
        f.stack = s;
        f.linear = i;
        f.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    }
    if (L.dyn_bytes) {
        w.dyn_bytes = L.dyn_bytes;
        w.dyn = static_cast<unsigned char*>(std::aligned_alloc(128, (L.dyn_bytes + 127) & ~size_t(127)));
    }
    gridDim = L.grid;
    blockDim = L.block;
    g_worker = &w;
    for (;;) {
        if (L.failed.load(std::memory_order_relaxed)) break;
        const uint64_t b = L.next.fetch_add(1, std::memory_order_relaxed);
        if (b >= L.nblocks) break;
        if (!run_block(w, b)) {
            L.report(w.error);
            break;
        }
    }
    g_worker = nullptr;
    std::free(w.dyn);
    stack_release(w.stacks);
}

int fail_launch(char* err, size_t cap, const std::string& msg) {
    if (cap) snprintf(err, cap, "%s", msg.c_str());
    return 1;
}

}  // namespace

// Runs `entry(args)` as every thread of every block of a grid. Returns 0, or 1 with a message
// in err (the first error of any block; the other blocks stop soon after).
extern "C" int icdit_emu_launch(void (*entry)(void* const*), void* const* args,
                                const uint32_t grid[3], const uint32_t block[3],
                                uint32_t dyn_smem_bytes, uint32_t workers, char* err,
                                size_t err_cap) {
    const uint64_t nthreads = uint64_t(block[0]) * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64)
        return fail_launch(err, err_cap,
                           "invalid block (" + std::to_string(block[0]) + "," +
                               std::to_string(block[1]) + "," + std::to_string(block[2]) +
                               "): at most 1024 threads, z ≤ 64");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
        grid[1] > 65535 || grid[2] > 65535)
        return fail_launch(err, err_cap,
                           "invalid grid (" + std::to_string(grid[0]) + "," +
                               std::to_string(grid[1]) + "," + std::to_string(grid[2]) + ")");
    Launch L;
    L.entry = entry;
    L.args = args;
    L.nblocks = uint64_t(grid[0]) * grid[1] * grid[2];
    L.nthreads = unsigned(nthreads);
    L.dyn_bytes = dyn_smem_bytes;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    const uint64_t n = std::max<uint64_t>(1, std::min<uint64_t>(workers, L.nblocks));
    std::vector<std::thread> helpers;
    for (uint64_t i = 1; i < n; ++i) helpers.emplace_back([&L] { run_worker(L); });
    run_worker(L);
    for (auto& t : helpers) t.join();
    if (!L.error.empty()) return fail_launch(err, err_cap, L.error);
    return 0;
}
