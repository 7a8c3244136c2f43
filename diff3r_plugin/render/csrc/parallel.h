// Parallel passes over a sorted pair list (shared by raster.cpp and pair_jacobian.cpp).
//
// Pairs are sorted by pixel, pixels are view-major (pixel = view * pixels_per_view + y w + x),
// and a row of the per-(view, Gaussian) attributes only has pairs in its own view's pixels. So
//   * a chunk of whole pixels computes its pixels' values alone (pixel-side sums), and
//   * a chunk of whole views also owns every row its pairs touch (Gaussian-side sums).
// Both kinds of chunk are processed in the serial order inside, so a result does not depend on
// the number of threads: it is the serial result, bit for bit.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace diff3r {

// Moves a chunk boundary of the pair range to the start of a pixel's list, so that parallel
// chunks own whole pixels (both neighbours of a boundary move it to the same place).
inline int64_t pixel_aligned(const int64_t* pix, int64_t k, int64_t n) {
  while (k > 0 && k < n && pix[k] == pix[k - 1]) ++k;
  return k;
}

constexpr int64_t kGrainPairs = 1 << 13;  // fewer pairs than this per chunk: not worth a task

// body(lo, hi) over contiguous pair ranges of whole pixels, one per thread (at most).
template <typename F>
void parallel_pixels(int64_t n, const int64_t* pix, F body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrainPairs));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = pixel_aligned(pix, n * c / chunks, n);
      const int64_t hi = pixel_aligned(pix, n * (c + 1) / chunks, n);
      if (lo < hi) body(lo, hi);
    }
  });
}

// body(lo, hi) over contiguous pair ranges of whole views. pixels_per_view <= 0: one range.
template <typename F>
void parallel_views(int64_t n, const int64_t* pix, int64_t pixels_per_view, F body) {
  if (n == 0) return;
  TORCH_CHECK(std::is_sorted(pix, pix + n), "the pairs must be sorted by pixel");
  const int64_t views = pixels_per_view > 0 ? pix[n - 1] / pixels_per_view + 1 : 1;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), views, std::max<int64_t>(1, n / kGrainPairs)}));
  if (chunks == 1) {
    body(int64_t(0), n);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t vlo = views * c / chunks, vhi = views * (c + 1) / chunks;
      const int64_t lo = std::lower_bound(pix, pix + n, vlo * pixels_per_view) - pix;
      const int64_t hi = std::lower_bound(pix, pix + n, vhi * pixels_per_view) - pix;
      if (lo < hi) body(lo, hi);
    }
  });
}

}  // namespace diff3r
