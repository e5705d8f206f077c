//! The shape of the house, checked on every `cargo test` (ARCHITECTURE.md's
//! invariants that a change could quietly break): no source file of the
//! node, the store and replica protocol, the protocol cores, membership,
//! placement or the harness grows past 700 lines; no two modules of the node import each other; the protocol
//! cores do no I/O (no async runtime in their dependency tree, no socket,
//! file or clock in their code); the fuzz targets do not build the node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source file grows past this, and it holds more than one idea.
const FILE_LINES_MAX: usize = 700;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file below `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn no_source_file_is_over_700_lines() {
    let mut big = Vec::new();
    for krate in ["node", "replication", "proto", "membership", "placement", "harness"] {
        for f in sources(&root().join(krate).join("src")) {
            let n = std::fs::read_to_string(&f).expect("readable").lines().count();
            if n > FILE_LINES_MAX {
                big.push(format!("{} ({n} lines)", f.display()));
            }
        }
    }
    assert!(big.is_empty(), "files over {FILE_LINES_MAX} lines: {big:#?}");
}

/// The module a file is (`a::b` for `a/b.rs` or `a/b/mod.rs`, "" for
/// `lib.rs`); `None` for a binary's root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("below src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    match last.as_str() {
        "main.rs" if parts.is_empty() => None,
        "lib.rs" if parts.is_empty() => Some(String::new()),
        "mod.rs" => Some(parts.join("::")),
        name => {
            parts.push(name.trim_end_matches(".rs").to_owned());
            Some(parts.join("::"))
        }
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}::{b}"),
    }
}

fn parent(m: &str) -> String {
    m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_owned())
}

/// The modules a file's code names by path (`crate::a::b`, `super::x`,
/// `self::x`, or a child module `x::`), each as the longest known module
/// the path starts with. `mod x;` declarations are not references.
fn references(me: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let children: BTreeSet<&str> = modules
        .iter()
        .filter(|m| parent(m) == me && !m.is_empty() && m.as_str() != me)
        .map(|m| m.rsplit("::").next().expect("a name"))
        .collect();
    let mut out = BTreeSet::new();
    // The module's own code: an inline test module (its `super` is this
    // module) is left out.
    let code = code.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub(crate) mod "))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let ident = |i: usize| bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !ident(i) || (i > 0 && (ident(i - 1) || bytes[i - 1] == b':')) {
            i += 1;
            continue;
        }
        // A path starting here: idents joined by `::`.
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < bytes.len() && ident(j) {
                j += 1;
            }
            segs.push(&code[s..j]);
            if code[j..].starts_with("::") && j + 2 < bytes.len() && ident(j + 2) {
                j += 2;
            } else {
                break;
            }
        }
        i = j;
        if segs.len() < 2 {
            continue;
        }
        let (base, rest) = match segs[0] {
            "crate" => (String::new(), &segs[1..]),
            "self" => (me.to_owned(), &segs[1..]),
            "super" => {
                let mut base = parent(me);
                let mut k = 1;
                while k < segs.len() && segs[k] == "super" {
                    base = parent(&base);
                    k += 1;
                }
                (base, &segs[k..])
            }
            first if children.contains(first) => (me.to_owned(), &segs[..]),
            _ => continue,
        };
        let mut target = base.clone();
        for s in rest {
            let next = join(&target, s);
            if modules.contains(&next) {
                target = next;
            } else {
                break;
            }
        }
        if target != me {
            out.insert(target);
        }
    }
    out
}

#[test]
fn no_two_modules_of_the_node_import_each_other() {
    let src = root().join("node/src");
    let files: Vec<(String, String)> = sources(&src)
        .into_iter()
        .filter_map(|f| Some((module_of(&src, &f)?, std::fs::read_to_string(&f).expect("readable"))))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let refs: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .map(|(m, code)| (m.clone(), references(m, code, &modules)))
        .collect();
    let mut both = Vec::new();
    for (a, to) in &refs {
        for b in to {
            if a < b && refs.get(b).is_some_and(|r| r.contains(a)) {
                both.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(both.is_empty(), "modules that import each other: {both:#?}");
    // And the folders as wholes (`smtp/*` and `services/*`, ...), the
    // crate root aside (it only declares and re-exports).
    let top = |m: &str| m.split("::").next().unwrap_or("").to_owned();
    let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, to) in &refs {
        for b in to {
            let (ta, tb) = (top(a), top(b));
            if ta != tb && !ta.is_empty() && !tb.is_empty() {
                folders.entry(ta).or_default().insert(tb);
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, to) in &folders {
        for b in to {
            if a < b && folders.get(b).is_some_and(|r| r.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "folders that import each other: {cycles:#?}");
    // The checker sees what it must: a known one-way reference.
    assert!(refs["smtp"].contains("services"), "{:?}", refs["smtp"]);
    assert!(refs["smtp::auth"].contains("smtp"), "{:?}", refs["smtp::auth"]);
}

#[test]
fn the_protocol_cores_do_no_io() {
    // Not in the dependency tree at all: the lock file's graph from
    // quill-proto down.
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).expect("Cargo.lock");
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pkg in lock.split("[[package]]").skip(1) {
        let name = pkg
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|n| n.trim_end_matches('"').to_owned())
            .expect("a name");
        let list = pkg
            .split("dependencies = [")
            .nth(1)
            .map(|d| d.split(']').next().unwrap_or(""))
            .unwrap_or("");
        let names = list
            .split(',')
            .filter_map(|d| d.trim().trim_matches('"').split(' ').next())
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        deps.entry(name).or_default().extend::<Vec<String>>(names);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["quill-proto".to_owned()];
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            todo.extend(deps.get(&p).cloned().unwrap_or_default());
        }
    }
    for io in ["tokio", "mio", "socket2", "quinn", "hyper", "rustls"] {
        assert!(!seen.contains(io), "quill-proto depends on {io}");
    }
    // Nor in its code.
    for f in sources(&root().join("proto/src")) {
        let text = std::fs::read_to_string(&f).expect("readable");
        // Code, not what its comments say about the shell.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for io in [
            "tokio",
            "std::fs",
            "std::net::Tcp",
            "std::net::Udp",
            "SystemTime",
            "Instant::now",
            "std::thread",
        ] {
            assert!(!code.contains(io), "{} uses {io}", f.display());
        }
    }
}

#[test]
fn the_fuzz_targets_do_not_build_the_node() {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
    assert!(
        manifest.contains("quill-proto"),
        "the fuzz targets use the protocol cores"
    );
    assert!(
        !manifest.contains("quill-node"),
        "a fuzz target depends on the node crate"
    );
}
