// Routed experts on packed INT4 weights and the fused MoE layer (ops.h). Expert layout and the
// scale-row trick that lets every token of an output group share one scale row: mm_common.h.
#include "ops.h"

#include <cstring>

#include "thread_pool.h"

namespace mobilemoe_ops {
namespace {

using mobilemoe_threads::run_jobs;
using mobilemoe_threads::run_row_jobs;
using mobilemoe_threads::workers_for;

// Packed stacked experts: codes [E, tiles*tile_stride], scale rows fp16 [E, G, in + in/32] (per
// output group g: [sn | smax]).
struct ExpertSet {
  const uint8_t* codes;
  const uint16_t* scales;
  int64_t E, in, out, nkb, tile_stride, expert_bytes, G, scale_row;
};

ExpertSet expert_set(const at::Tensor& codes, const at::Tensor& scales, int64_t in, int64_t out) {
  TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "packed expert codes must be a contiguous uint8 [E, bytes] tensor");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.dim() == 3 && scales.is_contiguous(),
              "packed expert scales must be a contiguous float16 [E, out/32, in + in/32] tensor");
  TORCH_CHECK(in % MM_QK == 0 && out % MM_QK == 0, "expert in/out must be multiples of 32");
  ExpertSet s;
  s.E = codes.size(0);
  s.in = in;
  s.out = out;
  s.nkb = in / MM_QK;
  s.tile_stride = s.nkb * MM_BLOCK_BYTES;
  s.expert_bytes = (out / MM_TILE) * s.tile_stride;
  s.G = out / MM_QK;
  s.scale_row = in + s.nkb;
  TORCH_CHECK(codes.size(1) == s.expert_bytes, "packed expert codes: ", codes.size(1), " bytes per expert, expected ",
              s.expert_bytes);
  TORCH_CHECK(scales.size(0) == s.E && scales.size(1) == s.G && scales.size(2) == s.scale_row,
              "packed expert scales: shape ", scales.sizes(), ", expected [", s.E, ", ", s.G, ", ", s.scale_row,
              "] (repack with this version's pack_experts)");
  s.codes = codes.data_ptr<uint8_t>();
  s.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return s;
}

struct Scratch {  // per-worker buffers of one expert group: its int8 activations and block maxima
  std::vector<int8_t> q;
  std::vector<float> d, smax;
  std::vector<int32_t> s;
  void reserve(int64_t rows, int64_t K) {
    const int64_t nkb = K / MM_QK;
    if ((int64_t)q.size() < rows * K) q.resize(rows * K);
    if ((int64_t)d.size() < rows * nkb) {
      d.resize(rows * nkb);
      s.resize(rows * nkb);
    }
    if ((int64_t)smax.size() < nkb) smax.resize(nkb);
  }
};

// Rows [M, K] prepared for the expert kernels: u = x * 127 / max|x|_b, xd = max|x|_b / 127.
struct RowPrep {
  std::vector<float> u, xd;
};

void prep_rows(const mm_kernels* k, const float* x, int64_t M, int64_t K, RowPrep& out) {
  const int64_t nkb = K / MM_QK;
  out.u.resize(M * K);
  out.xd.resize(M * nkb);
  run_row_jobs(M, 16, 4.0 * M * K, [&](int64_t r) {
    k->prep_row(x + r * K, K, out.u.data() + r * K, out.xd.data() + r * nkb);
  });
}

// One expert, one 32-wide output group g, rows [r0, r1) of the prepared rows (row r is idx[r], or r):
// each row is rounded to int8 against the group's normalised scale row sn with step
// xd[row, b] * smax[b], and dotted with the codes as they are.
void expert_group(const mm_kernels* k, const ExpertSet& X, int64_t e, int64_t g, const RowPrep& src,
                  const int64_t* idx, int64_t r0, int64_t r1, float* out, int64_t ldo, Scratch& sc) {
  const int64_t m = r1 - r0, K = X.in, nkb = X.nkb;
  sc.reserve(m, K);
  const uint16_t* sn = X.scales + (e * X.G + g) * X.scale_row;
  // The next group's scale row: it is read first by the next job, before any code bytes.
  for (int64_t off = 0; off < X.scale_row * 2; off += 64) __builtin_prefetch((const char*)(sn + X.scale_row) + off);
  for (int64_t b = 0; b < nkb; ++b) sc.smax[b] = mm_half_to_float(sn[K + b]);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = idx ? idx[r] : r;
    k->quant_scaled(src.u.data() + row * K, sn, K, sc.q.data() + (r - r0) * K, sc.s.data() + (r - r0) * nkb);
    const float* xd = src.xd.data() + row * nkb;
    float* d = sc.d.data() + (r - r0) * nkb;
    for (int64_t b = 0; b < nkb; ++b) d[b] = xd[b] * sc.smax[b];
  }
  k->gemm(X.codes + e * X.expert_bytes, X.tile_stride, nkb, 0, 2 * g, 2 * g + 2, sc.q.data(), sc.d.data(),
          sc.s.data(), m, out + r0 * ldo, ldo, X.out);
}

// The same job on bf16 rows (mm_kernels.expert_gemm_bf16): a = the bf16 copy of all R rows [R, in],
// made once per stage, in which rows [r0, r1) are this expert's. Nothing per row and group here:
// the group's scales go into the weights inside the kernel.
void expert_group_bf16(const mm_kernels* k, const ExpertSet& X, int64_t e, int64_t g, const uint16_t* a, int64_t r0,
                       int64_t r1, float* out, int64_t ldo) {
  const uint16_t* sn = X.scales + (e * X.G + g) * X.scale_row;
  for (int64_t off = 0; off < X.scale_row * 2; off += 64) __builtin_prefetch((const char*)(sn + X.scale_row) + off);
  k->expert_gemm_bf16(X.codes + e * X.expert_bytes, X.tile_stride, X.nkb, sn, 2 * g, 2 * g + 2, a + r0 * X.in, X.in,
                      r1 - r0, out + r0 * ldo, ldo, X.out);
}

// ---- the fused MoE layer -------------------------------------------------------------------------

enum class JobKind : int8_t { routed_group, shared_tiles };

// One job of a stage: a routed expert's output group g over assignments [a0, a1) of its sorted
// rows, or a block of the shared linear's tiles starting at tile g over tokens [a0, a1).
struct Job {
  JobKind kind;
  int64_t e, g, a0, a1;
};

// Buffers of the fused MoE operator, kept per calling thread and reused (capacity only grows): a
// decode layer takes ~0.1 ms, so a dozen allocations per call would show.
struct MoEWorkspace {
  std::vector<int64_t> offs, fill, token_of, slot_of;
  std::vector<Job> jobs;
  std::vector<Scratch> scratch;  // one per worker
  std::vector<float> gu, sgu, h, hs, y, ys;
  std::vector<uint16_t> xb, hb;  // bf16 rows for expert_gemm_bf16: x gathered per routed row, h
  QAct xq, hq;
  RowPrep xr, hr;
};

// Resize without keeping old values cheaply: every element is written before it is read.
template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// The T*k assignments grouped by expert (stable counting sort): expert e's rows are
// [offs[e], offs[e+1]), row p belongs to token token_of[p], assignment a sits in row slot_of[a]
// (-1 for an id of -1: the offloading runtime runs a layer in batches of resident experts).
void group_by_expert(const int64_t* ids, int64_t A, int64_t kk, int64_t E, MoEWorkspace& ws) {
  int64_t* offs = sized(ws.offs, E + 1);
  int64_t* fill = sized(ws.fill, E);
  int64_t* token_of = sized(ws.token_of, A);
  int64_t* slot_of = sized(ws.slot_of, A);
  std::fill(offs, offs + E + 1, 0);
  for (int64_t a = 0; a < A; ++a) {
    TORCH_CHECK(ids[a] >= -1 && ids[a] < E, "expert id ", ids[a], " out of range [0, ", E, ")");
    if (ids[a] >= 0) offs[ids[a] + 1]++;
  }
  for (int64_t e = 0; e < E; ++e) offs[e + 1] += offs[e];
  std::copy(offs, offs + E, fill);
  for (int64_t a = 0; a < A; ++a) {
    slot_of[a] = -1;
    if (ids[a] < 0) continue;
    const int64_t p = fill[ids[a]]++;
    token_of[p] = a / kk;
    slot_of[a] = p;
  }
}

// One stage's jobs: every chosen expert's `groups` output groups per token chunk, then the shared
// linear's tile blocks (of `sh_tiles` tiles) per token chunk.
int64_t build_jobs(MoEWorkspace& ws, int64_t E, int64_t T, int64_t groups, bool shared, int64_t sh_tiles,
                   int64_t sh_block) {
  const int64_t* offs = ws.offs.data();
  ws.jobs.clear();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t a0 = offs[e]; a0 < offs[e + 1]; a0 += TOKEN_CHUNK)
      for (int64_t g = 0; g < groups; ++g)
        ws.jobs.push_back({JobKind::routed_group, e, g, a0, std::min(offs[e + 1], a0 + TOKEN_CHUNK)});
  if (shared)
    for (int64_t m0 = 0; m0 < T; m0 += TOKEN_CHUNK)
      for (int64_t t0 = 0; t0 < sh_tiles; t0 += sh_block)
        ws.jobs.push_back({JobKind::shared_tiles, 0, t0, m0, std::min(T, m0 + TOKEN_CHUNK)});
  return (int64_t)ws.jobs.size();
}

// The shared linear's tiles [g, g + sh_block) for tokens [a0, a1) of activations `a` [T, K].
void shared_tiles(const mm_kernels* k, const at::Tensor& W, int64_t N, int64_t K, const QAct& a, const Job& jb,
                  int64_t sh_block, float* out) {
  const int64_t nkb = K / MM_QK, tiles = (N + MM_TILE - 1) / MM_TILE;
  k->gemm(W.data_ptr<uint8_t>(), W.size(1), nkb, 1, jb.g, std::min(tiles, jb.g + sh_block), a.q.data() + jb.a0 * K,
          a.d.data() + jb.a0 * nkb, a.s.data() + jb.a0 * nkb, jb.a1 - jb.a0, out + jb.a0 * N, N, N);
}

// out[t] = shared[t] (or 0) + sum over kept slots s of weights[t, s] * y[row of (t, s)], in this
// fixed order per token.
void combine(const float* y, const float* ys, const float* weights, const int64_t* slot_of, int64_t T, int64_t kk,
             int64_t H, float* out) {
  run_row_jobs(T, 8, 4.0 * T * kk * H, [&](int64_t t) {
    float* o = out + t * H;
    if (ys)
      std::memcpy(o, ys + t * H, H * sizeof(float));
    else
      std::fill(o, o + H, 0.f);
    for (int64_t s = 0; s < kk; ++s) {
      if (slot_of[t * kk + s] < 0) continue;
      const float wt = weights[t * kk + s];
      const float* yr = y + slot_of[t * kk + s] * H;
      for (int64_t i = 0; i < H; ++i) o[i] += wt * yr[i];
    }
  });
}

}  // namespace

at::Tensor expert_forward(const at::Tensor& codes, const at::Tensor& scales, int64_t in, int64_t out, int64_t e,
                          const at::Tensor& x) {
  ExpertSet X = expert_set(codes, scales, in, out);
  TORCH_CHECK(e >= 0 && e < X.E, "expert index ", e, " out of range [0, ", X.E, ")");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == in && x.is_contiguous(),
              "x must be a contiguous float32 [M, ", in, "] tensor");
  const mm_kernels* k = kernels();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out}, x.options());
  const int64_t nch = (M + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
  const int64_t njobs = nch * X.G;
  const int nw = workers_for(njobs, (double)X.expert_bytes * 1.125 + (double)M * in * out / 12.0);
  std::vector<Scratch> scratch(nw);
  RowPrep xr;
  prep_rows(k, x.data_ptr<float>(), M, in, xr);
  float* yp = y.data_ptr<float>();
  run_jobs(njobs, nw, [&](int64_t j, int w) {
    const int64_t c = j / X.G, g = j % X.G;
    expert_group(k, X, e, g, xr, nullptr, c * TOKEN_CHUNK, std::min(M, (c + 1) * TOKEN_CHUNK), yp, out,
                 scratch[w]);
  });
  return y;
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gu_codes,
               const at::Tensor& gu_scales, const at::Tensor& dn_codes, const at::Tensor& dn_scales, int64_t I,
               const at::Tensor& sh_gu, const at::Tensor& sh_dn, int64_t S) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [T, H]");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(ids.dtype() == at::kLong && ids.dim() == 2 && ids.size(0) == T && ids.is_contiguous(),
              "expert_ids must be contiguous int64 [T, k]");
  const int64_t kk = ids.size(1);
  TORCH_CHECK(weights.dtype() == at::kFloat && weights.sizes() == ids.sizes() && weights.is_contiguous(),
              "weights must be contiguous float32 [T, k]");
  ExpertSet GU = expert_set(gu_codes, gu_scales, H, 2 * I);
  ExpertSet DN = expert_set(dn_codes, dn_scales, I, H);
  TORCH_CHECK(GU.E == DN.E, "gate_up and down expert counts differ");
  const bool shared = S > 0;
  if (shared) {
    check_packed_linear(sh_gu, 2 * S, H);
    check_packed_linear(sh_dn, H, S);
  }
  const mm_kernels* k = kernels();
  const int64_t E = GU.E;
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0) return out;
  // The calling thread's workspace, by reference: the job lambdas run on other threads too, and a
  // thread_local named inside them would resolve to each runner's own (empty) instance.
  thread_local MoEWorkspace tls_workspace;
  MoEWorkspace& ws = tls_workspace;
  group_by_expert(ids.data_ptr<int64_t>(), T * kk, kk, E, ws);
  const int64_t* offs = ws.offs.data();
  const float* xp = x.data_ptr<float>();
  const int64_t R = offs[E];  // routed rows (assignments kept)
  // Stage 1's jobs (they depend only on the grouping). An expert's token chunk of at least
  // prefill_min_m rows runs on bf16 rows (where the kernels have expert_gemm_bf16), a smaller one
  // (decode) on the int8 path; each preparation runs only if some job uses it.
  const int64_t gu_tiles = (2 * S + MM_TILE - 1) / MM_TILE, dn_tiles = (H + MM_TILE - 1) / MM_TILE;
  const int64_t gu_block = linear_tile_block(k, T, gu_tiles), dn_block = linear_tile_block(k, T, dn_tiles);
  int64_t njobs = build_jobs(ws, E, T, GU.G, shared, gu_tiles, gu_block);
  const bool has_bf16 = k->expert_gemm_bf16 != nullptr && k->prefill_min_m > 0;
  auto on_bf16 = [&](const Job& jb) { return has_bf16 && jb.a1 - jb.a0 >= k->prefill_min_m; };
  bool need_q = false, need_b = false;
  for (const Job& jb : ws.jobs)
    if (jb.kind == JobKind::routed_group) (on_bf16(jb) ? need_b : need_q) = true;
  if (shared) quantize_rows(k, xp, T, H, ws.xq);
  if (need_q) prep_rows(k, xp, T, H, ws.xr);
  uint16_t* xb = need_b ? sized(ws.xb, R * H) : nullptr;
  if (need_b)
    run_row_jobs(R, 16, 2.0 * R * H, [&](int64_t p) { k->rows_to_bf16(xp + ws.token_of[p] * H, H, xb + p * H); });
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += offs[e + 1] > offs[e];
  // Work estimate of the whole layer (decides one thread vs all): bytes of the chosen experts and
  // the shared expert, plus MACs/12.
  const double work = (double)active * (GU.expert_bytes + DN.expert_bytes) * 1.125 +
                      (shared ? (double)sh_gu.numel() + (double)sh_dn.numel() : 0.0) +
                      (double)T * (3.0 * kk * H * I + (shared ? 3.0 * H * S : 0.0)) / 12.0;
  if ((int64_t)ws.scratch.size() < at::get_num_threads()) ws.scratch.resize(at::get_num_threads());

  // Stage 1: every chosen expert's gate_up (per output group) and the shared gate_up.
  float* gu = sized(ws.gu, R * 2 * I);
  float* sgu = sized(ws.sgu, shared ? T * 2 * S : 0);
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int w) {
    const Job& jb = ws.jobs[j];
    if (jb.kind == JobKind::routed_group && on_bf16(jb))
      expert_group_bf16(k, GU, jb.e, jb.g, xb, jb.a0, jb.a1, gu, 2 * I);
    else if (jb.kind == JobKind::routed_group)
      expert_group(k, GU, jb.e, jb.g, ws.xr, ws.token_of.data(), jb.a0, jb.a1, gu, 2 * I, ws.scratch[w]);
    else
      shared_tiles(k, sh_gu, 2 * S, H, ws.xq, jb, gu_block, sgu);
  });

  // SwiGLU activations, prepared for stage 2.
  float* h = sized(ws.h, R * I);
  swiglu_into(k, gu, R, I, h);
  if (need_q) prep_rows(k, h, R, I, ws.hr);
  uint16_t* hb = need_b ? sized(ws.hb, R * I) : nullptr;
  if (need_b) run_row_jobs(R, 16, 2.0 * R * I, [&](int64_t p) { k->rows_to_bf16(h + p * I, I, hb + p * I); });
  if (shared) {
    float* hs = sized(ws.hs, T * S);
    swiglu_into(k, sgu, T, S, hs);
    quantize_rows(k, hs, T, S, ws.hq);
  }

  // Stage 2: down projections.
  float* y = sized(ws.y, R * H);
  float* ys = sized(ws.ys, shared ? T * H : 0);
  njobs = build_jobs(ws, E, T, DN.G, shared, dn_tiles, dn_block);
  run_jobs(njobs, workers_for(njobs, work), [&](int64_t j, int w) {
    const Job& jb = ws.jobs[j];
    if (jb.kind == JobKind::routed_group && on_bf16(jb))
      expert_group_bf16(k, DN, jb.e, jb.g, hb, jb.a0, jb.a1, y, H);
    else if (jb.kind == JobKind::routed_group)
      expert_group(k, DN, jb.e, jb.g, ws.hr, nullptr, jb.a0, jb.a1, y, H, ws.scratch[w]);
    else
      shared_tiles(k, sh_dn, H, S, ws.hq, jb, dn_block, ys);
  });

  combine(y, shared ? ys : nullptr, weights.data_ptr<float>(), ws.slot_of.data(), T, kk, H, out.data_ptr<float>());
  return out;
}

}  // namespace mobilemoe_ops
