use std::fs;

use crate::common::{run_clean, stderr, stdout};

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("run.toml"), text).unwrap();
    let out = run_clean(dir.path(), &["config", "check", "run.toml"], &[]);
    (out.status.code().unwrap_or(-1), stdout(&out), stderr(&out))
}

#[test]
fn valid_config_prints_resolved_values() {
    let (code, out, err) = check("[run]\nseed = 3\n\n[sample]\nsigma = 0.03\nselect = 200\n");
    assert_eq!(code, 0, "stderr: {err}");
    let resolved: toml::Table = toml::from_str(&out).expect("stdout is TOML");
    assert_eq!(resolved["run"]["seed"].as_integer(), Some(3));
    assert_eq!(resolved["sample"]["sigma"].as_float(), Some(0.03));
    assert_eq!(resolved["sample"]["select"].as_integer(), Some(200));
    // Defaults are filled in, and the run folder is made absolute against the config's folder.
    assert_eq!(resolved["sample"]["k"].as_integer(), Some(300));
    let out_dir = resolved["run"]["out_dir"].as_str().unwrap();
    assert!(out_dir.ends_with("runs/default"), "{out_dir}");
}

#[test]
fn unknown_key_names_file_line_path_and_nearest_key() {
    let (code, out, err) = check("[run]\nseed = 3\n\n[sample]\nsgima = 0.03\n");
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("error: run.toml:5: sample.sgima: unknown key; did you mean `sigma`?"),
        "stderr: {err}"
    );
}

#[test]
fn wrong_type_names_file_line_and_path() {
    let (code, _, err) = check("[run]\nseed = \"seven\"\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("error: run.toml:2: run.seed: invalid type: string \"seven\""),
        "stderr: {err}"
    );
}

#[test]
fn out_of_range_value_names_key() {
    let (code, _, err) = check("[sample]\nkeep = 5000\n");
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "error: run.toml:2: sample.keep: keeps 5000 of 1500 candidates per boundary point"
        ),
        "stderr: {err}"
    );
}

#[test]
fn missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_clean(dir.path(), &["config", "check", "nope.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("error: nope.toml: No such file or directory"),
        "stderr: {err}"
    );
}

#[test]
fn shipped_configs_are_valid() {
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            dream_ood::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(seen > 0, "no configs in {}", configs.display());
}

/// `configs/reference.toml` documents every key; it must say exactly what the code's defaults are.
#[test]
fn reference_config_states_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/reference.toml");
    let text = fs::read_to_string(&path).unwrap();
    let parsed = dream_ood::config::Config::parse(&text, &path).unwrap();
    assert_eq!(parsed, dream_ood::config::Config::default());
    // And it names every key the schema has (a new key must be documented there).
    let documented: toml::Table = toml::from_str(&text).unwrap();
    let all: toml::Table =
        toml::from_str(&toml::to_string(&dream_ood::config::Config::default()).unwrap()).unwrap();
    assert_eq!(documented, all);
}

/// The cause of an I/O error is printed once (it is part of the message, not also a `source()`).
#[test]
fn missing_file_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_clean(dir.path(), &["config", "check", "gone.toml"], &[]);
    let err = stderr(&out);
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "stderr: {err}"
    );
}
