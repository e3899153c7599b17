//! PNG plots of an evaluation: score histograms (ID test vs each OOD set) and ROC curves; and the image grid
//! of a run's report (real ID images beside the outliers generated for each class).
//!
//! Drawn directly into an RGB buffer (`image`) with text from Noto Sans Mono glyphs compiled into the
//! binary (`noto-sans-mono-bitmap`): no plotting stack, no font lookup, no download, and the same pixels on
//! every machine. The plots are for people; the numbers are in `metrics.json` and the `.npy` scores.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};
use noto_sans_mono_bitmap::{FontWeight, RasterHeight, get_raster, get_raster_width};

use super::metrics::{Positive, RankedScores};
use crate::files::write_atomic;
use crate::{Error, Result};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const GREY: Rgb<u8> = Rgb([170, 170, 170]);
const ID_COLOUR: Rgb<u8> = Rgb([31, 119, 180]);
/// Colours of the OOD sets (matplotlib's tab10 without its blue, which is the ID colour).
const PALETTE: [Rgb<u8>; 9] = [
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
];
const HIST_BINS: usize = 50;
const FONT: RasterHeight = RasterHeight::Size16;

fn blend(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>, alpha: f32) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    for i in 0..3 {
        p.0[i] = (p.0[i] as f32 * (1.0 - alpha) + c.0[i] as f32 * alpha).round() as u8;
    }
}

fn fill_rect(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    c: Rgb<u8>,
    alpha: f32,
) {
    for y in y0.min(y1)..y0.max(y1) {
        for x in x0.min(x1)..x0.max(x1) {
            blend(img, x, y, c, alpha);
        }
    }
}

/// A line `width` pixels wide; `dash` > 0 draws dashes of that many pixels.
/// The x axis along the bottom and the y axis along the left of the plot box `(x0, y0)`–`(x1, y1)`.
fn axes(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64)) {
    line(
        img,
        (x0 as f64, y1 as f64),
        (x1 as f64, y1 as f64),
        BLACK,
        1,
        0,
    );
    line(
        img,
        (x0 as f64, y0 as f64),
        (x0 as f64, y1 as f64),
        BLACK,
        1,
        0,
    );
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>, width: i64, dash: usize) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        if dash > 0 && (i / dash) % 2 == 1 {
            continue;
        }
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        let (x0, y0) = (x.round() as i64 - width / 2, y.round() as i64 - width / 2);
        fill_rect(img, (x0, y0), (x0 + width, y0 + width), c, 1.0);
    }
}

fn text_width(s: &str) -> i64 {
    (s.chars().count() * get_raster_width(FontWeight::Regular, FONT)) as i64
}

/// Text with its top-left corner at `(x, y)`; characters the font lacks are drawn as `?`.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    let mut cx = x;
    for ch in s.chars() {
        let raster = get_raster(ch, FontWeight::Regular, FONT)
            .or_else(|| get_raster('?', FontWeight::Regular, FONT))
            .expect("invariant: the font has '?'");
        for (dy, row) in raster.rows().enumerate() {
            for (dx, &v) in row.iter().enumerate() {
                if v > 0 {
                    blend(img, cx + dx as i64, y + dy as i64, c, v as f32 / 255.0);
                }
            }
        }
        cx += raster.width() as i64;
    }
}

fn save(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg: format!("cannot encode PNG: {e}"),
        })?;
    write_atomic(path, &bytes)
}

/// One row of [`image_grid`]: a label and two groups of images drawn side by side.
pub struct GridRow {
    pub label: String,
    pub left: Vec<crate::data::RawImage>,
    pub right: Vec<crate::data::RawImage>,
}

/// Draws `rows` as a grid: each row's label, its `left` images, a gap, its `right` images, every image
/// scaled (nearest neighbour, gray as RGB) into a `cell`-pixel square; `headers` name the two groups.
/// The run report uses it for real ID images (left) beside the generated outliers of the same class.
pub fn image_grid(path: &Path, headers: (&str, &str), rows: &[GridRow], cell: u32) -> Result<()> {
    const PAD: i64 = 4;
    const GAP: i64 = 24;
    let cell_i = cell as i64;
    let line = FONT.val() as i64;
    let label_w = rows.iter().map(|r| text_width(&r.label)).max().unwrap_or(0) + 2 * PAD;
    let n_left = rows.iter().map(|r| r.left.len()).max().unwrap_or(0) as i64;
    let n_right = rows.iter().map(|r| r.right.len()).max().unwrap_or(0) as i64;
    let step = cell_i + PAD;
    let x_right = label_w + n_left * step + GAP;
    let top = line + 2 * PAD;
    let width = (x_right + n_right * step + PAD).max(label_w + text_width(headers.0) + GAP);
    let height = top + rows.len() as i64 * step + PAD;
    let mut img = RgbImage::from_pixel(width as u32, height as u32, WHITE);
    text(&mut img, label_w, PAD, headers.0, BLACK);
    text(&mut img, x_right, PAD, headers.1, BLACK);
    for (r, row) in rows.iter().enumerate() {
        let y = top + r as i64 * step;
        text(&mut img, PAD, y + (cell_i - line) / 2, &row.label, BLACK);
        let cells = row
            .left
            .iter()
            .enumerate()
            .map(|(i, im)| (label_w + i as i64 * step, im))
            .chain(
                row.right
                    .iter()
                    .enumerate()
                    .map(|(i, im)| (x_right + i as i64 * step, im)),
            );
        for (x, im) in cells {
            draw_scaled(&mut img, (x, y), cell_i, im);
        }
    }
    save(path, &img)
}

/// `im` scaled by nearest neighbour into the `side`-pixel square at `(x0, y0)`.
fn draw_scaled(img: &mut RgbImage, (x0, y0): (i64, i64), side: i64, im: &crate::data::RawImage) {
    let (w, h, c) = (im.width(), im.height(), im.channels());
    if w == 0 || h == 0 {
        return;
    }
    let data = im.data();
    for dy in 0..side {
        let sy = (dy as usize * h) / side as usize;
        for dx in 0..side {
            let sx = (dx as usize * w) / side as usize;
            let i = (sy * w + sx) * c;
            let px = if c == 1 {
                Rgb([data[i]; 3])
            } else {
                Rgb([data[i], data[i + 1], data[i + 2]])
            };
            let (x, y) = (x0 + dx, y0 + dy);
            if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
                img.put_pixel(x as u32, y as u32, px);
            }
        }
    }
}

/// A compact number for axis labels.
fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// The value at quantile `q` of sorted `v`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Densities of `values` over `bins` equal bins of `[lo, hi]` (values outside go to the edge bins).
fn densities(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    let mut counts = vec![0.0; bins];
    let w = (hi - lo) / bins as f64;
    for &v in values {
        let i = if w > 0.0 { ((v - lo) / w).floor() } else { 0.0 };
        counts[(i.max(0.0) as usize).min(bins - 1)] += 1.0;
    }
    let n = values.len().max(1) as f64;
    counts.iter().map(|c| c / n).collect()
}

/// One PNG with a panel per OOD set: the score histogram of the ID test set against that set's, as
/// fractions of each set (so sets of different sizes compare). The x range is the 0.5–99.5 % quantiles of
/// the two sets together, so a few extreme scores do not squeeze the rest.
pub fn histograms(path: &Path, title: &str, id: &[f64], oods: &[(String, Vec<f64>)]) -> Result<()> {
    let (pw, ph, top) = (440i64, 300i64, 34i64);
    let cols = oods.len().clamp(1, 3) as i64;
    let rows = (oods.len() as i64 + cols - 1) / cols;
    let mut img = RgbImage::from_pixel((pw * cols) as u32, (top + ph * rows.max(1)) as u32, WHITE);
    text(
        &mut img,
        10,
        8,
        &format!("{title}: score histograms (higher = more ID)"),
        BLACK,
    );
    for (k, (name, ood)) in oods.iter().enumerate() {
        let (ox, oy) = ((k as i64 % cols) * pw, top + (k as i64 / cols) * ph);
        let mut all: Vec<f64> = id
            .iter()
            .chain(ood)
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        if all.is_empty() {
            continue;
        }
        all.sort_by(f64::total_cmp);
        let (lo, mut hi) = (quantile(&all, 0.005), quantile(&all, 0.995));
        if hi <= lo {
            hi = lo + 1.0;
        }
        let (x0, x1, y0, y1) = (ox + 45, ox + pw - 45, oy + 30, oy + ph - 40); // plot area
        let (d_id, d_ood) = (
            densities(id, lo, hi, HIST_BINS),
            densities(ood, lo, hi, HIST_BINS),
        );
        let peak = d_id.iter().chain(&d_ood).copied().fold(1e-12, f64::max);
        let bw = (x1 - x0) as f64 / HIST_BINS as f64;
        for (d, c) in [(&d_id, ID_COLOUR), (&d_ood, PALETTE[k % PALETTE.len()])] {
            for (i, v) in d.iter().enumerate() {
                let h = (v / peak * (y1 - y0) as f64).round() as i64;
                let bx = x0 + (i as f64 * bw).round() as i64;
                let bx1 = x0 + ((i + 1) as f64 * bw).round() as i64;
                fill_rect(&mut img, (bx, y1 - h), (bx1, y1), c, 0.55);
            }
        }
        axes(&mut img, (x0, y0), (x1, y1));
        for (i, v) in [lo, (lo + hi) / 2.0, hi].into_iter().enumerate() {
            let s = fmt_num(v);
            let x = x0 + (x1 - x0) * i as i64 / 2;
            line(
                &mut img,
                (x as f64, y1 as f64),
                (x as f64, (y1 + 4) as f64),
                BLACK,
                1,
                0,
            );
            let tx = (x - text_width(&s) / 2).clamp(ox + 2, ox + pw - text_width(&s) - 2);
            text(&mut img, tx, y1 + 8, &s, BLACK);
        }
        text(
            &mut img,
            x0,
            oy + 6,
            &format!("ID test ({})", id.len()),
            ID_COLOUR,
        );
        let label = format!("{name} ({})", ood.len());
        text(
            &mut img,
            x1 - text_width(&label),
            oy + 6,
            &label,
            PALETTE[k % PALETTE.len()],
        );
    }
    save(path, &img)
}

/// The ROC points (FPR, TPR) with ID positive: at each distinct threshold t, TPR = share of ID scores ≥ t
/// and FPR = share of OOD scores ≥ t, from (0, 0) to (1, 1).
pub fn roc_points(id: &[f64], ood: &[f64]) -> Result<Vec<(f64, f64)>> {
    let ranked = RankedScores::new(id, ood)?;
    let (n_id, n_ood) = (ranked.n_id() as f64, ranked.n_ood() as f64);
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(
        ranked
            .curve(Positive::Id)
            .map(|p| (p.fps as f64 / n_ood, p.tps as f64 / n_id)),
    );
    Ok(pts)
}

/// One PNG with the ROC curve of every OOD set (ID positive), the chance diagonal and AUROCs.
pub fn roc_curves(path: &Path, title: &str, id: &[f64], oods: &[(String, Vec<f64>)]) -> Result<()> {
    let (w, h) = (560i64, 580i64);
    let (x0, x1, y0, y1) = (60i64, w - 25, 60i64, h - 60);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, WHITE);
    text(
        &mut img,
        10,
        8,
        &format!("{title}: ROC (ID positive)"),
        BLACK,
    );
    let px = |(f, t): (f64, f64)| {
        (
            x0 as f64 + f * (x1 - x0) as f64,
            y1 as f64 - t * (y1 - y0) as f64,
        )
    };
    line(&mut img, px((0.0, 0.0)), px((1.0, 1.0)), GREY, 1, 6);
    for (k, (name, ood)) in oods.iter().enumerate() {
        let pts = roc_points(id, ood)?;
        let c = PALETTE[k % PALETTE.len()];
        for pair in pts.windows(2) {
            line(&mut img, px(pair[0]), px(pair[1]), c, 2, 0);
        }
        let auroc = RankedScores::new(id, ood)?.auroc();
        let label = format!("{name}: AUROC {:.2}%", 100.0 * auroc);
        text(
            &mut img,
            x1 - text_width(&label) - 6,
            y1 - 22 - 20 * (oods.len() - 1 - k) as i64,
            &label,
            c,
        );
    }
    axes(&mut img, (x0, y0), (x1, y1));
    for i in 0..=4 {
        let v = i as f64 / 4.0;
        let (x, y) = px((v, v));
        line(&mut img, (x, y1 as f64), (x, (y1 + 4) as f64), BLACK, 1, 0);
        line(&mut img, ((x0 - 4) as f64, y), (x0 as f64, y), BLACK, 1, 0);
        let s = format!("{v:.2}");
        text(&mut img, x as i64 - text_width(&s) / 2, y1 + 6, &s, BLACK);
        text(&mut img, x0 - 6 - text_width(&s), y as i64 - 8, &s, BLACK);
    }
    let xl = "FPR (share of OOD accepted)";
    text(
        &mut img,
        (x0 + x1) / 2 - text_width(xl) / 2,
        h - 28,
        xl,
        BLACK,
    );
    text(&mut img, 10, 32, "TPR (share of ID accepted)", BLACK);
    save(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_points_run_from_origin_to_one_one() {
        let pts = roc_points(&[0.9, 0.8, 0.3], &[0.5, 0.1]).unwrap();
        assert_eq!(pts.first(), Some(&(0.0, 0.0)));
        assert_eq!(pts.last(), Some(&(1.0, 1.0)));
        // Thresholds 0.9, 0.8, 0.5, 0.3, 0.1.
        assert_eq!(pts[2], (0.0, 2.0 / 3.0));
        assert_eq!(pts[3], (0.5, 2.0 / 3.0));
    }

    #[test]
    fn densities_sum_to_one_and_clip_to_the_edges() {
        let d = densities(&[-5.0, 0.1, 0.5, 0.9, 7.0], 0.0, 1.0, 4);
        assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(d, vec![0.4, 0.0, 0.2, 0.4]);
    }

    #[test]
    fn image_grid_places_each_image_scaled_in_its_cell() {
        use crate::data::RawImage;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let gray = RawImage::new(2, 2, 1, vec![0, 0, 0, 0]).unwrap();
        let red = RawImage::new(1, 1, 3, vec![255, 0, 0]).unwrap();
        let rows = vec![
            GridRow {
                label: "a".into(),
                left: vec![gray.clone(), gray.clone()],
                right: vec![red.clone()],
            },
            GridRow {
                label: "bb".into(),
                left: vec![gray],
                right: vec![red.clone(), red],
            },
        ];
        image_grid(&path, ("real", "generated"), &rows, 16).unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        // 3 black cells and 3 red cells of 16 x 16 each (text is antialiased, never pure black here).
        assert_eq!(count([0, 0, 0]), 3 * 256);
        assert_eq!(count([255, 0, 0]), 3 * 256);
    }

    #[test]
    fn plots_are_pngs_with_both_colours() {
        let dir = tempfile::tempdir().unwrap();
        let id: Vec<f64> = (0..200).map(|i| (i as f64 * 0.37).sin() + 1.0).collect();
        let oods = vec![(
            "a".to_owned(),
            id.iter().map(|v| v - 0.8).collect::<Vec<_>>(),
        )];
        histograms(&dir.path().join("h.png"), "m / energy", &id, &oods).unwrap();
        roc_curves(&dir.path().join("r.png"), "m / energy", &id, &oods).unwrap();
        for name in ["h.png", "r.png"] {
            let img = image::open(dir.path().join(name)).unwrap().to_rgb8();
            // Orange-ish (the first OOD set) and, in the histograms, blue-ish (ID) pixels are drawn.
            let orange = |p: &Rgb<u8>| p.0[0] > 200 && (100..200).contains(&p.0[1]) && p.0[2] < 120;
            assert!(img.pixels().any(orange), "{name} lacks orange");
            if name == "h.png" {
                assert!(
                    img.pixels().any(|p| p.0[2] > 150 && p.0[0] < 120),
                    "{name} lacks blue"
                );
            }
        }
    }
}
