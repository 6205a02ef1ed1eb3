/* icdit C ABI: a DiT sampler embedded in your program.
 * Generated from ffi/src/lib.rs by cbindgen (see ffi/tests/header.rs); do not edit.
 * Link: -licdit_c (libicdit_c.so, or libicdit_c.a with -lstdc++ -lm -lpthread -ldl). */

#ifndef ICDIT_H
#define ICDIT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

// The version of this ABI: bumped whenever a struct or a signature changes.
#define ICDIT_ABI_VERSION 1

// What every call returns.
typedef enum IcditStatus {
  ICDIT_STATUS_OK = 0,
  // An argument or a setting is wrong; the message names it.
  ICDIT_STATUS_INVALID_ARGUMENT = 1,
  // A file could not be read (the message names it).
  ICDIT_STATUS_IO = 2,
  // Weights, factors or a VAE are malformed or do not fit the model.
  ICDIT_STATUS_MODEL = 3,
  // The planned memory is above the limit or what the machine has.
  ICDIT_STATUS_MEMORY = 4,
  // The GPU failed, or the backend is not in this build.
  ICDIT_STATUS_DEVICE = 5,
  // The model produced NaN or Inf (the message names the step and block).
  ICDIT_STATUS_NON_FINITE = 6,
  // `icdit_cancel` stopped the request; the output is not written.
  ICDIT_STATUS_CANCELLED = 7,
  // A callback of this handle's request called back into the handle.
  ICDIT_STATUS_BUSY = 8,
  // A panic inside icdit was caught; the handle refuses further requests (close it).
  ICDIT_STATUS_PANIC = 9,
} IcditStatus;

// An open model with every buffer a request needs. A handle may be used from any thread.
// Calls on one handle are serialised (a second thread waits for the first); a call from
// inside one of the handle's own callbacks returns `ICDIT_STATUS_BUSY`. `icdit_cancel` is
// the exception: it never waits and may be called from any thread, or a callback, at any
// time before `icdit_close`. Separate handles share nothing and sample in parallel.
// With backend "cuda" or "emu" a handle belongs to the thread that opened it (a device
// context is per thread): calls from other threads fail with ICDIT_STATUS_INVALID_ARGUMENT,
// and `icdit_close` from another thread releases the handle but not the device memory.
typedef struct IcditEngine IcditEngine;

// Settings for `icdit_open`. Fill with `icdit_options_default` first, then change fields;
// NULL strings and zero numbers mean the default named beside each field.
typedef struct IcditOptions {
  // Weights (official .safetensors or diffusers folder); NULL: the bundled model.
  const char *weights;
  // Rank-r factors for cache "icc"; NULL: none.
  const char *factors;
  // VAE folder for latent-space models; NULL: none (or a pipeline folder's own).
  const char *vae;
  // "cpu" (NULL), "cuda" (a build with the cuda feature) or "emu".
  const char *backend;
  // "ddpm" or "ddim"; NULL: the model's recommendation, else ddpm.
  const char *sampler;
  // A respacing spec ("ddim50", "250", "10,20") instead of steps; NULL: from steps.
  const char *respacing;
  // "none" (NULL), "reuse", "icc", "fora" or "taylor" (order 2, warm-up 2).
  const char *cache;
  // Float to uint8: "dit" (NULL) or "diffusers".
  const char *rounding;
  // Largest images per request (default 16).
  uint32_t max_batch;
  // DiT's respacing "N"; 0: the model's recommendation, else 250.
  uint32_t steps;
  // Under caching, every N-th step is full (default 2).
  uint32_t period;
  // Under caching, the full steps (indices from 0) instead of period; NULL: period.
  const uint32_t *full_steps;
  size_t full_steps_len;
  // CPU threads; 0: all cores.
  uint32_t threads;
  // CUDA device ordinal.
  uint32_t device;
  // DDIM eta (0: deterministic).
  float eta;
  // Guidance scale (1: none); 0: the model's recommendation, else 4.
  float cfg;
  // Check every step for NaN/Inf (default true).
  bool check_finite;
} IcditOptions;

// Called after each step, on the thread that called `icdit_sample_*`.
typedef void (*IcditProgressFn)(void *user, uint32_t step, uint32_t total, uint32_t timestep);

// Called after each step with the model's current estimate of the result (x̂₀): `latents`
// ((B, C, I, I) f32, `latents_len` floats) and, for pixel-space models, uint8 NHWC `pixels`
// (NULL and 0 otherwise). Both point into the handle's buffers, valid during the call.
typedef void (*IcditPreviewFn)(void *user,
                               uint32_t step,
                               uint32_t total,
                               const float *latents,
                               size_t latents_len,
                               const uint8_t *pixels,
                               size_t pixels_len);

// One request.
typedef struct IcditRequest {
  // `count` class labels, one image each (1 ≤ count ≤ max_batch).
  const int64_t *classes;
  size_t count;
  uint64_t seed;
  // Image index of the first image: noise is keyed by (seed, index), so image k is the
  // same alone or in any batch.
  uint64_t first_index;
  // Guidance scale; 0: the scale the handle was opened with. Another scale re-plans the
  // engine (one allocation per change).
  float cfg;
  // NULL: no progress reports.
  IcditProgressFn progress;
  // NULL: no previews (and no x̂₀ computed).
  IcditPreviewFn preview;
  // Passed to both callbacks.
  void *user;
} IcditRequest;

// Sizes of a handle's inputs and outputs.
typedef struct IcditInfo {
  uint32_t num_classes;
  uint32_t max_batch;
  uint32_t steps;
  uint32_t latent_channels;
  uint32_t latent_side;
  // Floats per image for `icdit_sample_latents`.
  size_t latent_len;
  // Pixels per image (0 when the handle cannot make pixels: a latent model, no VAE).
  uint32_t image_channels;
  uint32_t image_side;
  // Bytes per image for `icdit_sample_pixels` (uint8 NHWC).
  size_t pixel_len;
  // The guidance scale the handle was opened with.
  float cfg;
  // Whether per-step previews are available (the CPU backend and the GPU pipeline).
  bool previews;
} IcditInfo;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// Fills `options` with the defaults (`icdit sample` with no flags: the bundled model with
// its recommended sampler, steps and guidance, no caching, the CPU backend, 16 images).
void icdit_options_default(struct IcditOptions *options);

// Opens a model: loads the weights (and factors, VAE), plans and allocates every buffer.
// `options` NULL: the defaults. On success `*engine` is the new handle; on failure it is
// NULL and the message goes to `error` (`error_len` bytes, may be NULL).
enum IcditStatus icdit_open(const struct IcditOptions *options,
                            struct IcditEngine **engine,
                            char *error,
                            size_t error_len);

// Samples `request` and writes uint8 NHWC pixels (count × `pixel_len` bytes of
// `icdit_info`) into `out` (`out_len` bytes), converted as the command line converts them.
enum IcditStatus icdit_sample_pixels(struct IcditEngine *engine,
                                     const struct IcditRequest *request,
                                     uint8_t *out,
                                     size_t out_len);

// Samples `request` and writes f32 latents (count × `latent_len` floats, (B, C, I, I);
// images in [−1, 1] for pixel-space models) into `out` (`out_len` floats).
enum IcditStatus icdit_sample_latents(struct IcditEngine *engine,
                                      const struct IcditRequest *request,
                                      float *out,
                                      size_t out_len);

// Makes the request in progress on `engine` — or the next one, if none is — stop before its
// next step with `ICDIT_STATUS_CANCELLED`. Never waits; safe from any thread and from
// callbacks.
enum IcditStatus icdit_cancel(const struct IcditEngine *engine);

// Sizes and settings of an open handle.
enum IcditStatus icdit_info(struct IcditEngine *engine, struct IcditInfo *info);

// The message of the handle's last failed call ("" after a success), valid until the next
// call on the handle. Call it from the thread that made the failed call.
const char *icdit_last_error(struct IcditEngine *engine);

// A name for a status code ("ok", "invalid argument", …, "unknown status"); never NULL.
// Takes an int so that any value is safe to pass.
const char *icdit_status_name(int32_t status);

// Frees the handle and everything it holds (model, buffers, threads). NULL is ignored. No
// other call on the handle may be in progress or follow.
void icdit_close(struct IcditEngine *engine);

// The library's version, e.g. "0.1.0".
const char *icdit_version(void);

// `ICDIT_ABI_VERSION` of the library actually loaded: compare with the header's.
uint32_t icdit_abi_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* ICDIT_H */
