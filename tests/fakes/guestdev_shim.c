/*
 * guestdev_shim.c: an LD_PRELOAD library that emulates /dev/sev-guest and /dev/tdx_guest at the libc boundary.
 *
 * The agent's real device code (os.open, fcntl.ioctl, os.close through ctypes buffers) runs unchanged in a
 * process started with LD_PRELOAD=<this library>; opens of the configured paths return a private descriptor
 * (backed by /dev/null) and ioctls on that descriptor are answered here, writing through the pointers in the
 * request structs exactly where the kernel would. Every other path, descriptor and ioctl goes to the real libc.
 *
 * The behaviour follows the mainline drivers (drivers/virt/coco/sev-guest, drivers/virt/coco/tdx-guest):
 *   - SNP: `exitinfo2` is preset to 0xff on entry and the ioctl struct is copied back whenever it is non-zero;
 *     msg_version 0 -> EINVAL (nothing copied back); NULL req/resp -> EINVAL; unknown command -> ENOTTY;
 *     certs_len not a multiple of 4096 or above the driver limit -> EINVAL; a certificate buffer that is too
 *     small -> EIO with exitinfo2 = VMM INVALID_LEN << 32 and the required length written back to certs_len,
 *     the response left untouched; any firmware/host error -> EIO (ETIMEDOUT for VMM BUSY, after the kernel's
 *     own retries) and the VMPCK is disabled, so every later request fails with ENOTTY.
 *   - TDX: TDX_CMD_GET_REPORT0 copies REPORTDATA in and a 1024-byte TDREPORT out; other commands -> ENOTTY.
 *
 * Configuration (environment, read on every call so a test process may change it between calls):
 *   CVM_SHIM_SEV_PATH / CVM_SHIM_TDX_PATH  paths to emulate (need not exist)
 *   CVM_SHIM_LOG                           append one line per open/close/ioctl on an emulated path/fd
 *   CVM_SHIM_OPEN_ERRNO                    open() of an emulated path fails with this errno
 *   CVM_SHIM_ERRNO                         emulated ioctls fail with this errno (SNP: exitinfo2 stays 0xff
 *                                          unless CVM_SHIM_FW_ERROR / CVM_SHIM_VMM_ERROR give values)
 *   CVM_SHIM_FW_ERROR / CVM_SHIM_VMM_ERROR SNP guest request fails with these exitinfo2 halves
 *   CVM_SHIM_BUSY_COUNT                    the first N emulated ioctls of the process fail busy (-1: all)
 *   CVM_SHIM_BUSY_ERRNO                    errno of a busy failure (default EBUSY); SNP also reports VMM BUSY
 *   CVM_SHIM_REPORT_STATUS                 SNP: status word of MSG_REPORT_RSP / MSG_KEY_RSP (ioctl succeeds)
 *   CVM_SHIM_VMPL_FLOOR                    SNP: the guest's VMPL; a lower requested vmpl -> INVALID_PARAM
 *   CVM_SHIM_SNP_REPORT                    SNP: 1184-byte report template (REPORT_DATA and VMPL overwritten)
 *   CVM_SHIM_SNP_CERTS                     SNP: certificate table the host supplies (default: none)
 *   CVM_SHIM_CERTS_MAX                     SNP: the driver's certificate buffer limit (default 0x4000)
 *   CVM_SHIM_TDX_REPORT                    TDX: 1024-byte TDREPORT template (REPORTDATA overwritten)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <unistd.h>

/* ---- kernel ABI mirrors (x86_64; sizes as in <linux/sev-guest.h> and <linux/tdx-guest.h>) ---------------- */

struct shim_snp_report_req {
	uint8_t user_data[64];
	uint32_t vmpl;
	uint8_t rsvd[28];
};

struct shim_snp_report_resp {
	uint8_t data[4000];
};

struct shim_snp_derived_key_req {
	uint32_t root_key_select;
	uint32_t rsvd;
	uint64_t guest_field_select;
	uint32_t vmpl;
	uint32_t guest_svn;
	uint64_t tcb_version;
};

struct shim_snp_derived_key_resp {
	uint8_t data[64];
};

struct shim_snp_guest_request_ioctl {
	uint8_t msg_version;
	uint64_t req_data;
	uint64_t resp_data;
	union {
		uint64_t exitinfo2;
		struct {
			uint32_t fw_error;
			uint32_t vmm_error;
		};
	};
};

struct shim_snp_ext_report_req {
	struct shim_snp_report_req data;
	uint64_t certs_address;
	uint32_t certs_len;
};

struct shim_tdx_report_req {
	uint8_t reportdata[64];
	uint8_t tdreport[1024];
};

_Static_assert(sizeof(struct shim_snp_report_req) == 96, "snp_report_req");
_Static_assert(sizeof(struct shim_snp_report_resp) == 4000, "snp_report_resp");
_Static_assert(sizeof(struct shim_snp_derived_key_req) == 32, "snp_derived_key_req");
_Static_assert(sizeof(struct shim_snp_derived_key_resp) == 64, "snp_derived_key_resp");
_Static_assert(sizeof(struct shim_snp_guest_request_ioctl) == 32, "snp_guest_request_ioctl");
_Static_assert(sizeof(struct shim_snp_ext_report_req) == 112, "snp_ext_report_req");
_Static_assert(sizeof(struct shim_tdx_report_req) == 1088, "tdx_report_req");

#define SHIM_SNP_GET_REPORT _IOWR('S', 0x0, struct shim_snp_guest_request_ioctl)
#define SHIM_SNP_GET_DERIVED_KEY _IOWR('S', 0x1, struct shim_snp_guest_request_ioctl)
#define SHIM_SNP_GET_EXT_REPORT _IOWR('S', 0x2, struct shim_snp_guest_request_ioctl)
#define SHIM_TDX_CMD_GET_REPORT0 _IOWR('T', 0x1, struct shim_tdx_report_req)

#define VMM_ERR_SHIFT 32
#define VMM_ERR_INVALID_LEN 1u
#define VMM_ERR_BUSY 2u
#define SEV_RET_INVALID_PARAM 0x16u
#define IOCTL_NO_FW_CALL 0xffu
#define SHIM_PAGE_SIZE 4096u
#define SNP_REPORT_SIZE 0x4a0u
#define SNP_RESP_HDR_SIZE 0x20u
#define TDX_REPORT_SIZE 1024u
#define TDX_REPORTDATA_OFFSET 128u
#define SNP_REPORT_VMPL_OFFSET 0x30u
#define SNP_REPORT_DATA_OFFSET 0x50u
#define MAX_CERTS_FILE (1u << 20)
#define MAX_TRACKED_FDS 65536

enum shim_kind { KIND_NONE = 0, KIND_SEV = 1, KIND_TDX = 2 };

/* ---- state -------------------------------------------------------------------------------------------- */

static pthread_mutex_t shim_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char fd_kind[MAX_TRACKED_FDS];
static long busy_served;
static int vmpck_disabled;

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*close_fn)(int);
typedef int (*ioctl_fn)(int, unsigned long, ...);

static void *real_symbol(const char *name)
{
	void *sym = dlsym(RTLD_NEXT, name);

	if (!sym) {
		fprintf(stderr, "guestdev_shim: cannot resolve %s: %s\n", name, dlerror());
		abort();
	}
	return sym;
}

static int real_open(const char *path, int flags, mode_t mode)
{
	static open_fn fn;

	if (!fn)
		fn = (open_fn)real_symbol("open64");
	return fn(path, flags, mode);
}

static int real_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	static openat_fn fn;

	if (!fn)
		fn = (openat_fn)real_symbol("openat64");
	return fn(dirfd, path, flags, mode);
}

static int real_close(int fd)
{
	static close_fn fn;

	if (!fn)
		fn = (close_fn)real_symbol("close");
	return fn(fd);
}

static int real_ioctl(int fd, unsigned long request, void *arg)
{
	static ioctl_fn fn;

	if (!fn)
		fn = (ioctl_fn)real_symbol("ioctl");
	return fn(fd, request, arg);
}

/* ---- helpers ------------------------------------------------------------------------------------------ */

static long env_long(const char *name, long fallback)
{
	const char *value = getenv(name);
	char *end;
	long parsed;

	if (!value || !*value)
		return fallback;
	errno = 0;
	parsed = strtol(value, &end, 0);
	if (errno || *end) {
		fprintf(stderr, "guestdev_shim: %s=%s is not an integer\n", name, value);
		return fallback;
	}
	return parsed;
}

static const char *kind_name(int kind)
{
	return kind == KIND_SEV ? "sev" : "tdx";
}

static void log_event(const char *fmt, ...)
{
	const char *path = getenv("CVM_SHIM_LOG");
	char line[256];
	va_list ap;
	int len, fd, saved = errno;

	if (!path || !*path)
		return;
	va_start(ap, fmt);
	len = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	if ((size_t)len > sizeof(line) - 2)
		len = (int)sizeof(line) - 2;
	line[len++] = '\n';
	fd = real_open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (fd >= 0) {
		if (write(fd, line, (size_t)len) != len)
			fprintf(stderr, "guestdev_shim: short write to %s\n", path);
		real_close(fd);
	}
	errno = saved;
}

/* Reads exactly `size` bytes (or, with `size_out`, up to `size` bytes) of the file named by env `name`.
 * Returns 1 when loaded, 0 when the variable is unset, -1 on error (reported on stderr). */
static int load_file(const char *name, uint8_t *buf, size_t size, size_t *size_out)
{
	const char *path = getenv(name);
	size_t got = 0;
	ssize_t n;
	int fd;

	if (!path || !*path)
		return 0;
	fd = real_open(path, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0) {
		fprintf(stderr, "guestdev_shim: cannot open %s=%s: %s\n", name, path, strerror(errno));
		return -1;
	}
	while (got < size && (n = read(fd, buf + got, size - got)) > 0)
		got += (size_t)n;
	real_close(fd);
	if (size_out) {
		*size_out = got;
		return 1;
	}
	if (got != size) {
		fprintf(stderr, "guestdev_shim: %s=%s has %zu bytes, expected %zu\n", name, path, got, size);
		return -1;
	}
	return 1;
}

static void put_u32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, sizeof(v));
}

static void put_u64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, sizeof(v));
}

static void fill_pattern(uint8_t *p, size_t len, uint8_t seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(seed + i * 7u);
}

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* Takes one "busy" failure from the budget, if any is left. Called with shim_lock held. */
static int take_busy(void)
{
	long budget = env_long("CVM_SHIM_BUSY_COUNT", 0);

	if (budget < 0 || busy_served < budget) {
		busy_served++;
		return 1;
	}
	return 0;
}

/* ---- SEV-SNP ------------------------------------------------------------------------------------------ */

static void default_snp_report(uint8_t *r)
{
	memset(r, 0, SNP_REPORT_SIZE);
	put_u32(r + 0x000, 2);                     /* VERSION */
	put_u64(r + 0x008, 0x30000);               /* POLICY: SMT allowed, reserved bit 17 set */
	put_u32(r + 0x034, 1);                     /* SIGNATURE_ALGO: ECDSA P-384 with SHA-384 */
	put_u64(r + 0x038, 0x0300000000000873ull); /* CURRENT_TCB */
	put_u64(r + 0x040, 0x1);                   /* PLATFORM_INFO: SMT enabled */
	fill_pattern(r + 0x090, 48, 0x11);         /* MEASUREMENT */
	fill_pattern(r + 0x140, 32, 0x22);         /* REPORT_ID */
	put_u64(r + 0x180, 0x0300000000000873ull); /* REPORTED_TCB */
	fill_pattern(r + 0x1a0, 64, 0x33);         /* CHIP_ID */
	put_u64(r + 0x1e0, 0x0300000000000873ull); /* COMMITTED_TCB */
	put_u64(r + 0x1f0, 0x0300000000000873ull); /* LAUNCH_TCB */
	/* SIGNATURE left zero: this report is not signed */
}

/* The firmware's answer to a request at `vmpl`: 0 or SEV_RET_INVALID_PARAM for a VMPL the guest may not use. */
static uint32_t snp_firmware_status(uint32_t vmpl)
{
	long floor = env_long("CVM_SHIM_VMPL_FLOOR", 0);

	if (vmpl > 3 || (long)vmpl < floor)
		return SEV_RET_INVALID_PARAM;
	return (uint32_t)env_long("CVM_SHIM_REPORT_STATUS", 0);
}

/* The hypervisor/firmware round trip. `npages` is NULL for plain guest requests; for extended requests it holds
 * the pages offered and receives the pages the host needs. Returns 0 or -errno like the kernel. */
static int snp_send_guest_request(struct shim_snp_guest_request_ioctl *io, uint32_t *npages, uint32_t needed)
{
	long forced = env_long("CVM_SHIM_ERRNO", 0);
	uint32_t fw = (uint32_t)env_long("CVM_SHIM_FW_ERROR", 0);
	uint32_t vmm = (uint32_t)env_long("CVM_SHIM_VMM_ERROR", 0);

	if (vmpck_disabled)
		return -ENOTTY; /* "VMPCK is disabled": exitinfo2 stays 0xff */
	if (forced) {
		if (fw || vmm)
			io->exitinfo2 = ((uint64_t)vmm << VMM_ERR_SHIFT) | fw;
		return (int)-forced;
	}
	if (take_busy()) {
		io->exitinfo2 = (uint64_t)VMM_ERR_BUSY << VMM_ERR_SHIFT;
		return (int)-env_long("CVM_SHIM_BUSY_ERRNO", EBUSY);
	}
	if (fw || vmm) {
		io->exitinfo2 = ((uint64_t)vmm << VMM_ERR_SHIFT) | fw;
		vmpck_disabled = 1;
		return vmm == VMM_ERR_BUSY ? -ETIMEDOUT : -EIO;
	}
	if (npages && *npages && needed > *npages) {
		*npages = needed;
		io->exitinfo2 = (uint64_t)VMM_ERR_INVALID_LEN << VMM_ERR_SHIFT;
		return -EIO;
	}
	io->exitinfo2 = 0;
	return 0;
}

static int snp_build_report_resp(const struct shim_snp_report_req *req, struct shim_snp_report_resp *resp)
{
	uint32_t status = snp_firmware_status(req->vmpl);
	uint8_t *report = resp->data + SNP_RESP_HDR_SIZE;

	memset(resp, 0, sizeof(*resp));
	put_u32(resp->data, status);
	if (status)
		return 0;
	put_u32(resp->data + 4, SNP_REPORT_SIZE);
	switch (load_file("CVM_SHIM_SNP_REPORT", report, SNP_REPORT_SIZE, NULL)) {
	case 0:
		default_snp_report(report);
		break;
	case 1:
		break;
	default:
		return -EIO;
	}
	memcpy(report + SNP_REPORT_DATA_OFFSET, req->user_data, sizeof(req->user_data));
	put_u32(report + SNP_REPORT_VMPL_OFFSET, req->vmpl);
	return 0;
}

static int snp_get_report(struct shim_snp_guest_request_ioctl *io)
{
	struct shim_snp_report_req req;
	struct shim_snp_report_resp resp;
	int rc;

	if (!io->req_data || !io->resp_data)
		return -EINVAL;
	memcpy(&req, (void *)(uintptr_t)io->req_data, sizeof(req));
	rc = snp_send_guest_request(io, NULL, 0);
	if (rc)
		return rc;
	rc = snp_build_report_resp(&req, &resp);
	if (rc)
		return rc;
	memcpy((void *)(uintptr_t)io->resp_data, &resp, sizeof(resp));
	return 0;
}

static int snp_get_derived_key(struct shim_snp_guest_request_ioctl *io)
{
	struct shim_snp_derived_key_req req;
	struct shim_snp_derived_key_resp resp;
	uint32_t status;
	uint64_t state;
	int rc;

	if (!io->req_data || !io->resp_data)
		return -EINVAL;
	memcpy(&req, (void *)(uintptr_t)io->req_data, sizeof(req));
	rc = snp_send_guest_request(io, NULL, 0);
	if (rc)
		return rc;
	memset(&resp, 0, sizeof(resp));
	status = snp_firmware_status(req.vmpl);
	if (!status && (req.root_key_select > 1 || req.rsvd))
		status = SEV_RET_INVALID_PARAM;
	put_u32(resp.data, status);
	if (!status) {
		/* A deterministic function of every request field, so tests can tell inputs apart. */
		state = 0xcbf29ce484222325ull;
		for (size_t i = 0; i < sizeof(req); i++)
			state = (state ^ ((const uint8_t *)&req)[i]) * 0x100000001b3ull;
		for (size_t i = 0; i < 4; i++) {
			state = mix64(state);
			put_u64(resp.data + 0x20 + 8 * i, state);
		}
	}
	memcpy((void *)(uintptr_t)io->resp_data, &resp, sizeof(resp));
	return 0;
}

static int snp_get_ext_report(struct shim_snp_guest_request_ioctl *io)
{
	static uint8_t certs[MAX_CERTS_FILE];
	struct shim_snp_ext_report_req req;
	struct shim_snp_report_resp resp;
	long limit = env_long("CVM_SHIM_CERTS_MAX", 0x4000);
	size_t certs_size = 0;
	uint32_t npages = 0, needed = 0;
	int rc, want_certs;

	if (!io->req_data || !io->resp_data)
		return -EINVAL;
	memcpy(&req, (void *)(uintptr_t)io->req_data, sizeof(req));
	want_certs = req.certs_len && req.certs_address;
	if (want_certs) {
		if ((long)req.certs_len > limit || req.certs_len % SHIM_PAGE_SIZE)
			return -EINVAL;
		npages = req.certs_len / SHIM_PAGE_SIZE;
		if (load_file("CVM_SHIM_SNP_CERTS", certs, sizeof(certs), &certs_size) < 0)
			return -EIO;
		needed = (uint32_t)((certs_size + SHIM_PAGE_SIZE - 1) / SHIM_PAGE_SIZE);
	}
	rc = snp_send_guest_request(io, &npages, needed);
	if (io->vmm_error == VMM_ERR_INVALID_LEN) {
		req.certs_len = npages * SHIM_PAGE_SIZE;
		memcpy((void *)(uintptr_t)io->req_data, &req, sizeof(req));
	}
	if (rc)
		return rc;
	rc = snp_build_report_resp(&req.data, &resp);
	if (rc)
		return rc;
	if (want_certs) {
		uint8_t *dst = (uint8_t *)(uintptr_t)req.certs_address;

		memset(dst, 0, req.certs_len);
		memcpy(dst, certs, certs_size);
	}
	memcpy((void *)(uintptr_t)io->resp_data, &resp, sizeof(resp));
	return 0;
}

static int sev_ioctl(unsigned long request, void *argp)
{
	struct shim_snp_guest_request_ioctl input;
	int rc;

	if (!argp)
		return -EFAULT;
	memcpy(&input, argp, sizeof(input));
	input.exitinfo2 = IOCTL_NO_FW_CALL;
	if (!input.msg_version)
		return -EINVAL;
	switch (request) {
	case SHIM_SNP_GET_REPORT:
		rc = snp_get_report(&input);
		break;
	case SHIM_SNP_GET_DERIVED_KEY:
		rc = snp_get_derived_key(&input);
		break;
	case SHIM_SNP_GET_EXT_REPORT:
		rc = snp_get_ext_report(&input);
		break;
	default:
		rc = -ENOTTY;
		break;
	}
	if (input.exitinfo2)
		memcpy(argp, &input, sizeof(input));
	return rc;
}

/* ---- TDX ---------------------------------------------------------------------------------------------- */

static void default_td_report(uint8_t *r)
{
	memset(r, 0, TDX_REPORT_SIZE);
	r[0] = 0x81;                    /* REPORTTYPE: TDX, subtype 0, version 0 (TDX 1.0) */
	fill_pattern(r + 16, 16, 0x01); /* CPUSVN */
	fill_pattern(r + 32, 48, 0x02); /* TEE_TCB_INFO_HASH (not a real hash) */
	fill_pattern(r + 80, 48, 0x03); /* TEE_INFO_HASH (not a real hash) */
	fill_pattern(r + 224, 32, 0x04); /* MAC (not a real MAC) */
	put_u64(r + 256, 0x1ff);         /* TEE_TCB_INFO.VALID */
	fill_pattern(r + 280, 48, 0x05); /* MRSEAM */
	put_u64(r + 512, 0x10000000);    /* TD ATTRIBUTES: SEPT_VE_DISABLE */
	put_u64(r + 520, 0xe7);          /* XFAM */
	fill_pattern(r + 528, 48, 0x06); /* MRTD */
	fill_pattern(r + 720, 48, 0x07); /* RTMR0 */
	fill_pattern(r + 768, 48, 0x08); /* RTMR1 */
	fill_pattern(r + 816, 48, 0x09); /* RTMR2 */
}

static int tdx_ioctl(unsigned long request, void *argp)
{
	struct shim_tdx_report_req *req = argp;
	uint8_t report[TDX_REPORT_SIZE];
	long forced = env_long("CVM_SHIM_ERRNO", 0);

	if (request != SHIM_TDX_CMD_GET_REPORT0)
		return -ENOTTY;
	if (!req)
		return -EFAULT;
	if (forced)
		return (int)-forced;
	if (take_busy())
		return (int)-env_long("CVM_SHIM_BUSY_ERRNO", EBUSY);
	switch (load_file("CVM_SHIM_TDX_REPORT", report, sizeof(report), NULL)) {
	case 0:
		default_td_report(report);
		break;
	case 1:
		break;
	default:
		return -EIO;
	}
	memcpy(report + TDX_REPORTDATA_OFFSET, req->reportdata, sizeof(req->reportdata));
	memcpy(req->tdreport, report, sizeof(report));
	return 0;
}

/* ---- interposed libc entry points --------------------------------------------------------------------- */

static int classify(const char *path)
{
	const char *sev = getenv("CVM_SHIM_SEV_PATH");
	const char *tdx = getenv("CVM_SHIM_TDX_PATH");

	if (!path)
		return KIND_NONE;
	if (sev && *sev && strcmp(path, sev) == 0)
		return KIND_SEV;
	if (tdx && *tdx && strcmp(path, tdx) == 0)
		return KIND_TDX;
	return KIND_NONE;
}

static int needs_mode(int flags)
{
#ifdef O_TMPFILE
	if ((flags & O_TMPFILE) == O_TMPFILE)
		return 1;
#endif
	return (flags & O_CREAT) != 0;
}

static int emulated_open(int kind, int flags)
{
	long fail = env_long("CVM_SHIM_OPEN_ERRNO", 0);
	int fd;

	if (fail) {
		log_event("open %s -1 %ld", kind_name(kind), fail);
		errno = (int)fail;
		return -1;
	}
	fd = real_open("/dev/null", O_RDWR | (flags & O_CLOEXEC), 0);
	if (fd >= MAX_TRACKED_FDS) {
		real_close(fd);
		errno = EMFILE;
		fd = -1;
	}
	if (fd < 0) {
		log_event("open %s -1 %d", kind_name(kind), errno);
		return -1;
	}
	pthread_mutex_lock(&shim_lock);
	fd_kind[fd] = (unsigned char)kind;
	pthread_mutex_unlock(&shim_lock);
	log_event("open %s %d 0", kind_name(kind), fd);
	return fd;
}

static int shim_open(const char *path, int flags, mode_t mode)
{
	int kind = classify(path);

	return kind ? emulated_open(kind, flags) : real_open(path, flags, mode);
}

static int shim_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	int kind = classify(path);

	return kind ? emulated_open(kind, flags) : real_openat(dirfd, path, flags, mode);
}

#define TAKE_MODE(last, flags, mode)                 \
	do {                                          \
		if (needs_mode(flags)) {              \
			va_list ap;                   \
			va_start(ap, last);           \
			(mode) = (mode_t)va_arg(ap, int); \
			va_end(ap);                   \
		}                                     \
	} while (0)

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;

	TAKE_MODE(flags, flags, mode);
	return shim_open(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;

	TAKE_MODE(flags, flags, mode);
	return shim_open(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	TAKE_MODE(flags, flags, mode);
	return shim_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	TAKE_MODE(flags, flags, mode);
	return shim_openat(dirfd, path, flags, mode);
}

/* _FORTIFY_SOURCE entry points used by hardened callers. */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);

int __open_2(const char *path, int flags)
{
	return shim_open(path, flags, 0);
}

int __open64_2(const char *path, int flags)
{
	return shim_open(path, flags, 0);
}

int __openat_2(int dirfd, const char *path, int flags)
{
	return shim_openat(dirfd, path, flags, 0);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
	return shim_openat(dirfd, path, flags, 0);
}

int close(int fd)
{
	int kind = KIND_NONE;

	if (fd >= 0 && fd < MAX_TRACKED_FDS) {
		pthread_mutex_lock(&shim_lock);
		kind = fd_kind[fd];
		fd_kind[fd] = KIND_NONE;
		pthread_mutex_unlock(&shim_lock);
	}
	if (kind)
		log_event("close %s %d", kind_name(kind), fd);
	return real_close(fd);
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;
	int kind = KIND_NONE, rc;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);

	if (fd >= 0 && fd < MAX_TRACKED_FDS) {
		pthread_mutex_lock(&shim_lock);
		kind = fd_kind[fd];
		pthread_mutex_unlock(&shim_lock);
	}
	if (!kind)
		return real_ioctl(fd, request, arg);

	/* One request at a time, like the drivers' command mutexes. */
	pthread_mutex_lock(&shim_lock);
	rc = kind == KIND_SEV ? sev_ioctl(request, arg) : tdx_ioctl(request, arg);
	pthread_mutex_unlock(&shim_lock);
	log_event("ioctl %s %d 0x%lx %d", kind_name(kind), fd, request, -rc);
	if (rc) {
		errno = -rc;
		return -1;
	}
	return 0;
}
