// CPU kernels of the layer's explicit sparse Jacobian (diff3r_plugin/layer/sparse_jacobian.py).
//
// With the pair list frozen, a pixel's colour C = bg + sum_i w_i (c_i - bg), w_i = alpha_i T_i,
// depends on Gaussian i only through its projected features f_i = [mx, my, a, b, c, o, r, g, b]
// (rows of N x 9). Per pair the Jacobian row block is
//   dC/df = [ g_alpha d_alpha^T | w I ],
//   g_alpha = dC/dalpha = T (c - bg) - S / (1 - alpha),  S = sum_{j behind} w_j (c_j - bg),
//   d_alpha = dalpha/d(mx, my, a, b, c, o)  (zero where alpha is clamped at 0.99),
// and the products J p / J^T u are one pass over the pairs. Pairs are sorted by pixel, so the
// pixel-side sums need no atomics; the Gaussian-side sums are gathered per Gaussian row.
// Same arithmetic as the PyTorch path in sparse_jacobian.py (which stays the path of derivatives
// of these products, of forward mode and of tensors off the CPU).

#include <torch/extension.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr double kAlphaMax = 0.99;
constexpr double kTMin = 1e-4;
constexpr int kF = 9;  // features per (view, Gaussian)


void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// The per-pair arrays of one linearization: P pairs, int64 indices, factors of one dtype.
void check_pairs(const torch::Tensor& gid, const torch::Tensor& pixel, const torch::Tensor& g_alpha,
                 const torch::Tensor& d_alpha, const torch::Tensor& weight) {
  check(gid, "gid"); check(pixel, "pixel"); check(g_alpha, "g_alpha"); check(d_alpha, "d_alpha");
  check(weight, "weight");
  const int64_t n = gid.numel();
  TORCH_CHECK(gid.scalar_type() == torch::kInt64 && pixel.scalar_type() == torch::kInt64 && pixel.numel() == n,
              "gid and pixel must be int64 [P]");
  TORCH_CHECK(g_alpha.dim() == 2 && g_alpha.size(0) == n && g_alpha.size(1) == 3 && d_alpha.dim() == 2 &&
              d_alpha.size(0) == n && d_alpha.size(1) == 6 && weight.numel() == n,
              "g_alpha [P, 3], d_alpha [P, 6] and weight [P] must match the P pairs");
  TORCH_CHECK(d_alpha.scalar_type() == g_alpha.scalar_type() && weight.scalar_type() == g_alpha.scalar_type(),
              "the pair factors must share one dtype");
}

// Pixel-side passes run on chunks of whole pixels, Gaussian-side sums on chunks of whole views
// (csrc/parallel.h): each task writes only its own pixels or rows, in the serial order.
using diff3r::parallel_pixels;
using diff3r::parallel_views;

// Per-pair factors at one linearization point, and the composited colour.
template <typename T>
std::vector<torch::Tensor> build_impl(const torch::Tensor& feats, const torch::Tensor& gid,
                                      const torch::Tensor& pixel, const torch::Tensor& px,
                                      const torch::Tensor& py, const torch::Tensor& bg,
                                      int64_t pixels_per_view, int64_t num_pixels) {
  const T* f = feats.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* xs = px.data_ptr<T>();
  const T* ys = py.data_ptr<T>();
  const T* bgp = bg.data_ptr<T>();  // [views, 3]
  const int64_t n = gid.numel();
  // Every entry is written below (the pairs behind a pixel's cut-off get zeros), so no
  // zero-fill pass over the P x 10 factors first.
  auto g_alpha = torch::empty({n, 3}, feats.options());
  auto d_alpha = torch::empty({n, 6}, feats.options());
  auto weight = torch::empty({n}, feats.options());
  auto color = torch::empty({num_pixels, 3}, feats.options());
  T* ga = g_alpha.data_ptr<T>();
  T* da = d_alpha.data_ptr<T>();
  T* wt = weight.data_ptr<T>();
  T* col = color.data_ptr<T>();
  for (int64_t q = 0; q < num_pixels; ++q) {
    const T* b = bgp + 3 * (q / pixels_per_view);
    col[3 * q] = b[0]; col[3 * q + 1] = b[1]; col[3 * q + 2] = b[2];
  }
  const T amax = T(kAlphaMax), tmin = T(kTMin);
  parallel_pixels(n, pix, [&](int64_t lo, int64_t hi) {
  std::vector<double> trans, alphas;
  int64_t i = lo;
  while (i < hi) {
    const int64_t q = pix[i];
    int64_t end = i;
    while (end < hi && pix[end] == q) ++end;
    const T* b = bgp + 3 * (q / pixels_per_view);
    trans.clear(); alphas.clear();
    double td = 1.0;
    double total[3] = {0, 0, 0};
    for (int64_t k = i; k < end; ++k) {
      const T* a = f + kF * g[k];
      const T dx = a[0] - xs[k], dy = a[1] - ys[k];
      const T e = std::exp(T(-0.5) * (a[2] * dx * dx + a[4] * dy * dy) - a[3] * dx * dy);
      const T raw = a[5] * e;
      const T alpha = std::min(raw, amax);
      const T t = T(td);
      if (!(t * (T(1) - alpha) >= tmin)) break;  // keep is a prefix of the pixel's list
      const T w = alpha * t;
      wt[k] = w;
      for (int c = 0; c < 3; ++c) total[c] += double(w * (a[6 + c] - b[c]));
      const T fa = raw <= amax ? alpha : T(0);
      T* d = da + 6 * k;
      d[0] = fa * -(a[2] * dx + a[3] * dy);
      d[1] = fa * -(a[4] * dy + a[3] * dx);
      d[2] = fa * T(-0.5) * dx * dx;
      d[3] = fa * -(dx * dy);
      d[4] = fa * T(-0.5) * dy * dy;
      d[5] = raw <= amax ? e : T(0);
      trans.push_back(double(t));
      alphas.push_back(double(alpha));
      td *= 1.0 - double(alpha);
    }
    for (int64_t k = i + static_cast<int64_t>(trans.size()); k < end; ++k) {  // behind the cut-off
      wt[k] = T(0);
      for (int c = 0; c < 3; ++c) ga[3 * k + c] = T(0);
      for (int c = 0; c < 6; ++c) da[6 * k + c] = T(0);
    }
    for (int c = 0; c < 3; ++c) col[3 * q + c] = T(double(b[c]) + total[c]);
    // Back to front: S_i = sum of w_j (c_j - bg) over the kept pairs behind i.
    double s[3] = {0, 0, 0};
    for (int64_t j = static_cast<int64_t>(trans.size()) - 1; j >= 0; --j) {
      const int64_t k = i + j;
      const T* a = f + kF * g[k];
      for (int c = 0; c < 3; ++c) {
        const double cd = double(a[6 + c] - b[c]);
        ga[3 * k + c] = T(trans[j] * cd - s[c] / (1.0 - alphas[j]));
        s[c] += double(wt[k]) * cd;
      }
    }
    i = end;
  }
  });
  return {g_alpha, d_alpha, weight, color};
}

// One pair's row block of J, dC/df = [g_alpha d_alpha^T | w I], applied to its Gaussian's
// feature tangent q (adds to the pixel's 3 values) ...
template <typename T>
inline void add_pair_tangent(const T* q, const T* ga, const T* d, T w, T* out) {
  const T s = d[0] * q[0] + d[1] * q[1] + d[2] * q[2] + d[3] * q[3] + d[4] * q[4] + d[5] * q[5];
  for (int c = 0; c < 3; ++c) out[c] += ga[c] * s + w * q[6 + c];
}

// ... and transposed, to the pixel's cotangent u (adds to the Gaussian's 9 feature cotangents).
template <typename T>
inline void add_pair_cotangent(const T* u, const T* ga, const T* d, T w, T* out) {
  const T s = ga[0] * u[0] + ga[1] * u[1] + ga[2] * u[2];
  for (int j = 0; j < 6; ++j) out[j] += d[j] * s;
  for (int c = 0; c < 3; ++c) out[6 + c] += w * u[c];
}

// J p at the pixels: img[pixel] += g_alpha (d_alpha . q[:6]) + w q[6:], q the feature tangents.
template <typename T>
torch::Tensor jvp_impl(const torch::Tensor& q, const torch::Tensor& gid, const torch::Tensor& pixel,
                       const torch::Tensor& g_alpha, const torch::Tensor& d_alpha,
                       const torch::Tensor& weight, int64_t num_pixels) {
  const T* qt = q.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* ga = g_alpha.data_ptr<T>();
  const T* da = d_alpha.data_ptr<T>();
  const T* wt = weight.data_ptr<T>();
  const int64_t n = gid.numel();
  auto img = torch::zeros({num_pixels, 3}, q.options());
  T* out = img.data_ptr<T>();
  parallel_pixels(n, pix, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k)
      add_pair_tangent(qt + kF * g[k], ga + 3 * k, da + 6 * k, wt[k], out + 3 * pix[k]);
  });
  return img;
}

// J^T u at the features: ct[gid] += [d_alpha (g_alpha . u[pixel]), w u[pixel]].
template <typename T>
torch::Tensor vjp_impl(const torch::Tensor& u, const torch::Tensor& gid, const torch::Tensor& pixel,
                       const torch::Tensor& g_alpha, const torch::Tensor& d_alpha,
                       const torch::Tensor& weight, int64_t num_rows, int64_t pixels_per_view) {
  const T* up = u.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* ga = g_alpha.data_ptr<T>();
  const T* da = d_alpha.data_ptr<T>();
  const T* wt = weight.data_ptr<T>();
  const int64_t n = gid.numel();
  auto ct = torch::zeros({num_rows, kF}, u.options());
  T* out = ct.data_ptr<T>();
  parallel_views(n, pix, pixels_per_view, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k)
      add_pair_cotangent(up + 3 * pix[k], ga + 3 * k, da + 6 * k, wt[k], out + kF * g[k]);
  });
  return ct;
}

// J^T W J p in one pass: per pixel, its value u = W (J p)[pixel] from its pairs, then the pairs'
// cotangents from u while they are in cache (the two products' passes over the pairs, fused).
template <typename T>
torch::Tensor gn_impl(const torch::Tensor& q, const torch::Tensor& gid, const torch::Tensor& pixel,
                      const torch::Tensor& g_alpha, const torch::Tensor& d_alpha,
                      const torch::Tensor& weight, const torch::Tensor* wsq, int64_t num_rows,
                      int64_t pixels_per_view) {
  const T* qt = q.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* ga = g_alpha.data_ptr<T>();
  const T* da = d_alpha.data_ptr<T>();
  const T* wt = weight.data_ptr<T>();
  const T* ws = wsq ? wsq->data_ptr<T>() : nullptr;
  const int64_t n = gid.numel();
  auto ct = torch::zeros({num_rows, kF}, q.options());
  T* out = ct.data_ptr<T>();
  parallel_views(n, pix, pixels_per_view, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    while (i < hi) {
      const int64_t px = pix[i];
      int64_t end = i;
      while (end < hi && pix[end] == px) ++end;
      T u[3] = {0, 0, 0};
      for (int64_t k = i; k < end; ++k) add_pair_tangent(qt + kF * g[k], ga + 3 * k, da + 6 * k, wt[k], u);
      if (ws) for (int c = 0; c < 3; ++c) u[c] *= ws[3 * px + c];
      for (int64_t k = i; k < end; ++k) add_pair_cotangent(u, ga + 3 * k, da + 6 * k, wt[k], out + kF * g[k]);
      i = end;
    }
  });
  return ct;
}

// Per (view, Gaussian) moments of the pairs' factors A = diag(s) [g_alpha d_alpha^T | w I]:
// row [|G|^2 d d^T (36) | d (w s * G)^T (18) | (w s)^2 (3)], G = s * g_alpha (s = W^1/2 or 1).
template <typename T>
torch::Tensor moments_impl(const torch::Tensor& gid, const torch::Tensor& pixel,
                           const torch::Tensor& g_alpha, const torch::Tensor& d_alpha,
                           const torch::Tensor& weight, const torch::Tensor* sqrt_w,
                           int64_t num_rows, int64_t pixels_per_view) {
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* ga = g_alpha.data_ptr<T>();
  const T* da = d_alpha.data_ptr<T>();
  const T* wt = weight.data_ptr<T>();
  const T* sw = sqrt_w ? sqrt_w->data_ptr<T>() : nullptr;
  const int64_t n = gid.numel();
  auto moments = torch::zeros({num_rows, 57}, g_alpha.options());
  T* out = moments.data_ptr<T>();
  parallel_views(n, pix, pixels_per_view, [&](int64_t lo, int64_t hi) {
  for (int64_t k = lo; k < hi; ++k) {
    T G[3], ws[3];
    for (int c = 0; c < 3; ++c) {
      const T s = sw ? sw[3 * pix[k] + c] : T(1);
      G[c] = ga[3 * k + c] * s;
      ws[c] = wt[k] * s;
    }
    const T norm = G[0] * G[0] + G[1] * G[1] + G[2] * G[2];
    const T* d = da + 6 * k;
    T* o = out + 57 * g[k];
    for (int a = 0; a < 6; ++a) {
      const T nd = norm * d[a];
      for (int b = 0; b < 6; ++b) o[6 * a + b] += nd * d[b];
      for (int c = 0; c < 3; ++c) o[36 + 3 * a + c] += d[a] * (ws[c] * G[c]);
    }
    for (int c = 0; c < 3; ++c) o[54 + c] += ws[c] * ws[c];
  }
  });
  // The 9 x 9 moments [[dd, dq], [dq^T, diag(ww)]] of each row, assembled in place of the
  // PyTorch concatenations (rows are independent: any thread count gives the same bits).
  auto full = torch::zeros({num_rows, 9, 9}, g_alpha.options());
  T* f = full.data_ptr<T>();
  at::parallel_for(0, num_rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* o = out + 57 * r;
      T* m = f + 81 * r;
      for (int a = 0; a < 6; ++a) {
        for (int b = 0; b < 6; ++b) m[9 * a + b] = o[6 * a + b];
        for (int c = 0; c < 3; ++c) {
          m[9 * a + 6 + c] = o[36 + 3 * a + c];
          m[9 * (6 + c) + a] = o[36 + 3 * a + c];
        }
      }
      for (int c = 0; c < 3; ++c) m[9 * (6 + c) + 6 + c] = o[54 + c];
    }
  });
  return full;
}

// Per-Gaussian blocks of J^T W J over the columns `cols` of F, from the feature moments:
// B[b, g] = sum over views v of F_s^T M_s F_s, F_s = F[(b, v, g)][rows][:, cols] (r x k) and
// M_s = M[(b, v, g)][rows][:, rows]. One task per (b, g) block, the views summed in order, so
// the result does not depend on the thread count. F is read in its factored form (geo [N, 9,
// n_geo] and, with the appearance, opacity [N] and color [N, 3, d_sh]: see f_entry), never as a
// dense [N, 9, n_i] copy. F is mostly zeros (a feature moves with few slots: the geometry moves
// mean and conic, the opacity logit only the opacity, the DC only its colour channel), so zero
// entries of F are skipped in both products.
template <typename T>
inline T f_entry(const T* G, const T* O, const T* C, int64_t row, int64_t n_geo, int64_t d_sh, int64_t f,
                 int64_t s) {
  if (s < n_geo) return G[(row * kF + f) * n_geo + s];
  const int64_t a = s - n_geo;  // appearance slot: opacity logit, DC x 3, then each channel's rest
  if (a == 0) return f == 5 ? O[row] : T(0);
  int64_t c, j;
  if (a <= 3) {
    c = a - 1; j = 0;
  } else {
    c = (a - 4) / (d_sh - 1); j = 1 + (a - 4) % (d_sh - 1);
  }
  return f == 6 + c ? C[(row * 3 + c) * d_sh + j] : T(0);
}

template <typename T>
torch::Tensor blocks_impl(const torch::Tensor& geo, const torch::Tensor* opacity, const torch::Tensor* color,
                          const torch::Tensor& moments, const torch::Tensor& cols, const torch::Tensor& rows,
                          int64_t batch, int64_t views) {
  const int64_t n = geo.size(0), n_geo = geo.size(2);
  const int64_t d_sh = color ? color->size(2) : 0;
  const int64_t k = cols.numel(), r = rows.numel();
  const int64_t g = n / (batch * views);
  auto out = torch::empty({batch * g, k, k}, geo.options());
  const T* G = geo.data_ptr<T>();
  const T* Op = opacity ? opacity->data_ptr<T>() : nullptr;
  const T* Cp = color ? color->data_ptr<T>() : nullptr;
  const T* M = moments.data_ptr<T>();
  const int64_t* cs = cols.data_ptr<int64_t>();
  const int64_t* rs = rows.data_ptr<int64_t>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, batch * g, 64, [&](int64_t lo, int64_t hi) {
    std::vector<double> f(r * k), mf(r * k), acc(k * k);
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t bi = bg / g, gi = bg % g;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t vi = 0; vi < views; ++vi) {
        const int64_t row = (bi * views + vi) * g + gi;
        const T* Mr = M + row * kF * kF;
        for (int64_t a = 0; a < r; ++a)
          for (int64_t s = 0; s < k; ++s) f[a * k + s] = double(f_entry(G, Op, Cp, row, n_geo, d_sh, rs[a], cs[s]));
        // mf = M_s F_s
        std::fill(mf.begin(), mf.end(), 0.0);
        for (int64_t c = 0; c < r; ++c) {
          for (int64_t s = 0; s < k; ++s) {
            const double x = f[c * k + s];
            if (x == 0.0) continue;
            for (int64_t a = 0; a < r; ++a) mf[a * k + s] += double(Mr[rs[a] * kF + rs[c]]) * x;
          }
        }
        // acc += F_s^T mf (upper triangle; the block is symmetric)
        for (int64_t a = 0; a < r; ++a) {
          for (int64_t s = 0; s < k; ++s) {
            const double x = f[a * k + s];
            if (x == 0.0) continue;
            const double* m = &mf[a * k];
            double* o = &acc[s * k];
            for (int64_t t = s; t < k; ++t) o[t] += x * m[t];
          }
        }
      }
      T* Ob = O + bg * k * k;
      for (int64_t s = 0; s < k; ++s)
        for (int64_t t = s; t < k; ++t) {
          Ob[s * k + t] = T(acc[s * k + t]);
          Ob[t * k + s] = T(acc[s * k + t]);
        }
    }
  });
  return out;
}

// The products with F, the Jacobian of the projected features in the parameter slots:
// row n = (b, v, g) of F is geo [9, n_geo] (the geometry columns, dense) followed, when
// `opacity` is given, by the factored appearance columns: d(opacity)/d(logit) = opacity[n]
// and dc_k/dsh_kj = color[n, k, j] (slot order: opacity logit, the DC of the three channels,
// then each channel's higher coefficients). p and the cotangent are read and written through
// slots [G, n_i], the flat parameter index of each Gaussian's slots.
template <typename T>
torch::Tensor tangent_impl(const torch::Tensor& geo, const torch::Tensor* opacity, const torch::Tensor* color,
                           const torch::Tensor& p, const torch::Tensor& slots, int64_t views) {
  const int64_t n = geo.size(0), n_geo = geo.size(2);
  const int64_t n_par = p.size(1), g = slots.size(0), n_i = slots.size(1);
  const int64_t d_sh = color ? color->size(2) : 0;
  auto out = torch::empty({n, kF}, geo.options());
  const T* G = geo.data_ptr<T>();
  const T* O = opacity ? opacity->data_ptr<T>() : nullptr;
  const T* C = color ? color->data_ptr<T>() : nullptr;
  const T* P = p.data_ptr<T>();
  const int64_t* S = slots.data_ptr<int64_t>();
  T* Q = out.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t lo, int64_t hi) {
    std::vector<T> ps(n_i);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t gi = row % g, bi = row / (views * g);
      const T* pb = P + bi * n_par;
      const int64_t* sl = S + gi * n_i;
      for (int64_t s = 0; s < n_i; ++s) ps[s] = pb[sl[s]];
      const T* Gr = G + row * kF * n_geo;
      T* q = Q + row * kF;
      for (int f = 0; f < kF; ++f) {
        T acc = 0;
        for (int64_t s = 0; s < n_geo; ++s) acc += Gr[f * n_geo + s] * ps[s];
        q[f] = acc;
      }
      if (O) {
        const T* pa = ps.data() + n_geo;
        q[5] += O[row] * pa[0];
        const T* Cr = C + row * 3 * d_sh;
        for (int c = 0; c < 3; ++c) {
          T acc = Cr[c * d_sh] * pa[1 + c];
          for (int64_t j = 1; j < d_sh; ++j) acc += Cr[c * d_sh + j] * pa[4 + c * (d_sh - 1) + j - 1];
          q[6 + c] += acc;
        }
      }
    }
  });
  return out;
}

template <typename T>
torch::Tensor cotangent_impl(const torch::Tensor& geo, const torch::Tensor* opacity, const torch::Tensor* color,
                             const torch::Tensor& ct, const torch::Tensor& slots, int64_t batch, int64_t views,
                             int64_t n_out) {
  const int64_t n_geo = geo.size(2), g = slots.size(0), n_i = slots.size(1);
  const int64_t d_sh = color ? color->size(2) : 0;
  auto out = torch::zeros({batch, n_out}, geo.options());
  const T* G = geo.data_ptr<T>();
  const T* O = opacity ? opacity->data_ptr<T>() : nullptr;
  const T* C = color ? color->data_ptr<T>() : nullptr;
  const T* U = ct.data_ptr<T>();
  const int64_t* S = slots.data_ptr<int64_t>();
  T* R = out.data_ptr<T>();
  // One task per (b, Gaussian): its views are summed in order, and it alone writes its slots.
  at::parallel_for(0, batch * g, 256, [&](int64_t lo, int64_t hi) {
    std::vector<T> acc(n_i);
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t bi = bg / g, gi = bg % g;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t vi = 0; vi < views; ++vi) {
        const int64_t row = (bi * views + vi) * g + gi;
        const T* Gr = G + row * kF * n_geo;
        const T* u = U + row * kF;
        for (int64_t s = 0; s < n_geo; ++s) {
          T a = 0;
          for (int f = 0; f < kF; ++f) a += Gr[f * n_geo + s] * u[f];
          acc[s] += a;
        }
        if (O) {
          T* pa = acc.data() + n_geo;
          pa[0] += O[row] * u[5];
          const T* Cr = C + row * 3 * d_sh;
          for (int c = 0; c < 3; ++c) {
            pa[1 + c] += Cr[c * d_sh] * u[6 + c];
            for (int64_t j = 1; j < d_sh; ++j) pa[4 + c * (d_sh - 1) + j - 1] += Cr[c * d_sh + j] * u[6 + c];
          }
        }
      }
      T* rb = R + bi * n_out;
      const int64_t* sl = S + gi * n_i;
      for (int64_t s = 0; s < n_i; ++s) rb[sl[s]] = acc[s];
    }
  });
  return out;
}

// z[b, slots[g]] = inv[b, g] r[b, slots[g]] for every block (the block-Jacobi preconditioner's
// application); the other entries of z keep their values. One task per block.
template <typename T>
void block_apply_impl(const torch::Tensor& inv, const torch::Tensor& r, const torch::Tensor& slots,
                      torch::Tensor& z) {
  const int64_t batch = r.size(0), n = r.size(1), g = slots.size(0), k = slots.size(1);
  const T* A = inv.data_ptr<T>();
  const T* R = r.data_ptr<T>();
  const int64_t* S = slots.data_ptr<int64_t>();
  T* Z = z.data_ptr<T>();
  at::parallel_for(0, batch * g, 256, [&](int64_t lo, int64_t hi) {
    std::vector<T> rb(k);
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t bi = bg / g, gi = bg % g;
      const int64_t* sl = S + gi * k;
      const T* rr = R + bi * n;
      for (int64_t j = 0; j < k; ++j) rb[j] = rr[sl[j]];
      const T* Ab = A + bg * k * k;
      T* zz = Z + bi * n;
      for (int64_t i = 0; i < k; ++i) {
        T acc = 0;
        for (int64_t j = 0; j < k; ++j) acc += Ab[i * k + j] * rb[j];
        zz[sl[i]] = acc;
      }
    }
  });
}

// Inverses of small SPD blocks [M, k, k] (plus the diagonal shift [M, k] when given: the
// system's Lambda + mu D, added here instead of in a [M, k, k] copy) by Cholesky (in double), one
// block per task; a block whose factorization meets a non-positive pivot gets the inverse of its
// diagonal instead (flagged in ok = 0), as the PyTorch path of the block preconditioner does.
template <typename T>
std::vector<torch::Tensor> spd_inverse_impl(const torch::Tensor& blocks, const torch::Tensor* shift) {
  const int64_t m = blocks.size(0), k = blocks.size(1);
  auto inv = torch::empty_like(blocks);
  auto ok = torch::ones({m}, blocks.options().dtype(torch::kBool));
  const T* a = blocks.data_ptr<T>();
  const T* sh = shift ? shift->data_ptr<T>() : nullptr;
  T* out = inv.data_ptr<T>();
  bool* good = ok.data_ptr<bool>();
  at::parallel_for(0, m, 64, [&](int64_t lo, int64_t hi) {
    std::vector<double> l(k * k), li(k * k);
    for (int64_t b = lo; b < hi; ++b) {
      const T* A = a + b * k * k;
      const T* Sb = sh ? sh + b * k : nullptr;
      // The shifted diagonal, rounded to T as blocks + diag_embed(shift) would be.
      auto diag = [&](int64_t j) { return double(Sb ? T(A[j * k + j] + Sb[j]) : A[j * k + j]); };
      T* X = out + b * k * k;
      bool pd = true;
      std::fill(l.begin(), l.end(), 0.0);
      for (int64_t j = 0; j < k && pd; ++j) {
        double d = diag(j);
        for (int64_t p = 0; p < j; ++p) d -= l[j * k + p] * l[j * k + p];
        if (!(d > 0.0) || !std::isfinite(d)) { pd = false; break; }
        const double ljj = std::sqrt(d);
        l[j * k + j] = ljj;
        for (int64_t i = j + 1; i < k; ++i) {
          double s = double(A[i * k + j]);
          for (int64_t p = 0; p < j; ++p) s -= l[i * k + p] * l[j * k + p];
          l[i * k + j] = s / ljj;
        }
      }
      if (!pd) {
        good[b] = false;
        for (int64_t i = 0; i < k * k; ++i) X[i] = T(0);
        for (int64_t i = 0; i < k; ++i) {
          const double d = diag(i);
          X[i * k + i] = T(1.0 / std::max(d, double(std::numeric_limits<T>::min())));
        }
        continue;
      }
      // L^-1 (lower triangular), then A^-1 = L^-T L^-1.
      std::fill(li.begin(), li.end(), 0.0);
      for (int64_t j = 0; j < k; ++j) {
        li[j * k + j] = 1.0 / l[j * k + j];
        for (int64_t i = j + 1; i < k; ++i) {
          double s = 0.0;
          for (int64_t p = j; p < i; ++p) s -= l[i * k + p] * li[p * k + j];
          li[i * k + j] = s / l[i * k + i];
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0.0;
          for (int64_t p = i; p < k; ++p) s += li[p * k + i] * li[p * k + j];
          X[i * k + j] = T(s);
          X[j * k + i] = T(s);
        }
      }
    }
  });
  return {inv, ok};
}

std::vector<torch::Tensor> pj_spd_inverse(torch::Tensor blocks, c10::optional<torch::Tensor> shift) {
  check(blocks, "blocks");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), "blocks must be [M, k, k]");
  if (shift) {
    check(*shift, "shift");
    TORCH_CHECK(shift->dim() == 2 && shift->size(0) == blocks.size(0) && shift->size(1) == blocks.size(1) &&
                shift->scalar_type() == blocks.scalar_type(), "shift must be [M, k] of the blocks' dtype");
  }
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "diff3r_pj_spd_inverse", [&] {
    out = spd_inverse_impl<scalar_t>(blocks, shift ? &(*shift) : nullptr);
  });
  return out;
}

std::vector<torch::Tensor> pj_build(torch::Tensor feats, torch::Tensor gid, torch::Tensor pixel,
                                    torch::Tensor px, torch::Tensor py, torch::Tensor bg,
                                    int64_t pixels_per_view, int64_t num_pixels) {
  check(feats, "feats"); check(gid, "gid"); check(pixel, "pixel"); check(px, "px"); check(py, "py");
  check(bg, "bg");
  TORCH_CHECK(feats.dim() == 2 && feats.size(1) == kF, "feats must be [N, 9]");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "diff3r_pj_build", [&] {
    out = build_impl<scalar_t>(feats, gid, pixel, px, py, bg, pixels_per_view, num_pixels);
  });
  return out;
}

torch::Tensor pj_jvp(torch::Tensor q, torch::Tensor gid, torch::Tensor pixel, torch::Tensor g_alpha,
                     torch::Tensor d_alpha, torch::Tensor weight, int64_t num_pixels) {
  check(q, "q"); check_pairs(gid, pixel, g_alpha, d_alpha, weight);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == kF && q.scalar_type() == g_alpha.scalar_type(), "q must be [N, 9]");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "diff3r_pj_jvp", [&] {
    out = jvp_impl<scalar_t>(q, gid, pixel, g_alpha, d_alpha, weight, num_pixels);
  });
  return out;
}

torch::Tensor pj_vjp(torch::Tensor u, torch::Tensor gid, torch::Tensor pixel, torch::Tensor g_alpha,
                     torch::Tensor d_alpha, torch::Tensor weight, int64_t num_rows, int64_t pixels_per_view) {
  check(u, "u"); check_pairs(gid, pixel, g_alpha, d_alpha, weight);
  TORCH_CHECK(u.dim() == 2 && u.size(1) == 3 && u.scalar_type() == g_alpha.scalar_type(), "u must be [pixels, 3]");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "diff3r_pj_vjp", [&] {
    out = vjp_impl<scalar_t>(u, gid, pixel, g_alpha, d_alpha, weight, num_rows, pixels_per_view);
  });
  return out;
}

torch::Tensor pj_gauss_newton(torch::Tensor q, torch::Tensor gid, torch::Tensor pixel, torch::Tensor g_alpha,
                              torch::Tensor d_alpha, torch::Tensor weight, c10::optional<torch::Tensor> wsq,
                              int64_t num_rows, int64_t pixels_per_view) {
  check(q, "q"); check_pairs(gid, pixel, g_alpha, d_alpha, weight);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == kF && q.scalar_type() == g_alpha.scalar_type(), "q must be [N, 9]");
  if (wsq) check(*wsq, "wsq");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "diff3r_pj_gauss_newton", [&] {
    out = gn_impl<scalar_t>(q, gid, pixel, g_alpha, d_alpha, weight, wsq ? &(*wsq) : nullptr, num_rows,
                               pixels_per_view);
  });
  return out;
}

// F's factors against each other: geo [N, 9, n_geo], opacity [N] and color [N, 3, d_sh] (both or
// neither), one dtype. Returns F's column count n_i = n_geo (+ 1 + 3 d_sh with the appearance).
int64_t f_columns(const torch::Tensor& geo, const c10::optional<torch::Tensor>& opacity,
                  const c10::optional<torch::Tensor>& color) {
  TORCH_CHECK(opacity.has_value() == color.has_value(), "opacity and color come together");
  int64_t n_i = geo.size(2);
  if (opacity) {
    check(*opacity, "opacity"); check(*color, "color");
    TORCH_CHECK(opacity->numel() == geo.size(0) && color->dim() == 3 && color->size(0) == geo.size(0) &&
                color->size(1) == 3 && color->size(2) >= 1, "opacity must be [N] and color [N, 3, d_sh]");
    TORCH_CHECK(opacity->scalar_type() == geo.scalar_type() && color->scalar_type() == geo.scalar_type(),
                "F's factors must share one dtype");
    n_i += 1 + 3 * color->size(2);
  }
  return n_i;
}

torch::Tensor pj_blocks(torch::Tensor geo, c10::optional<torch::Tensor> opacity, c10::optional<torch::Tensor> color,
                        torch::Tensor moments, torch::Tensor cols, torch::Tensor rows, int64_t batch, int64_t views) {
  check(geo, "geo"); check(moments, "moments"); check(cols, "cols"); check(rows, "rows");
  TORCH_CHECK(geo.dim() == 3 && geo.size(1) == kF, "geo must be [N, 9, n_geo]");
  TORCH_CHECK(moments.dim() == 3 && moments.size(0) == geo.size(0) && moments.size(1) == kF &&
              moments.size(2) == kF && moments.scalar_type() == geo.scalar_type(),
              "moments must be [N, 9, 9] of geo's dtype");
  TORCH_CHECK(cols.scalar_type() == torch::kInt64 && rows.scalar_type() == torch::kInt64, "cols and rows must be int64");
  TORCH_CHECK(batch > 0 && views > 0 && geo.size(0) % (batch * views) == 0, "N must be batch * views * G");
  const int64_t ns = f_columns(geo, opacity, color);
  auto c = cols.accessor<int64_t, 1>();
  for (int64_t i = 0; i < cols.numel(); ++i) TORCH_CHECK(c[i] >= 0 && c[i] < ns, "cols out of range");
  auto rr = rows.accessor<int64_t, 1>();
  for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(rr[i] >= 0 && rr[i] < kF, "rows out of range");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(geo.scalar_type(), "diff3r_pj_blocks", [&] {
    out = blocks_impl<scalar_t>(geo, opacity ? &(*opacity) : nullptr, color ? &(*color) : nullptr, moments, cols,
                                rows, batch, views);
  });
  return out;
}

// Shapes of F's factors against the slots: geo [N, 9, n_geo], opacity [N] and color [N, 3, d_sh]
// (both or neither), slots [G, n_i] with n_i = n_geo (+ 1 + 3 d_sh with the appearance).
void check_f(const torch::Tensor& geo, const c10::optional<torch::Tensor>& opacity,
             const c10::optional<torch::Tensor>& color, const torch::Tensor& slots, int64_t views) {
  check(geo, "geo"); check(slots, "slots");
  TORCH_CHECK(geo.dim() == 3 && geo.size(1) == kF, "geo must be [N, 9, n_geo]");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kInt64, "slots must be int64 [G, n_i]");
  TORCH_CHECK(views > 0 && slots.size(0) > 0 && geo.size(0) % (views * slots.size(0)) == 0,
              "N must be batch * views * G");
  TORCH_CHECK(slots.size(1) == f_columns(geo, opacity, color), "slots must have one column per column of F");
}

torch::Tensor pj_tangent(torch::Tensor geo, c10::optional<torch::Tensor> opacity, c10::optional<torch::Tensor> color,
                         torch::Tensor p, torch::Tensor slots, int64_t views) {
  check_f(geo, opacity, color, slots, views); check(p, "p");
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == geo.scalar_type() &&
              p.size(0) * views * slots.size(0) == geo.size(0), "p must be [batch, n] of geo's dtype");
  TORCH_CHECK(slots.numel() == 0 || slots.max().item<int64_t>() < p.size(1), "slots out of p's range");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(geo.scalar_type(), "diff3r_pj_tangent", [&] {
    out = tangent_impl<scalar_t>(geo, opacity ? &(*opacity) : nullptr, color ? &(*color) : nullptr, p, slots,
                                 views);
  });
  return out;
}

torch::Tensor pj_cotangent(torch::Tensor geo, c10::optional<torch::Tensor> opacity,
                           c10::optional<torch::Tensor> color, torch::Tensor ct, torch::Tensor slots,
                           int64_t batch, int64_t views, int64_t n_out) {
  check_f(geo, opacity, color, slots, views); check(ct, "ct");
  TORCH_CHECK(ct.dim() == 2 && ct.size(0) == geo.size(0) && ct.size(1) == kF &&
              ct.scalar_type() == geo.scalar_type(), "ct must be [N, 9] of geo's dtype");
  TORCH_CHECK(batch * views * slots.size(0) == geo.size(0), "N must be batch * views * G");
  TORCH_CHECK(slots.numel() == 0 || slots.max().item<int64_t>() < n_out, "slots out of the output's range");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(geo.scalar_type(), "diff3r_pj_cotangent", [&] {
    out = cotangent_impl<scalar_t>(geo, opacity ? &(*opacity) : nullptr, color ? &(*color) : nullptr, ct, slots,
                                   batch, views, n_out);
  });
  return out;
}

torch::Tensor pj_block_apply(torch::Tensor inv, torch::Tensor r, torch::Tensor slots, torch::Tensor z) {
  check(inv, "inv"); check(r, "r"); check(slots, "slots"); check(z, "z");
  TORCH_CHECK(r.dim() == 2 && z.sizes() == r.sizes() && z.scalar_type() == r.scalar_type(), "r and z must be [b, n]");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kInt64, "slots must be int64 [G, k]");
  TORCH_CHECK(inv.dim() == 3 && inv.size(0) == r.size(0) * slots.size(0) && inv.size(1) == slots.size(1) &&
              inv.size(2) == slots.size(1) && inv.scalar_type() == r.scalar_type(),
              "inv must be [b * G, k, k] of r's dtype");
  TORCH_CHECK(slots.numel() == 0 || (slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < r.size(1)),
              "slots out of r's range");
  auto out = z.clone();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "diff3r_pj_block_apply", [&] {
    block_apply_impl<scalar_t>(inv, r, slots, out);
  });
  return out;
}

torch::Tensor pj_moments(torch::Tensor gid, torch::Tensor pixel, torch::Tensor g_alpha,
                         torch::Tensor d_alpha, torch::Tensor weight, c10::optional<torch::Tensor> sqrt_w,
                         int64_t num_rows, int64_t pixels_per_view) {
  check_pairs(gid, pixel, g_alpha, d_alpha, weight);
  if (sqrt_w) check(*sqrt_w, "sqrt_w");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(g_alpha.scalar_type(), "diff3r_pj_moments", [&] {
    out = moments_impl<scalar_t>(gid, pixel, g_alpha, d_alpha, weight,
                                 sqrt_w ? &(*sqrt_w) : nullptr, num_rows, pixels_per_view);
  });
  return out;
}

}  // namespace

void register_pair_jacobian(pybind11::module& m) {
  m.def("pj_build", &pj_build, "per-pair factors of the sparse Jacobian, and the composited colour");
  m.def("pj_jvp", &pj_jvp, "J p over the pairs, from the feature tangents");
  m.def("pj_vjp", &pj_vjp, "J^T u over the pairs, to the feature cotangents");
  m.def("pj_gauss_newton", &pj_gauss_newton, "J^T W J p over the pairs, feature tangents to cotangents");
  m.def("pj_spd_inverse", &pj_spd_inverse, "inverses of small SPD blocks (plus a diagonal shift) by Cholesky "
        "(diagonal fallback)", pybind11::arg("blocks"), pybind11::arg("shift") = pybind11::none());
  m.def("pj_moments", &pj_moments, "per-(view, Gaussian) moments of the pair factors");
  m.def("pj_tangent", &pj_tangent, "F p: feature tangents from parameter tangents");
  m.def("pj_cotangent", &pj_cotangent, "F^T ct summed over views: parameter cotangents");
  m.def("pj_block_apply", &pj_block_apply, "z with each block's entries replaced by inv r (block Jacobi)");
  m.def("pj_blocks", &pj_blocks, "per-Gaussian blocks F^T M F of J^T W J, summed over views");
}
