/* Sampling from C through icdit's C ABI (include/icdit.h).
 *
 *   cargo build --release -p icdit-c
 *   cc -std=c11 -O2 examples/c/sample.c -Iinclude -Ltarget/release -licdit_c \
 *      -Wl,-rpath,"$PWD/target/release" -o sample
 *   ./sample [--class 1,2,3] [--seed 0] [--weights W] [--out pixels.u8] [--progress]
 *
 * Opens the bundled model (or W) with the command line's defaults, samples one image per
 * class and writes the uint8 NHWC pixels, as raw bytes, to --out: the same bytes as
 * `icdit sample --class 1,2,3 --seed 0 --npz S.npz` stores in S.npz's arr_0. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "icdit.h"

static void on_step(void *user, uint32_t step, uint32_t total, uint32_t timestep) {
    (void)user;
    fprintf(stderr, "\rstep %u/%u (t = %u)%s", step + 1, total, timestep, step + 1 == total ? "\n" : "");
}

int main(int argc, char **argv) {
    const char *classes_arg = "1,2,3", *out_path = NULL, *weights = NULL;
    unsigned long long seed = 0;
    int progress = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--class") && i + 1 < argc) classes_arg = argv[++i];
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--weights") && i + 1 < argc) weights = argv[++i];
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "--progress")) progress = 1;
        else {
            fprintf(stderr, "usage: %s [--class 1,2,3] [--seed S] [--weights W] [--out F] [--progress]\n", argv[0]);
            return 2;
        }
    }
    if (icdit_abi_version() != ICDIT_ABI_VERSION) {
        fprintf(stderr, "libicdit_c has ABI %u, this program was built for %u\n", icdit_abi_version(), ICDIT_ABI_VERSION);
        return 1;
    }

    int64_t classes[64];
    size_t count = 0;
    for (const char *p = classes_arg; *p && count < 64;) {
        char *end;
        classes[count++] = strtoll(p, &end, 10);
        if (end == p) break;
        p = *end == ',' ? end + 1 : end;
    }

    IcditOptions options;
    icdit_options_default(&options); /* the bundled model, its recommended settings */
    options.weights = weights;
    IcditEngine *engine = NULL;
    char error[1024];
    IcditStatus status = icdit_open(&options, &engine, error, sizeof error);
    if (status != ICDIT_STATUS_OK) {
        fprintf(stderr, "icdit_open: %s: %s\n", icdit_status_name(status), error);
        return 1;
    }
    IcditInfo info;
    icdit_info(engine, &info);

    size_t len = count * info.pixel_len;
    uint8_t *pixels = malloc(len ? len : 1);
    IcditRequest request = {
        .classes = classes,
        .count = count,
        .seed = seed,
        .progress = progress ? on_step : NULL,
    };
    status = icdit_sample_pixels(engine, &request, pixels, len);
    if (status != ICDIT_STATUS_OK) {
        fprintf(stderr, "icdit_sample_pixels: %s: %s\n", icdit_status_name(status), icdit_last_error(engine));
        free(pixels);
        icdit_close(engine);
        return 1;
    }
    fprintf(stderr, "icdit %s: %zu images of %ux%ux%u, %u steps, guidance %g\n", icdit_version(), count,
            info.image_side, info.image_side, info.image_channels, info.steps, info.cfg);
    if (out_path) {
        FILE *f = fopen(out_path, "wb");
        if (!f || fwrite(pixels, 1, len, f) != len || fclose(f) != 0) {
            fprintf(stderr, "cannot write %s\n", out_path);
            free(pixels);
            icdit_close(engine);
            return 1;
        }
    }
    free(pixels);
    icdit_close(engine); /* frees the model, every buffer and the threads */
    return 0;
}
