//! Layers point down: every `crate::<module>` path in `src/<module>/**` (or `src/<module>.rs`)
//! names a module the table below allows. Comments and doc lines do not count; code, strings
//! and `#[cfg(test)]` modules do (a test module that reaches up is an arrow up too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What each top-level module may import (itself and `logging` are always allowed).
const ALLOWED: &[(&str, &[&str])] = &[
    ("spec", &[]),
    ("domain", &["spec"]),
    ("convert", &["spec", "domain"]),
    ("libvirt", &["domain"]),
    ("pod", &["spec", "domain", "convert", "libvirt"]),
    (
        "datavolume",
        &["spec", "domain", "convert", "libvirt", "pod"],
    ),
    (
        "vm",
        &["spec", "domain", "convert", "libvirt", "pod", "datavolume"],
    ),
    (
        "api",
        &[
            "spec",
            "domain",
            "convert",
            "libvirt",
            "pod",
            "datavolume",
            "vm",
        ],
    ),
    ("logging", &[]),
];

/// Everyone may use these.
const LEAVES: &[&str] = &["logging"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text with every comment (line, doc and block) replaced by spaces, newlines kept, so
/// byte offsets still give the right line. String and char literals are kept as they are.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // Raw string r"..." / r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    i = j;
                    continue;
                }
                j += 1;
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = (j + close.len()).min(b.len());
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\''), or a lifetime ('a): skip only the former.
                if b.get(i + 1) == Some(&b'\\') {
                    let end = b[i + 2..].iter().position(|&c| c == b'\'');
                    i = end.map_or(b.len(), |n| i + 2 + n + 1);
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("comments blanked on ASCII bytes only")
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Every top-level module named by a `crate::` path in `code`, with the byte offset of its
/// name. `crate::{a::X, b}` groups count each member.
fn crate_refs(code: &str) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let mut refs = Vec::new();
    let mut from = 0;
    while let Some(n) = code[from..].find("crate::") {
        let at = from + n;
        from = at + "crate::".len();
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$') {
            continue; // `virt_launcher_crate::`, `$crate::`
        }
        let mut i = skip_ws(b, from);
        if b.get(i) == Some(&b'{') {
            // One level of grouping: the first identifier after `{` and after each `,` at
            // depth one.
            let mut depth = 0;
            let mut expect = true;
            while i < b.len() {
                match b[i] {
                    b'{' => {
                        depth += 1;
                        if depth == 1 {
                            expect = true;
                        }
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect = true,
                    c if depth == 1 && expect && is_ident(c) => {
                        let end = ident_end(b, i);
                        refs.push((i, code[i..end].to_string()));
                        expect = false;
                        i = end;
                        continue;
                    }
                    c if !c.is_ascii_whitespace() && depth == 1 => expect = false,
                    _ => {}
                }
                i += 1;
            }
        } else if b.get(i).is_some_and(|&c| is_ident(c)) {
            let end = ident_end(b, i);
            refs.push((i, code[i..end].to_string()));
            i = end;
        }
        from = from.max(i.min(b.len()));
    }
    refs
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

fn ident_end(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|&c| is_ident(c)) {
        i += 1;
    }
    i
}

/// The top-level module a file under `src/` belongs to; `None` for the crate root and the
/// binaries, which wire everything.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?;
    if parts.next().is_some() {
        return (first != "bin").then(|| first.to_string());
    }
    let stem = first.strip_suffix(".rs")?;
    (!matches!(stem, "lib" | "main")).then(|| stem.to_string())
}

fn violations(src: &Path) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    let root = src.parent().unwrap_or(src);
    for file in files {
        let shown = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .display()
            .to_string();
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let Some(may) = allowed.get(module.as_str()) else {
            found.push(format!(
                "{shown}: module `{module}` is not in the layer table of tests/layers.rs"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let code = strip_comments(&text);
        for (at, target) in crate_refs(&code) {
            if target == module
                || LEAVES.contains(&target.as_str())
                || may.contains(&target.as_str())
            {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            found.push(format!(
                "{shown}:{line}: `{module}` imports `crate::{target}`, above it (allowed: {})",
                if may.is_empty() {
                    "nothing".to_string()
                } else {
                    may.join(", ")
                }
            ));
        }
    }
    found
}

#[test]
fn layers_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "{} import(s) of a layer above:\n{}",
        found.len(),
        found.join("\n")
    );
}

/// Every child process goes through `pod::process` (the one owner of `waitpid`): a process
/// started any other way races the reaper for its exit status.
#[test]
fn child_processes_start_only_in_pod_process() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let owner = src.join("pod/process.rs");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for file in files.iter().filter(|f| **f != owner) {
        let code = strip_comments(&std::fs::read_to_string(file).unwrap());
        for (n, line) in code.lines().enumerate() {
            let line: String = line.split_whitespace().collect();
            let std_command = line.contains("std::process::Command")
                || (line.contains("std::process::{") && line.contains("Command"));
            if std_command || line.contains("tokio::process") || line.contains("libc::fork") {
                found.push(format!("{}:{}", file.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "processes started outside src/pod/process.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scanner_sees_paths_and_skips_comments() {
    let code = strip_comments(concat!(
        "//! [`crate::vm`] in a doc line\n",
        "use crate::spec::Vmi; // crate::api in a comment\n",
        "/* crate::api\n in a block */ use crate::{domain::X, convert::{facts::Y, Z}};\n",
        "let s = \"crate::string\"; let c = '\"'; fn f<'a>() { crate::pod::g() }\n",
        "let r = r#\"a \" // not a comment\"#; crate::libvirt::h();\n",
    ));
    let names: Vec<String> = crate_refs(&code).into_iter().map(|(_, n)| n).collect();
    assert_eq!(
        names,
        ["spec", "domain", "convert", "string", "pod", "libvirt"]
    );
    assert_eq!(code.lines().count(), 6);
    assert!(code.lines().next().unwrap().trim().is_empty());
}

#[test]
fn a_module_reaching_up_is_named_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("layers-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("spec")).unwrap();
    std::fs::write(
        dir.join("spec/mod.rs"),
        "//! [`crate::convert`] is fine in a doc line\n\nuse crate::convert::facts;\n",
    )
    .unwrap();
    std::fs::write(dir.join("logging.rs"), "use crate::spec::X;\n").unwrap();
    std::fs::write(dir.join("domain.rs"), "use crate::{spec, logging};\n").unwrap();
    let found = violations(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].ends_with(
            "logging.rs:1: `logging` imports `crate::spec`, above it (allowed: nothing)"
        ),
        "{}",
        found[0]
    );
    assert!(
        found[1].contains("spec/mod.rs:3: `spec` imports `crate::convert`"),
        "{}",
        found[1]
    );
}
