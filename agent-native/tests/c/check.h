/* Minimal assertion helpers for devmig's C unit tests. A failed CHECK prints
 * file:line and the expression, and the test exits non-zero; pytest runs
 * each test executable and shows its output on failure. */
#ifndef DEVMIG_TEST_CHECK_H
#define DEVMIG_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures;
#define CHECK(expr)                                                                  \
	do {                                                                         \
		if (!(expr)) {                                                       \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr); \
			check_failures++;                                            \
		}                                                                    \
	} while (0)
static inline int check_streq(const char *a, const char *b)
{
	return a && b && strcmp(a, b) == 0;
}
#define CHECK_STREQ(a, b) CHECK(check_streq((a), (b)))
#define CHECK_DONE()                                                                 \
	do {                                                                         \
		if (check_failures) {                                                \
			fprintf(stderr, "%d check(s) failed\n", check_failures);     \
			return EXIT_FAILURE;                                         \
		}                                                                    \
		printf("ok\n");                                                      \
		return EXIT_SUCCESS;                                                 \
	} while (0)
#endif
