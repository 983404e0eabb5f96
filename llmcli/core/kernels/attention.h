/* Attention over a slot KV cache (attention.c): one query row at a time in one fixed order, the
 * same bits on every ISA and whatever else shares the call. */
#ifndef LLMCLI_ATTENTION_H
#define LLMCLI_ATTENTION_H

#include <stdint.h>

/* N query tokens, each over its own cache row.
 *   q (N, nq, D): roped queries; row[t]: token t's cache row (NULL: row t); pos[t]: its position,
 *   whose key and value are already in the cache
 *   kc, vc: one layer's cache (rows, nk, cap, D) with strides sb, sh, ss (D contiguous)
 *   window: sliding window (keys pos - window + 1 .. pos), 0 for none; scale: the query scale
 *   (0: 1/sqrt(D)); query head h reads key head h / (nq / nk)
 *   out (N, nq, D)
 * Returns 0, or -1 when a thread's scratch could not be allocated (some rows of out are then unset). */
int attn_tokens_f32(const float *q, const int64_t *row, const int64_t *pos, const float *kc, const float *vc, int64_t sb, int64_t sh, int64_t ss,
                    int N, int nq, int nk, int D, int window, float scale, float *out);

/* N query tokens before rope, each over its own cache row (a packed prompt or mixed step).
 *   qk: token t's nq query heads then nk key heads, D floats each, at qk + t * qk_stride;
 *   v: its nk value heads at v + t * v_stride; cos, sin (N, D): rope at each token's position
 *   row, pos, caches, window, scale, out: as attn_tokens_f32
 * Ropes the queries and keys (as torch's x * cos + rotate_half(x) * sin rounds), writes each key
 * and value into the cache at (row[t], pos[t]), then attn_tokens_f32. A token's keys are written
 * before any token attends, so a prompt chunk sees its own earlier tokens. */
int attn_rope_tokens_f32(const float *qk, int64_t qk_stride, const float *v, int64_t v_stride, const float *cos, const float *sin, const int64_t *row,
                         const int64_t *pos, float *kc, float *vc, int64_t sb, int64_t sh, int64_t ss, int N, int nq, int nk, int D, int window, float scale,
                         float *out);

/* One decode step of attention for B sequences (cache row b), one new position each.
 *   qkv (B, nq + 2 nk, D): the fused projection's output before rope
 *   cos, sin (B, D): rope at each row's position; pos (B,): that position
 * Writes the new key (roped) and value into the cache at pos, then attn_tokens_f32 over keys
 * lo..pos. Returns 0, or -1 when scratch could not be allocated. */
int attn_decode_f32(const float *qkv, const float *cos, const float *sin, const int64_t *pos, float *kc, float *vc, int64_t sb, int64_t sh, int64_t ss,
                    int B, int nq, int nk, int D, int window, float *out);

#endif
