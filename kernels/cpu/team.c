/* Pinning the calling thread's OpenMP team, for an engine that borrows a partner's idle cores
 * (appliance/engine/core_share.py). No vector code: it builds on any x86 or Arm Linux with OpenMP.
 *
 * libgomp keeps a master's team threads between parallel regions but may let them go when a region
 * asks for fewer, and a new thread inherits the master's mask, so the caller pins again whenever it
 * grows the team back. */
#define _GNU_SOURCE
#include <errno.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>

/* Team thread t < n_home may run on every core of home; thread n_home + j only on lent[j].
 * Returns 0, an errno of sched_setaffinity, or -1 when libgomp gave a smaller team. */
int pdbox_pin_team(int n_home, const int *home, int n_lent, const int *lent) {
    int n = n_home + n_lent, failed = 0, size = 0;
#pragma omp parallel num_threads(n) reduction(| : failed)
    {
        int t = omp_get_thread_num();
        cpu_set_t set;
        CPU_ZERO(&set);
        if (t < n_home)
            for (int i = 0; i < n_home; i++) CPU_SET(home[i], &set);
        else
            CPU_SET(lent[t - n_home], &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) failed |= errno;
        if (t == 0) size = omp_get_num_threads();
    }
    if (failed) return failed;
    return size == n ? 0 : -1;
}

/* The masks (cores 0..63) of a team of n threads, in masks[0 .. n-1]; returns the team's size. */
int pdbox_team_masks(int n, uint64_t *masks) {
    int size = 0;
#pragma omp parallel num_threads(n)
    {
        int t = omp_get_thread_num();
        cpu_set_t set;
        uint64_t bits = 0;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            for (int c = 0; c < 64; c++)
                if (CPU_ISSET(c, &set)) bits |= (uint64_t)1 << c;
        if (t < n) masks[t] = bits;
        if (t == 0) size = omp_get_num_threads();
    }
    return size;
}
