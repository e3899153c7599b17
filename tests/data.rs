//! `dream_ood::data` through its public API: the transforms against torchvision 0.26 with its own random
//! draws replayed (`tests/fixtures/data/`, made by `tools/make_transform_fixtures.py`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::Deserialize;
use serde_json::Value;

use dream_ood::data::RawImage;
use dream_ood::data::transforms::{
    CropBox, Draws, Normalize, Pipeline, Size, Transform, resized_crop_params,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

#[derive(Debug, Deserialize)]
struct Fixtures {
    tolerance: f32,
    tensor_path_max_abs_diff: f32,
    cases: Vec<Case>,
    rrc_params: Vec<ParamsCase>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    image: String,
    channels: usize,
    transforms: Vec<Value>,
    normalize: Option<String>,
    draws: Vec<Draw>,
    expected: String,
    tensor_path: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ParamsCase {
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    draws: Vec<Draw>,
    #[serde(rename = "box")]
    crop: [i64; 4],
}

#[derive(Debug, Clone, Deserialize)]
struct Draw {
    kind: String,
    lo: f64,
    hi: f64,
    value: f64,
}

/// Replays torchvision's recorded draws, checking that each is asked for with the same kind and range.
struct Replay {
    draws: VecDeque<Draw>,
    errors: RefCell<Vec<String>>,
}

impl Replay {
    fn new(draws: &[Draw]) -> Self {
        Self {
            draws: draws.iter().cloned().collect(),
            errors: RefCell::default(),
        }
    }

    fn take(&mut self, kind: &str, lo: f64, hi: f64) -> f64 {
        let Some(d) = self.draws.pop_front() else {
            self.errors
                .borrow_mut()
                .push(format!("{kind}({lo}, {hi}) asked after the last draw"));
            return 0.0;
        };
        // Ranges agree to float32 precision (torch computes the log-ratio bounds in float32).
        if d.kind != kind || (d.lo - lo).abs() > 1e-6 || (d.hi - hi).abs() > 1e-6 {
            self.errors.borrow_mut().push(format!(
                "asked {kind}({lo}, {hi}), torchvision drew {}({}, {})",
                d.kind, d.lo, d.hi
            ));
        }
        d.value
    }

    fn check(&self, name: &str) {
        let errors = self.errors.borrow();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        assert!(
            self.draws.is_empty(),
            "{name}: {} draws left unused",
            self.draws.len()
        );
    }
}

impl Draws for Replay {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.take("uniform", lo, hi)
    }
    fn randint(&mut self, lo: i64, hi: i64) -> i64 {
        self.take("randint", lo as f64, hi as f64) as i64
    }
    fn rand(&mut self) -> f64 {
        self.take("rand", 0.0, 1.0)
    }
}

fn pair(v: &Value) -> (usize, usize) {
    let a = v.as_array().expect("size is [h, w]");
    (
        a[0].as_u64().unwrap() as usize,
        a[1].as_u64().unwrap() as usize,
    )
}

fn f64_pair(v: &Value) -> (f64, f64) {
    let a = v.as_array().expect("a [lo, hi] pair");
    (a[0].as_f64().unwrap(), a[1].as_f64().unwrap())
}

/// The fixture's transform spec as the library's [`Transform`].
fn transform(spec: &Value) -> Transform {
    let size = &spec["size"];
    match spec["kind"].as_str().unwrap() {
        "resize" => match size.as_u64() {
            Some(n) => Transform::Resize(Size::Shorter(n as usize)),
            None => {
                let (height, width) = pair(size);
                Transform::Resize(Size::Exact { height, width })
            }
        },
        "center_crop" => {
            let (height, width) = pair(size);
            Transform::CenterCrop { height, width }
        }
        "random_crop" => {
            let (height, width) = pair(size);
            Transform::RandomCrop {
                height,
                width,
                padding: spec["padding"].as_u64().unwrap() as usize,
            }
        }
        "random_horizontal_flip" => Transform::RandomHorizontalFlip {
            p: spec["p"].as_f64().unwrap(),
        },
        "random_resized_crop" => {
            let (height, width) = pair(size);
            Transform::RandomResizedCrop {
                height,
                width,
                scale: f64_pair(&spec["scale"]),
                ratio: f64_pair(&spec["ratio"]),
            }
        }
        other => panic!("unknown transform {other} in the fixture"),
    }
}

fn load() -> Fixtures {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).expect("fixtures present");
    serde_json::from_str(&text).expect("cases.json parses")
}

/// Largest |a − b|, after checking shapes agree.
fn max_diff(name: &str, got: &[f32], got_shape: &[usize], want: &ArrayD<f32>) -> f32 {
    assert_eq!(got_shape, want.shape(), "{name}: shape");
    got.iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn transforms_equal_torchvision_with_its_draws_replayed() {
    let fx = load();
    assert!(fx.cases.len() >= 40, "fixture has {} cases", fx.cases.len());
    for case in &fx.cases {
        let img = RawImage::open(&fixture_dir().join(&case.image)).unwrap();
        let normalize = match case.normalize.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some("cifar") => Some(Some(Normalize::cifar())),
            Some("imagenet") => Some(Some(Normalize::imagenet())),
            Some(other) => panic!("unknown normalisation {other}"),
        };
        let pipeline = Pipeline {
            channels: case.channels,
            transforms: case.transforms.iter().map(transform).collect(),
            normalize: normalize.clone().flatten(),
        };
        let mut replay = Replay::new(&case.draws);
        let path = fixture_dir().join(&case.expected);
        let diff = if normalize.is_some() {
            // ToTensor output: float32 CHW.
            let out = pipeline.apply(img, &mut replay).unwrap();
            let want: ArrayD<f32> = ndarray_npy::read_npy(&path).unwrap();
            max_diff(
                &case.name,
                &out.data,
                &[out.channels, out.height, out.width],
                &want,
            )
        } else {
            // PIL image output: uint8 HWC.
            let mut out = img.to_channels(case.channels).unwrap();
            for t in &pipeline.transforms {
                out = dream_ood::data::transforms::apply_one(t, out, &mut replay).unwrap();
            }
            let want: ArrayD<u8> = ndarray_npy::read_npy(&path).unwrap();
            assert_eq!(
                [out.height(), out.width(), out.channels()].as_slice(),
                want.shape(),
                "{}: shape",
                case.name
            );
            let got: Vec<u8> = out.data().to_vec();
            let levels = got
                .iter()
                .zip(want.iter())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            if let Some(tp) = &case.tensor_path {
                // torchvision's tensor path (antialias=True, float, no uint8 rounding) within the stated
                // bound, in levels; CHW there, HWC here.
                let t: ArrayD<f32> = ndarray_npy::read_npy(fixture_dir().join(tp)).unwrap();
                let (h, w, c) = (out.height(), out.width(), out.channels());
                let mut chw = vec![0f32; got.len()];
                for (p, v) in got.iter().enumerate() {
                    chw[(p % c) * h * w + p / c] = *v as f32;
                }
                let d = max_diff(&case.name, &chw, &[c, h, w], &t);
                assert!(
                    d <= fx.tensor_path_max_abs_diff + 1e-3,
                    "{}: {d} levels from torchvision's tensor path",
                    case.name
                );
            }
            levels as f32
        };
        replay.check(&case.name);
        assert!(
            diff <= fx.tolerance,
            "{}: max |diff| {diff} (tolerance {})",
            case.name,
            fx.tolerance
        );
    }
}

#[test]
fn resized_crop_boxes_equal_torchvision_get_params() {
    let fx = load();
    let mut fallbacks = 0;
    for (n, p) in fx.rrc_params.iter().enumerate() {
        let mut replay = Replay::new(&p.draws);
        let b = resized_crop_params(p.height, p.width, p.scale, p.ratio, &mut replay);
        replay.check(&format!("rrc_params[{n}]"));
        let want = CropBox {
            top: p.crop[0],
            left: p.crop[1],
            height: p.crop[2] as usize,
            width: p.crop[3] as usize,
        };
        assert_eq!(b, want, "rrc_params[{n}] ({}×{})", p.height, p.width);
        fallbacks += usize::from(p.draws.len() == 20);
    }
    assert!(fallbacks > 0, "no case exercised the fallback");
}
