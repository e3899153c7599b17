//! Image transforms with torchvision 0.26 semantics on PIL images, the path the official code takes
//! (`torchvision.transforms` on images from `ImageFolder`/`CIFAR100`, which are PIL images).
//!
//! Every random choice goes through [`Draws`], in the order and with the ranges torchvision draws them
//! (`torch.rand(1)` for a flip, `torch.randint` for crop offsets, `torch.empty(1).uniform_` for
//! RandomResizedCrop's area and log-ratio). The loader passes a ChaCha8 generator seeded per sample; tests
//! replay the draws torchvision made and get its exact output (`tests/data.rs`, fixtures from
//! `tools/make_transform_fixtures.py`).
//!
//! Rounding follows Python: `round()` is round-half-to-even (CenterCrop offsets, RandomResizedCrop sizes)
//! and `int()` truncates (Resize's longer side).

use rand::RngExt;
use rand::rngs::ChaCha8Rng;

use super::RawImage;
use super::resize::resize_bilinear;
use crate::{Error, Result};

/// Source of the random numbers a transform consumes, one call per torch draw.
pub trait Draws {
    /// `torch.empty(1).uniform_(lo, hi).item()`: a float32 in `[lo, hi)`, returned as f64.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64;
    /// `torch.randint(lo, hi, (1,)).item()`: an integer in `[lo, hi)`; callers ensure `lo < hi`.
    fn randint(&mut self, lo: i64, hi: i64) -> i64;
    /// `torch.rand(1).item()`: a float32 in `[0, 1)`.
    fn rand(&mut self) -> f64 {
        self.uniform(0.0, 1.0)
    }
}

impl Draws for ChaCha8Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u: f32 = self.random();
        // torch fills a float32 tensor: keep float32 precision so both paths round the same way.
        (lo + (hi - lo) * u as f64) as f32 as f64
    }

    fn randint(&mut self, lo: i64, hi: i64) -> i64 {
        self.random_range(lo..hi)
    }
}

/// Python's `round()` for floats: halves go to the even neighbour (`round(2.5) == 2`).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The size argument of `Resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    /// `Resize(n)`: the shorter side becomes `n`, the longer `int(n · long / short)`.
    Shorter(usize),
    /// `Resize((h, w))`.
    Exact { height: usize, width: usize },
}

/// A crop rectangle: `top`, `left` may be negative or run past the image (zero fill), as PIL's crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row (`i` in torchvision).
    pub top: i64,
    /// First column (`j`).
    pub left: i64,
    /// Rows (`h`).
    pub height: usize,
    /// Columns (`w`).
    pub width: usize,
}

/// One uint8 → uint8 step, as the torchvision class of the same name with PIL input.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// `Resize(size)`, bilinear, antialiased on downscale (Pillow's resampler).
    Resize(Size),
    /// `CenterCrop((height, width))`, zero-padding first when the crop is larger than the image.
    CenterCrop { height: usize, width: usize },
    /// `RandomCrop((height, width), padding)`: zero padding on all four sides, then a uniform offset.
    RandomCrop {
        height: usize,
        width: usize,
        padding: usize,
    },
    /// `RandomHorizontalFlip(p)`.
    RandomHorizontalFlip { p: f64 },
    /// `RandomResizedCrop((height, width), scale, ratio)`, bilinear.
    RandomResizedCrop {
        height: usize,
        width: usize,
        scale: (f64, f64),
        ratio: (f64, f64),
    },
    /// `RandomApply([GaussianBlur(kernel, sigma = (lo, hi))], p)`: with probability `p`, a Gaussian blur
    /// with σ drawn uniformly from `sigma` (torchvision's draws: `rand` for the apply, then `uniform`),
    /// a `kernel`×`kernel` window and reflect padding, rounded back to uint8 as torchvision does.
    RandomGaussianBlur {
        kernel: usize,
        sigma: (f64, f64),
        p: f64,
    },
    /// `Grayscale(num_output_channels = channels)`: PIL's `convert("L")` luma, repeated back to 3 channels
    /// when the image has 3. Dream-OOD puts it first in the generated outliers' pipeline when the ID
    /// images are gray (see `DataConfig::outlier_pipeline`).
    Grayscale,
}

/// `Normalize(mean, std)` after `ToTensor`, per channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    /// Per-channel mean on the 0..1 scale.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation on the 0..1 scale.
    pub std: Vec<f64>,
}

impl Normalize {
    /// CIFAR statistics of the official code: `[125.3, 123.0, 113.9] / 255`, `[63.0, 62.1, 66.7] / 255`
    /// (`scripts/pretrain_cifar100.py:L80-84`, SPEC §1.4).
    pub fn cifar() -> Self {
        Self {
            mean: [125.3, 123.0, 113.9].iter().map(|v| v / 255.0).collect(),
            std: [63.0, 62.1, 66.7].iter().map(|v| v / 255.0).collect(),
        }
    }

    /// ImageNet statistics (`scripts/pretrain_in100.py:L58-68`).
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }
}

/// An image as a float CHW array, what `ToTensor` (+ `Normalize`) yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `[C, H, W]` row-major.
    pub data: Vec<f32>,
}

/// Channel conversion, then the transforms in order, then `ToTensor` and the optional `Normalize`.
/// Serialisable: checkpoints and exported detectors carry their evaluation pipeline, so `score` and
/// `serve` preprocess exactly as evaluation did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    /// Channels the network wants (1 or 3): gray images become RGB by repetition, colour images gray
    /// by PIL's luma, before anything else (torchvision's ImageFolder loader converts to RGB first too).
    pub channels: usize,
    /// uint8 steps, in order.
    pub transforms: Vec<Transform>,
    /// Applied after `ToTensor`; `None` leaves values in 0..1.
    pub normalize: Option<Normalize>,
}

impl Pipeline {
    /// CIFAR training (SPEC §1.4, `scripts/pretrain_cifar100.py:L80-84`): RandomHorizontalFlip →
    /// RandomCrop(32, padding=4) → ToTensor → Normalize(CIFAR).
    pub fn cifar_train() -> Self {
        Self {
            channels: 3,
            transforms: vec![
                Transform::RandomHorizontalFlip { p: 0.5 },
                Transform::RandomCrop {
                    height: 32,
                    width: 32,
                    padding: 4,
                },
            ],
            normalize: Some(Normalize::cifar()),
        }
    }

    /// CIFAR test (SPEC §5.3): ToTensor → Normalize(CIFAR).
    pub fn cifar_test() -> Self {
        Self {
            channels: 3,
            transforms: vec![],
            normalize: Some(Normalize::cifar()),
        }
    }

    /// Generated outliers for CIFAR training (SPEC §4.2): RandomCrop(32, padding=4) → flip → Normalize,
    /// preceded by Resize(32).
    /// Deviation: the official `train_ood_det_cifar100.py:L120-124` has no Resize, so a 256 px image
    /// becomes a random 32 px patch; SPEC §7 item 11 decides to add `Resize(32)`, as the authors'
    /// `get_repre.py:L180-186` does.
    pub fn cifar_outliers() -> Self {
        Self {
            channels: 3,
            transforms: vec![
                Transform::Resize(Size::Shorter(32)),
                Transform::RandomCrop {
                    height: 32,
                    width: 32,
                    padding: 4,
                },
                Transform::RandomHorizontalFlip { p: 0.5 },
            ],
            normalize: Some(Normalize::cifar()),
        }
    }

    /// ImageNet-style training (SPEC §1.4, `scripts/pretrain_in100.py:L58-68`): RandomResizedCrop(size)
    /// with scale (0.08, 1) and ratio (3/4, 4/3) → RandomHorizontalFlip → Normalize(ImageNet).
    pub fn imagenet_train(size: usize) -> Self {
        Self {
            channels: 3,
            transforms: vec![
                Transform::RandomResizedCrop {
                    height: size,
                    width: size,
                    scale: (0.08, 1.0),
                    ratio: (3.0 / 4.0, 4.0 / 3.0),
                },
                Transform::RandomHorizontalFlip { p: 0.5 },
            ],
            normalize: Some(Normalize::imagenet()),
        }
    }

    /// ImageNet-style evaluation (SPEC §5.3, `scripts/test_ood_in100.py:L57-65`): Resize(resize) →
    /// CenterCrop(crop) → Normalize(ImageNet); the paper uses 256 and 224.
    pub fn imagenet_test(resize: usize, crop: usize) -> Self {
        Self {
            channels: 3,
            transforms: vec![
                Transform::Resize(Size::Shorter(resize)),
                Transform::CenterCrop {
                    height: crop,
                    width: crop,
                },
            ],
            normalize: Some(Normalize::imagenet()),
        }
    }

    /// This pipeline without the steps that set the output size (Resize, CenterCrop and the random
    /// crops): channel conversion, the other steps and the normalisation stay, so every image keeps its
    /// own size. `eval` uses it for an OOD set with `preprocess = "native"` (ToTensor + Normalize only,
    /// as the official CIFAR-100 test script feeds LSUN-C and iSUN, SPEC §5.3).
    pub fn native(&self) -> Self {
        let sets_size = |t: &Transform| {
            matches!(
                t,
                Transform::Resize(_)
                    | Transform::CenterCrop { .. }
                    | Transform::RandomCrop { .. }
                    | Transform::RandomResizedCrop { .. }
            )
        };
        Self {
            channels: self.channels,
            transforms: self
                .transforms
                .iter()
                .filter(|t| !sets_size(t))
                .cloned()
                .collect(),
            normalize: self.normalize.clone(),
        }
    }

    /// Checks the settings once, so that applying can only fail on the image itself.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::InvalidValue {
                key: format!("transforms.{key}"),
                msg,
            })
        };
        if self.channels != 1 && self.channels != 3 {
            return bad("channels", format!("{}; expected 1 or 3", self.channels));
        }
        if let Some(n) = &self.normalize {
            if n.mean.len() != self.channels || n.std.len() != self.channels {
                return bad(
                    "normalize",
                    format!(
                        "{} means and {} stds for {} channels",
                        n.mean.len(),
                        n.std.len(),
                        self.channels
                    ),
                );
            }
            if n.std.iter().any(|s| s.is_nan() || *s <= 0.0)
                || n.mean.iter().any(|m| !m.is_finite())
            {
                return bad("normalize", "std must be > 0 and mean finite".into());
            }
        }
        for t in &self.transforms {
            let (h, w) = match *t {
                Transform::Resize(Size::Shorter(n)) => (n, n),
                Transform::Resize(Size::Exact { height, width })
                | Transform::CenterCrop { height, width }
                | Transform::RandomCrop { height, width, .. } => (height, width),
                Transform::RandomHorizontalFlip { p } => {
                    if !(0.0..=1.0).contains(&p) {
                        return bad(
                            "random_horizontal_flip.p",
                            format!("{p}; expected 0 ≤ p ≤ 1"),
                        );
                    }
                    (1, 1)
                }
                Transform::Grayscale => (1, 1),
                Transform::RandomGaussianBlur { kernel, sigma, p } => {
                    if kernel % 2 == 0
                        || !(sigma.0 > 0.0 && sigma.0 <= sigma.1)
                        || !(0.0..=1.0).contains(&p)
                    {
                        return bad(
                            "random_gaussian_blur",
                            format!(
                                "kernel {kernel}, sigma {sigma:?}, p {p}; expected an odd kernel, \
                                 0 < sigma.0 ≤ sigma.1 and 0 ≤ p ≤ 1"
                            ),
                        );
                    }
                    (kernel, kernel)
                }
                Transform::RandomResizedCrop {
                    height,
                    width,
                    scale,
                    ratio,
                } => {
                    if !(scale.0 > 0.0 && scale.0 <= scale.1 && ratio.0 > 0.0 && ratio.0 <= ratio.1)
                    {
                        return bad(
                            "random_resized_crop",
                            format!(
                                "scale {scale:?} and ratio {ratio:?} must be positive (min, max) pairs"
                            ),
                        );
                    }
                    (height, width)
                }
            };
            if h == 0 || w == 0 {
                return bad("size", format!("{t:?}: sizes must be positive"));
            }
        }
        Ok(())
    }

    /// Runs the pipeline on one image. Fails only when a crop does not fit (RandomCrop larger than the
    /// padded image, as torchvision's ValueError) or the settings are invalid.
    pub fn apply(&self, img: RawImage, draws: &mut dyn Draws) -> Result<Chw> {
        self.validate()?;
        let mut img = img.to_channels(self.channels)?;
        for t in &self.transforms {
            img = apply_one(t, img, draws)?;
        }
        to_tensor(&img, self.normalize.as_ref())
    }
}

/// One transform, with torchvision's draws.
pub fn apply_one(t: &Transform, img: RawImage, draws: &mut dyn Draws) -> Result<RawImage> {
    Ok(match *t {
        Transform::Resize(size) => {
            let (h, w) = resized_output_size(img.height(), img.width(), size);
            if (h, w) == (img.height(), img.width()) {
                img
            } else {
                resize_bilinear(&img, w, h)
            }
        }
        Transform::RandomGaussianBlur { kernel, sigma, p } => {
            // RandomApply: `if p < torch.rand(1): return img`, compared in float32 (torch casts p to the
            // tensor's dtype).
            if (p as f32 as f64) < draws.rand() {
                img
            } else {
                let sigma = draws.uniform(sigma.0, sigma.1);
                gaussian_blur(&img, kernel, sigma)?
            }
        }
        Transform::Grayscale => {
            let c = img.channels();
            img.to_channels(1)?.to_channels(c)?
        }
        Transform::CenterCrop { height, width } => center_crop(&img, height, width),
        Transform::RandomCrop {
            height,
            width,
            padding,
        } => {
            let (ph, pw) = (img.height() + 2 * padding, img.width() + 2 * padding);
            if ph < height || pw < width {
                return Err(Error::Shape {
                    what: "RandomCrop input (after padding)".into(),
                    expected: format!("at least {height}×{width}"),
                    got: format!("{ph}×{pw}"),
                });
            }
            let (i, j) = if ph == height && pw == width {
                (0, 0)
            } else {
                let i = draws.randint(0, (ph - height + 1) as i64);
                let j = draws.randint(0, (pw - width + 1) as i64);
                (i, j)
            };
            crop(
                &img,
                CropBox {
                    top: i - padding as i64,
                    left: j - padding as i64,
                    height,
                    width,
                },
            )
        }
        Transform::RandomHorizontalFlip { p } => {
            if draws.rand() < p {
                hflip(&img)
            } else {
                img
            }
        }
        Transform::RandomResizedCrop {
            height,
            width,
            scale,
            ratio,
        } => {
            let b = resized_crop_params(img.height(), img.width(), scale, ratio, draws);
            resize_bilinear(&crop(&img, b), width, height)
        }
    })
}

/// torchvision's `_compute_resized_output_size` without `max_size`: `(height, width)`.
pub fn resized_output_size(height: usize, width: usize, size: Size) -> (usize, usize) {
    match size {
        Size::Exact { height, width } => (height, width),
        Size::Shorter(n) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            // int(n * long / short): float division, then truncation.
            let new_long = (n as f64 * long as f64 / short as f64) as usize;
            if width <= height {
                (new_long, n)
            } else {
                (n, new_long)
            }
        }
    }
}

/// `RandomResizedCrop.get_params`: up to 10 tries of a random area fraction in `scale` and a log-uniform
/// aspect ratio in `ratio`; if none fits, the largest central crop whose ratio is clamped into `ratio`.
pub fn resized_crop_params(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    draws: &mut dyn Draws,
) -> CropBox {
    let area = (height * width) as f64;
    // torch.log(torch.tensor(ratio)) is float32.
    let log_ratio = ((ratio.0 as f32).ln() as f64, (ratio.1 as f32).ln() as f64);
    for _ in 0..10 {
        let target_area = area * draws.uniform(scale.0, scale.1);
        let aspect = (draws.uniform(log_ratio.0, log_ratio.1) as f32).exp() as f64;
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if 0.0 < w && w <= width as f64 && 0.0 < h && h <= height as f64 {
            let (w, h) = (w as usize, h as usize);
            let top = draws.randint(0, (height - h + 1) as i64);
            let left = draws.randint(0, (width - w + 1) as i64);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    // Fallback to a central crop.
    let in_ratio = width as f64 / height as f64;
    let (min_r, max_r) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < min_r {
        (width, round_half_even(width as f64 / min_r) as usize)
    } else if in_ratio > max_r {
        (round_half_even(height as f64 * max_r) as usize, height)
    } else {
        (width, height)
    };
    CropBox {
        top: ((height - h) / 2) as i64,
        left: ((width - w) / 2) as i64,
        height: h,
        width: w,
    }
}

/// PIL's `crop`: pixels outside the image are zero.
pub fn crop(img: &RawImage, b: CropBox) -> RawImage {
    let c = img.channels();
    let mut out = RawImage::zeros(b.width, b.height, c);
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.data();
    let dst = out.data_mut();
    for y in 0..b.height as i64 {
        let sy = b.top + y;
        if sy < 0 || sy >= h {
            continue;
        }
        let x0 = b.left.max(0);
        let x1 = (b.left + b.width as i64).min(w);
        if x0 >= x1 {
            continue;
        }
        let s = ((sy * w + x0) as usize) * c;
        let d = ((y * b.width as i64 + (x0 - b.left)) as usize) * c;
        let n = (x1 - x0) as usize * c;
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
    out
}

/// `CenterCrop`: zero-pad to at least the crop size (left/top get the smaller half), then cut the
/// centre with offsets `round((H − h) / 2)`, Python rounding.
pub fn center_crop(img: &RawImage, height: usize, width: usize) -> RawImage {
    let (ih, iw) = (img.height() as i64, img.width() as i64);
    let (ch, cw) = (height as i64, width as i64);
    // Padding shifts the origin by the left/top pad.
    let pad_left = if cw > iw { (cw - iw) / 2 } else { 0 };
    let pad_top = if ch > ih { (ch - ih) / 2 } else { 0 };
    let pw = if cw > iw {
        iw + (cw - iw) / 2 + (cw - iw + 1) / 2
    } else {
        iw
    };
    let ph = if ch > ih {
        ih + (ch - ih) / 2 + (ch - ih + 1) / 2
    } else {
        ih
    };
    let top = round_half_even((ph - ch) as f64 / 2.0) as i64;
    let left = round_half_even((pw - cw) as f64 / 2.0) as i64;
    crop(
        img,
        CropBox {
            top: top - pad_top,
            left: left - pad_left,
            height,
            width,
        },
    )
}

/// torchvision's `F.gaussian_blur(img, [k, k], [σ, σ])` on a uint8 PIL image, in float32 as torch
/// computes it (`_functional_tensor.py` `gaussian_blur`, torchvision 0.26):
///
/// 1. the 1-D kernel `exp(-0.5 (x / σ)²)` at `x = -k/2 … k/2`, divided by its sum (torch's summation
///    order, [`torch_sum_f32`]); the 2-D kernel is the outer product `w[ky] · w[kx]`;
/// 2. reflect padding of `k/2` on every side (the edge pixel is not repeated);
/// 3. a depthwise correlation, each output one fused multiply-add per tap, rows of the window first
///    (what torch's CPU conv2d does for 3 channels, and for 1 channel from a 5×5 window up);
/// 4. `torch.round` (half to even), then uint8.
///
/// Deviation: for 1-channel images and a 3×3 window torch 2.11's CPU conv2d (x86) multiplies and adds
/// without fusing, so a sum can differ from ours in its last bits (up to 3e-5 on 0..255 in our
/// trials); a pixel changes only when the sum is that close to a .5 tie. The 1-channel 3×3 fixtures
/// stay at least 8e-4 from one.
///
/// `sigma` is used as float32 (torch divides a float32 tensor by it). Fails, as torchvision, on an even
/// kernel, `sigma ≤ 0`, or a side not above `k/2` (PyTorch's reflect padding needs `pad < side`).
pub fn gaussian_blur(img: &RawImage, kernel: usize, sigma: f64) -> Result<RawImage> {
    let (h, w, c) = (img.height(), img.width(), img.channels());
    if kernel.is_multiple_of(2) || sigma.is_nan() || sigma <= 0.0 {
        return Err(Error::InvalidValue {
            key: "gaussian_blur".into(),
            msg: format!("kernel {kernel}, sigma {sigma}; expected an odd kernel and sigma > 0"),
        });
    }
    let half = kernel / 2;
    if h <= half || w <= half {
        return Err(Error::Shape {
            what: "GaussianBlur input".into(),
            expected: format!("sides above {half} for a {kernel}×{kernel} kernel"),
            got: format!("{h}×{w}"),
        });
    }
    // 1. Kernel, [k] then [k, k] row-major.
    let k1 = gaussian_kernel1d(kernel, sigma as f32);
    let k2: Vec<f32> = k1
        .iter()
        .flat_map(|wy| k1.iter().map(move |wx| wy * wx))
        .collect();
    // 2. Reflect: -1 → 1, n → n - 2.
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let r = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        r as usize
    };
    let src = img.data();
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                // 3. One fused multiply-add per tap, window rows first.
                let mut acc = 0f32;
                for ky in 0..kernel {
                    let sy = reflect((y + ky) as isize - half as isize, h);
                    for kx in 0..kernel {
                        let sx = reflect((x + kx) as isize - half as isize, w);
                        acc = k2[ky * kernel + kx].mul_add(src[(sy * w + sx) * c + ch] as f32, acc);
                    }
                }
                // 4. Round half to even; the kernel sums to 1, so 0 ≤ acc ≤ 255 up to rounding.
                out[(y * w + x) * c + ch] = acc.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RawImage::new(w, h, c, out)
}

/// `_get_gaussian_kernel1d(kernel, sigma)` in float32, for an odd `kernel`.
fn gaussian_kernel1d(kernel: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel / 2) as f32;
    let pdf: Vec<f32> = (0..kernel)
        .map(|i| {
            // torch.linspace(-(k-1)/2, (k-1)/2, k) has step 1 for odd k: the points are exact integers.
            let z = (i as f32 - half) / sigma;
            (-0.5 * (z * z)).exp()
        })
        .collect();
    let sum = torch_sum_f32(&pdf);
    pdf.iter().map(|v| v / sum).collect()
}

/// `torch.sum` of a contiguous float32 vector on an x86 CPU, in torch's order (`cascade_sum` in
/// `aten/src/ATen/native/cpu/SumKernel.cpp`, torch 2.11): below 8 values, `row_sum` (four
/// interleaved partial sums, the tail added to the first, then the other three); from 8 values,
/// `row_sum` over 8-lane vectors, then the scalar tail, then the 8 lanes. Checked against torch for
/// lengths 1–199; the cascade levels torch adds from 512 values on are not modelled.
///
/// The order matters: the blur kernel is divided by this sum, and a sum one ulp off moves a weight by
/// an ulp. Deviation: on other CPUs (aarch64) torch's vectors have other widths and windows of 8 or
/// more may get weights an ulp apart.
fn torch_sum_f32(v: &[f32]) -> f32 {
    const LANES: usize = 8;
    if v.len() < LANES {
        return row_sum(&v.iter().map(|&x| [x]).collect::<Vec<_>>())[0];
    }
    let vectors: Vec<[f32; LANES]> = v
        .chunks_exact(LANES)
        .map(|c| c.try_into().expect("invariant: chunks of LANES"))
        .collect();
    let lanes = row_sum(&vectors);
    let mut acc = 0f32;
    for x in v.chunks_exact(LANES).remainder() {
        acc += x;
    }
    for x in lanes {
        acc += x;
    }
    acc
}

/// torch's `row_sum` with `ilp_factor = 4`, lane-wise over `L`-wide items: item `i` goes to partial
/// sum `i % 4` while four fit, the rest to partial sum 0, then partial sums 1, 2, 3 are added to 0.
fn row_sum<const L: usize>(items: &[[f32; L]]) -> [f32; L] {
    let full = items.len() / 4 * 4;
    let mut partial = [[0f32; L]; 4];
    for (i, item) in items[..full].iter().enumerate() {
        for (p, x) in partial[i % 4].iter_mut().zip(item) {
            *p += x;
        }
    }
    for item in &items[full..] {
        for (p, x) in partial[0].iter_mut().zip(item) {
            *p += x;
        }
    }
    let (first, rest) = partial.split_at_mut(1);
    for other in rest.iter() {
        for (p, x) in first[0].iter_mut().zip(other) {
            *p += x;
        }
    }
    first[0]
}

/// `hflip`: mirror left–right.
pub fn hflip(img: &RawImage) -> RawImage {
    let (w, c) = (img.width(), img.channels());
    let mut out = img.clone();
    let src = img.data();
    for (y, row) in out.data_mut().chunks_exact_mut(w * c).enumerate() {
        for x in 0..w {
            let s = (y * w + (w - 1 - x)) * c;
            row[x * c..x * c + c].copy_from_slice(&src[s..s + c]);
        }
    }
    out
}

/// `ToTensor` then `Normalize`, in float32 with torch's operation order: `v / 255`, `− mean`, `/ std`.
/// Fails if `normalize` has fewer entries than the image has channels.
pub fn to_tensor(img: &RawImage, normalize: Option<&Normalize>) -> Result<Chw> {
    let (h, w, c) = (img.height(), img.width(), img.channels());
    if let Some(n) = normalize
        && (n.mean.len() < c || n.std.len() < c)
    {
        return Err(Error::Shape {
            what: "Normalize mean/std".into(),
            expected: format!("{c} values each (one per channel)"),
            got: format!("{} and {}", n.mean.len(), n.std.len()),
        });
    }
    let mut data = vec![0f32; c * h * w];
    let src = img.data();
    for ch in 0..c {
        let (mean, std) = normalize.map_or((0f32, 1f32), |n| (n.mean[ch] as f32, n.std[ch] as f32));
        let plane = &mut data[ch * h * w..(ch + 1) * h * w];
        for (p, out) in plane.iter_mut().enumerate() {
            let x = src[p * c + ch] as f32 / 255.0;
            *out = if normalize.is_some() {
                (x - mean) / std
            } else {
                x
            };
        }
    }
    Ok(Chw {
        channels: c,
        height: h,
        width: w,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Hands out fixed draws, whatever the range asked for.
    struct Fixed(Vec<f64>);

    impl Draws for Fixed {
        fn uniform(&mut self, _: f64, _: f64) -> f64 {
            self.0.remove(0)
        }
        fn randint(&mut self, _: i64, _: i64) -> i64 {
            self.0.remove(0) as i64
        }
    }

    fn ramp(w: usize, h: usize) -> RawImage {
        RawImage::new(w, h, 1, (1..=w * h).map(|v| v as u8).collect()).unwrap()
    }

    #[test]
    fn python_rounding() {
        let r: Vec<f64> = [0.5, 1.5, 2.5, -0.5, 2.4, 2.6]
            .map(round_half_even)
            .to_vec();
        assert_eq!(r, [0.0, 2.0, 2.0, -0.0, 2.0, 3.0]);
    }

    #[test]
    fn resize_shorter_side_truncates_the_longer() {
        // 48×64 (h×w), Resize(32): int(32·64/48) = int(42.67) = 42.
        assert_eq!(resized_output_size(48, 64, Size::Shorter(32)), (32, 42));
        assert_eq!(resized_output_size(100, 30, Size::Shorter(16)), (53, 16));
        assert_eq!(
            resized_output_size(
                9,
                9,
                Size::Exact {
                    height: 3,
                    width: 5
                }
            ),
            (3, 5)
        );
    }

    #[test]
    fn center_crop_rounds_half_to_even_and_pads_with_zeros() {
        // Width 5 → 2: left = round(1.5) = 2; width 7 → 2: left = round(2.5) = 2.
        assert_eq!(center_crop(&ramp(5, 1), 1, 2).data(), &[3, 4]);
        assert_eq!(center_crop(&ramp(7, 1), 1, 2).data(), &[3, 4]);
        // Width 2 → 5: pad 1 left, 2 right.
        assert_eq!(center_crop(&ramp(2, 1), 1, 5).data(), &[0, 1, 2, 0, 0]);
    }

    #[test]
    fn random_crop_offsets_are_into_the_padded_image() {
        let t = Transform::RandomCrop {
            height: 2,
            width: 2,
            padding: 1,
        };
        // i = 0 (one row of padding on top), j = 2 (last possible column offset).
        let out = apply_one(&t, ramp(2, 2), &mut Fixed(vec![0.0, 2.0])).unwrap();
        assert_eq!(out.data(), &[0, 0, 2, 0]);
        let too_big = Transform::RandomCrop {
            height: 9,
            width: 2,
            padding: 1,
        };
        assert!(apply_one(&too_big, ramp(2, 2), &mut Fixed(vec![])).is_err());
    }

    #[test]
    fn flip_happens_when_the_draw_is_below_p() {
        let t = Transform::RandomHorizontalFlip { p: 0.5 };
        let img = RawImage::new(3, 1, 3, (0..9).collect()).unwrap();
        let flipped = apply_one(&t, img.clone(), &mut Fixed(vec![0.49])).unwrap();
        assert_eq!(flipped.data(), &[6, 7, 8, 3, 4, 5, 0, 1, 2]);
        assert_eq!(
            apply_one(&t, img.clone(), &mut Fixed(vec![0.5])).unwrap(),
            img
        );
    }

    #[test]
    fn resized_crop_falls_back_to_a_central_crop_with_clamped_ratio() {
        // 10×100 with scale ≥ 0.99: every try needs h ≈ 27..36 > 10, so all 10 fail. in_ratio 10 > 4/3:
        // h = 10, w = round(10 · 4/3) = 13, centred: left = (100 − 13) // 2 = 43.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let b = resized_crop_params(10, 100, (0.99, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 43,
                height: 10,
                width: 13
            }
        );
    }

    #[test]
    fn resized_crop_boxes_respect_scale_ratio_and_bounds() {
        let (scale, ratio) = ((0.08, 1.0), (0.75, 4.0 / 3.0));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen_small = false;
        for _ in 0..500 {
            let b = resized_crop_params(64, 48, scale, ratio, &mut rng);
            assert!(b.top >= 0 && b.left >= 0);
            assert!(
                b.top as usize + b.height <= 64 && b.left as usize + b.width <= 48,
                "{b:?}"
            );
            let frac = (b.height * b.width) as f64 / (64.0 * 48.0);
            // Rounding w and h to integers moves the area by at most about (w + h) / 2 pixels.
            let slack = (b.height + b.width) as f64 / (64.0 * 48.0);
            assert!(frac >= scale.0 - slack && frac <= scale.1 + slack, "{b:?}");
            let r = b.width as f64 / b.height as f64;
            let r_slack = 1.0 / b.height as f64 + r / b.height as f64;
            assert!(r >= ratio.0 - r_slack && r <= ratio.1 + r_slack, "{b:?}");
            seen_small |= frac < 0.2;
        }
        assert!(seen_small, "scale draws never reached small areas");
    }

    #[test]
    fn same_seed_same_output_and_seeds_differ() {
        let img =
            RawImage::new(40, 30, 3, (0..3600).map(|v| (v * 7 % 256) as u8).collect()).unwrap();
        let p = Pipeline::imagenet_train(24);
        let run = |seed| {
            p.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3).data, run(4).data);
        let out = run(3);
        assert_eq!((out.channels, out.height, out.width), (3, 24, 24));
    }

    #[test]
    fn to_tensor_and_normalize() {
        let img = RawImage::new(2, 1, 1, vec![0, 255]).unwrap();
        assert_eq!(to_tensor(&img, None).unwrap().data, [0.0, 1.0]);
        let n = Normalize {
            mean: vec![0.5],
            std: vec![0.25],
        };
        assert_eq!(to_tensor(&img, Some(&n)).unwrap().data, [-2.0, 2.0]);
        // HWC → CHW.
        let rgb = RawImage::new(2, 1, 3, vec![255, 0, 0, 0, 0, 255]).unwrap();
        assert_eq!(
            to_tensor(&rgb, None).unwrap().data,
            [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        );
        // Too few statistics for the channels is an error, not an index panic.
        assert!(to_tensor(&rgb, Some(&n)).is_err());
    }

    #[test]
    fn sums_in_torch_order() {
        // Values from `torch.tensor(v).sum()` (torch 2.11, x86); a left-to-right sum gives 1.5 and 1.
        // 5 values: ((x0 + x4) + x1 + x2) + x3.
        assert_eq!(torch_sum_f32(&[1.0, 1e8, -1e8, 0.5, 1.0]), 0.5);
        // 11 values: one 8-lane vector, the 3-value tail first, then the lanes.
        let v = [1e8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1e8, 1.0];
        assert_eq!(torch_sum_f32(&v), 7.0);
    }

    #[test]
    fn blur_kernel_one_is_the_identity_and_sides_must_exceed_half_the_kernel() {
        let img = ramp(3, 2);
        assert_eq!(gaussian_blur(&img, 1, 0.7).unwrap(), img);
        // A 5×5 window reflects 2 pixels: 3 px sides work, 2 px do not (PyTorch's reflect padding).
        assert!(gaussian_blur(&ramp(3, 3), 5, 1.0).is_ok());
        let err = gaussian_blur(&ramp(3, 2), 5, 1.0).unwrap_err().to_string();
        assert!(err.contains("sides above 2"), "{err}");
        assert!(gaussian_blur(&img, 4, 1.0).is_err());
        assert!(gaussian_blur(&img, 3, 0.0).is_err());
    }

    #[test]
    fn blur_applies_when_p_is_not_below_the_draw() {
        let t = Transform::RandomGaussianBlur {
            kernel: 3,
            sigma: (0.1, 2.0),
            p: 0.5,
        };
        let img = ramp(4, 4);
        // rand 0.6 > p: skipped, no σ drawn (Fixed would panic on a second draw).
        assert_eq!(
            apply_one(&t, img.clone(), &mut Fixed(vec![0.6])).unwrap(),
            img
        );
        // rand 0.5 = p: applied with σ = 1.5.
        let out = apply_one(&t, img.clone(), &mut Fixed(vec![0.5, 1.5])).unwrap();
        assert_eq!(out, gaussian_blur(&img, 3, 1.5).unwrap());
        assert_ne!(out, img);
    }

    #[test]
    fn native_keeps_the_size_and_the_normalisation() {
        let eval = Pipeline::imagenet_test(36, 32);
        let native = eval.native();
        assert!(native.transforms.is_empty());
        assert_eq!(native.normalize, eval.normalize);
        assert_eq!(native.channels, 3);
        // Non-geometric steps stay, in order.
        let mut p = Pipeline::cifar_outliers();
        p.transforms.insert(1, Transform::Grayscale);
        assert_eq!(
            p.native().transforms,
            [
                Transform::Grayscale,
                Transform::RandomHorizontalFlip { p: 0.5 }
            ]
        );
        // A 36×36 image comes out 36×36 (and 32×32 through the evaluation transform).
        let img =
            RawImage::new(36, 36, 1, (0..36 * 36).map(|v| (v % 251) as u8).collect()).unwrap();
        let mut none = Fixed(vec![]);
        let out = native.apply(img.clone(), &mut none).unwrap();
        assert_eq!((out.channels, out.height, out.width), (3, 36, 36));
        let want = to_tensor(
            &img.clone().to_channels(3).unwrap(),
            eval.normalize.as_ref(),
        )
        .unwrap();
        assert_eq!(out, want);
        let cut = eval.apply(img, &mut none).unwrap();
        assert_eq!((cut.height, cut.width), (32, 32));
    }

    #[test]
    fn invalid_settings_are_reported_by_key() {
        let mut p = Pipeline::cifar_test();
        p.channels = 1;
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("transforms.normalize"), "{err}");
        let p = Pipeline {
            channels: 3,
            transforms: vec![Transform::RandomResizedCrop {
                height: 8,
                width: 8,
                scale: (1.0, 0.5),
                ratio: (0.75, 1.33),
            }],
            normalize: None,
        };
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("random_resized_crop")
        );
    }
}
