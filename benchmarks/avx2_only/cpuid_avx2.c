/* Make this process see an AVX2-only x86 CPU: every CPUID instruction traps (Linux CPUID
 * faulting, ARCH_SET_CPUID), and the trap answers the real CPUID with AVX-512, AMX, AVX-VNNI
 * and the bf16/fp16 extensions cleared, so that ONNX Runtime, oneDNN, torch, OpenCV and NumPy
 * pick the kernels they would pick on an AVX2 CPU (an AMD EPYC Zen 2/3, a Haswell-Skylake
 * client). The microarchitecture (clock, caches, core count) stays this machine's, so the
 * figures are those of AVX2 code on this core, not of another CPU.
 * Built and preloaded by ./run next to this file. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void mask(unsigned leaf, unsigned sub, unsigned r[4]) {
    enum { A, B, C, D };
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[B] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[C] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23, AMX_TILE 24,
         * AMX_INT8 25 */
        r[D] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                  (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX_VNNI 4, AVX512_BF16 5, AMX_FP16 21, AVX_IFMA 23 */
        r[A] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX_VNNI_INT8 4, AVX_NE_CONVERT 5, AMX_COMPLEX 8, AVX10 19 */
        r[D] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 19));
    } else if (leaf == 0xd && sub == 0) {
        /* XSAVE components the OS may enable: drop opmask/ZMM (5-7) and AMX tiles (17-18) */
        r[A] &= ~((7u << 5) | (3u << 17));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        r[A] = r[B] = r[C] = r[D] = 0; /* AMX palettes, TMUL, AVX10 */
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned r[4], leaf = (unsigned)g[REG_RAX], sub = (unsigned)g[REG_RCX];
        set_cpuid(1);
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
        set_cpuid(0);
        mask(leaf, sub, r);
        g[REG_RAX] = r[0], g[REG_RBX] = r[1], g[REG_RCX] = r[2], g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    (void)info;
    signal(sig, SIG_DFL); /* a real crash: let it happen as it would have */
}

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (set_cpuid(0) != 0) {
        perror("cpuid_avx2: arch_prctl(ARCH_SET_CPUID)");
        exit(70);
    }
}
