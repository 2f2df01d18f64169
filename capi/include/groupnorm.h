/*
 * groupnorm.h: the C ABI of the groupnorm crate (src/capi.rs).
 *
 * Group Normalization on NVIDIA GPUs, forward and backward, with the semantics of PyTorch's
 * torch.nn.functional.group_norm. Link against libgroupnorm.so (or libgroupnorm.a).
 *
 * Conventions:
 * - Functions that can fail return a groupnorm_status_t and set the calling thread's last
 *   error message (groupnorm_last_error): what went wrong, or "" on success.
 * - Tensor pointers are CUDA device pointers (CUdeviceptr values) in the primary context of the
 *   stream's device, the context PyTorch and the CUDA runtime API use. NULL weight, bias,
 *   dweight, dbias mean absent.
 * - `stream` is a CUstream / cudaStream_t, or NULL for the legacy default stream of the
 *   calling thread's current context. The device is found from it.
 * - Dims are the logical (N, C, *spatial) whatever the layout; S is the product of the spatial
 *   dims (1 when there are none), G the number of groups.
 * - Statistics are f32 `mean` and `rstd` = 1 / sqrt(var + eps) (biased variance), shape (N, G),
 *   row-major, as PyTorch's native_group_norm saves them.
 * - Nothing allocates device memory or synchronizes: work is enqueued on `stream` with the
 *   caller's workspace (sized by the *_workspace_size queries), so calls can be captured in a
 *   CUDA graph. Functions are thread-safe.
 * - Arguments are validated before the CUDA driver is touched, so a bad problem gets
 *   GROUPNORM_STATUS_INVALID_ARGUMENT on any machine, with or without a GPU.
 *
 * This header is written by hand; tests/c_abi.rs checks it against the library (every enum
 * value, struct field, offset and prototype), so the two cannot drift apart.
 */
#ifndef GROUPNORM_H
#define GROUPNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What a call returned. */
typedef enum groupnorm_status_t {
    GROUPNORM_STATUS_OK = 0,
    /* NULL where a pointer is required, a negative or inconsistent dim, groups not dividing
     * channels, an unknown enum value, a bad eps, a parameter dtype that is neither f32 nor
     * the activation dtype, too small a workspace */
    GROUPNORM_STATUS_INVALID_ARGUMENT = 1,
    /* valid, but not supported by this build or device (yet): e.g. a forced fused path, a stream
     * of a non-primary context, a device the kernels were not built for */
    GROUPNORM_STATUS_UNSUPPORTED = 2,
    /* the CUDA driver library (libcuda) could not be loaded */
    GROUPNORM_STATUS_NO_DRIVER = 3,
    /* the driver loaded but found no usable device */
    GROUPNORM_STATUS_NO_DEVICE = 4,
    /* the library was built without nvcc: it carries no GPU kernels */
    GROUPNORM_STATUS_KERNELS_NOT_BUILT = 5,
    /* the device ran out of memory */
    GROUPNORM_STATUS_OUT_OF_MEMORY = 6,
    /* any other CUDA driver error (invalid stream or context, failed launch) */
    GROUPNORM_STATUS_CUDA_ERROR = 7,
    /* a bug in the library (a caught panic); the message says where */
    GROUPNORM_STATUS_INTERNAL = 8
} groupnorm_status_t;

/* Element type of activations (dtype) or parameters (param_dtype). */
typedef enum groupnorm_dtype_t {
    GROUPNORM_DTYPE_F32 = 0,
    GROUPNORM_DTYPE_F16 = 1,
    GROUPNORM_DTYPE_BF16 = 2
} groupnorm_dtype_t;

/* Memory order of activations whose logical dims are (N, C, *spatial). */
typedef enum groupnorm_layout_t {
    /* contiguous (N, C, *spatial), PyTorch's default */
    GROUPNORM_LAYOUT_NCHW = 0,
    /* channels-last, contiguous (N, *spatial, C) */
    GROUPNORM_LAYOUT_NHWC = 1
} groupnorm_layout_t;

/* Which kernel path to take: AUTO unless comparing paths. */
typedef enum groupnorm_path_t {
    GROUPNORM_PATH_AUTO = 0,
    /* one block per group row, the row on chip; an error where a row does not fit */
    GROUPNORM_PATH_FUSED = 1,
    /* rows split across blocks, partials merged in a fixed order */
    GROUPNORM_PATH_SPLIT = 2,
    /* rows split across the blocks of a thread-block cluster, chunks on chip (compute
     * capability 9.0+, NCHW); an error where that is not possible */
    GROUPNORM_PATH_CLUSTER = 3
} groupnorm_path_t;

/* The activation fused after the affine transform. */
typedef enum groupnorm_activation_t {
    /* none: y = xhat * weight + bias */
    GROUPNORM_ACTIVATION_NONE = 0,
    /* y = silu(xhat * weight + bias), silu(z) = z / (1 + exp(-z)); its backward is
     * groupnorm_backward_activated (it needs the bias) */
    GROUPNORM_ACTIVATION_SILU = 1
} groupnorm_activation_t;

/* The enums above cross the ABI as 32-bit integers, inside groupnorm_problem_t too: refuse to
 * compile where an enum is not 4 bytes (e.g. under -fshort-enums). */
typedef char groupnorm_static_assert_enum_size[(sizeof(groupnorm_dtype_t) == 4) ? 1 : -1];

/* One GroupNorm problem: everything but the pointers. */
typedef struct groupnorm_problem_t {
    /* ndims values: N, C, then any number of spatial dims (none included), all >= 0;
       ndims is 2 to 64 (more is GROUPNORM_STATUS_INVALID_ARGUMENT, refused before dims is read) */
    const int64_t *dims;
    /* number of dims, >= 2 */
    int32_t ndims;
    /* number of groups G, >= 1, dividing C */
    int64_t groups;
    /* added to the variance before the square root: finite, >= 0 (PyTorch's default 1e-5) */
    double eps;
    groupnorm_layout_t layout;
    /* activations: x, y, dy, dx */
    groupnorm_dtype_t dtype;
    /* parameters: weight, bias, dweight, dbias; GROUPNORM_DTYPE_F32 or dtype */
    groupnorm_dtype_t param_dtype;
    groupnorm_path_t path;
    /* GROUPNORM_ACTIVATION_NONE (0) for plain GroupNorm */
    groupnorm_activation_t activation;
} groupnorm_problem_t;

/* The library's version ("0.1.0"): a static string. */
const char *groupnorm_version(void);

/* A short static description of a status ("invalid argument"); never NULL. */
const char *groupnorm_status_string(groupnorm_status_t status);

/* The message of the last status-returning call on the calling thread: what went wrong, with
 * the values involved, or "" after a success. Never NULL; valid until the next status-returning
 * call on this thread (copy it to keep it). */
const char *groupnorm_last_error(void);

/* Writes to *bytes the workspace groupnorm_forward needs for *problem on the device of
 * `stream` (0 for most shapes); *bytes is 0 when the call fails. */
groupnorm_status_t groupnorm_forward_workspace_size(const groupnorm_problem_t *problem,
                                                    void *stream, size_t *bytes);

/* Writes to *bytes the workspace groupnorm_backward needs for *problem on the device of
 * `stream`; *bytes is 0 when the call fails. */
groupnorm_status_t groupnorm_backward_workspace_size(const groupnorm_problem_t *problem,
                                                     void *stream, size_t *bytes);

/* Enqueues a forward pass on `stream`:
 *     y = act((x - mean[n,g]) * rstd[n,g] * weight[c] + bias[c])   (act: problem->activation)
 * x, y: N*C*S elements of problem->dtype in problem->layout; weight, bias: C elements of
 * problem->param_dtype, or NULL (weight 1, bias 0); mean, rstd: N*G floats, written (required);
 * workspace: workspace_bytes bytes, at least what groupnorm_forward_workspace_size says, 4-byte
 * aligned (NULL when that is 0). Outputs must not overlap inputs or each other. Every pointer
 * must stay valid until the stream's work has completed. */
groupnorm_status_t groupnorm_forward(const groupnorm_problem_t *problem, const void *x, void *y,
                                     const void *weight, const void *bias, float *mean,
                                     float *rstd, void *workspace, size_t workspace_bytes,
                                     void *stream);

/* Enqueues a backward pass on `stream`: dx from dy, x and the forward pass's mean and rstd,
 * and when not NULL, dweight[c] = sum over n, s of dy * xhat and dbias[c] = sum of dy.
 * dy, x, dx: N*C*S elements of problem->dtype; mean, rstd: the N*G floats the forward pass of
 * this x saved; weight: C elements of problem->param_dtype, or NULL (weight 1); dweight,
 * dbias: C elements of problem->param_dtype, written, or NULL (not computed; dweight needs
 * weight); workspace: at least what groupnorm_backward_workspace_size says. Outputs must not
 * overlap inputs or each other; every pointer must stay valid until the stream's work has
 * completed. A problem with an activation is refused (GROUPNORM_STATUS_INVALID_ARGUMENT): use
 * groupnorm_backward_activated. */
groupnorm_status_t groupnorm_backward(const groupnorm_problem_t *problem, const void *dy,
                                      const void *x, const float *mean, const float *rstd,
                                      const void *weight, void *dx, void *dweight, void *dbias,
                                      void *workspace, size_t workspace_bytes, void *stream);

/* The backward pass of GroupNorm followed by problem->activation: as groupnorm_backward, with
 * dy the gradient of the activation's output and bias the forward pass's bias (C elements of
 * problem->param_dtype, or NULL if it had none), from which the activation's input is
 * recomputed on chip. dweight and dbias are those of the whole fused operation. With
 * GROUPNORM_ACTIVATION_NONE it is groupnorm_backward (bias is not read). */
groupnorm_status_t groupnorm_backward_activated(const groupnorm_problem_t *problem,
                                                const void *dy, const void *x, const float *mean,
                                                const float *rstd, const void *weight,
                                                const void *bias, void *dx, void *dweight,
                                                void *dbias, void *workspace,
                                                size_t workspace_bytes, void *stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* GROUPNORM_H */
