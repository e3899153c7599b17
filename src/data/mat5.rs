//! A reader for the numeric arrays of MATLAB level-5 MAT-files (what `save -v6` / `-v7` and
//! `scipy.io.savemat` write), enough for SVHN's `*_32x32.mat` ([`super::svhn_mat`]).
//!
//! Layout (MathWorks' "MAT-File Format" document, `matfile_format.pdf`, chapter 1; where it is silent, what
//! `scipy.io.matlab._mio5` does, e.g. reading the next element right after a compressed one):
//!
//! ```text
//!  header   128 bytes: 116 bytes of text, 8 bytes subsystem offset, version u16 (0x0100),
//!           endian indicator "IM" (little-endian file) or "MI" (big-endian)
//!  element  tag (type u32, nbytes u32) + data padded to 8 bytes, or the small form: one u32 holding
//!           nbytes (high 16 bits, 1..4) and type (low 16 bits), then the data in the tag's second word
//!  miMATRIX (14)      array flags (miUINT32 ×2: class in bits 0–7, complex bit 0x0800),
//!                     dimensions (miINT32 ×n), name (miINT8), real part (numeric), imaginary part
//!  miCOMPRESSED (15)  a zlib stream holding one miMATRIX element; not padded after
//! ```
//!
//! The real part may be stored in a smaller type than the array's class (MATLAB writes a double array of
//! small integers as miUINT8), so values are converted on request. The file is read as a stream: only the
//! variables asked for are decompressed and kept, so the 1.3 GB `extra_32x32.mat` costs the size of its
//! arrays, not twice that. Cell, struct, char and sparse arrays are listed by name and skipped.
//!
//! Every defect (not a MAT-5 file, a MATLAB v7.3 HDF5 file, truncation, an element that overruns its
//! matrix, a corrupt zlib stream) is an [`Error::Data`] naming the file; nothing here panics on input.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::ZlibDecoder;

use crate::{Error, Result};

const HEADER_LEN: u64 = 128;
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

/// A variable of a MAT-file: its header always, its real part when it was asked for and is numeric.
#[derive(Debug, Clone)]
pub(crate) struct Variable {
    pub name: String,
    /// MATLAB's array class code (`mxDOUBLE_CLASS` = 6, `mxUINT8_CLASS` = 9, …).
    pub class: u8,
    pub complex: bool,
    /// MATLAB dimensions, first fastest (column-major).
    pub dims: Vec<usize>,
    pub real: Option<Numeric>,
}

/// `mxDOUBLE_CLASS`, the first numeric array class; `mxUINT64_CLASS` (15) is the last.
const MX_DOUBLE: u8 = 6;
/// `mxUINT8_CLASS`.
pub(crate) const MX_UINT8: u8 = 9;
const MX_UINT64: u8 = 15;

impl Variable {
    /// Whether the class is a numeric array (double, single or an integer type).
    pub fn is_numeric(&self) -> bool {
        (MX_DOUBLE..=MX_UINT64).contains(&self.class)
    }

    /// The class as MATLAB's `class()` names it.
    pub fn class_name(&self) -> &'static str {
        match self.class {
            1 => "cell",
            2 => "struct",
            3 => "object",
            4 => "char",
            5 => "sparse",
            6 => "double",
            7 => "single",
            8 => "int8",
            9 => "uint8",
            10 => "int16",
            11 => "uint16",
            12 => "int32",
            13 => "uint32",
            14 => "int64",
            15 => "uint64",
            _ => "unknown class",
        }
    }

    /// The number of elements the dimensions promise, `None` on overflow.
    pub fn numel(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

/// The real part of a numeric array as stored: element type, raw bytes and byte order.
#[derive(Debug, Clone)]
pub(crate) struct Numeric {
    /// The MAT data type (`miUINT8` = 2, `miDOUBLE` = 9, …).
    pub data_type: u32,
    pub bytes: Vec<u8>,
    pub big_endian: bool,
}

impl Numeric {
    /// Bytes per element of a numeric data type; `None` for a type that is not a number.
    fn width(data_type: u32) -> Option<usize> {
        match data_type {
            1 | 2 => Some(1),       // miINT8, miUINT8
            3 | 4 => Some(2),       // miINT16, miUINT16
            5..=7 => Some(4),       // miINT32, miUINT32, miSINGLE
            9 | 12 | 13 => Some(8), // miDOUBLE, miINT64, miUINT64
            _ => None,
        }
    }

    /// Number of stored elements.
    pub fn len(&self) -> usize {
        Self::width(self.data_type).map_or(0, |w| self.bytes.len() / w)
    }

    /// Element `i` as f64 (exact for every type but 64-bit integers past 2^53, which SVHN does not have).
    fn value(&self, i: usize) -> f64 {
        let w = Self::width(self.data_type).unwrap_or(1);
        let mut b = [0u8; 8];
        b[..w].copy_from_slice(&self.bytes[i * w..(i + 1) * w]);
        if self.big_endian {
            b[..w].reverse();
        }
        match self.data_type {
            1 => b[0] as i8 as f64,
            2 => b[0] as f64,
            3 => i16::from_le_bytes([b[0], b[1]]) as f64,
            4 => u16::from_le_bytes([b[0], b[1]]) as f64,
            5 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            6 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            7 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            9 => f64::from_le_bytes(b),
            12 => i64::from_le_bytes(b) as f64,
            _ => u64::from_le_bytes(b) as f64,
        }
    }

    /// Every element as f64.
    pub fn to_f64(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.value(i)).collect()
    }

    /// Every element as u8, failing at the first that is not an integer in 0..=255. miUINT8 data is
    /// taken as it is.
    pub fn into_u8(self) -> std::result::Result<Vec<u8>, String> {
        if self.data_type == MI_UINT8 {
            return Ok(self.bytes);
        }
        (0..self.len())
            .map(|i| {
                let v = self.value(i);
                if v.fract() == 0.0 && (0.0..=255.0).contains(&v) {
                    Ok(v as u8)
                } else {
                    Err(format!("element {i} is {v}, not a uint8 value"))
                }
            })
            .collect()
    }
}

/// Reads the variables of a MAT-5 file in file order. Every variable's name, class and dimensions are
/// returned; the real part only for numeric variables named in `wanted`.
pub(crate) fn read_variables(path: &Path, wanted: &[&str]) -> Result<Vec<Variable>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::new(file);
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let mut header = vec![0u8; len.min(HEADER_LEN) as usize];
    r.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let big_endian = check_header(&header, len).map_err(bad)?;

    let mut vars = Vec::new();
    let mut pos = HEADER_LEN;
    while pos < len {
        if len - pos < 8 {
            return Err(bad(format!(
                "truncated: {} stray bytes at byte {pos} where an element tag (8 bytes) should be",
                len - pos
            )));
        }
        let mut tag = [0u8; 8];
        r.read_exact(&mut tag).map_err(|e| Error::io(path, e))?;
        let (data_type, nbytes) = parse_tag(&tag, big_endian);
        let (nbytes, small) = match nbytes {
            TagSize::Small(_) => (0, true),
            TagSize::Full(n) => (n as u64, false),
        };
        let start = pos;
        pos += 8;
        if nbytes > len - pos {
            return Err(bad(format!(
                "truncated: the element at byte {start} declares {nbytes} bytes, only {} remain",
                len - pos
            )));
        }
        let mut body = (&mut r).take(nbytes);
        let parsed = match data_type {
            _ if small => Ok(None),
            MI_MATRIX => read_matrix(&mut body, nbytes, nbytes, big_endian, wanted),
            MI_COMPRESSED => read_compressed(&mut body, nbytes, big_endian, wanted),
            _ => Ok(None), // subsystem data and other top-level elements are not variables
        };
        let var = parsed.map_err(|e| e.at(path, start))?;
        // Skip what was not read: the rest of an unwanted variable, a zlib trailer.
        std::io::copy(&mut body, &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
        vars.extend(var);
        pos += nbytes;
    }
    Ok(vars)
}

/// Checks the 128-byte header and returns whether the file is big-endian.
fn check_header(header: &[u8], len: u64) -> std::result::Result<bool, String> {
    const V73: &str = "MATLAB v7.3 (HDF5) files are not supported; re-save it with MATLAB's \
                       save(..., '-v7') or with scipy.io.savemat";
    if header.starts_with(b"\x89HDF\r\n\x1a\n") {
        return Err(format!("an HDF5 file: {V73}"));
    }
    if header.len() < HEADER_LEN as usize {
        return Err(format!(
            "not a MATLAB MAT-file: {len} bytes, shorter than the 128-byte MAT-5 header"
        ));
    }
    let big_endian = match &header[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => {
            return Err(format!(
                "not a MATLAB level-5 MAT-file: bytes 126–127 are {other:02x?}, not the endian \
                 indicator \"IM\" or \"MI\" (MATLAB v4 files are not supported either)"
            ));
        }
    };
    let version = read_u16(&header[124..126], big_endian);
    match version {
        0x0100 => Ok(big_endian),
        0x0200 => Err(format!("version 0x0200: {V73}")),
        v => Err(format!(
            "MAT-file version 0x{v:04x}; only level 5 (0x0100: MATLAB -v6 and -v7) is supported"
        )),
    }
}

/// A problem inside one top-level element, located by [`Problem::at`].
#[derive(Debug)]
enum Problem {
    /// The element's content is inconsistent.
    Bad(String),
    /// Reading failed: a corrupt zlib stream, or the element ended early.
    Read(std::io::Error),
}

impl Problem {
    fn at(self, path: &Path, start: u64) -> Error {
        let path: PathBuf = path.to_path_buf();
        let msg = match self {
            Problem::Bad(m) => format!("the variable at byte {start}: {m}"),
            Problem::Read(e) if e.kind() == ErrorKind::UnexpectedEof => {
                format!("the variable at byte {start} ends before its content does (truncated?)")
            }
            Problem::Read(e) => format!("the variable at byte {start} cannot be read: {e}"),
        };
        Error::Data {
            path,
            line: None,
            msg,
        }
    }
}

impl From<std::io::Error> for Problem {
    fn from(e: std::io::Error) -> Self {
        Problem::Read(e)
    }
}

type Parsed<T> = std::result::Result<T, Problem>;

/// The size field of a tag.
enum TagSize {
    /// The small form: the data (1..4 bytes) is in the tag's second word.
    Small(usize),
    Full(u32),
}

fn read_u16(b: &[u8], big_endian: bool) -> u16 {
    let b = [b[0], b[1]];
    if big_endian {
        u16::from_be_bytes(b)
    } else {
        u16::from_le_bytes(b)
    }
}

fn read_u32(b: &[u8], big_endian: bool) -> u32 {
    let b = [b[0], b[1], b[2], b[3]];
    if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    }
}

fn parse_tag(tag: &[u8; 8], big_endian: bool) -> (u32, TagSize) {
    let first = read_u32(&tag[..4], big_endian);
    if first >> 16 != 0 {
        (first & 0xffff, TagSize::Small((first >> 16) as usize))
    } else {
        (first, TagSize::Full(read_u32(&tag[4..], big_endian)))
    }
}

/// Reads a miCOMPRESSED element's body (`nbytes` long): a zlib stream holding one miMATRIX.
fn read_compressed(
    body: &mut impl Read,
    nbytes: u64,
    big_endian: bool,
    wanted: &[&str],
) -> Parsed<Option<Variable>> {
    let mut z = ZlibDecoder::new(body);
    let mut tag = [0u8; 8];
    z.read_exact(&mut tag)?;
    // Deflate expands at most 1032:1, so no real stream can fill more than this.
    let most = nbytes.saturating_mul(1032);
    let var = match parse_tag(&tag, big_endian) {
        (MI_MATRIX, TagSize::Full(n)) => read_matrix(
            &mut (&mut z).take(n as u64),
            n as u64,
            most,
            big_endian,
            wanted,
        )?,
        (t, _) => {
            return Err(Problem::Bad(format!(
                "the compressed element holds data type {t}, not miMATRIX (14)"
            )));
        }
    };
    if var.as_ref().is_some_and(|v| v.real.is_some()) {
        // Inflate to the end of the stream, so its Adler-32 checksum vouches for the data kept.
        std::io::copy(&mut z, &mut std::io::sink())?;
    }
    Ok(var)
}

/// Reads a miMATRIX body of `nbytes`: flags, dimensions, name, and the real part when wanted. `most` bounds
/// what the body can really hold (the file's bytes, or what its zlib stream can expand to), so a corrupt
/// size never reserves more memory than that.
fn read_matrix(
    body: &mut impl Read,
    nbytes: u64,
    most: u64,
    big_endian: bool,
    wanted: &[&str],
) -> Parsed<Option<Variable>> {
    if nbytes == 0 {
        return Ok(None); // an empty matrix element (MATLAB writes these for empty cells)
    }
    let mut sub = Subelements {
        r: body,
        left: nbytes,
        most,
        big_endian,
    };
    let (t, flags) = sub.next()?;
    if t != MI_UINT32 || flags.len() != 8 {
        return Err(Problem::Bad(format!(
            "array flags are type {t} with {} bytes; expected miUINT32 (6) with 8",
            flags.len()
        )));
    }
    let word = read_u32(&flags, big_endian);
    let class = (word & 0xff) as u8;
    let complex = word & 0x0800 != 0;

    let (t, dims) = sub.next()?;
    if t != MI_INT32 || dims.len() < 8 || dims.len() % 4 != 0 {
        return Err(Problem::Bad(format!(
            "dimensions are type {t} with {} bytes; expected miINT32 (5), at least 2 of them",
            dims.len()
        )));
    }
    let dims = dims
        .chunks_exact(4)
        .map(|c| {
            let d = read_u32(c, big_endian) as i32;
            usize::try_from(d).map_err(|_| Problem::Bad(format!("negative dimension {d}")))
        })
        .collect::<Parsed<Vec<usize>>>()?;

    let (t, name) = sub.next()?;
    if !matches!(t, MI_INT8 | MI_UINT8 | MI_UTF8) {
        return Err(Problem::Bad(format!(
            "the array name is type {t}; expected miINT8 (1)"
        )));
    }
    let name = String::from_utf8_lossy(&name).into_owned();
    let mut var = Variable {
        name,
        class,
        complex,
        dims,
        real: None,
    };
    let numeric = (6..=15).contains(&class);
    if numeric && wanted.contains(&var.name.as_str()) {
        let (data_type, bytes) = sub.next()?;
        let Some(width) = Numeric::width(data_type) else {
            return Err(Problem::Bad(format!(
                "`{}`: the real part is data type {data_type}, not a number type",
                var.name
            )));
        };
        if bytes.len() % width != 0 {
            return Err(Problem::Bad(format!(
                "`{}`: {} bytes of real part are not whole {width}-byte elements",
                var.name,
                bytes.len()
            )));
        }
        var.real = Some(Numeric {
            data_type,
            bytes,
            big_endian,
        });
    }
    Ok(Some(var))
}

/// The data elements inside a matrix, each checked against the bytes the matrix has left.
struct Subelements<'a, R: Read> {
    r: &'a mut R,
    left: u64,
    most: u64,
    big_endian: bool,
}

impl<R: Read> Subelements<'_, R> {
    /// The next element's type and data, its padding skipped.
    fn next(&mut self) -> Parsed<(u32, Vec<u8>)> {
        if self.left < 8 {
            return Err(Problem::Bad(format!(
                "the matrix ends ({} bytes left) where another element should start",
                self.left
            )));
        }
        let mut tag = [0u8; 8];
        self.r.read_exact(&mut tag)?;
        self.left -= 8;
        match parse_tag(&tag, self.big_endian) {
            (t, TagSize::Small(n)) if n <= 4 => Ok((t, tag[4..4 + n].to_vec())),
            (t, TagSize::Small(n)) => Err(Problem::Bad(format!(
                "a small data element (type {t}) claims {n} bytes; at most 4 fit"
            ))),
            (t, TagSize::Full(n)) => {
                let n = n as u64;
                if n > self.left {
                    return Err(Problem::Bad(format!(
                        "an element of type {t} declares {n} bytes, its matrix has {} left",
                        self.left
                    )));
                }
                let mut data = Vec::with_capacity(n.min(self.most) as usize);
                let got = self.r.take(n).read_to_end(&mut data)? as u64;
                if got < n {
                    return Err(Problem::Read(ErrorKind::UnexpectedEof.into()));
                }
                // Padding to 8 bytes; the last element of a matrix may go without it.
                let pad = ((8 - n % 8) % 8).min(self.left - n);
                std::io::copy(&mut self.r.take(pad), &mut std::io::sink())?;
                self.left -= n + pad;
                Ok((t, data))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    fn word(v: u32, big: bool) -> [u8; 4] {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    /// Test writer: one data element in the normal form, or the small form when `small` (≤ 4 bytes).
    pub(crate) fn element(data_type: u32, data: &[u8], big: bool, small: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if small {
            assert!(
                data.len() <= 4,
                "test bug: {} bytes in a small element",
                data.len()
            );
            out.extend(word((data.len() as u32) << 16 | data_type, big));
            out.extend(data);
            out.resize(8, 0);
        } else {
            out.extend(word(data_type, big));
            out.extend(word(data.len() as u32, big));
            out.extend(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    }

    /// Test writer: a miMATRIX element with a short (small-form) name.
    pub(crate) fn matrix(
        class: u8,
        dims: &[i32],
        name: &str,
        real: (u32, &[u8]),
        big: bool,
    ) -> Vec<u8> {
        let flags = [word(class as u32, big), [0; 4]].concat();
        let mut body = element(MI_UINT32, &flags, big, false);
        let dims: Vec<u8> = dims.iter().flat_map(|&d| word(d as u32, big)).collect();
        body.extend(element(MI_INT32, &dims, big, false));
        body.extend(element(MI_INT8, name.as_bytes(), big, name.len() <= 4));
        body.extend(element(real.0, real.1, big, real.1.len() <= 4));
        element(MI_MATRIX, &body, big, false)
    }

    /// Test writer: a header (level 5, the byte order's indicator) followed by `elements`.
    pub(crate) fn file(big: bool, elements: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"MATLAB 5.0 MAT-file, written by dream-ood's tests".to_vec();
        out.resize(124, b' ');
        out.extend(if big { [1, 0] } else { [0, 1] });
        out.extend(if big { b"MI" } else { b"IM" });
        for e in elements {
            out.extend(e);
        }
        out
    }

    fn read(bytes: &[u8], wanted: &[&str]) -> Result<Vec<Variable>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.mat");
        std::fs::write(&p, bytes).unwrap();
        read_variables(&p, wanted)
    }

    fn err(bytes: &[u8]) -> String {
        read(bytes, &["a"]).unwrap_err().to_string()
    }

    #[test]
    fn small_elements_and_both_byte_orders_read_alike() {
        for big in [false, true] {
            // A double array stored as three miUINT8 values in the small form, as MATLAB compacts it.
            let a = matrix(6, &[3, 1], "a", (MI_UINT8, &[10, 1, 5]), big);
            let b = matrix(9, &[1, 2], "b", (MI_UINT8, &[7, 8]), big);
            let vars = read(&file(big, &[a, b]), &["a"]).unwrap();
            assert_eq!(vars.len(), 2);
            assert_eq!((vars[0].name.as_str(), vars[0].class), ("a", 6));
            assert_eq!(vars[0].class_name(), "double");
            assert_eq!(vars[0].dims, [3, 1]);
            assert_eq!(vars[0].real.as_ref().unwrap().to_f64(), [10.0, 1.0, 5.0]);
            // Not asked for: listed, data not kept.
            assert_eq!(vars[1].name, "b");
            assert!(vars[1].real.is_none());
        }
    }

    #[test]
    fn every_numeric_type_converts_in_both_byte_orders() {
        // Each value written by std's to_{le,be}_bytes of the type the MAT data type names.
        let encode = |t: u32, v: f64, big: bool| -> Vec<u8> {
            let le = match t {
                1 => (v as i8).to_le_bytes().to_vec(),
                2 => (v as u8).to_le_bytes().to_vec(),
                3 => (v as i16).to_le_bytes().to_vec(),
                4 => (v as u16).to_le_bytes().to_vec(),
                5 => (v as i32).to_le_bytes().to_vec(),
                6 => (v as u32).to_le_bytes().to_vec(),
                7 => (v as f32).to_le_bytes().to_vec(),
                9 => v.to_le_bytes().to_vec(),
                12 => (v as i64).to_le_bytes().to_vec(),
                _ => (v as u64).to_le_bytes().to_vec(),
            };
            if big {
                le.into_iter().rev().collect()
            } else {
                le
            }
        };
        let cases = [
            (1, [-1.0, 127.0]),
            (2, [255.0, 0.0]),
            (3, [-2.0, 300.0]),
            (4, [65535.0, 1.0]),
            (5, [-7.0, 2147483647.0]),
            (6, [4294967295.0, 3.0]),
            (7, [0.5, -1.25]),
            (9, [0.1, 10.0]),
            (12, [-3.0, 4.0]),
            (13, [5.0, 6.0]),
        ];
        for big in [false, true] {
            for (t, want) in cases {
                let bytes = [encode(t, want[0], big), encode(t, want[1], big)].concat();
                let m = matrix(6, &[1, 2], "a", (t, &bytes), big);
                let vars = read(&file(big, &[m]), &["a"]).unwrap();
                let real = vars[0].real.as_ref().unwrap();
                assert_eq!(real.len(), 2, "type {t}");
                assert_eq!(real.to_f64(), want, "type {t}, big-endian {big}");
            }
        }
    }

    #[test]
    fn into_u8_takes_uint8_data_and_whole_values_only() {
        let n = |data_type, bytes: Vec<u8>| Numeric {
            data_type,
            bytes,
            big_endian: false,
        };
        assert_eq!(n(MI_UINT8, vec![0, 255]).into_u8().unwrap(), [0, 255]);
        let doubles = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(n(9, doubles(&[3.0, 250.0])).into_u8().unwrap(), [3, 250]);
        let e = n(9, doubles(&[3.0, 2.5])).into_u8().unwrap_err();
        assert!(e.contains("element 1 is 2.5"), "{e}");
        assert!(n(9, doubles(&[256.0])).into_u8().is_err());
        assert!(n(9, doubles(&[-1.0])).into_u8().is_err());
    }

    #[test]
    fn compressed_elements_are_inflated() {
        let m = matrix(
            6,
            &[2, 1],
            "a",
            (9, &[1f64.to_le_bytes(), 2f64.to_le_bytes()].concat()),
            false,
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
        z.write_all(&m).unwrap();
        // Not padded after, as MATLAB and scipy write it; a plain element follows.
        let mut c = 15u32.to_le_bytes().to_vec();
        let stream = z.finish().unwrap();
        c.extend((stream.len() as u32).to_le_bytes());
        c.extend(&stream);
        let b = matrix(9, &[1, 1], "b", (MI_UINT8, &[4]), false);
        let vars = read(&file(false, &[c.clone(), b]), &["a", "b"]).unwrap();
        assert_eq!(vars[0].real.as_ref().unwrap().to_f64(), [1.0, 2.0]);
        assert_eq!(vars[1].real.as_ref().unwrap().to_f64(), [4.0]);

        // A corrupt stream is an error, never a panic.
        let mut broken = c.clone();
        for byte in &mut broken[12..20] {
            *byte ^= 0x5a;
        }
        let e = err(&file(false, &[broken]));
        assert!(e.contains("t.mat") && e.contains("byte 128"), "{e}");
    }

    #[test]
    fn headers_that_are_not_mat5_say_what_they_are() {
        let e = err(b"hello");
        assert!(
            e.contains("t.mat") && e.contains("shorter than the 128-byte"),
            "{e}"
        );

        let mut v73 = file(false, &[]);
        v73[..19].copy_from_slice(b"MATLAB 7.3 MAT-file");
        v73[124..126].copy_from_slice(&[0, 2]);
        v73.resize(512, 0);
        v73.extend(b"\x89HDF\r\n\x1a\n");
        let e = err(&v73);
        assert!(
            e.contains("MATLAB v7.3 (HDF5) files are not supported"),
            "{e}"
        );
        assert!(e.contains("-v7"), "{e}");

        let mut hdf5 = b"\x89HDF\r\n\x1a\n".to_vec();
        hdf5.resize(600, 0);
        let e = err(&hdf5);
        assert!(e.contains("an HDF5 file") && e.contains("v7.3"), "{e}");

        let e = err(&[7u8; 200]);
        assert!(
            e.contains("not a MATLAB level-5 MAT-file") && e.contains("07, 07"),
            "{e}"
        );

        let mut odd = file(false, &[]);
        odd[124..126].copy_from_slice(&[0, 3]);
        let e = err(&odd);
        assert!(e.contains("version 0x0300"), "{e}");
    }

    #[test]
    fn sizes_that_overrun_are_errors() {
        let m = matrix(6, &[1, 1], "a", (MI_UINT8, &[1]), false);
        let whole = file(false, std::slice::from_ref(&m));
        let e = err(&whole[..whole.len() - 3]);
        assert!(
            e.contains("truncated") && e.contains("element at byte 128"),
            "{e}"
        );
        let e = err(&[whole.clone(), vec![0; 5]].concat());
        assert!(e.contains("5 stray bytes"), "{e}");

        // The dimensions element claims more than the matrix holds.
        let mut overrun = m;
        overrun[8 + 8 + 8 + 4..8 + 8 + 8 + 8].copy_from_slice(&4000u32.to_le_bytes());
        let e = err(&file(false, &[overrun]));
        assert!(e.contains("declares 4000 bytes"), "{e}");

        // A negative dimension.
        let neg = matrix(6, &[-1, 1], "a", (MI_UINT8, &[1]), false);
        let e = err(&file(false, &[neg]));
        assert!(e.contains("negative dimension -1"), "{e}");
    }
}
