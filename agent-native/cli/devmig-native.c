/* devmig-native: the native core from a shell, for operators and scripts.
 *
 *   devmig-native DEVICE COMMAND [ARGS]
 *
 * DEVICE is one of
 *   --group N --device NAME   /dev/vfio/N and a type1 container; NAME is
 *                             the PCI address or mdev UUID
 *   --cdev PATH               /dev/vfio/devices/vfioN bound to /dev/iommu
 *   --sim SPEC                the simulated device; SPEC is comma-separated
 *                             key=value: mem=SIZE (bytes, K/M/G suffixes;
 *                             default 1M), seed=N, dirty=N (pages dirtied
 *                             per MiB read in PRE_COPY), flags=stop_copy
 *                             [+p2p][+pre_copy] (default all three)
 * COMMAND is one of
 *   probe                     the migration flags
 *   info                      ids, driver, flags, state, regions
 *   state [NEW_STATE]         the state, or move to NEW_STATE (a kernel
 *                             state name) through the core's one setter
 *   save --to FILE [--precopy]  RUNNING -> [PRE_COPY ->] STOP_COPY -> STOP,
 *                             the device state to FILE as a devmig stream
 *   load --from FILE          -> RESUMING, the verified stream, STOP ->
 *                             RUNNING; a stream that does not verify resets
 *                             the device and never runs it
 *   region-read INDEX OFFSET LEN [--fifo]   hex bytes of a region (trapped
 *                             access, one byte per access)
 *   region-write INDEX OFFSET HEX [--fifo]  write bytes given in hex
 *   dirty --iova A --length L [--page-size P] [--seconds S]
 *                             device DMA logging over [A, A+L): start, wait
 *                             S seconds (default 1), report the dirty pages
 *                             as "FIRST_PAGE COUNT" runs, stop. One command:
 *                             a device's DMA log lives only while it is
 *                             open, so start, report and stop cannot be
 *                             separate processes
 *                             --fifo: every access at OFFSET, for a device
 *                             register such as a UART's data port
 * State changes are logged on stderr as "devmig: FROM -> TO". A simulated
 * device lives only as long as the command: save and load print its
 * memory digest ("digest 0x..."), so a script compares a source's with
 * the target's.
 *
 * Exit codes:
 *   0  done
 *   1  usage: bad arguments
 *   2  device: it cannot be opened, or an operation on it failed
 *   3  refused: the core's arc table or the kernel refused the transition
 *   4  stream: the stream did not verify (corrupt, truncated, another
 *      device's); the device was reset
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "devmig/bitmap.h"
#include "devmig/devmig.h"
#include "devmig/dirty.h"
#include "devmig/sim.h"
#include "devmig/stream.h"
#include "devmig/vfio.h"

enum { EXIT_OK = 0, EXIT_USAGE = 1, EXIT_DEVICE = 2, EXIT_REFUSED = 3, EXIT_STREAM = 4 };

static const char *prog = "devmig-native";

static void usage(void)
{
	fprintf(stderr,
		"usage: %s (--group N --device NAME | --cdev PATH | --sim SPEC) COMMAND [ARGS]\n"
		"commands: probe | info | state [NEW_STATE] | save --to FILE [--precopy] |\n"
		"          load --from FILE | region-read INDEX OFFSET LEN [--fifo] |\n"
		"          region-write INDEX OFFSET HEXBYTES [--fifo] |\n"
		"          dirty --iova A --length L [--page-size P] [--seconds S]\n"
		"exit codes: 0 ok, 1 usage, 2 device error, 3 refused transition, 4 stream refused\n",
		prog);
}

static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return code;
}

static void log_line(void *ctx, const char *line)
{
	(void)ctx;
	fprintf(stderr, "devmig: %s\n", line);
}

/* "64M" -> bytes; -1 when malformed. */
static int64_t parse_size(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);

	if (end == s)
		return -1;
	switch (*end) {
	case 'K': case 'k': v <<= 10; end++; break;
	case 'M': case 'm': v <<= 20; end++; break;
	case 'G': case 'g': v <<= 30; end++; break;
	default: break;
	}
	return *end || v > (1ULL << 40) ? -1 : (int64_t)v;
}

static int parse_sim(const char *spec, struct devmig_sim_config *cfg)
{
	char buf[256], *save = NULL, *kv;

	memset(cfg, 0, sizeof(*cfg));
	if (strlen(spec) >= sizeof(buf))
		return -1;
	strcpy(buf, spec);
	for (kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		char *v = strchr(kv, '=');
		char *end;

		if (!v)
			return -1;
		*v++ = '\0';
		if (!strcmp(kv, "mem")) {
			int64_t n = parse_size(v);

			if (n <= 0)
				return -1;
			cfg->mem_size = (uint64_t)n;
		} else if (!strcmp(kv, "seed")) {
			cfg->seed = strtoull(v, &end, 0);
			if (*end)
				return -1;
		} else if (!strcmp(kv, "dirty")) {
			unsigned long n = strtoul(v, &end, 0);

			if (*end || n > 256)
				return -1; /* a MiB is 256 pages */
			cfg->dirty_pages_per_mib = (uint32_t)n;
		} else if (!strcmp(kv, "flags")) {
			char *f, *s2 = NULL;

			cfg->flags = 0;
			for (f = strtok_r(v, "+", &s2); f; f = strtok_r(NULL, "+", &s2)) {
				if (!strcmp(f, "stop_copy"))
					cfg->flags |= DEVMIG_MIG_STOP_COPY;
				else if (!strcmp(f, "p2p"))
					cfg->flags |= DEVMIG_MIG_P2P;
				else if (!strcmp(f, "pre_copy"))
					cfg->flags |= DEVMIG_MIG_PRE_COPY;
				else
					return -1;
			}
			if (!(cfg->flags & DEVMIG_MIG_STOP_COPY))
				return -1; /* STOP_COPY is mandatory in the uAPI */
		} else {
			return -1;
		}
	}
	return 0;
}

struct target {
	struct devmig_vfio_handle h;
	struct devmig_dev *dev;
	int sim;
};

/* The descriptor of a real device: PCI ids from config space when it has
 * one (region 7), and the driver from sysfs when the caller knows it; the
 * stream refuses a device unlike its source by these. */
static void real_desc(int fd, struct devmig_dev_desc *desc)
{
	struct devmig_region_info ri;
	uint8_t id[4];

	memset(desc, 0, sizeof(*desc));
	snprintf(desc->driver, sizeof(desc->driver), "vfio");
	if (devmig_vfio_get_region_info(fd, DEVMIG_VFIO_PCI_CONFIG_REGION_INDEX, &ri) == 0) {
		if (pread(fd, id, sizeof(id), (off_t)ri.offset) == (ssize_t)sizeof(id)) {
			desc->vendor_id = (uint16_t)(id[0] | id[1] << 8);
			desc->device_id = (uint16_t)(id[2] | id[3] << 8);
		}
		devmig_region_info_free(&ri);
	}
}

static int open_target(int argc, char **argv, int *argi, struct target *t)
{
	const char *group = NULL, *device = NULL, *cdev = NULL, *sim = NULL;
	char why[512] = "";
	int i = *argi, r;

	memset(t, 0, sizeof(*t));
	t->h.device_fd = t->h.container_fd = t->h.group_fd = t->h.iommufd = -1;
	for (; i + 1 < argc && !strncmp(argv[i], "--", 2); i += 2) {
		if (!strcmp(argv[i], "--group"))
			group = argv[i + 1];
		else if (!strcmp(argv[i], "--device"))
			device = argv[i + 1];
		else if (!strcmp(argv[i], "--cdev"))
			cdev = argv[i + 1];
		else if (!strcmp(argv[i], "--sim"))
			sim = argv[i + 1];
		else
			return fail(EXIT_USAGE, "unknown option %s", argv[i]);
	}
	*argi = i;
	if (!!sim + !!cdev + !!(group || device) != 1 || (!!group != !!device))
		return fail(EXIT_USAGE, "name one device: --group N --device NAME, --cdev PATH or --sim SPEC");
	if (sim) {
		struct devmig_sim_config cfg;

		if (parse_sim(sim, &cfg) < 0)
			return fail(EXIT_USAGE, "bad --sim spec \"%s\" (keys: mem, seed, dirty, flags)", sim);
		r = devmig_dev_open_sim(&cfg, &t->dev);
		if (r < 0)
			return fail(EXIT_DEVICE, "simulated device: %s", strerror(-r));
		t->sim = 1;
	} else {
		struct devmig_dev_desc desc;

		if (cdev) {
			r = devmig_vfio_open_cdev(cdev, "/dev/iommu", &t->h, why, sizeof(why));
		} else {
			char path[64];

			snprintf(path, sizeof(path), "/dev/vfio/%.40s", group);
			r = devmig_vfio_open_group(path, device, &t->h, why, sizeof(why));
		}
		if (r < 0)
			return fail(EXIT_DEVICE, "opening the device: %s", why);
		real_desc(t->h.device_fd, &desc);
		r = devmig_dev_open_vfio(t->h.device_fd, &desc, &t->dev);
		if (r < 0)
			return fail(EXIT_DEVICE, "not a migratable VFIO device: %s", strerror(-r));
	}
	devmig_dev_set_log(t->dev, log_line, NULL);
	return EXIT_OK;
}

static void print_flags(uint64_t f)
{
	printf("flags 0x%" PRIx64 "%s%s%s\n", f, f & DEVMIG_MIG_STOP_COPY ? " STOP_COPY" : "",
	       f & DEVMIG_MIG_P2P ? " P2P" : "", f & DEVMIG_MIG_PRE_COPY ? " PRE_COPY" : "");
}

static void print_digest(struct target *t)
{
	uint64_t dg;

	if (t->sim && devmig_sim_mem_digest(t->dev, &dg) == 0)
		printf("digest 0x%016" PRIx64 "\n", dg);
}

/* Exit code for a failed set_state: the arc table's refusal is EINVAL
 * before any ioctl, the kernel's own refusal is EINVAL too. */
static int state_fail(int r, uint32_t to)
{
	return fail(r == -EINVAL ? EXIT_REFUSED : EXIT_DEVICE, "-> %s: %s", devmig_state_name(to),
		    strerror(-r));
}

static int cmd_info(struct target *t)
{
	const struct devmig_dev_desc *d = devmig_dev_desc(t->dev);
	uint32_t st = 0;

	printf("device %04x:%04x driver %s%s\n", d->vendor_id, d->device_id, d->driver,
	       t->sim ? " (simulated)" : "");
	print_flags(devmig_dev_flags(t->dev));
	if (devmig_get_state(t->dev, &st) == 0)
		printf("state %s\n", devmig_state_name(st));
	if (t->sim)
		return EXIT_OK;
	struct devmig_vfio_device_info di;

	if (devmig_vfio_device_get_info(t->h.device_fd, &di) < 0)
		return fail(EXIT_DEVICE, "VFIO_DEVICE_GET_INFO failed");
	printf("regions %u irqs %u\n", di.num_regions, di.num_irqs);
	for (uint32_t i = 0; i < di.num_regions; i++) {
		struct devmig_region_info ri;

		if (devmig_vfio_get_region_info(t->h.device_fd, i, &ri) < 0)
			continue;
		if (ri.size) {
			printf("region %u size 0x%" PRIx64 " flags 0x%x", i, ri.size, ri.flags);
			for (uint32_t k = 0; ri.has_sparse && k < ri.nr_sparse; k++)
				printf(" mmap[0x%llx+0x%llx]", (unsigned long long)ri.sparse[k].offset,
				       (unsigned long long)ri.sparse[k].size);
			printf("\n");
		}
		devmig_region_info_free(&ri);
	}
	return EXIT_OK;
}

static int cmd_state(struct target *t, int argc, char **argv)
{
	uint32_t st = 0;
	int to, r;

	if (argc == 0) {
		r = devmig_get_state(t->dev, &st);
		if (r < 0)
			return fail(EXIT_DEVICE, "reading the state: %s", strerror(-r));
		printf("%s\n", devmig_state_name(st));
		return EXIT_OK;
	}
	to = devmig_state_from_name(argv[0]);
	if (to < 0)
		return fail(EXIT_USAGE, "unknown state \"%s\" (kernel names: RUNNING, STOP, ...)", argv[0]);
	/* A failed request goes back to where the device was. */
	r = devmig_get_state(t->dev, &st);
	if (r == 0)
		r = devmig_set_state(t->dev, (uint32_t)to, st, NULL);
	if (r < 0)
		return state_fail(r, (uint32_t)to);
	printf("%s\n", devmig_state_name(devmig_dev_state(t->dev)));
	return EXIT_OK;
}

static int cmd_save(struct target *t, int argc, char **argv)
{
	const char *to = NULL;
	int precopy = 0, fd, r;
	long n;

	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--to") && i + 1 < argc)
			to = argv[++i];
		else if (!strcmp(argv[i], "--precopy"))
			precopy = 1;
		else
			return fail(EXIT_USAGE, "save: unexpected \"%s\"", argv[i]);
	}
	if (!to)
		return fail(EXIT_USAGE, "save needs --to FILE");
	if (precopy && !(devmig_dev_flags(t->dev) & DEVMIG_MIG_PRE_COPY))
		return fail(EXIT_REFUSED, "the device does not support PRE_COPY");
	r = devmig_set_state(t->dev, precopy ? DEVMIG_STATE_PRE_COPY : DEVMIG_STATE_STOP_COPY,
			     DEVMIG_STATE_RUNNING, NULL);
	if (r < 0)
		return state_fail(r, precopy ? DEVMIG_STATE_PRE_COPY : DEVMIG_STATE_STOP_COPY);
	fd = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		devmig_set_state(t->dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
		return fail(EXIT_USAGE, "%s: %s", to, strerror(errno));
	}
	n = devmig_stream_save(t->dev, fd);
	if (n >= 0 && fsync(fd) < 0)
		n = -errno;
	close(fd);
	if (n < 0) {
		/* The device goes back to running: nothing was moved. */
		devmig_set_state(t->dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
		return fail(EXIT_DEVICE, "saving: %s", strerror((int)-n));
	}
	r = devmig_set_state(t->dev, DEVMIG_STATE_STOP, DEVMIG_STATE_ERROR, NULL);
	if (r < 0)
		return state_fail(r, DEVMIG_STATE_STOP);
	/* Stopped: the memory the stream carries, dirtied pages included. */
	print_digest(t);
	printf("saved %ld bytes to %s\n", n, to);
	return EXIT_OK;
}

static int cmd_load(struct target *t, int argc, char **argv)
{
	uint32_t st = 0;
	int fd, r;

	if (argc != 2 || strcmp(argv[0], "--from"))
		return fail(EXIT_USAGE, "load needs --from FILE");
	fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(EXIT_USAGE, "%s: %s", argv[1], strerror(errno));
	r = devmig_get_state(t->dev, &st);
	if (r == 0)
		r = devmig_set_state(t->dev, DEVMIG_STATE_RESUMING, st, NULL);
	if (r < 0) {
		close(fd);
		return state_fail(r, DEVMIG_STATE_RESUMING);
	}
	r = devmig_stream_load(t->dev, fd);
	close(fd);
	if (r < 0)
		return fail(r == -EINVAL ? EXIT_DEVICE : EXIT_STREAM,
			    "the stream was refused (%s); the device was reset", strerror(-r));
	r = devmig_set_state(t->dev, DEVMIG_STATE_RUNNING, DEVMIG_STATE_ERROR, NULL);
	if (r < 0)
		return state_fail(r, DEVMIG_STATE_RUNNING);
	print_digest(t);
	printf("loaded %s, device RUNNING\n", argv[1]);
	return EXIT_OK;
}

static int region_of(struct target *t, const char *idx, struct devmig_region_info *ri)
{
	char *end;
	unsigned long i = strtoul(idx, &end, 0);
	int r;

	if (t->sim)
		return fail(EXIT_DEVICE, "the simulated device has no regions");
	if (*end || i > 64)
		return fail(EXIT_USAGE, "bad region index \"%s\"", idx);
	r = devmig_vfio_get_region_info(t->h.device_fd, (uint32_t)i, ri);
	if (r < 0)
		return fail(EXIT_DEVICE, "region %lu: %s", i, strerror(-r));
	return EXIT_OK;
}

static int cmd_region_rw(struct target *t, int write, int argc, char **argv)
{
	struct devmig_region_info ri;
	unsigned long long off, len, span;
	uint8_t buf[4096];
	char *end;
	int rc, fifo = 0;

	if (argc == 4 && !strcmp(argv[3], "--fifo")) {
		fifo = 1;
		argc = 3;
	}
	if (argc != 3)
		return fail(EXIT_USAGE, "%s INDEX OFFSET %s", write ? "region-write" : "region-read",
			    write ? "HEXBYTES" : "LEN");
	off = strtoull(argv[1], &end, 0);
	if (*end)
		return fail(EXIT_USAGE, "bad offset \"%s\"", argv[1]);
	if (write) {
		size_t n = strlen(argv[2]);

		if (n % 2 || n / 2 > sizeof(buf) || !n)
			return fail(EXIT_USAGE, "HEXBYTES: an even number of hex digits, at most %zu bytes",
				    sizeof(buf));
		for (size_t i = 0; i < n / 2; i++) {
			unsigned int b;

			if (sscanf(argv[2] + 2 * i, "%2x", &b) != 1)
				return fail(EXIT_USAGE, "not hex: \"%s\"", argv[2]);
			buf[i] = (uint8_t)b;
		}
		len = n / 2;
	} else {
		len = strtoull(argv[2], &end, 0);
		if (*end || !len || len > sizeof(buf))
			return fail(EXIT_USAGE, "LEN: 1 to %zu", sizeof(buf));
	}
	rc = region_of(t, argv[0], &ri);
	if (rc)
		return rc;
	span = fifo ? 1 : len;
	if (off + span > ri.size || off + span < off) {
		devmig_region_info_free(&ri);
		return fail(EXIT_USAGE, "0x%llx+%llu is outside the region (size 0x%llx)", off, span,
			    (unsigned long long)ri.size);
	}
	/* One access per byte, as a guest driver touches device registers:
	 * some devices (mtty's UART) act on every access. */
	for (unsigned long long i = 0; i < len; i++) {
		off_t at = (off_t)(ri.offset + off + (fifo ? 0 : i));
		ssize_t n = write ? pwrite(t->h.device_fd, buf + i, 1, at) : pread(t->h.device_fd, buf + i, 1, at);

		if (n != 1) {
			devmig_region_info_free(&ri);
			return fail(EXIT_DEVICE, "%s at 0x%llx: %s", write ? "write" : "read", off + i,
				    n < 0 ? strerror(errno) : "short");
		}
	}
	devmig_region_info_free(&ri);
	if (!write) {
		for (unsigned long long i = 0; i < len; i++)
			printf("%02x", buf[i]);
		printf("\n");
	}
	return EXIT_OK;
}

static int cmd_dirty(struct target *t, int argc, char **argv)
{
	struct devmig_vfio_device_feature_dma_logging_range range = { 0, 0 };
	unsigned long long ps = 4096, secs = 1;
	uint64_t chosen, pages, total = 0, pos = 0, *bm;
	struct devmig_page_range runs[64];
	size_t n;
	int r;

	for (int i = 0; i + 1 < argc; i += 2) {
		char *end;
		unsigned long long v = strtoull(argv[i + 1], &end, 0);

		if (*end)
			return fail(EXIT_USAGE, "dirty: bad number \"%s\"", argv[i + 1]);
		if (!strcmp(argv[i], "--iova"))
			range.iova = v;
		else if (!strcmp(argv[i], "--length"))
			range.length = v;
		else if (!strcmp(argv[i], "--page-size"))
			ps = v;
		else if (!strcmp(argv[i], "--seconds"))
			secs = v;
		else
			return fail(EXIT_USAGE, "dirty: unexpected \"%s\"", argv[i]);
	}
	if (argc % 2 || !range.length || ps < 4096 || (ps & (ps - 1)) || range.iova % ps ||
	    range.length % ps || secs > 3600)
		return fail(EXIT_USAGE,
			    "dirty needs --iova and --length, multiples of --page-size (a power of two, "
			    ">= 4096); --seconds up to 3600");
	pages = range.length / ps;
	bm = calloc((pages + 63) / 64, 8);
	if (!bm)
		return fail(EXIT_DEVICE, "out of memory for %llu pages", (unsigned long long)pages);
	chosen = ps;
	r = devmig_dma_log_start(t->dev, &range, 1, &chosen);
	if (r < 0) {
		free(bm);
		return fail(EXIT_DEVICE, "DMA logging start: %s%s", strerror(-r),
			    r == -ENOTTY ? " (the device has no DMA logging)" : "");
	}
	sleep((unsigned int)secs);
	r = devmig_dma_log_report(t->dev, range.iova, range.length, ps, bm, (pages + 63) / 64);
	devmig_dma_log_stop(t->dev);
	if (r < 0) {
		free(bm);
		return fail(EXIT_DEVICE, "DMA logging report: %s (treat all memory as dirty)", strerror(-r));
	}
	printf("# device logs at %llu bytes; report at %llu; first page 0 is iova 0x%llx\n",
	       (unsigned long long)chosen, ps, (unsigned long long)range.iova);
	while ((n = devmig_bitmap_ranges(bm, pages, &pos, runs, 64)) > 0)
		for (size_t i = 0; i < n; i++) {
			printf("%llu %llu\n", (unsigned long long)runs[i].first, (unsigned long long)runs[i].count);
			total += runs[i].count;
		}
	printf("# %llu of %llu pages dirty\n", (unsigned long long)total, (unsigned long long)pages);
	free(bm);
	return EXIT_OK;
}

int main(int argc, char **argv)
{
	struct target t;
	const char *cmd;
	int i = 1, rc;

	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage();
		return argc < 2 ? EXIT_USAGE : EXIT_OK;
	}
	rc = open_target(argc, argv, &i, &t);
	if (rc) {
		if (rc == EXIT_USAGE)
			usage();
		return rc;
	}
	if (i >= argc) {
		usage();
		rc = EXIT_USAGE;
		goto out;
	}
	cmd = argv[i++];
	if (!strcmp(cmd, "probe")) {
		uint64_t f;

		rc = devmig_probe_flags(t.dev, &f);
		if (rc < 0)
			rc = fail(EXIT_DEVICE, "probe: %s", strerror(-rc));
		else
			print_flags(f);
	} else if (!strcmp(cmd, "info")) {
		rc = cmd_info(&t);
	} else if (!strcmp(cmd, "state")) {
		rc = cmd_state(&t, argc - i, argv + i);
	} else if (!strcmp(cmd, "save")) {
		rc = cmd_save(&t, argc - i, argv + i);
	} else if (!strcmp(cmd, "load")) {
		rc = cmd_load(&t, argc - i, argv + i);
	} else if (!strcmp(cmd, "region-read")) {
		rc = cmd_region_rw(&t, 0, argc - i, argv + i);
	} else if (!strcmp(cmd, "region-write")) {
		rc = cmd_region_rw(&t, 1, argc - i, argv + i);
	} else if (!strcmp(cmd, "dirty")) {
		rc = cmd_dirty(&t, argc - i, argv + i);
	} else {
		rc = fail(EXIT_USAGE, "unknown command \"%s\"", cmd);
		usage();
	}
out:
	devmig_dev_close(t.dev);
	devmig_vfio_handle_close(&t.h);
	return rc;
}
