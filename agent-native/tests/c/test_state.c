#include <errno.h>

#include "check.h"
#include "devmig/devmig.h"

int main(void)
{
	/* Names are the kernel's, at the kernel's values. */
	CHECK_STREQ(devmig_state_name(DEVMIG_STATE_ERROR), "ERROR");
	CHECK_STREQ(devmig_state_name(1), "STOP");
	CHECK_STREQ(devmig_state_name(3), "STOP_COPY");
	CHECK_STREQ(devmig_state_name(7), "PRE_COPY_P2P");
	CHECK(devmig_state_name(8) == NULL);
	CHECK(devmig_state_name(UINT32_MAX) == NULL);

	/* Every name parses back to its value. */
	for (uint32_t s = 0; s < DEVMIG_STATE_COUNT; s++)
		CHECK(devmig_state_from_name(devmig_state_name(s)) == (int)s);
	CHECK(devmig_state_from_name("stop") == -EINVAL);
	CHECK(devmig_state_from_name("") == -EINVAL);
	CHECK(devmig_state_from_name(NULL) == -EINVAL);
	CHECK_DONE();
}
