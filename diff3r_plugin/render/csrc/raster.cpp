// CPU kernels of the torch backend's pair-list renderer (diff3r_plugin/render/native.py).
//
// Same arithmetic as the pure-PyTorch path in torch_backend.py, one pass over the pairs instead
// of one pass per elementwise op:
//   power  = -0.5 (a dx^2 + c dy^2) - b dx dy,   dx = mx - px, dy = my - py
//   alpha  = min(0.99, o exp(power)),  pairs with alpha < 1/255 (or power > 0) are not planned
//   T_i    = prod_{j < i, same pixel} (1 - alpha_j)   (in double)
//   stop before the first pair with T_i (1 - alpha_i) < 1e-4
//   acc    = sum_i alpha_i T_i [r_i, g_i, b_i, z_i, 1]
// Attribute rows (N x 10): mx, my, a, b, c, o, r, g, b, z.

#include <torch/extension.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.99;
constexpr double kTMin = 1e-4;
constexpr int kCols = 10;

template <typename T>
inline T pair_power(const T* a, T px, T py) {
  const T dx = a[0] - px;
  const T dy = a[1] - py;
  return T(-0.5) * (a[2] * dx * dx + a[4] * dy * dy) - a[3] * dx * dy;
}

// Pairs of the planned Gaussians, sorted by pixel and front to back inside each pixel. Gaussians
// with an empty box are skipped; the others are taken view by view in increasing depth (ties by
// index, as a stable sort), and a counting sort by pixel keeps that order inside every pixel.
// Views share no pixel and no Gaussian row, so each view is planned on its own (in parallel) and
// the views' pair lists are concatenated: the same plan as one serial pass.
template <typename T>
std::vector<torch::Tensor> plan_impl(const torch::Tensor& box, const torch::Tensor& packed,
                                     const torch::Tensor& depth, int64_t per_view, int64_t h,
                                     int64_t w, int64_t num_pixels) {
  const int64_t* bx = box.data_ptr<int64_t>();  // nx, ny, x0, y0, flat view (nx * ny = 0: skip)
  const T* pk = packed.data_ptr<T>();           // mx, my, a, b, c, o
  const T* dp = depth.data_ptr<T>();
  const int64_t n = depth.numel();
  const int64_t pv = std::max<int64_t>(per_view, 1);
  const int64_t hw = h * w;
  const int64_t views = (n + pv - 1) / pv;
  for (int64_t g = 0; g < n; ++g)
    TORCH_CHECK(bx[5 * g] * bx[5 * g + 1] == 0 || bx[5 * g + 4] == g / pv,
                "plan: box[g, 4] must be the view of row g (g // per_view)");
  TORCH_CHECK(views * hw <= num_pixels || n == 0, "plan: num_pixels is smaller than views * h * w");
  const T amin = T(kAlphaMin), amax = T(kAlphaMax);
  // Per view: its pairs' Gaussians in pixel order, and the run start of each of its pixels.
  std::vector<std::vector<int64_t>> vgid(views), vstart(views);
  at::parallel_for(0, views, 1, [&](int64_t v0, int64_t v1) {
    std::vector<int64_t> order, kept_pix, kept_gid;
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t lo = v * pv, hi = std::min(n, lo + pv);
      order.clear();
      int64_t box_pixels = 0;
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t cnt = bx[5 * g] * bx[5 * g + 1];
        if (cnt > 0) {
          order.push_back(g);
          box_pixels += cnt;
        }
      }
      std::stable_sort(order.begin(), order.end(), [dp](int64_t a, int64_t b) { return dp[a] < dp[b]; });
      kept_pix.clear();
      kept_gid.clear();
      kept_pix.reserve(box_pixels);
      kept_gid.reserve(box_pixels);
      std::vector<int64_t>& start = vstart[v];
      start.assign(hw + 1, 0);
      for (const int64_t g : order) {
        const int64_t* b = bx + 5 * g;
        const T* p = pk + 6 * g;
        // o exp(power) >= 1/255 <=> power >= log(1 / (255 o)). Away from that threshold (by far
        // more than exp's rounding) the test is decided without exp; near it, exactly as in the
        // PyTorch path, so both give the same pairs.
        const double thr = std::log(kAlphaMin / std::max(double(p[5]), 1e-300));
        for (int64_t y = b[3]; y < b[3] + b[1]; ++y) {
          const T dy = p[1] - T(y);
          for (int64_t x = b[2]; x < b[2] + b[0]; ++x) {
            const T dx = p[0] - T(x);
            const T power = T(-0.5) * (p[2] * dx * dx + p[4] * dy * dy) - p[3] * dx * dy;
            if (power > T(0)) continue;
            const double pw = double(power);
            if (pw < thr - 1e-3) continue;
            if (pw <= thr + 1e-3 && !(std::min(p[5] * std::exp(power), amax) >= amin)) continue;
            const int64_t local = y * w + x;
            kept_pix.push_back(local);
            kept_gid.push_back(g);
            ++start[local + 1];
          }
        }
      }
      for (int64_t i = 0; i < hw; ++i) start[i + 1] += start[i];  // run starts
      std::vector<int64_t>& gids = vgid[v];
      gids.resize(kept_pix.size());
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (size_t i = 0; i < kept_pix.size(); ++i) gids[next[kept_pix[i]]++] = kept_gid[i];
    }
  });
  std::vector<int64_t> offset(views + 1, 0);
  for (int64_t v = 0; v < views; ++v) offset[v + 1] = offset[v] + static_cast<int64_t>(vgid[v].size());
  const int64_t total = offset[views];
  auto lopt = torch::TensorOptions().dtype(torch::kInt64);
  auto gid = torch::empty({total}, lopt), pix = torch::empty({total}, lopt);
  auto seg = torch::empty({total}, lopt);
  auto px = torch::empty({total}, packed.options()), py = torch::empty({total}, packed.options());
  int64_t* gid_p = gid.data_ptr<int64_t>();
  int64_t* pix_p = pix.data_ptr<int64_t>();
  int64_t* seg_p = seg.data_ptr<int64_t>();
  T* px_p = px.data_ptr<T>();
  T* py_p = py.data_ptr<T>();
  // Per-pixel fields, written run by run (sequential, no division per pair).
  at::parallel_for(0, views, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t off = offset[v];
      std::copy(vgid[v].begin(), vgid[v].end(), gid_p + off);
      const std::vector<int64_t>& start = vstart[v];
      for (int64_t l = 0; l < hw; ++l) {
        const int64_t a = off + start[l], e = off + start[l + 1];
        if (a == e) continue;
        const T fx = T(l % w), fy = T(l / w);
        for (int64_t k = a; k < e; ++k) {
          pix_p[k] = v * hw + l;
          seg_p[k] = a;
          px_p[k] = fx;
          py_p[k] = fy;
        }
      }
    }
  });
  return {gid, pix, seg, px, py};
}

template <typename T>
torch::Tensor forward_impl(const torch::Tensor& attrs, const torch::Tensor& gid,
                           const torch::Tensor& pixel, const torch::Tensor& px,
                           const torch::Tensor& py, int64_t num_pixels) {
  const T* at = attrs.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* xs = px.data_ptr<T>();
  const T* ys = py.data_ptr<T>();
  const int64_t n = gid.numel();
  auto acc = torch::zeros({num_pixels, 5}, attrs.options());
  T* out = acc.data_ptr<T>();
  const T amax = T(kAlphaMax), tmin = T(kTMin);
  diff3r::parallel_pixels(n, pix, [&](int64_t lo, int64_t hi) {
  int64_t i = lo;
  while (i < hi) {
    const int64_t q = pix[i];
    int64_t end = i;
    while (end < hi && pix[end] == q) ++end;
    double td = 1.0;
    double s[5] = {0, 0, 0, 0, 0};
    for (int64_t k = i; k < end; ++k) {
      const T* a = at + kCols * g[k];
      const T alpha = std::min(a[5] * std::exp(pair_power(a, xs[k], ys[k])), amax);
      const T t = T(td);
      if (!(t * (T(1) - alpha) >= tmin)) break;  // keep is a prefix of the pixel's list
      const T wgt = alpha * t;
      s[0] += wgt * a[6];
      s[1] += wgt * a[7];
      s[2] += wgt * a[8];
      s[3] += wgt * a[9];
      s[4] += wgt;
      td *= 1.0 - double(alpha);
    }
    for (int c = 0; c < 5; ++c) out[5 * q + c] = T(s[c]);
    i = end;
  }
  });
  return acc;
}

template <typename T>
torch::Tensor backward_impl(const torch::Tensor& attrs, const torch::Tensor& gid,
                            const torch::Tensor& pixel, const torch::Tensor& px,
                            const torch::Tensor& py, const torch::Tensor& grad_acc,
                            int64_t pixels_per_view) {
  const T* at = attrs.data_ptr<T>();
  const int64_t* g = gid.data_ptr<int64_t>();
  const int64_t* pix = pixel.data_ptr<int64_t>();
  const T* xs = px.data_ptr<T>();
  const T* ys = py.data_ptr<T>();
  const T* go = grad_acc.data_ptr<T>();
  const int64_t n = gid.numel();
  auto grad = torch::zeros_like(attrs);
  T* gr = grad.data_ptr<T>();
  const T amax = T(kAlphaMax), tmin = T(kTMin);
  // Whole views per task: a Gaussian row's pairs all lie in its view, so no two tasks add to
  // the same row.
  diff3r::parallel_views(n, pix, pixels_per_view, [&](int64_t lo, int64_t hi) {
  std::vector<double> trans, alphas, raws, exps, dots;
  int64_t i = lo;
  while (i < hi) {
    const int64_t q = pix[i];
    int64_t end = i;
    while (end < hi && pix[end] == q) ++end;
    const T* G = go + 5 * q;
    trans.clear(); alphas.clear(); raws.clear(); exps.clear(); dots.clear();
    double td = 1.0;
    for (int64_t k = i; k < end; ++k) {
      const T* a = at + kCols * g[k];
      const T e = std::exp(pair_power(a, xs[k], ys[k]));
      const T raw = a[5] * e;
      const T alpha = std::min(raw, amax);
      const T t = T(td);
      if (!(t * (T(1) - alpha) >= tmin)) break;
      trans.push_back(double(t));
      alphas.push_back(double(alpha));
      raws.push_back(double(raw));
      exps.push_back(double(e));
      dots.push_back(double(G[0]) * a[6] + double(G[1]) * a[7] + double(G[2]) * a[8] +
                     double(G[3]) * a[9] + double(G[4]));
      td *= 1.0 - double(alpha);
    }
    // Back to front: S = sum_{k > j} w_k (G . f_k); dL/dalpha_j = T_j (G . f_j) - S / (1 - alpha_j).
    double s = 0.0;
    for (int64_t j = static_cast<int64_t>(trans.size()) - 1; j >= 0; --j) {
      const int64_t k = i + j;
      const T* a = at + kCols * g[k];
      T* d = gr + kCols * g[k];
      const double wgt = double(T(T(alphas[j]) * T(trans[j])));
      const double dalpha = trans[j] * dots[j] - s / (1.0 - alphas[j]);
      s += wgt * dots[j];
      d[6] += T(wgt * G[0]);
      d[7] += T(wgt * G[1]);
      d[8] += T(wgt * G[2]);
      d[9] += T(wgt * G[3]);
      if (raws[j] > double(amax)) continue;  // clamped: no gradient through o exp(power)
      const double e = exps[j];
      const double dpow = dalpha * raws[j];
      const double dx = double(a[0]) - xs[k], dy = double(a[1]) - ys[k];
      d[0] += T(-dpow * (a[2] * dx + a[3] * dy));
      d[1] += T(-dpow * (a[4] * dy + a[3] * dx));
      d[2] += T(-0.5 * dpow * dx * dx);
      d[3] += T(-dpow * dx * dy);
      d[4] += T(-0.5 * dpow * dy * dy);
      d[5] += T(dalpha * e);
    }
    i = end;
  }
  });
  return grad;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

std::vector<torch::Tensor> plan(torch::Tensor box, torch::Tensor packed, torch::Tensor depth,
                                int64_t per_view, int64_t h, int64_t w, int64_t num_pixels) {
  check(box, "box"); check(packed, "packed"); check(depth, "depth");
  TORCH_CHECK(box.scalar_type() == torch::kInt64 && box.size(0) == depth.numel() &&
              packed.size(0) == depth.numel() && packed.scalar_type() == depth.scalar_type(),
              "plan: box [N, 5] int64, packed [N, 6] and depth [N] of one dtype");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "diff3r_plan", [&] {
    out = plan_impl<scalar_t>(box, packed, depth, per_view, h, w, num_pixels);
  });
  return out;
}

torch::Tensor composite_forward(torch::Tensor attrs, torch::Tensor gid, torch::Tensor pixel,
                                torch::Tensor px, torch::Tensor py, int64_t num_pixels) {
  check(attrs, "attrs"); check(gid, "gid"); check(pixel, "pixel"); check(px, "px"); check(py, "py");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(attrs.scalar_type(), "diff3r_composite_forward", [&] {
    out = forward_impl<scalar_t>(attrs, gid, pixel, px, py, num_pixels);
  });
  return out;
}

torch::Tensor composite_backward(torch::Tensor attrs, torch::Tensor gid, torch::Tensor pixel,
                                 torch::Tensor px, torch::Tensor py, torch::Tensor grad_acc,
                                 int64_t pixels_per_view) {
  check(attrs, "attrs"); check(grad_acc, "grad_acc");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(attrs.scalar_type(), "diff3r_composite_backward", [&] {
    out = backward_impl<scalar_t>(attrs, gid, pixel, px, py, grad_acc, pixels_per_view);
  });
  return out;
}

}  // namespace

void register_pair_jacobian(pybind11::module& m);  // pair_jacobian.cpp
void register_projection_jacobian(pybind11::module& m);  // projection_jacobian.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_pair_jacobian(m);
  register_projection_jacobian(m);
  m.def("plan", &plan, "sorted (pixel, Gaussian) pairs");
  m.def("composite_forward", &composite_forward, "front-to-back compositing of planned pairs");
  m.def("composite_backward", &composite_backward, "reverse-mode derivative of composite_forward");
}
