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
  auto g_alpha = torch::zeros({n, 3}, feats.options());
  auto d_alpha = torch::zeros({n, 6}, feats.options());
  auto weight = torch::zeros({n}, feats.options());
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
  return moments;
}

// Inverses of small SPD blocks [M, k, k] by Cholesky (in double), one block per task; a block
// whose factorization meets a non-positive pivot gets the inverse of its diagonal instead
// (flagged in ok = 0), as the PyTorch path of the block preconditioner does.
template <typename T>
std::vector<torch::Tensor> spd_inverse_impl(const torch::Tensor& blocks) {
  const int64_t m = blocks.size(0), k = blocks.size(1);
  auto inv = torch::empty_like(blocks);
  auto ok = torch::ones({m}, blocks.options().dtype(torch::kBool));
  const T* a = blocks.data_ptr<T>();
  T* out = inv.data_ptr<T>();
  bool* good = ok.data_ptr<bool>();
  at::parallel_for(0, m, 64, [&](int64_t lo, int64_t hi) {
    std::vector<double> l(k * k), li(k * k);
    for (int64_t b = lo; b < hi; ++b) {
      const T* A = a + b * k * k;
      T* X = out + b * k * k;
      bool pd = true;
      std::fill(l.begin(), l.end(), 0.0);
      for (int64_t j = 0; j < k && pd; ++j) {
        double d = double(A[j * k + j]);
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
          const double d = double(A[i * k + i]);
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

std::vector<torch::Tensor> pj_spd_inverse(torch::Tensor blocks) {
  check(blocks, "blocks");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == blocks.size(2), "blocks must be [M, k, k]");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "diff3r_pj_spd_inverse", [&] {
    out = spd_inverse_impl<scalar_t>(blocks);
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
  m.def("pj_spd_inverse", &pj_spd_inverse, "inverses of small SPD blocks by Cholesky (diagonal fallback)");
  m.def("pj_moments", &pj_moments, "per-(view, Gaussian) moments of the pair factors");
}
