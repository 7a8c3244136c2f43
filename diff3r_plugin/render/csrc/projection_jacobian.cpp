// The geometry columns of the projection's Jacobian (diff3r_plugin/layer/projection_jacobian.py),
// one pass per (batch, view, Gaussian) row.
//
// For each row: d(mean2d, conic) / d(mu, log-scales, quaternion), [5, 10], of the EWA projection
// of render/common.py (ewa_terms, project), with the same clamps and the same stand-ins for
// culled Gaussians. With p = R mu + t, z_s = z where z > near_cull (else 1), u = x / z_s,
// v = y / z_s, u_c, v_c clamped to the FoV limits:
//   mean2d = (f_x u + c_x, f_y v + c_y),  du/dmu = (R_0 - u dz) / z_s,  dz = [valid] R_2,
//   m_0 = f_x (R_0 - u_c R_2) / z_s,  m_1 = f_y (R_1 - v_c R_2) / z_s,
//   (a, b, c) = (m_0 S m_0, m_0 S m_1, m_1 S m_1) + 0.3 (a, c),  S = R_q diag(s^2) R_q^T,
//   conic = (c, -b, a) / det,  det = a c - b^2,  d(x / det) = (dx det - x ddet) / det^2.
// The colour rows (view-dependent SH) and the opacity row are left zero here: pj_color_rows
// gives the SH part. Rows are independent, so the result does not depend on the thread count.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int kRows = 9;   // features: mean2d (2), conic (3), opacity, colour (3)
constexpr int kCols = 10;  // means (3), log-scales (3), quaternion (4)
constexpr double kDilation = 0.3;

// R(q) - I of the rotation formula of quat_to_rotmat (homogeneous quadratic in q = wxyz).
template <typename T>
inline void rotation_quadratic(const T* q, T out[3][3]) {
  const T w = q[0], x = q[1], y = q[2], z = q[3];
  out[0][0] = -2 * (y * y + z * z); out[0][1] = 2 * (x * y - w * z); out[0][2] = 2 * (x * z + w * y);
  out[1][0] = 2 * (x * y + w * z); out[1][1] = -2 * (x * x + z * z); out[1][2] = 2 * (y * z - w * x);
  out[2][0] = 2 * (x * z - w * y); out[2][1] = 2 * (y * z + w * x); out[2][2] = -2 * (x * x + y * y);
}

// R_q and dR_q / dq_i of the normalized-quaternion rotation (projection_jacobian.py,
// _rotation_derivatives): q_hat = q / |q| computed as u / |u|, u = q / max|q|, and
// dq_hat / dq = (I - q_hat q_hat^T) / |q|; R - I is quadratic, so its derivative along e is
// (Q(q_hat + e) - Q(q_hat - e)) / 2.
template <typename T>
inline void rotation_derivatives(const T* quat, T rot[3][3], T d_rot[4][3][3]) {
  T peak = 0;
  for (int i = 0; i < 4; ++i) peak = std::max(peak, std::abs(quat[i]));
  const T div = peak > 0 ? peak : T(1);
  T u[4];
  for (int i = 0; i < 4; ++i) u[i] = quat[i] / div;
  const T norm_u = std::max(std::sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2] + u[3] * u[3]), T(1e-12));
  T qh[4];
  for (int i = 0; i < 4; ++i) qh[i] = u[i] / norm_u;
  const T norm_q = norm_u * div;
  T quad[3][3];
  rotation_quadratic(qh, quad);
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c) rot[r][c] = (r == c ? T(1) : T(0)) + quad[r][c];
  for (int i = 0; i < 4; ++i) {
    T plus[4], minus[4];
    for (int j = 0; j < 4; ++j) {
      const T dq = ((i == j ? T(1) : T(0)) - qh[i] * qh[j]) / norm_q;
      plus[j] = qh[j] + dq;
      minus[j] = qh[j] - dq;
    }
    T qp[3][3], qm[3][3];
    rotation_quadratic(plus, qp);
    rotation_quadratic(minus, qm);
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) d_rot[i][r][c] = T(0.5) * (qp[r][c] - qm[r][c]);
  }
}

template <typename T>
inline T dot3(const T* a, const T* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

// One (view, Gaussian) of ewa_terms: camera-space point, the clamped EWA rows m_0, m_1 and the
// dilated 2D covariance (a, b, c), for camera w ([3, 4] world to camera), cm (fx, fy, lim_x,
// lim_y, near_cull, ...), mean mu and covariance sg (row-major 3 x 3). Shared by both kernels,
// so the projection and its Jacobian are built on the same numbers.
template <typename T>
struct EwaPoint {
  T r0[3], r1[3], r2[3];
  T x, y, z, zs, u, t, uc, tc;
  bool valid;
  T m0[3], m1[3], t0[3], t1[3];
  T a, bb, c;

  EwaPoint(const T* w, const T* cm, const T* mu, const T* sg) {
    const T fx = cm[0], fy = cm[1], lim_x = cm[2], lim_y = cm[3], near_cull = cm[4];
    for (int k = 0; k < 3; ++k) {
      r0[k] = w[k];
      r1[k] = w[4 + k];
      r2[k] = w[8 + k];
    }
    x = dot3(r0, mu) + w[3];
    y = dot3(r1, mu) + w[7];
    z = dot3(r2, mu) + w[11];
    valid = z > near_cull;
    zs = valid ? z : T(1);
    u = x / zs;
    t = y / zs;
    uc = std::max(std::min(u, lim_x), -lim_x);
    tc = std::max(std::min(t, lim_y), -lim_y);
    for (int k = 0; k < 3; ++k) {
      m0[k] = (fx / zs) * r0[k] + (-fx * uc / zs) * r2[k];
      m1[k] = (fy / zs) * r1[k] + (-fy * tc / zs) * r2[k];
    }
    for (int i = 0; i < 3; ++i) {
      t0[i] = sg[3 * i] * m0[0] + sg[3 * i + 1] * m0[1] + sg[3 * i + 2] * m0[2];
      t1[i] = sg[3 * i] * m1[0] + sg[3 * i + 1] * m1[1] + sg[3 * i + 2] * m1[2];
    }
    a = dot3(m0, t0) + T(kDilation);
    bb = dot3(m0, t1);
    c = dot3(m1, t1) + T(kDilation);
  }
};

template <typename T>
void columns_impl(const torch::Tensor& means, const torch::Tensor& log_scales, const torch::Tensor& quats,
                  const torch::Tensor& w2c, const torch::Tensor& cam, torch::Tensor& out) {
  const int64_t b = means.size(0), g = means.size(1), v = w2c.size(1);
  const T* mu_p = means.data_ptr<T>();
  const T* ls_p = log_scales.data_ptr<T>();
  const T* q_p = quats.data_ptr<T>();
  const T* w_p = w2c.data_ptr<T>();   // [b, v, 3, 4]
  const T* c_p = cam.data_ptr<T>();   // [b, v, 7]: fx, fy, lim_x, lim_y, near_cull, cx, cy
  T* o_p = out.data_ptr<T>();         // [b, v, g, 9, 10], zero-initialized
  at::parallel_for(0, b * g, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t bi = bg / g, gi = bg % g;
      const T* mu = mu_p + 3 * bg;
      T rq[3][3], drq[4][3][3];
      rotation_derivatives(q_p + 4 * bg, rq, drq);
      T s2[3];
      for (int k = 0; k < 3; ++k) s2[k] = std::exp(2 * ls_p[3 * bg + k]);
      T sigma[3][3];  // (R_q * s^2) R_q^T, as build_covariance
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
          sigma[i][j] = rq[i][0] * s2[0] * rq[j][0] + rq[i][1] * s2[1] * rq[j][1] + rq[i][2] * s2[2] * rq[j][2];
      for (int64_t vi = 0; vi < v; ++vi) {
        const T* cm = c_p + 7 * (bi * v + vi);
        const EwaPoint<T> e(w_p + 12 * (bi * v + vi), cm, mu, &sigma[0][0]);
        const T fx = cm[0], fy = cm[1], lim_x = cm[2], lim_y = cm[3];
        const T* r0 = e.r0; const T* r1 = e.r1; const T* r2 = e.r2;
        const T* m0 = e.m0; const T* m1 = e.m1; const T* t0 = e.t0; const T* t1 = e.t1;
        const bool valid = e.valid;
        const T zs = e.zs, u = e.u, t = e.t, uc = e.uc, tc = e.tc, a = e.a, bb = e.bb, c = e.c;
        const T free_u = (u < lim_x && u > -lim_x) ? T(1) : T(0);
        const T free_t = (t < lim_y && t > -lim_y) ? T(1) : T(0);
        T e0[3], e1[3], dz[3], du[3], dt[3];
        for (int k = 0; k < 3; ++k) {
          e0[k] = r0[k] - uc * r2[k];
          e1[k] = r1[k] - tc * r2[k];
          dz[k] = (valid ? T(1) : T(0)) * r2[k];
        }
        for (int k = 0; k < 3; ++k) {
          du[k] = (r0[k] - u * dz[k]) / zs;
          dt[k] = (r1[k] - t * dz[k]) / zs;
        }

        // d(a, b, c) along the 10 geometry parameters.
        T da[kCols], db[kCols], dc[kCols];
        const T inv_z2 = 1 / (zs * zs);
        for (int j = 0; j < 3; ++j) {  // means: dm0[j] = d m0 / d mu_j
          T dm0[3], dm1[3];
          for (int k = 0; k < 3; ++k) {
            dm0[k] = fx * (-inv_z2 * dz[j] * e0[k] - ((free_u * du[j]) / zs) * r2[k]);
            dm1[k] = fy * (-inv_z2 * dz[j] * e1[k] - ((free_t * dt[j]) / zs) * r2[k]);
          }
          da[j] = 2 * dot3(dm0, t0);
          db[j] = dot3(dm0, t1) + dot3(dm1, t0);
          dc[j] = 2 * dot3(dm1, t1);
        }
        T p0[3], p1[3];  // m . r_k (r_k the columns of R_q)
        for (int k = 0; k < 3; ++k) {
          p0[k] = m0[0] * rq[0][k] + m0[1] * rq[1][k] + m0[2] * rq[2][k];
          p1[k] = m1[0] * rq[0][k] + m1[1] * rq[1][k] + m1[2] * rq[2][k];
        }
        for (int k = 0; k < 3; ++k) {  // log-scales: m dS m'^T = 2 s_k^2 (m . r_k)(m' . r_k)
          da[3 + k] = 2 * s2[k] * p0[k] * p0[k];
          db[3 + k] = 2 * s2[k] * p0[k] * p1[k];
          dc[3 + k] = 2 * s2[k] * p1[k] * p1[k];
        }
        for (int qi = 0; qi < 4; ++qi) {  // quaternion: sum_k s_k^2 ((m . dr_k)(m' . r_k) + ...)
          T sa = 0, sb = 0, sc = 0;
          for (int k = 0; k < 3; ++k) {
            const T q0 = m0[0] * drq[qi][0][k] + m0[1] * drq[qi][1][k] + m0[2] * drq[qi][2][k];
            const T q1 = m1[0] * drq[qi][0][k] + m1[1] * drq[qi][1][k] + m1[2] * drq[qi][2][k];
            sa += s2[k] * q0 * p0[k];
            sb += s2[k] * (q0 * p1[k] + p0[k] * q1);
            sc += s2[k] * q1 * p1[k];
          }
          da[6 + qi] = 2 * sa;
          db[6 + qi] = sb;
          dc[6 + qi] = 2 * sc;
        }

        const T det = a * c - bb * bb;
        const bool ok = valid && det > 0;
        const T dets = ok ? det : T(1);
        const T inv2 = 1 / (dets * dets);
        T* row = o_p + (((bi * v + vi) * g + gi) * kRows) * kCols;
        for (int k = 0; k < 3; ++k) {
          row[0 * kCols + k] = fx * du[k];
          row[1 * kCols + k] = fy * dt[k];
        }
        for (int j = 0; j < kCols; ++j) {
          const T ddet = (ok ? T(1) : T(0)) * (da[j] * c + a * dc[j] - 2 * bb * db[j]);
          row[2 * kCols + j] = (dc[j] * dets - c * ddet) * inv2;
          row[3 * kCols + j] = -(db[j] * dets - bb * ddet) * inv2;
          row[4 * kCols + j] = (da[j] * dets - a * ddet) * inv2;
        }
      }
    }
  });
}

// Values of the EWA projection (render/common.py, ewa_terms and project) per (batch, view,
// Gaussian) row: [mx, my, conic (3), cov2d (3), z, valid], with the same clamps and stand-ins.
template <typename T>
void project_impl(const torch::Tensor& means, const torch::Tensor& covariances, const torch::Tensor& w2c,
                  const torch::Tensor& cam, torch::Tensor& out) {
  const int64_t b = means.size(0), g = means.size(1), v = w2c.size(1);
  const T* mu_p = means.data_ptr<T>();
  const T* s_p = covariances.data_ptr<T>();  // [b, g, 3, 3]
  const T* w_p = w2c.data_ptr<T>();
  const T* c_p = cam.data_ptr<T>();          // [b, v, 7]: fx, fy, lim_x, lim_y, near_cull, cx, cy
  T* o_p = out.data_ptr<T>();                // [b, v, g, 10]
  at::parallel_for(0, b * v * g, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t bi = row / (v * g), vi = (row / g) % v, gi = row % g;
      const int64_t bg = bi * g + gi;
      const T* mu = mu_p + 3 * bg;
      const T* sg = s_p + 9 * bg;
      const T* cm = c_p + 7 * (bi * v + vi);
      const EwaPoint<T> e(w_p + 12 * (bi * v + vi), cm, mu, sg);
      const T fx = cm[0], fy = cm[1];
      const T u = e.u, t = e.t, z = e.z, a = e.a, bb = e.bb, c = e.c;
      const bool valid = e.valid;
      const T det = a * c - bb * bb;
      const bool ok = valid && det > 0;
      const T dets = ok ? det : T(1);
      T* o = o_p + 10 * row;
      o[0] = fx * u + cm[5];
      o[1] = fy * t + cm[6];
      o[2] = c / dets; o[3] = -bb / dets; o[4] = a / dets;
      o[5] = a; o[6] = bb; o[7] = c;
      o[8] = z;
      o[9] = ok ? T(1) : T(0);
    }
  });
}

void check(const torch::Tensor& t, const char* name, int64_t dim, int64_t last) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.dim() == dim && t.size(dim - 1) == last, name, " must have ", dim, " axes, the last of size ",
              last);
}

}  // namespace

// means, log_scales [b, g, 3], quats [b, g, 4], w2c [b, v, 3, 4] (world to camera),
// cam [b, v, 7] = (fx, fy, lim_x, lim_y, near_cull, cx, cy) -> [b, v, g, 9, 10].
torch::Tensor pj_geometry_columns(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                  torch::Tensor w2c, torch::Tensor cam) {
  check(means, "means", 3, 3); check(log_scales, "log_scales", 3, 3); check(quats, "quats", 3, 4);
  check(cam, "cam", 3, 7);
  TORCH_CHECK(w2c.device().is_cpu() && w2c.is_contiguous() && w2c.dim() == 4 && w2c.size(2) == 3 &&
              w2c.size(3) == 4, "w2c must be a contiguous CPU tensor [b, v, 3, 4]");
  const int64_t b = means.size(0), g = means.size(1), v = w2c.size(1);
  TORCH_CHECK(log_scales.size(0) == b && log_scales.size(1) == g && quats.size(0) == b && quats.size(1) == g,
              "means, log_scales and quats must share [b, g]");
  TORCH_CHECK(w2c.size(0) == b && cam.size(0) == b && cam.size(1) == v, "w2c and cam must share [b, v]");
  const auto dtype = means.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64, "float32 or float64 expected");
  TORCH_CHECK(log_scales.scalar_type() == dtype && quats.scalar_type() == dtype && w2c.scalar_type() == dtype &&
              cam.scalar_type() == dtype, "the inputs must share one dtype");
  auto out = torch::zeros({b, v, g, kRows, kCols}, means.options());
  if (dtype == torch::kFloat64) {
    columns_impl<double>(means, log_scales, quats, w2c, cam, out);
  } else {
    columns_impl<float>(means, log_scales, quats, w2c, cam, out);
  }
  return out;
}

// means [b, g, 3], covariances [b, g, 3, 3], w2c [b, v, 3, 4],
// cam [b, v, 7] = (fx, fy, lim_x, lim_y, near_cull, cx, cy) -> [b, v, g, 10].
torch::Tensor pj_project(torch::Tensor means, torch::Tensor covariances, torch::Tensor w2c, torch::Tensor cam) {
  check(means, "means", 3, 3); check(cam, "cam", 3, 7);
  TORCH_CHECK(covariances.device().is_cpu() && covariances.is_contiguous() && covariances.dim() == 4 &&
              covariances.size(2) == 3 && covariances.size(3) == 3,
              "covariances must be a contiguous CPU tensor [b, g, 3, 3]");
  TORCH_CHECK(w2c.device().is_cpu() && w2c.is_contiguous() && w2c.dim() == 4 && w2c.size(2) == 3 &&
              w2c.size(3) == 4, "w2c must be a contiguous CPU tensor [b, v, 3, 4]");
  const int64_t b = means.size(0), g = means.size(1), v = w2c.size(1);
  TORCH_CHECK(covariances.size(0) == b && covariances.size(1) == g, "means and covariances must share [b, g]");
  TORCH_CHECK(w2c.size(0) == b && cam.size(0) == b && cam.size(1) == v, "w2c and cam must share [b, v]");
  const auto dtype = means.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64, "float32 or float64 expected");
  TORCH_CHECK(covariances.scalar_type() == dtype && w2c.scalar_type() == dtype && cam.scalar_type() == dtype,
              "the inputs must share one dtype");
  auto out = torch::empty({b, v, g, 10}, means.options());
  if (dtype == torch::kFloat64) {
    project_impl<double>(means, covariances, w2c, cam, out);
  } else {
    project_impl<float>(means, covariances, w2c, cam, out);
  }
  return out;
}

namespace {

// The SH constants of diff3r_plugin/geometry/sh.py (the rasterizers' real SH basis).
constexpr double kC1 = 0.4886025119029199;
constexpr double kC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
constexpr double kC3[7] = {-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277, -0.5900435899266435};

// dY_j / d(x, y, z) of the basis polynomials of sh_basis_values up to degree 3, [16][3].
template <typename T>
inline void sh_basis_gradient(T x, T y, T z, int degree, T out[16][3]) {
  const T c1 = T(kC1);
  T* o = &out[0][0];
  for (int i = 0; i < 48; ++i) o[i] = T(0);
  if (degree > 0) {
    out[1][1] = -c1; out[2][2] = c1; out[3][0] = -c1;
  }
  if (degree > 1) {
    const T c0 = T(kC2[0]), c1b = T(kC2[1]), c2 = T(kC2[2]), c3 = T(kC2[3]), c4 = T(kC2[4]);
    out[4][0] = c0 * y; out[4][1] = c0 * x;
    out[5][1] = c1b * z; out[5][2] = c1b * y;
    out[6][0] = c2 * (-2 * x); out[6][1] = c2 * (-2 * y); out[6][2] = c2 * (4 * z);
    out[7][0] = c3 * z; out[7][2] = c3 * x;
    out[8][0] = c4 * (2 * x); out[8][1] = c4 * (-2 * y);
  }
  if (degree > 2) {
    const T xx = x * x, yy = y * y, zz = z * z;
    const T a0 = T(kC3[0]), a1 = T(kC3[1]), a2 = T(kC3[2]), a3 = T(kC3[3]), a4 = T(kC3[4]), a5 = T(kC3[5]),
            a6 = T(kC3[6]);
    // y (3xx - yy)
    out[9][0] = a0 * (6 * x * y); out[9][1] = a0 * (3 * xx - 3 * yy);
    // x y z
    out[10][0] = a1 * (y * z); out[10][1] = a1 * (x * z); out[10][2] = a1 * (x * y);
    // y (4zz - xx - yy)
    out[11][0] = a2 * (-2 * x * y); out[11][1] = a2 * (4 * zz - xx - 3 * yy); out[11][2] = a2 * (8 * y * z);
    // z (2zz - 3xx - 3yy)
    out[12][0] = a3 * (-6 * x * z); out[12][1] = a3 * (-6 * y * z); out[12][2] = a3 * (6 * zz - 3 * xx - 3 * yy);
    // x (4zz - xx - yy)
    out[13][0] = a4 * (4 * zz - 3 * xx - yy); out[13][1] = a4 * (-2 * x * y); out[13][2] = a4 * (8 * x * z);
    // z (xx - yy)
    out[14][0] = a5 * (2 * x * z); out[14][1] = a5 * (-2 * y * z); out[14][2] = a5 * (xx - yy);
    // x (xx - 3yy)
    out[15][0] = a6 * (3 * xx - 3 * yy); out[15][1] = a6 * (-6 * x * y);
  }
}

// The colour rows d colour / d mu [b, v, g, 3, 3] of a view-dependent SH colour
// c_k = max(0, sum_j h_kj Y_j(d) + 0.5), d = (mu - o) / |mu - o|:
//   dc_k / dmu = [c_k > 0] (I - d d^T) (sum_j h_kj dY_j / dd) / |mu - o|,
// with the basis's axes (x, y, z) = (d_0, d_1, d_2) for "3dgs" and (d_2, d_0, d_1) for "e3nn".
template <typename T>
void color_rows_impl(const torch::Tensor& means, const torch::Tensor& harmonics, const torch::Tensor& campos,
                     const torch::Tensor& color, int degree, bool e3nn, torch::Tensor& out) {
  const int64_t b = means.size(0), g = means.size(1), v = campos.size(1), d_sh = harmonics.size(3);
  const int64_t k = (degree + 1) * (degree + 1);
  const T* M = means.data_ptr<T>();
  const T* H = harmonics.data_ptr<T>();
  const T* O = campos.data_ptr<T>();
  const T* C = color.data_ptr<T>();
  T* R = out.data_ptr<T>();
  at::parallel_for(0, b * v * g, 1024, [&](int64_t lo, int64_t hi) {
    T grad[16][3];
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t gi = row % g, vi = (row / g) % v, bi = row / (g * v);
      const T* mu = M + (bi * g + gi) * 3;
      const T* o = O + (bi * v + vi) * 3;
      const T rel[3] = {mu[0] - o[0], mu[1] - o[1], mu[2] - o[2]};
      const T dist = std::max(std::sqrt(rel[0] * rel[0] + rel[1] * rel[1] + rel[2] * rel[2]), T(1e-12));
      const T d[3] = {rel[0] / dist, rel[1] / dist, rel[2] / dist};
      // Basis axes from the direction, and back (perm[e] = basis axis of direction component e).
      const int perm[3] = {e3nn ? 1 : 0, e3nn ? 2 : 1, e3nn ? 0 : 2};
      T axes[3];
      for (int e = 0; e < 3; ++e) axes[perm[e]] = d[e];
      sh_basis_gradient(axes[0], axes[1], axes[2], degree, grad);
      const T* h = H + (bi * g + gi) * 3 * d_sh;
      const T* col = C + row * 3;
      T* r = R + row * 9;
      for (int c = 0; c < 3; ++c) {
        T gd[3] = {0, 0, 0};
        for (int64_t j = 1; j < k; ++j) {
          const T hj = h[c * d_sh + j];
          for (int e = 0; e < 3; ++e) gd[e] += hj * grad[j][perm[e]];
        }
        const T dot = gd[0] * d[0] + gd[1] * d[1] + gd[2] * d[2];
        const T lit = col[c] > T(0) ? T(1) : T(0);
        for (int e = 0; e < 3; ++e) r[3 * c + e] = lit * (gd[e] - dot * d[e]) / dist;
      }
    }
  });
}

}  // namespace

// means [b, g, 3], harmonics [b, g, 3, d_sh], campos [b, v, 3] (camera centres), color [b, v, g, 3]
// (the projected colours: their zeros are where the clamp cuts the derivative), degree in 1..3
// -> the colour rows d colour / d means [b, v, g, 3, 3].
torch::Tensor pj_color_rows(torch::Tensor means, torch::Tensor harmonics, torch::Tensor campos, torch::Tensor color,
                            int64_t degree, bool e3nn) {
  check(means, "means", 3, 3); check(campos, "campos", 3, 3); check(color, "color", 4, 3);
  TORCH_CHECK(harmonics.device().is_cpu() && harmonics.is_contiguous() && harmonics.dim() == 4 &&
              harmonics.size(2) == 3, "harmonics must be a contiguous CPU tensor [b, g, 3, d_sh]");
  const int64_t b = means.size(0), g = means.size(1), v = campos.size(1);
  TORCH_CHECK(harmonics.size(0) == b && harmonics.size(1) == g, "means and harmonics must share [b, g]");
  TORCH_CHECK(campos.size(0) == b && color.size(0) == b && color.size(1) == v && color.size(2) == g,
              "campos must be [b, v, 3] and color [b, v, g, 3]");
  TORCH_CHECK(degree >= 1 && degree <= 3 && harmonics.size(3) >= (degree + 1) * (degree + 1),
              "degree must be in 1..3 and harmonics must hold its coefficients");
  const auto dtype = means.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64, "float32 or float64 expected");
  TORCH_CHECK(harmonics.scalar_type() == dtype && campos.scalar_type() == dtype && color.scalar_type() == dtype,
              "the inputs must share one dtype");
  auto out = torch::empty({b, v, g, 3, 3}, means.options());
  if (dtype == torch::kFloat64) {
    color_rows_impl<double>(means, harmonics, campos, color, int(degree), e3nn, out);
  } else {
    color_rows_impl<float>(means, harmonics, campos, color, int(degree), e3nn, out);
  }
  return out;
}

void register_projection_jacobian(pybind11::module& m) {
  m.def("pj_color_rows", &pj_color_rows,
        "d colour / d means of a view-dependent SH colour per (batch, view, Gaussian)");
  m.def("pj_project", &pj_project, "values of the EWA projection per (batch, view, Gaussian)");
  m.def("pj_geometry_columns", &pj_geometry_columns,
        "d(mean2d, conic) / d(means, log-scales, quaternion) per (batch, view, Gaussian)");
}
