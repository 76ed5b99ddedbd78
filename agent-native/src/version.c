#include "devmig/devmig.h"

#define STR_(x) #x
#define STR(x) STR_(x)

const char *devmig_version(void)
{
	return STR(DEVMIG_VERSION_MAJOR) "." STR(DEVMIG_VERSION_MINOR) "." STR(DEVMIG_VERSION_PATCH);
}
