//! The classes file of stage 3: which word goes into each class's prompt and which token is replaced.
//!
//! ```toml
//! template = "A high-quality image of the {}"   # the default
//!
//! [[class]]                     # class 0 = row 0 of the embedding file
//! name = "aquarium fish"        # the word put into the prompt
//! embedding_word = "fish"       # its first BPE token is the anchor (default: name)
//!
//! [[class]]
//! name = "kite"
//! prompt = "A high-quality image of the kite bird"   # a full prompt instead of the template
//! ```
//!
//! Class index = position in this list = first axis of the embedding file. `configs/classes/` ships the
//! CIFAR-100 and ImageNet-100 lists of the official code (SPEC §1.1, §3.1), each fixed and as-official.

use std::path::Path;

use serde::Deserialize;

use crate::config::parse_toml;
use crate::error::{Error, Result};

/// The official prompt template (`scripts/dream_ood.py:L180-183`).
pub const DEFAULT_TEMPLATE: &str = "A high-quality image of the {}";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClasses {
    #[serde(default = "default_template")]
    template: String,
    #[serde(rename = "class", default)]
    classes: Vec<RawClass>,
}

fn default_template() -> String {
    DEFAULT_TEMPLATE.to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    embedding_word: Option<String>,
    prompt: Option<String>,
}

/// One class, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    /// The class name (the word in the prompt).
    pub name: String,
    /// The word whose first BPE token is the anchor replaced by the outlier embedding.
    pub embedding_word: String,
    /// The full prompt.
    pub prompt: String,
}

/// A classes file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classes {
    pub classes: Vec<ClassSpec>,
}

impl Classes {
    pub fn load(path: &Path) -> Result<Classes> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Classes> {
        let raw: RawClasses = parse_toml(text, path)?;
        let bad = |key: String, msg: String| Error::Config {
            path: path.to_owned(),
            line: None,
            key,
            msg,
        };
        if raw.template.matches("{}").count() != 1 {
            return Err(bad(
                "template".to_owned(),
                format!("must contain `{{}}` exactly once, got {:?}", raw.template),
            ));
        }
        if raw.classes.is_empty() {
            return Err(bad(
                "class".to_owned(),
                "no [[class]] tables: list one per class, in embedding-file order".to_owned(),
            ));
        }
        let mut classes = Vec::with_capacity(raw.classes.len());
        for (i, c) in raw.classes.into_iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(bad(format!("class[{i}].name"), "is empty".to_owned()));
            }
            let prompt = c
                .prompt
                .unwrap_or_else(|| raw.template.replacen("{}", &c.name, 1));
            let embedding_word = c.embedding_word.unwrap_or_else(|| c.name.clone());
            classes.push(ClassSpec {
                name: c.name,
                embedding_word,
                prompt,
            });
        }
        Ok(Classes { classes })
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_template_and_overrides() {
        let text = "[[class]]\nname = \"aquarium fish\"\nembedding_word = \"fish\"\n\n[[class]]\nname = \"kite\"\nprompt = \"A high-quality image of the kite bird\"\n";
        let c = Classes::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(
            c.classes[0].prompt,
            "A high-quality image of the aquarium fish"
        );
        assert_eq!(c.classes[0].embedding_word, "fish");
        assert_eq!(c.classes[1].prompt, "A high-quality image of the kite bird");
        assert_eq!(c.classes[1].embedding_word, "kite");
    }

    #[test]
    fn shipped_lists_parse_with_their_decisions() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/classes");
        let load = |name: &str| Classes::load(&dir.join(name)).unwrap();
        let (c, c_off) = (load("cifar100.toml"), load("cifar100-official.toml"));
        let (i, i_off) = (load("imagenet100.toml"), load("imagenet100-official.toml"));
        for list in [&c, &c_off, &i, &i_off] {
            assert_eq!(list.len(), 100);
        }
        // SPEC §1.1: six CIFAR prompt words differ from their embedding words.
        assert_eq!(
            (
                c.classes[1].name.as_str(),
                c.classes[1].embedding_word.as_str()
            ),
            ("aquarium fish", "fish")
        );
        assert_eq!(c.classes[41].embedding_word, "mower");
        // SPEC §7 item 6: fixed puts the anchor word in the prompt; official keeps "chimpanzee".
        assert_eq!(c.classes[21].prompt, "A high-quality image of the chimp");
        assert_eq!(
            c_off.classes[21].prompt,
            "A high-quality image of the chimpanzee"
        );
        assert_eq!(c_off.classes[21].embedding_word, "chimp");
        // SPEC §3.1 suffixes and §7 item 8.
        assert_eq!(
            i.classes[0].prompt,
            "A high-quality image of the stingray in the water"
        );
        assert_eq!(
            i.classes[80].prompt,
            "A high-quality image of the wire nail"
        );
        assert_eq!(
            i_off.classes[80].prompt,
            "A high-quality image of the nailA high-quality image of the wire nail"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = Classes::parse("[[class]]\nnmae = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml:2: class[0].nmae: unknown key; did you mean `name`?"),
            "{err}"
        );
        let err = Classes::parse(
            "template = \"no slot\"\n[[class]]\nname = \"x\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("template: must contain `{}` exactly once"),
            "{err}"
        );
        let err = Classes::parse("", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("class: no [[class]] tables"), "{err}");
    }
}
