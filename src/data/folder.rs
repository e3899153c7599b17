//! Image folders in torchvision's `ImageFolder` layout: `root/<class>/**/<image>`.
//!
//! Classes are the subfolders of `root` sorted by name, label = position (torchvision's `find_classes`).
//! Images are found as torchvision's `make_dataset` does: every folder under a class folder (symlinks
//! followed) in sorted path order, files sorted by name, kept if their extension (any case) is `png`,
//! `jpg`, `jpeg` or `webp`, the formats this build decodes; other files are ignored. Files are decoded
//! when the loader asks, so a corrupt one surfaces there and falls under its [`super::OnError`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{Dataset, RawImage, index_error};
use crate::{Error, Result};

/// File extensions decoded (lower case).
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// An image folder: paths and labels; pixels are read on demand.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<i64>,
}

impl ImageFolder {
    /// Lists `root`. Fails if `root` has no class folder, or a class folder holds no image (torchvision
    /// raises the same; an empty class would silently shift nothing but is almost always a mistake).
    pub fn open(root: &Path) -> Result<Self> {
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            if entry.path().is_dir() {
                classes.push(entry.file_name());
            }
        }
        // Python sorts str by code point; UTF-8 byte order is the same order.
        classes.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        if classes.is_empty() {
            return Err(Error::Data {
                path: root.to_path_buf(),
                line: None,
                msg: "no class subfolder (ImageFolder layout: root/<class>/<image>)".into(),
            });
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let found = list_images(&root.join(class))?;
            if found.is_empty() {
                empty.push(class.to_string_lossy().into_owned());
            }
            labels.extend(std::iter::repeat_n(label as i64, found.len()));
            files.extend(found);
        }
        if !empty.is_empty() {
            return Err(Error::Data {
                path: root.to_path_buf(),
                line: None,
                msg: format!(
                    "no {} image in class folder(s) {}; remove them or add images",
                    EXTENSIONS.join("/"),
                    empty.join(", ")
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes: classes
                .into_iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            files,
            labels,
        })
    }

    /// The folder this was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in label then path order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Images under `dir`, in the order of `sorted(os.walk(dir, followlinks=True))` then `sorted(fnames)`.
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    // Gather every folder first: os.walk's tuples sorted by their root string is not a depth-first walk
    // in name order ("a b" sorts before "a/b").
    let mut dirs: Vec<(OsString, Vec<OsString>)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if has_image_extension(&path) {
                names.push(entry.file_name());
            }
        }
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        dirs.push((d.into_os_string(), names));
    }
    dirs.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    Ok(dirs
        .into_iter()
        .flat_map(|(d, names)| {
            let d = PathBuf::from(d);
            names.into_iter().map(move |n| d.join(n))
        })
        .collect())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn label(&self, index: usize) -> i64 {
        self.labels.get(index).copied().unwrap_or(-1)
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        let path = self
            .files
            .get(index)
            .ok_or_else(|| index_error(index, self.len()))?;
        RawImage::open(path)
    }

    fn describe(&self, index: usize) -> String {
        self.files
            .get(index)
            .map_or_else(|| format!("image {index}"), |p| p.display().to_string())
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_raw(2, 2, vec![v; 4])
            .unwrap()
            .save(path)
            .unwrap();
    }

    #[test]
    fn classes_sorted_files_in_os_walk_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("b_cls/z.png"), 1);
        png(&r.join("b_cls/a.PNG"), 2);
        png(&r.join("b_cls/a/b/x.png"), 3);
        png(&r.join("b_cls/a b/y.png"), 4);
        std::fs::write(r.join("b_cls/notes.txt"), "ignored").unwrap();
        png(&r.join("A_cls/k.png"), 5);
        std::fs::write(r.join("stray.png"), "not in a class").unwrap();
        let ds = ImageFolder::open(r).unwrap();
        assert_eq!(ds.classes(), &["A_cls".to_string(), "b_cls".to_string()]);
        let rel: Vec<String> = ds
            .files()
            .iter()
            .map(|p| p.strip_prefix(r).unwrap().display().to_string())
            .collect();
        // sorted(os.walk): "b_cls" < "b_cls/a" < "b_cls/a b" < "b_cls/a/b" (space 0x20 < '/' 0x2f).
        assert_eq!(
            rel,
            [
                "A_cls/k.png",
                "b_cls/a.PNG",
                "b_cls/z.png",
                "b_cls/a b/y.png",
                "b_cls/a/b/x.png"
            ]
        );
        assert_eq!(
            (0..5).map(|i| ds.label(i)).collect::<Vec<_>>(),
            [0, 1, 1, 1, 1]
        );
        assert_eq!(ds.get(4).unwrap().data(), &[3; 4]);
    }

    #[test]
    fn an_empty_class_or_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no class subfolder"), "{err}");
        png(&dir.path().join("cat/1.png"), 0);
        std::fs::create_dir(dir.path().join("dog")).unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("dog"), "{err}");
    }
}
