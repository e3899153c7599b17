//! Bilinear resizing exactly as Pillow does it, which is what torchvision's `Resize` runs on the PIL images
//! the official code feeds it (`F.resize` → `PIL.Image.resize(size, BILINEAR)`).
//!
//! Pillow's resampler (`src/libImaging/Resample.c`, unchanged in this respect since Pillow 4.3) is a
//! separable convolution with a triangle filter whose support grows with the scale factor on downscaling
//! (this is the "antialias" that torchvision's tensor path imitates with `antialias=True`):
//!
//! ```text
//! scale   = in / out;  filterscale = max(scale, 1);  support = 1 · filterscale
//! center  = (x_out + 0.5) · scale
//! taps    = [trunc(center − support + 0.5), trunc(center + support + 0.5)) ∩ [0, in)
//! w(x_in) = max(0, 1 − |(x_in − center + 0.5) / filterscale|), normalised to sum 1
//! ```
//!
//! Weights are turned into 22-bit fixed point (`PRECISION_BITS = 32 − 8 − 2`), each pass accumulates from
//! `1 << 21` (rounding), shifts right by 22 and clamps to 0..=255. The horizontal pass runs first, over only
//! the rows the vertical pass will read, and its result is rounded to uint8 before the vertical pass. Doing
//! the same here gives byte-identical output (`tests/data.rs`, tolerance 0).

use super::RawImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps for one axis: per output position, the first input index and its weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter, box = whole axis.
fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 × filterscale
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; then clamp.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                (1.0 - t.abs()).max(0.0)
            })
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        for (x, w) in k.iter().enumerate() {
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if *w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `out_width × out_height` with Pillow's BILINEAR filter (antialiased when shrinking).
/// Same size returns a copy, as Pillow does; a zero-sized output is an empty image.
pub fn resize_bilinear(img: &RawImage, out_width: usize, out_height: usize) -> RawImage {
    let (w, h, c) = (img.width(), img.height(), img.channels());
    if out_width == 0 || out_height == 0 {
        return RawImage::zeros(out_width, out_height, c);
    }
    let horiz = precompute(w, out_width);
    let vert = precompute(h, out_height);
    let need_h = out_width != w;
    let need_v = out_height != h;

    // Horizontal pass over the rows the vertical pass reads (all rows when there is none).
    let (first_row, last_row) = if need_v {
        let first = vert.bounds[0].0;
        let (lo, n) = vert.bounds[out_height - 1];
        (first, lo + n)
    } else {
        (0, h)
    };
    let (tmp, tmp_w, row0) = if need_h {
        let rows = last_row - first_row;
        let mut out = vec![0u8; rows * out_width * c];
        let src = img.data();
        for y in 0..rows {
            let src_row = &src[(y + first_row) * w * c..(y + first_row + 1) * w * c];
            for xx in 0..out_width {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                for ch in 0..c {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        acc += src_row[(xmin + x) * c + ch] as i64 * kx as i64;
                    }
                    out[(y * out_width + xx) * c + ch] = clip8(acc);
                }
            }
        }
        (out, out_width, first_row)
    } else {
        (img.data().to_vec(), w, 0)
    };
    if !need_v {
        return RawImage::new(tmp_w, h, c, tmp).expect("invariant: resize keeps the byte count");
    }
    let mut out = vec![0u8; out_height * tmp_w * c];
    for yy in 0..out_height {
        let (ymin, n) = vert.bounds[yy];
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        for x in 0..tmp_w * c {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                acc += tmp[(ymin - row0 + y) * tmp_w * c + x] as i64 * ky as i64;
            }
            out[yy * tmp_w * c + x] = clip8(acc);
        }
    }
    RawImage::new(tmp_w, out_height, c, out).expect("invariant: resize keeps the byte count")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_image_stays_constant_at_any_size() {
        let img = RawImage::new(7, 5, 3, vec![123; 105]).unwrap();
        for (w, h) in [(3, 2), (14, 11), (7, 1), (1, 9), (7, 5)] {
            let out = resize_bilinear(&img, w, h);
            assert_eq!((out.width(), out.height()), (w, h));
            assert!(out.data().iter().all(|&v| v == 123), "{w}×{h}");
        }
    }

    #[test]
    fn halving_matches_pillow_by_hand() {
        // in 4 → out 2: scale 2, support 2. Output 0 has centre 1 and taps x = 0, 1, 2 at distances
        // 0.5, 0.5, 1.5 (÷2): weights 0.75, 0.75, 0.25 → 3/7, 3/7, 1/7: (0·3 + 100·3 + 200)/7 = 71.4.
        // Output 1 has centre 3, taps x = 1, 2, 3: weights 1/7, 3/7, 3/7: (100 + 600 + 120)/7 = 117.1.
        // Pillow: Image.frombytes("L", (4, 1), bytes([0, 100, 200, 40])).resize((2, 1), BILINEAR) → 71, 117.
        let img = RawImage::new(4, 1, 1, vec![0, 100, 200, 40]).unwrap();
        assert_eq!(resize_bilinear(&img, 2, 1).data(), &[71, 117]);
    }
}
