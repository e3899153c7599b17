//! OOD test sets made on the fly from material every machine can fetch from a package registry
//! (`../shared/reference/data-sources.md`): letters rendered from TrueType fonts, seeded crops of texture
//! and photo files, and uniform noise. Each is deterministic in its seed, so a run can be repeated and two
//! machines evaluate on the same images; nothing derived is ever written to disk or committed.
//!
//! Images are gray (one channel, bright content on black for letters); the loader repeats them to three
//! channels when the network wants three.

use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontVec, PxScale, ScaleFont, point};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::resize::resize_bilinear;
use super::{Dataset, RawImage};
use crate::{Error, Result};

/// A well-mixed seed for item `index` of a set seeded with `seed`.
fn item_rng(seed: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(super::loader::sample_seed(seed, 0x5e7, index))
}

/// Files in `dir` (not recursive) with one of `exts`, sorted by name.
fn files_with(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Data {
            path: dir.to_path_buf(),
            line: None,
            msg: format!("no {} files in this folder", exts.join("/")),
        });
    }
    Ok(files)
}

/// Capital letters A–Z rendered from every `.ttf` in a folder (a notMNIST-like near-OOD set for digit and
/// clothing classifiers): 26 × fonts × `variants` images, label = letter index. Each variant draws its
/// size (60–85% of the side) and offset (±10% of the side) from the seed.
pub struct Letters {
    fonts: Vec<(PathBuf, FontVec)>,
    side: usize,
    variants: usize,
    seed: u64,
    classes: Vec<String>,
}

impl Letters {
    pub fn open(dir: &Path, side: usize, variants: usize, seed: u64) -> Result<Self> {
        let mut fonts = Vec::new();
        for path in files_with(dir, &["ttf", "otf"])? {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let font = FontVec::try_from_vec(bytes).map_err(|e| Error::Data {
                path: path.clone(),
                line: None,
                msg: format!("not a usable font: {e}"),
            })?;
            fonts.push((path, font));
        }
        Ok(Self {
            fonts,
            side,
            variants: variants.max(1),
            seed,
            classes: ('A'..='Z').map(String::from).collect(),
        })
    }

    /// (font, letter, variant) of an index.
    fn parts(&self, index: usize) -> (usize, usize, usize) {
        let per_font = 26 * self.variants;
        (
            index / per_font,
            (index % per_font) / self.variants,
            index % self.variants,
        )
    }
}

impl Dataset for Letters {
    fn len(&self) -> usize {
        self.fonts.len() * 26 * self.variants
    }

    fn label(&self, index: usize) -> i64 {
        self.parts(index).1 as i64
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        if index >= self.len() {
            return Err(super::index_error(index, self.len()));
        }
        let (f, letter, _) = self.parts(index);
        let font = &self.fonts[f].1;
        let mut rng = item_rng(self.seed, index);
        let side = self.side as f32;
        let px = side * rng.random_range(0.6f32..0.85);
        let (dx, dy) = (
            side * rng.random_range(-0.1f32..0.1),
            side * rng.random_range(-0.1f32..0.1),
        );
        let ch = (b'A' + letter as u8) as char;
        let scaled = font.as_scaled(PxScale::from(px));
        let glyph = scaled.scaled_glyph(ch);
        let mut img = RawImage::zeros(self.side, self.side, 1);
        if let Some(outlined) = font.outline_glyph(glyph) {
            let b = outlined.px_bounds();
            // Centre the glyph's box, then jitter.
            let ox = (side - b.width()) / 2.0 - b.min.x + dx;
            let oy = (side - b.height()) / 2.0 - b.min.y + dy;
            let mut glyph = scaled.scaled_glyph(ch);
            glyph.position = point(ox, oy);
            if let Some(outlined) = font.outline_glyph(glyph) {
                let b = outlined.px_bounds();
                let data = img.data_mut();
                outlined.draw(|x, y, c| {
                    let (x, y) = (b.min.x as i64 + x as i64, b.min.y as i64 + y as i64);
                    if (0..side as i64).contains(&x) && (0..side as i64).contains(&y) {
                        let v = &mut data[y as usize * self.side + x as usize];
                        *v = (*v).max((c.clamp(0.0, 1.0) * 255.0).round() as u8);
                    }
                });
            }
        }
        Ok(img)
    }

    fn describe(&self, index: usize) -> String {
        let (f, letter, v) = self.parts(index);
        format!(
            "{} letter {} variant {v}",
            self.fonts
                .get(f)
                .map_or_else(String::new, |(p, _)| p.display().to_string()),
            (b'A' + letter as u8) as char
        )
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }
}

/// `count` seeded square crops of the images in a folder (textures, photos), gray, resized to `side`.
/// A crop's side is drawn in [1.7, 2.3] × `side` (capped by the image), its image and position uniformly:
/// the texture and photo-patch sets of the data reference, at any output size.
pub struct Crops {
    images: Vec<(PathBuf, RawImage)>,
    count: usize,
    side: usize,
    seed: u64,
}

impl Crops {
    pub fn open(dir: &Path, count: usize, side: usize, seed: u64) -> Result<Self> {
        let mut images = Vec::new();
        for path in files_with(dir, &["png", "jpg", "jpeg", "webp"])? {
            let img = RawImage::open(&path)?.to_channels(1)?;
            images.push((path, img));
        }
        Ok(Self {
            images,
            count,
            side,
            seed,
        })
    }
}

impl Dataset for Crops {
    fn len(&self) -> usize {
        self.count
    }

    fn label(&self, _index: usize) -> i64 {
        0
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        if index >= self.count {
            return Err(super::index_error(index, self.count));
        }
        let mut rng = item_rng(self.seed, index);
        let img = &self.images[rng.random_range(0..self.images.len())].1;
        let (w, h) = (img.width(), img.height());
        let want = ((self.side as f64) * rng.random_range(1.7..2.3)).round() as usize;
        let s = want.min(w).min(h).max(1);
        let (x0, y0) = (rng.random_range(0..=w - s), rng.random_range(0..=h - s));
        let mut crop = RawImage::zeros(s, s, 1);
        {
            let src = img.data();
            let dst = crop.data_mut();
            for y in 0..s {
                dst[y * s..(y + 1) * s]
                    .copy_from_slice(&src[(y0 + y) * w + x0..(y0 + y) * w + x0 + s]);
            }
        }
        Ok(resize_bilinear(&crop, self.side, self.side))
    }

    fn describe(&self, index: usize) -> String {
        format!("crop #{index} of {} images", self.images.len())
    }
}

/// `count` images of uniform noise in 0..=255, gray, `side` × `side`: the sanity set every detector should
/// reject (an energy baseline often does not).
pub struct Noise {
    count: usize,
    side: usize,
    seed: u64,
}

impl Noise {
    pub fn new(count: usize, side: usize, seed: u64) -> Self {
        Self { count, side, seed }
    }
}

impl Dataset for Noise {
    fn len(&self) -> usize {
        self.count
    }

    fn label(&self, _index: usize) -> i64 {
        0
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        if index >= self.count {
            return Err(super::index_error(index, self.count));
        }
        let mut rng = item_rng(self.seed, index);
        let data: Vec<u8> = (0..self.side * self.side).map(|_| rng.random()).collect();
        RawImage::new(self.side, self.side, 1, data)
    }

    fn describe(&self, index: usize) -> String {
        format!("noise #{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEJAVU: &str = "/usr/share/fonts/truetype/dejavu";

    #[test]
    fn noise_is_seeded_and_uniform() {
        let n = Noise::new(4, 16, 7);
        let a = n.get(2).unwrap();
        assert_eq!(a, Noise::new(4, 16, 7).get(2).unwrap());
        assert_ne!(a, n.get(3).unwrap());
        assert_ne!(a, Noise::new(4, 16, 8).get(2).unwrap());
        let mean = a.data().iter().map(|&v| v as f64).sum::<f64>() / 256.0;
        assert!((mean - 127.5).abs() < 25.0, "{mean}");
        assert!(n.get(4).is_err());
    }

    #[test]
    fn crops_come_from_the_images_at_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        // A horizontal ramp: every crop of it is a ramp too.
        let img = image::GrayImage::from_fn(100, 80, |x, _| image::Luma([(x * 2) as u8]));
        img.save(dir.path().join("ramp.png")).unwrap();
        let crops = Crops::open(dir.path(), 5, 28, 1).unwrap();
        for i in 0..5 {
            let c = crops.get(i).unwrap();
            assert_eq!((c.width(), c.height(), c.channels()), (28, 28, 1));
            let row = &c.data()[..28];
            assert!(
                row.windows(2).all(|w| w[0] <= w[1]),
                "crop {i} is not a ramp: {row:?}"
            );
        }
        assert_eq!(
            crops.get(3).unwrap(),
            Crops::open(dir.path(), 5, 28, 1).unwrap().get(3).unwrap()
        );
        let err = Crops::open(tempfile::tempdir().unwrap().path(), 5, 28, 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no png"), "{err}");
    }

    #[test]
    fn letters_render_distinct_glyphs_inside_the_frame() {
        assert!(
            Path::new(DEJAVU).exists(),
            "{DEJAVU} is missing: install the Debian package fonts-dejavu-core (the demo's letters set)"
        );
        let letters = Letters::open(Path::new(DEJAVU), 28, 2, 0).unwrap();
        assert_eq!(letters.len() % (26 * 2), 0);
        let a = letters.get(0).unwrap();
        let b = letters.get(2).unwrap();
        assert_eq!(letters.label(0), 0);
        assert_eq!(letters.label(2), 1);
        assert_ne!(a, b);
        for img in [&a, &b] {
            let ink = img.data().iter().filter(|&&v| v > 128).count();
            assert!(ink > 20, "glyph too faint: {ink} bright pixels");
            // Nothing touches the border rows (the glyph is centred with small jitter).
            assert!(img.data()[..28].iter().all(|&v| v < 128));
        }
    }
}
