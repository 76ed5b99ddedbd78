#include "check.h"
#include "devmig/devmig.h"

int main(void)
{
	char want[32];
	snprintf(want, sizeof(want), "%d.%d.%d", DEVMIG_VERSION_MAJOR, DEVMIG_VERSION_MINOR,
		 DEVMIG_VERSION_PATCH);
	CHECK_STREQ(devmig_version(), want);
	CHECK_DONE();
}
