/* The simulated device's page and memory digest (sim_digest.c); internal
 * to the simulated device. */
#ifndef DEVMIG_SIM_DIGEST_H
#define DEVMIG_SIM_DIGEST_H

#include <stddef.h>
#include <stdint.h>

/* The digest of len bytes at src from seed h. When dst is not NULL the
 * bytes are also copied there in the same pass (dst must then be 64-byte
 * aligned and len a multiple of 64, as a page is), with stores that bypass
 * the cache (a loaded page is not read again soon), ordered only by
 * sim_digest_fence(). */
uint64_t sim_digest_copy(void *dst, const void *src, size_t len, uint64_t h);
/* The digest's mixing step, h = (rotl(h, 23) ^ w) * 2^64/golden ratio:
 * also how the device mixes a page's digest with its index. */
uint64_t sim_digest_fold(uint64_t h, uint64_t w);
/* Orders the copies' stores before whatever follows: call once after a
 * batch of sim_digest_copy with dst, before another thread may read dst. */
void sim_digest_fence(void);

#endif
