//! VE templates: the images new VEs start from.
//!
//! A template lives in `<templates_dir>/<name>/` as `template.img` (a minimal
//! ext4 image, files owned by uid/gid 0..65535 as the VE's root sees them) and
//! `template.toml` (its metadata). Both are written by `images/build`; see
//! docs/templates.md.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// File names inside a template directory.
pub const IMAGE_FILE: &str = "template.img";
pub const META_FILE: &str = "template.toml";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid template name {name:?}: use letters, digits, '.', '-' and '_' only")]
    InvalidName { name: String },
    #[error("template {name:?} not found: {dir} does not exist (build it with `images/build {name} --out {templates_dir}`)")]
    NotFound {
        name: String,
        dir: PathBuf,
        templates_dir: PathBuf,
    },
    #[error("template {name:?} is incomplete: {path} is missing (rebuild it with `images/build {name} --force`)")]
    Incomplete { name: String, path: PathBuf },
    #[error("cannot read template {name:?} at {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("template {name:?} has an invalid {path}: {message}")]
    InvalidMeta {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("cannot list templates in {dir}: {source}")]
    List { dir: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub dir: PathBuf,
    /// `<dir>/template.img`.
    pub image: PathBuf,
    pub meta: TemplateMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TemplateMeta {
    pub description: String,
    /// The VE's PID 1 and its arguments, e.g. `["/sbin/init"]`.
    pub init: Vec<String>,
    /// The signal that makes the init shut the VE down cleanly, e.g. "SIGUSR2".
    pub stop_signal: String,
    /// The smallest disk a VE made from this template may have.
    pub min_disk_bytes: u64,
    pub os: String,
}

/// Template names become directory names: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid {
        Ok(())
    } else {
        Err(TemplateError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Parses and checks the contents of a `template.toml`. Pure.
pub fn parse_meta(text: &str) -> Result<TemplateMeta, String> {
    let meta: TemplateMeta = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if meta.init.is_empty() || meta.init[0].is_empty() {
        return Err("init is empty: it must name the VE's PID 1, e.g. [\"/sbin/init\"]".into());
    }
    if !meta.init[0].starts_with('/') {
        return Err(format!("init {:?} is not an absolute path", meta.init[0]));
    }
    if parse_signal(&meta.stop_signal).is_none() {
        return Err(format!(
            "stop_signal {:?} is not a signal name like \"SIGTERM\"",
            meta.stop_signal
        ));
    }
    if meta.min_disk_bytes == 0 {
        return Err("min_disk_bytes is 0".into());
    }
    Ok(meta)
}

/// Maps "SIGUSR2" (or "USR2") to its signal.
pub fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    let full = if name.starts_with("SIG") {
        name.to_string()
    } else {
        format!("SIG{name}")
    };
    full.parse().ok()
}

pub fn load_template(templates_dir: &Path, name: &str) -> Result<Template, TemplateError> {
    validate_name(name)?;
    let dir = templates_dir.join(name);
    if !dir.is_dir() {
        return Err(TemplateError::NotFound {
            name: name.to_string(),
            dir,
            templates_dir: templates_dir.to_path_buf(),
        });
    }
    let meta_path = dir.join(META_FILE);
    let image = dir.join(IMAGE_FILE);
    for path in [&meta_path, &image] {
        if !path.is_file() {
            return Err(TemplateError::Incomplete {
                name: name.to_string(),
                path: path.clone(),
            });
        }
    }
    let text = fs::read_to_string(&meta_path).map_err(|source| TemplateError::Read {
        name: name.to_string(),
        path: meta_path.clone(),
        source,
    })?;
    let meta = parse_meta(&text).map_err(|message| TemplateError::InvalidMeta {
        name: name.to_string(),
        path: meta_path,
        message,
    })?;
    Ok(Template {
        name: name.to_string(),
        dir,
        image,
        meta,
    })
}

/// Every complete template in `templates_dir`, sorted by name. Directories
/// that are not templates (no template.toml, e.g. a build in progress) are
/// skipped; a template with a broken template.toml is an error.
pub fn list_templates(templates_dir: &Path) -> Result<Vec<Template>, TemplateError> {
    let entries = match fs::read_dir(templates_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TemplateError::List {
                dir: templates_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut templates = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TemplateError::List {
            dir: templates_dir.to_path_buf(),
            source,
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if validate_name(&name).is_err() || !entry.path().join(META_FILE).is_file() {
            continue;
        }
        templates.push(load_template(templates_dir, &name)?);
    }
    templates.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(templates)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
description = "BusyBox"
os = "busybox"
init = ["/sbin/init"]
stop_signal = "SIGUSR2"
min_disk_bytes = 67108864
recipe_hash = "abc"
"#;

    #[test]
    fn parses_builder_output() {
        let meta = parse_meta(GOOD).unwrap();
        assert_eq!(meta.init, vec!["/sbin/init".to_string()]);
        assert_eq!(meta.stop_signal, "SIGUSR2");
        assert_eq!(meta.min_disk_bytes, 64 << 20);
        assert_eq!(meta.os, "busybox");
    }

    #[test]
    fn rejects_bad_meta() {
        let bad_signal = GOOD.replace("SIGUSR2", "SIGNOPE");
        assert!(parse_meta(&bad_signal).unwrap_err().contains("SIGNOPE"));
        let relative_init = GOOD.replace("/sbin/init", "init");
        assert!(parse_meta(&relative_init).unwrap_err().contains("absolute"));
        let no_init = GOOD.replace("[\"/sbin/init\"]", "[]");
        assert!(parse_meta(&no_init).unwrap_err().contains("init is empty"));
        let missing = GOOD.replace("os = \"busybox\"\n", "");
        assert!(parse_meta(&missing).unwrap_err().contains("os"));
    }

    #[test]
    fn signal_names() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGINT"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("PWR"), Some(Signal::SIGPWR));
        assert_eq!(parse_signal("sigint"), None);
    }

    #[test]
    fn names() {
        assert!(validate_name("debian12").is_ok());
        assert!(validate_name("my_os-1.2").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn load_and_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list_templates(dir.path()).unwrap().is_empty());
        let missing = load_template(dir.path(), "busybox").unwrap_err();
        assert!(
            matches!(missing, TemplateError::NotFound { .. }),
            "{missing}"
        );
        assert!(missing.to_string().contains("images/build busybox"));

        let t = dir.path().join("busybox");
        fs::create_dir(&t).unwrap();
        fs::write(t.join(META_FILE), GOOD).unwrap();
        let incomplete = load_template(dir.path(), "busybox").unwrap_err();
        assert!(
            matches!(incomplete, TemplateError::Incomplete { .. }),
            "{incomplete}"
        );

        fs::write(t.join(IMAGE_FILE), b"").unwrap();
        fs::create_dir(dir.path().join(".build-x")).unwrap();
        let all = list_templates(dir.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "busybox");
        assert_eq!(all[0].image, t.join(IMAGE_FILE));
    }
}
