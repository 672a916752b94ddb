//! Golden tests: `tests/golden/<case>/` holds `vmi.yaml` or `vmi.json`, an optional
//! `facts.json` (the `--pod-facts` format) and either `expected.xml` (conversion succeeds and the
//! domain XML equals it semantically: attribute order, comments and whitespace-only text are
//! ignored) or `expected-error.txt` (conversion fails with exactly that message).
//!
//! An optional `options.json` stands for virt-handler's Sync options
//! (`{"smbios": {...}, "memBalloonStatsPeriod": N, "freePageReportingDisabled": bool,
//! "serialConsoleLogDisabled": bool}`).
//!
//! `UPDATE_GOLDEN=1 cargo test --test golden` rewrites the expected files from the current output;
//! review the diff before committing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use virt_launcher::pod::facts as podfacts;
use virt_launcher::{convert, spec};

#[derive(Debug, PartialEq)]
enum Node {
    Elem(Elem),
    Text(String),
}

#[derive(Debug, PartialEq)]
struct Elem {
    name: String,
    attrs: BTreeMap<String, String>,
    children: Vec<Node>,
}

fn parse_tree(xml: &str) -> Result<Elem, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Elem> = vec![Elem {
        name: "#document".into(),
        attrs: BTreeMap::new(),
        children: vec![],
    }];
    let elem = |e: &quick_xml::events::BytesStart<'_>| -> Result<Elem, String> {
        let mut attrs = BTreeMap::new();
        for a in e.attributes() {
            let a = a.map_err(|e| e.to_string())?;
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| e.to_string())?;
            attrs.insert(a.key.as_ref().to_string(), v.into_owned());
        }
        Ok(Elem {
            name: e.name().as_ref().to_string(),
            attrs,
            children: vec![],
        })
    };
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => stack.push(elem(&e)?),
            Event::Empty(e) => {
                let el = elem(&e)?;
                stack
                    .last_mut()
                    .ok_or("stack")?
                    .children
                    .push(Node::Elem(el));
            }
            Event::End(_) => {
                let el = stack.pop().ok_or("unbalanced")?;
                stack
                    .last_mut()
                    .ok_or("unbalanced")?
                    .children
                    .push(Node::Elem(el));
            }
            Event::Text(t) => {
                let s = t.xml10_content();
                let top = stack.last_mut().ok_or("stack")?;
                match top.children.last_mut() {
                    Some(Node::Text(prev)) => prev.push_str(&s),
                    _ => top.children.push(Node::Text(s.into_owned())),
                }
            }
            Event::GeneralRef(r) => {
                // Character references (&#10;) and predefined entities arrive separately.
                let s = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_predefined_entity(&r)
                        .ok_or_else(|| format!("unknown entity &{};", &*r))?
                        .to_string(),
                };
                let top = stack.last_mut().ok_or("stack")?;
                match top.children.last_mut() {
                    Some(Node::Text(t)) => t.push_str(&s),
                    _ => top.children.push(Node::Text(s)),
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut doc = stack.pop().ok_or("empty")?;
    strip_blank(&mut doc);
    if !stack.is_empty() {
        return Err("unclosed elements".into());
    }
    match doc.children.pop() {
        Some(Node::Elem(e)) if doc.children.is_empty() => Ok(e),
        _ => Err("expected exactly one root element".into()),
    }
}

fn strip_blank(e: &mut Elem) {
    e.children
        .retain(|c| !matches!(c, Node::Text(t) if t.trim().is_empty()));
    for c in &mut e.children {
        if let Node::Elem(ch) = c {
            strip_blank(ch);
        }
    }
}

fn diff(path: &str, want: &Elem, got: &Elem, out: &mut String) {
    let here = format!("{path}/{}", want.name);
    if want.name != got.name {
        let _ = writeln!(out, "{path}: expected <{}>, got <{}>", want.name, got.name);
        return;
    }
    for (k, v) in &want.attrs {
        match got.attrs.get(k) {
            None => {
                let _ = writeln!(out, "{here}/@{k}: missing (expected {v:?})");
            }
            Some(g) if g != v => {
                let _ = writeln!(out, "{here}/@{k}: expected {v:?}, got {g:?}");
            }
            _ => {}
        }
    }
    for (k, g) in &got.attrs {
        if !want.attrs.contains_key(k) {
            let _ = writeln!(out, "{here}/@{k}: unexpected {g:?}");
        }
    }
    let n = want.children.len().max(got.children.len());
    for i in 0..n {
        match (want.children.get(i), got.children.get(i)) {
            (Some(Node::Elem(w)), Some(Node::Elem(g))) => diff(&format!("{here}[{i}]"), w, g, out),
            (Some(Node::Text(w)), Some(Node::Text(g))) if w.trim() == g.trim() => {}
            (Some(w), Some(g)) => {
                let _ = writeln!(
                    out,
                    "{here} child {i}: expected {}, got {}",
                    show(w),
                    show(g)
                );
            }
            (Some(w), None) => {
                let _ = writeln!(out, "{here} child {i}: missing {}", show(w));
            }
            (None, Some(g)) => {
                let _ = writeln!(out, "{here} child {i}: unexpected {}", show(g));
            }
            (None, None) => {}
        }
    }
}

fn show(n: &Node) -> String {
    match n {
        Node::Text(t) => format!("text {t:?}"),
        Node::Elem(e) => {
            let attrs: Vec<String> = e.attrs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("<{} {}>", e.name, attrs.join(" "))
        }
    }
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Run one case: `Ok(xml)` or `Err(message)`.
fn run(dir: &Path) -> Result<String, String> {
    let vmi_path = ["vmi.yaml", "vmi.json"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{}: no vmi.yaml or vmi.json", dir.display()));
    let mut vmi = spec::load_file(&vmi_path).map_err(|e| e.to_string())?;
    let options_path = dir.join("options.json");
    if options_path.exists() {
        let o: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&options_path).expect("read options"))
                .expect("options.json is JSON");
        let text = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string()
        };
        vmi.handler_options = Some(spec::HandlerOptions {
            smbios: o.get("smbios").map(|s| spec::Smbios {
                manufacturer: text(s, "manufacturer"),
                product: text(s, "product"),
                version: text(s, "version"),
                sku: text(s, "sku"),
                family: text(s, "family"),
            }),
            mem_balloon_stats_period: o["memBalloonStatsPeriod"].as_u64().unwrap_or(0) as u32,
            free_page_reporting_disabled: o["freePageReportingDisabled"].as_bool() == Some(true),
            serial_console_log_disabled: o["serialConsoleLogDisabled"].as_bool() == Some(true),
            bochs_display_for_efi_guests: o["bochsDisplayForEFIGuests"].as_bool() == Some(true),
        });
    }
    let facts_path = dir.join("facts.json");
    let facts = if facts_path.exists() {
        podfacts::from_file(&facts_path, &vmi).map_err(|e| e.to_string())?
    } else {
        virt_launcher::convert::facts::PodFacts::defaults(&vmi)
    };
    convert::convert(&vmi, &facts)
        .map(|d| d.to_xml())
        .map_err(|e| e.to_string())
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = String::new();
    let all = cases();
    for dir in &all {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let xml_file = dir.join("expected.xml");
        let err_file = dir.join("expected-error.txt");
        let result = run(dir);
        if update {
            match &result {
                Ok(xml) => {
                    std::fs::write(&xml_file, xml).expect("write expected.xml");
                    let _ = std::fs::remove_file(&err_file);
                }
                Err(e) => {
                    std::fs::write(&err_file, format!("{e}\n")).expect("write expected-error.txt");
                    let _ = std::fs::remove_file(&xml_file);
                }
            }
            continue;
        }
        match (result, xml_file.exists(), err_file.exists()) {
            (Ok(xml), true, _) => {
                let want_text = std::fs::read_to_string(&xml_file).expect("read expected.xml");
                let want = parse_tree(&want_text)
                    .unwrap_or_else(|e| panic!("{name}: expected.xml does not parse: {e}"));
                let got = parse_tree(&xml)
                    .unwrap_or_else(|e| panic!("{name}: output does not parse: {e}\n{xml}"));
                let mut d = String::new();
                diff("", &want, &got, &mut d);
                if !d.is_empty() {
                    let _ = writeln!(
                        failures,
                        "== {name}: domain XML differs from expected.xml\n{d}"
                    );
                }
            }
            (Err(e), _, true) => {
                let want = std::fs::read_to_string(&err_file).expect("read expected-error.txt");
                if want.trim() != e.trim() {
                    let _ = writeln!(
                        failures,
                        "== {name}: wrong error\n  expected: {}\n  got:      {e}",
                        want.trim()
                    );
                }
            }
            (Ok(_), false, true) => {
                let _ = writeln!(
                    failures,
                    "== {name}: expected an error, conversion succeeded"
                );
            }
            (Err(e), true, _) => {
                let _ = writeln!(failures, "== {name}: conversion failed: {e}");
            }
            (_, false, false) => {
                let _ = writeln!(failures, "== {name}: no expected.xml or expected-error.txt");
            }
        }
    }
    assert!(
        all.len() >= 20,
        "expected at least 20 golden cases, found {}",
        all.len()
    );
    assert!(
        failures.is_empty(),
        "{failures}\n(run with UPDATE_GOLDEN=1 to rewrite, then review the diff)"
    );
}

/// Every expected.xml must be valid per libvirt's schema (the host's: libvirt 11.x, whose RNG
/// knows `<driver><iothreads>`, `<dataStore>` and the vhost-user passt back-end), when
/// `virt-xml-validate` (libvirt-clients) is installed; CI installs it.
#[test]
fn golden_outputs_validate_against_libvirt_schema() {
    let have = std::process::Command::new("virt-xml-validate")
        .arg("--help")
        .output()
        .is_ok();
    if !have {
        println!("virt-xml-validate not installed; skipping schema validation");
        return;
    }
    let mut bad = String::new();
    let mut checked = 0;
    for dir in cases() {
        let xml = dir.join("expected.xml");
        if !xml.exists() {
            continue;
        }
        checked += 1;
        let out = std::process::Command::new("virt-xml-validate")
            .arg(&xml)
            .arg("domain")
            .output()
            .expect("run virt-xml-validate");
        if !out.status.success() {
            let _ = writeln!(
                bad,
                "{}: {}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(bad.is_empty(), "schema validation failed:\n{bad}");
    assert!(
        checked >= 20,
        "expected at least 20 expected.xml files, validated {checked}"
    );
}

#[test]
fn semantic_compare_ignores_attribute_order_but_not_values() {
    let a = parse_tree("<a x='1' y='2'>\n  <b/>\n</a>").expect("a");
    let b = parse_tree("<a y=\"2\" x=\"1\"><b/></a>").expect("b");
    let c = parse_tree("<a y='3' x='1'><b/></a>").expect("c");
    let mut d = String::new();
    diff("", &a, &b, &mut d);
    assert!(d.is_empty(), "{d}");
    diff("", &a, &c, &mut d);
    assert!(d.contains("/a/@y: expected \"2\", got \"3\""), "{d}");
}

/// Every expected.xml is defined by a real libvirt (the host's 11.x with the launcher's own
/// libvirtd.conf and qemu.conf, in a private daemon as the benchmark's raw side runs it) and
/// undefined again: the schema alone does not know QEMU's capabilities (device models, machine
/// types, CPU features) that `virDomainDefineXML` checks. Nothing is started.
#[test]
fn golden_outputs_are_defined_by_a_real_libvirt() {
    let root = PathBuf::from(format!("/tmp/vl-golden-define-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (mut daemon, _) = launcher_bench::raw::RawLibvirt::start(&root, "golden-define")
        .unwrap_or_else(|e| panic!("a private libvirtd (needs root and libvirt): {e:#}"));
    let uri = daemon.uri();
    let virsh = |args: &[&str]| {
        std::process::Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&uri)
            .args(args)
            .output()
            .expect("run virsh")
    };
    let mut bad = String::new();
    let mut defined = 0;
    for dir in cases() {
        let xml = dir.join("expected.xml");
        if !xml.exists() {
            continue;
        }
        let out = virsh(&["define", xml.to_str().unwrap()]);
        if !out.status.success() {
            let _ = writeln!(
                bad,
                "{}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        }
        defined += 1;
        let text = std::fs::read_to_string(&xml).unwrap();
        let name = text
            .split_once("<name>")
            .and_then(|(_, rest)| rest.split_once("</name>"))
            .map(|(name, _)| name.to_string())
            .expect("a <name> in expected.xml");
        let out = virsh(&["undefine", "--nvram", &name]);
        let out = if out.status.success() {
            out
        } else {
            virsh(&["undefine", &name])
        };
        assert!(
            out.status.success(),
            "{}: undefine {name}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    daemon.stop().expect("stop the private libvirtd");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&root);
    assert!(bad.is_empty(), "libvirt refused to define:\n{bad}");
    assert!(defined >= 20, "only {defined} golden domains defined");
}
