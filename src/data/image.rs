//! [`RawImage`]: one decoded image as uint8 height × width × channels, the layout PIL and `np.array(pil)`
//! use, so the transforms can follow torchvision's PIL code paths value for value.

use std::path::Path;

use crate::{Error, Result};

/// A uint8 image, row-major HWC, with 1 (gray) or 3 (RGB) channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl RawImage {
    /// Wraps HWC bytes; fails if `channels` is not 1 or 3 or the length does not match.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(Error::InvalidValue {
                key: "channels".into(),
                msg: format!("{channels}; expected 1 (gray) or 3 (RGB)"),
            });
        }
        let expected = width * height * channels;
        if data.len() != expected {
            return Err(Error::Shape {
                what: "image bytes".into(),
                expected: format!("{height}×{width}×{channels} = {expected}"),
                got: data.len().to_string(),
            });
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// PNG bytes of the image (8-bit gray or RGB, as it is), e.g. to hand a dataset sample to a tool that
    /// reads files; `what` names it in the error.
    pub fn to_png(&self, what: &str) -> Result<Vec<u8>> {
        let colour = if self.channels == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        let mut bytes = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut bytes),
            &self.data,
            self.width as u32,
            self.height as u32,
            colour,
        )
        .map_err(|e| Error::Check {
            what: what.to_owned(),
            msg: format!("PNG encoding failed: {e}"),
        })?;
        Ok(bytes)
    }

    /// An all-zero (black) image.
    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Self {
            width,
            height,
            channels,
            data: vec![0; width * height * channels],
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// 1 or 3.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The HWC bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The HWC bytes, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Consumes the image, returning its HWC bytes.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// Converts to `channels` (1 or 3) the way PIL's `convert` does: gray → RGB repeats the value, RGB →
    /// gray is ITU-R 601-2 luma in PIL's fixed point, `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
    pub fn to_channels(self, channels: usize) -> Result<Self> {
        match (self.channels, channels) {
            (a, b) if a == b => Ok(self),
            (1, 3) => {
                let data = self.data.iter().flat_map(|&v| [v, v, v]).collect();
                Ok(Self {
                    channels: 3,
                    data,
                    ..self
                })
            }
            (3, 1) => {
                let data = self
                    .data
                    .chunks_exact(3)
                    .map(|p| {
                        let l =
                            19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000;
                        (l >> 16) as u8
                    })
                    .collect();
                Ok(Self {
                    channels: 1,
                    data,
                    ..self
                })
            }
            (_, c) => Err(Error::InvalidValue {
                key: "channels".into(),
                msg: format!("{c}; expected 1 (gray) or 3 (RGB)"),
            }),
        }
    }

    /// Decodes a PNG, JPEG or WebP file (format guessed from the content, not the name). Gray and
    /// gray+alpha images stay 1 channel; everything else becomes RGB with alpha dropped, as PIL's
    /// `convert("RGB")` in torchvision's `pil_loader` does.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Data {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        let reader = ::image::ImageReader::open(path)
            .map_err(|e| Error::io(path, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?;
        let img = reader
            .decode()
            .map_err(|e| bad(format!("cannot decode image: {e}")))?;
        Ok(Self::from_dynamic(img))
    }

    /// Converts a decoded `image` crate image (see [`RawImage::open`] for the channel rule).
    pub fn from_dynamic(img: ::image::DynamicImage) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        if img.color().has_color() {
            Self {
                width,
                height,
                channels: 3,
                data: img.into_rgb8().into_raw(),
            }
        } else {
            Self {
                width,
                height,
                channels: 1,
                data: img.into_luma8().into_raw(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_gray_and_rgb() {
        for channels in [1, 3] {
            let data: Vec<u8> = (0..5 * 4 * channels).map(|i| (i * 7) as u8).collect();
            let img = RawImage::new(5, 4, channels, data).unwrap();
            let back = ::image::load_from_memory(&img.to_png("t").unwrap()).unwrap();
            assert_eq!(RawImage::from_dynamic(back), img);
        }
    }

    #[test]
    fn new_checks_length_and_channels() {
        assert!(RawImage::new(2, 2, 3, vec![0; 12]).is_ok());
        assert!(RawImage::new(2, 2, 3, vec![0; 11]).is_err());
        assert!(RawImage::new(2, 2, 4, vec![0; 16]).is_err());
    }

    #[test]
    fn gray_to_rgb_repeats_and_rgb_to_gray_is_pil_luma() {
        let g = RawImage::new(2, 1, 1, vec![7, 200]).unwrap();
        assert_eq!(g.to_channels(3).unwrap().data(), &[7, 7, 7, 200, 200, 200]);
        // PIL: Image.new("RGB", (1, 1), (255, 0, 0)).convert("L") is 76; (0, 255, 0) is 150; (0, 0, 255)
        // is 29; (10, 20, 30) is 18.
        let c = RawImage::new(4, 1, 3, vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]).unwrap();
        assert_eq!(c.to_channels(1).unwrap().data(), &[76, 150, 29, 18]);
    }

    #[test]
    fn open_reports_a_corrupt_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.png");
        std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = RawImage::open(&p).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let missing = RawImage::open(&dir.path().join("nope.png"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.png"), "{missing}");
    }

    #[test]
    fn open_keeps_gray_gray_and_drops_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        ::image::GrayImage::from_raw(2, 1, vec![3, 250])
            .unwrap()
            .save(&gray)
            .unwrap();
        let g = RawImage::open(&gray).unwrap();
        assert_eq!((g.width(), g.height(), g.channels()), (2, 1, 1));
        assert_eq!(g.data(), &[3, 250]);
        let rgba = dir.path().join("c.png");
        ::image::RgbaImage::from_raw(1, 1, vec![9, 8, 7, 0])
            .unwrap()
            .save(&rgba)
            .unwrap();
        assert_eq!(RawImage::open(&rgba).unwrap().data(), &[9, 8, 7]);
    }
}
