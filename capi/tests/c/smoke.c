/*
 * smoke.c: the C ABI from C, on any machine (tests/c_abi.rs compiles, links and runs it).
 *
 *     smoke EXPECTED_DEVICE_STATUS VERSION
 *
 * EXPECTED_DEVICE_STATUS is the status a valid problem must get once the library looks for the
 * device of the NULL stream: a number (3 = GROUPNORM_STATUS_NO_DRIVER on a machine without
 * libcuda), or "device" for any of the statuses that say the device cannot be used (on a
 * machine with a driver this program has no current CUDA context, so the NULL stream names no
 * device). No data pointer is ever valid here; the library must not touch them before it has
 * a device, and it never gets one.
 *
 * Checks: the version string, the status strings, the thread's last error message, every
 * invalid problem refused with GROUPNORM_STATUS_INVALID_ARGUMENT and a message naming the
 * problem by all four status-returning functions before any driver call, and a valid problem
 * refused with the device status and a message, not a crash. Prints one line per check, then
 * "smoke: N checks, F failures"; exits 0 only when F is 0.
 */
#include "groupnorm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0;
static int failures = 0;

static void check(int ok, const char *what, const char *detail)
{
    checks++;
    if (!ok) {
        failures++;
    }
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail ? ": " : "", detail ? detail : "");
}

/* -1: any status saying the device cannot be used */
static int device_status_ok(groupnorm_status_t got, int want)
{
    if (want >= 0) {
        return (int)got == want;
    }
    return got == GROUPNORM_STATUS_NO_DRIVER || got == GROUPNORM_STATUS_NO_DEVICE
           || got == GROUPNORM_STATUS_KERNELS_NOT_BUILT || got == GROUPNORM_STATUS_CUDA_ERROR
           || got == GROUPNORM_STATUS_UNSUPPORTED;
}

/* got must be want (or, for want < 0, a device status), with a last error message that is
 * non-empty and contains needle (when given) */
static void expect(const char *what, groupnorm_status_t got, int want, int device,
                   const char *needle)
{
    char detail[1024];
    const char *msg = groupnorm_last_error();
    int ok = msg != NULL && msg[0] != '\0'
             && (device ? device_status_ok(got, want) : (int)got == want)
             && (needle == NULL || strstr(msg, needle) != NULL);
    snprintf(detail, sizeof detail, "status %d (%s), last error \"%s\"%s%s", (int)got,
             groupnorm_status_string(got), msg ? msg : "(NULL)",
             needle ? ", expected to contain " : "", needle ? needle : "");
    check(ok, what, detail);
}

static groupnorm_problem_t valid_problem(const int64_t *dims)
{
    groupnorm_problem_t p;
    memset(&p, 0, sizeof p);
    p.dims = dims;
    p.ndims = 4;
    p.groups = 4;
    p.eps = 1e-5;
    p.layout = GROUPNORM_LAYOUT_NCHW;
    p.dtype = GROUPNORM_DTYPE_F32;
    p.param_dtype = GROUPNORM_DTYPE_F32;
    p.path = GROUPNORM_PATH_AUTO;
    p.activation = GROUPNORM_ACTIVATION_NONE;
    return p;
}

/* Calls function `which` (0 forward workspace, 1 backward workspace, 2 forward, 3 backward)
 * with NULL data pointers and the NULL stream. */
static groupnorm_status_t call(int which, const groupnorm_problem_t *p, size_t *bytes)
{
    switch (which) {
    case 0:
        return groupnorm_forward_workspace_size(p, NULL, bytes);
    case 1:
        return groupnorm_backward_workspace_size(p, NULL, bytes);
    case 2:
        return groupnorm_forward(p, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL);
    default:
        return groupnorm_backward(p, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0,
                                  NULL);
    }
}

static const char *const function_names[4] = {
    "groupnorm_forward_workspace_size",
    "groupnorm_backward_workspace_size",
    "groupnorm_forward",
    "groupnorm_backward",
};

int main(int argc, char **argv)
{
    static const int64_t dims[4] = {2, 8, 4, 4};
    static const int64_t negative_spatial[4] = {2, 8, -4, 4};
    static const int64_t negative_batch[4] = {-1, 8, 4, 4};
    static const int64_t zero_channels[4] = {2, 0, 4, 4};
    char what[256];
    int want_device;
    int i, which;

    if (argc != 3) {
        fprintf(stderr, "usage: %s EXPECTED_DEVICE_STATUS|device VERSION\n", argv[0]);
        return 2;
    }
    want_device = strcmp(argv[1], "device") == 0 ? -1 : atoi(argv[1]);

    /* before any call, the last error is "" (and never NULL) */
    check(groupnorm_last_error() != NULL && groupnorm_last_error()[0] == '\0',
          "last error is empty before any call", groupnorm_last_error());

    /* version */
    check(groupnorm_version() != NULL && strcmp(groupnorm_version(), argv[2]) == 0,
          "groupnorm_version", groupnorm_version());

    /* status strings: non-empty and distinct for every status; unknown values still answer */
    for (i = GROUPNORM_STATUS_OK; i <= GROUPNORM_STATUS_INTERNAL; i++) {
        const char *s = groupnorm_status_string((groupnorm_status_t)i);
        int j, distinct = 1;
        for (j = GROUPNORM_STATUS_OK; j < i; j++) {
            distinct = distinct && strcmp(s, groupnorm_status_string((groupnorm_status_t)j)) != 0;
        }
        snprintf(what, sizeof what, "groupnorm_status_string(%d)", i);
        check(s != NULL && s[0] != '\0' && distinct, what, s);
    }
    check(strcmp(groupnorm_status_string((groupnorm_status_t)99), "unknown status") == 0,
          "groupnorm_status_string(99)", groupnorm_status_string((groupnorm_status_t)99));
    check(strcmp(groupnorm_status_string(GROUPNORM_STATUS_INVALID_ARGUMENT),
                 "invalid argument") == 0,
          "groupnorm_status_string(INVALID_ARGUMENT)",
          groupnorm_status_string(GROUPNORM_STATUS_INVALID_ARGUMENT));

    /* invalid problems, refused by all four functions with a message naming the fault */
    for (which = 0; which < 4; which++) {
        struct bad {
            const char *name;
            groupnorm_problem_t p;
            int null_problem;
            const char *needle;
        } bad[24];
        int n = 0;
        size_t bytes;

#define BAD(NAME, NEEDLE, STMT)                                                                  \
    do {                                                                                         \
        groupnorm_problem_t p = valid_problem(dims);                                             \
        STMT;                                                                                    \
        bad[n].name = NAME;                                                                      \
        bad[n].p = p;                                                                            \
        bad[n].null_problem = 0;                                                                 \
        bad[n].needle = NEEDLE;                                                                  \
        n++;                                                                                     \
    } while (0)

        BAD("NULL problem", "problem is NULL", (void)0);
        bad[n - 1].null_problem = 1;
        BAD("ndims = 1", "ndims is 1", p.ndims = 1);
        BAD("ndims = 0, dims NULL", "ndims is 0", (p.ndims = 0, p.dims = NULL));
        BAD("ndims = -3", "ndims is -3", p.ndims = -3);
        BAD("dims NULL", "dims is NULL", p.dims = NULL);
        BAD("negative spatial dim", "dims[2] is -4", p.dims = negative_spatial);
        BAD("negative batch", "dims[0] is -1", p.dims = negative_batch);
        BAD("groups not dividing channels", "divisible by groups (3)", p.groups = 3);
        BAD("groups = 0", "groups must be at least 1", p.groups = 0);
        BAD("groups = -2", "groups is -2", p.groups = -2);
        BAD("channels = 0", "channels must be at least 1", p.dims = zero_channels);
        BAD("eps = -1", "eps must be finite and positive in f32", p.eps = -1.0);
        BAD("eps = NaN", "eps must be finite and positive in f32", p.eps = NAN);
        BAD("dtype = 7", "dtype is 7", p.dtype = (groupnorm_dtype_t)7);
        BAD("eps = 1e-50 (0 in f32)", "eps must be finite and positive in f32", p.eps = 1e-50);
        BAD("param_dtype = -1", "param_dtype is -1", p.param_dtype = (groupnorm_dtype_t)-1);
        BAD("f16 parameters for bf16 activations", "parameters must be f32 or bf16",
            (p.dtype = GROUPNORM_DTYPE_BF16, p.param_dtype = GROUPNORM_DTYPE_F16));
        BAD("layout = 2", "layout is 2", p.layout = (groupnorm_layout_t)2);
        BAD("path = 9", "path is 9", p.path = (groupnorm_path_t)9);
#undef BAD

        for (i = 0; i < n; i++) {
            groupnorm_status_t s;
            bytes = 12345;
            s = call(which, bad[i].null_problem ? NULL : &bad[i].p, &bytes);
            snprintf(what, sizeof what, "%s: %s", function_names[which], bad[i].name);
            expect(what, s, GROUPNORM_STATUS_INVALID_ARGUMENT, 0, bad[i].needle);
            if (which < 2) {
                snprintf(what, sizeof what, "%s: %s leaves *bytes = 0", function_names[which],
                         bad[i].name);
                check(bytes == 0, what, NULL);
            }
        }
        if (which < 2) {
            groupnorm_problem_t p = valid_problem(dims);
            snprintf(what, sizeof what, "%s: bytes NULL", function_names[which]);
            expect(what, call(which, &p, NULL), GROUPNORM_STATUS_INVALID_ARGUMENT, 0,
                   "bytes is NULL");
        }
    }

    /* the message stays until the next status-returning call; string functions leave it */
    {
        groupnorm_problem_t p = valid_problem(dims);
        p.groups = 3;
        call(2, &p, NULL);
        (void)groupnorm_version();
        (void)groupnorm_status_string(GROUPNORM_STATUS_OK);
        check(strstr(groupnorm_last_error(), "groupnorm_forward: ") == groupnorm_last_error(),
              "last error names the function and survives the string functions",
              groupnorm_last_error());
    }

    /* valid problems get as far as the device, and fail there with a status, not a crash */
    for (which = 0; which < 4; which++) {
        int variant;
        for (variant = 0; variant < 3; variant++) {
            static const int64_t sd[4] = {2, 320, 64, 64};
            static const int64_t two_d[2] = {16, 256};
            groupnorm_problem_t p = valid_problem(dims);
            size_t bytes = 12345;
            const char *name = "f32 (2, 8, 4, 4)";
            groupnorm_status_t s;
            if (variant == 1) {
                p.dims = sd;
                p.groups = 32;
                p.dtype = GROUPNORM_DTYPE_F16;
                name = "f16/f32 (2, 320, 64, 64), G = 32";
            } else if (variant == 2) {
                p.dims = two_d;
                p.ndims = 2;
                p.groups = 8;
                p.dtype = GROUPNORM_DTYPE_BF16;
                p.param_dtype = GROUPNORM_DTYPE_BF16;
                p.layout = GROUPNORM_LAYOUT_NHWC;
                p.path = GROUPNORM_PATH_SPLIT;
                name = "bf16 NHWC split (16, 256), G = 8";
            }
            s = call(which, &p, &bytes);
            snprintf(what, sizeof what, "%s: valid %s", function_names[which], name);
            expect(what, s, want_device, 1, NULL);
            if (which < 2) {
                snprintf(what, sizeof what, "%s: valid %s leaves *bytes = 0",
                         function_names[which], name);
                check(bytes == 0, what, NULL);
            }
        }
    }

    printf("smoke: %d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
