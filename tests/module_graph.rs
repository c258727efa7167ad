//! The dependency picture of `src/` has no cycle: no module uses one that uses it back.
//!
//! Every `crate::` / `super::` / `self::` path in `src/` counts (`use` lines, inline paths such as
//! `crate::tokenizer::x`), and so do paths into a module's own children (`report::x` in
//! `sweep/mod.rs`) and the method registry's lines (`lora => Lora` names `adapters::lora`). A
//! path resolves to the deepest module it names; the crate root is a facade whose `pub use`
//! re-exports are followed (`crate::Result` is `error`), while a path through another module's
//! re-export uses that module. Doc comments do not count. `src/bin` is
//! another crate and is left out. Inline modules (`mod tests { .. }`) are modules of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module graph of the crate under `src`.
#[derive(Default, Debug)]
struct Graph {
    /// Module path (`adapters::lora`; `crate` for the root) -> the modules it uses.
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Module -> `pub use` re-exports: exported name -> target path (`crate::error::Result`).
    exports: BTreeMap<String, BTreeMap<String, String>>,
    /// Module -> `pub use x::*` targets.
    globs: BTreeMap<String, Vec<String>>,
    /// Every module: files and inline modules.
    modules: BTreeSet<String>,
    /// Inline modules whose body the checker could not read (declared in a macro): a path into
    /// one stands for its parent (the registry's generated `adapters::exports`).
    opaque: BTreeSet<String>,
}

/// A file's module path from its path under `src`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    if parts.is_empty() {
        "crate".into()
    } else {
        parts.join("::")
    }
}

/// The modules of the files under `src`.
fn files_of(src: &Path) -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.iter().map(|f| module_of(src, f)).collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().unwrap() != "bin" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `line` without a `//` comment (not inside a string literal).
fn code(line: &str) -> &str {
    let mut in_str = false;
    let bytes = line.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
            b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// `a::{b, c::{d, e as f}, self}` -> `a::b`, `a::c::d`, `a::c::e`, `a` (aliases dropped).
fn expand(tree: &str) -> Vec<(String, String)> {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap()];
        let (mut depth, mut start, mut out) = (0, 0, Vec::new());
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(&inner[start..]);
        return out
            .into_iter()
            .filter(|s| !s.trim().is_empty())
            .flat_map(|s| expand(&format!("{prefix}::{}", s.trim())))
            .collect();
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((p, a)) => (p.trim(), a.trim()),
        None => (tree, tree.rsplit("::").next().unwrap()),
    };
    let path = path.strip_suffix("::self").unwrap_or(path);
    let name = if alias == "self" { path.rsplit("::").next().unwrap() } else { alias };
    vec![(path.to_string(), name.to_string())]
}

/// An absolute path (`crate::a::b`) for `path` written in module `module`.
fn absolute(module: &str, path: &str, children: &BTreeSet<String>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = if module == "crate" { vec![] } else { module.split("::").map(String::from).collect() };
    match segs[0] {
        "crate" => base.clear(),
        "self" => {}
        "super" => {
            while segs.first() == Some(&"super") {
                base.pop()?;
                segs.remove(0);
            }
            segs.insert(0, "self");
        }
        first if children.contains(first) => segs.insert(0, "self"),
        _ => return None, // an external crate or a local item
    }
    let rest: Vec<String> = segs[1..].iter().map(|s| s.to_string()).collect();
    Some(std::iter::once("crate".to_string()).chain(base).chain(rest).collect::<Vec<_>>().join("::"))
}

impl Graph {
    fn build(src: &Path) -> Self {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut graph = Graph::default();
        let mut uses: Vec<(String, String)> = Vec::new(); // (module, absolute path)
        let path_re = regex::Regex::new(r"\b(?:crate|super|self)(?:::\w+)+").unwrap();
        let child_re = regex::Regex::new(r"\b([a-z_][a-z0-9_]*)::[A-Za-z_]").unwrap();
        let registry_re = regex::Regex::new(r"^\s*([a-z_][a-z0-9_]*)\s*=>\s*[A-Z]").unwrap();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let file_module = module_of(src, &file);
            // The stack of inline modules: (module path, brace depth at which it closes).
            graph.modules.insert(file_module.clone());
            let mut stack: Vec<(String, i32)> = vec![(file_module.clone(), -1)];
            let mut depth = 0i32;
            let mut children: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut statement = String::new();
            let mut in_registry = false;
            for raw in text.lines() {
                let line = code(raw);
                let module = stack.last().unwrap().0.clone();
                let trimmed = line.trim_start();
                let kids = children.entry(module.clone()).or_default();
                for decl in ["pub mod ", "pub(crate) mod ", "mod "] {
                    if let Some(rest) = trimmed.strip_prefix(decl) {
                        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        kids.insert(name.clone());
                        if rest.trim_end().ends_with('{') {
                            let child = if module == "crate" { name } else { format!("{module}::{name}") };
                            graph.modules.insert(child.clone());
                            stack.push((child, depth));
                        }
                        break;
                    }
                }
                if trimmed.starts_with("methods! {") {
                    in_registry = true;
                } else if in_registry && trimmed.starts_with('}') {
                    in_registry = false;
                } else if let Some(c) = registry_re.captures(line).filter(|_| in_registry) {
                    kids.insert(c[1].to_string());
                    uses.push((module.clone(), format!("crate::{}::{}", module.replace("crate", ""), &c[1])));
                }
                let kids = kids.clone();
                let is_use = ["use ", "pub use ", "pub(crate) use "].iter().any(|u| trimmed.starts_with(u));
                if is_use || !statement.is_empty() {
                    statement.push_str(line);
                    if line.contains(';') {
                        let public = statement.trim_start().starts_with("pub use");
                        let body = statement.trim_start().split_once("use ").unwrap().1.trim_end_matches(';');
                        let body = body.split(';').next().unwrap().to_string();
                        for (path, name) in expand(&body) {
                            if let Some(abs) = absolute(&module, &path, &kids) {
                                if public && name == "*" {
                                    graph
                                        .globs
                                        .entry(module.clone())
                                        .or_default()
                                        .push(abs.trim_end_matches("::*").into());
                                } else if public {
                                    graph.exports.entry(module.clone()).or_default().insert(name, abs.clone());
                                }
                                uses.push((module.clone(), abs.trim_end_matches("::*").to_string()));
                            }
                        }
                        statement.clear();
                    }
                } else if !trimmed.starts_with("//") {
                    for m in path_re.find_iter(line) {
                        if let Some(abs) = absolute(&module, m.as_str(), &kids) {
                            uses.push((module.clone(), abs));
                        }
                    }
                    for c in child_re.captures_iter(line) {
                        if kids.contains(&c[1]) {
                            uses.push((module.clone(), format!("crate::{}::{}", module.replace("crate", ""), &c[1])));
                        }
                    }
                }
                depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
                while stack.len() > 1 && depth <= stack.last().unwrap().1 {
                    stack.pop();
                }
            }
        }
        let readable: BTreeSet<&String> = uses.iter().map(|(m, _)| m).collect();
        graph.opaque =
            graph.modules.iter().filter(|m| !readable.contains(m) && !files_of(src).contains(*m)).cloned().collect();
        for (from, path) in uses {
            let to = graph.resolve(&path.replace("crate::::", "crate::"), 0);
            if to != from {
                graph.edges.entry(from).or_default().insert(to);
            }
        }
        graph
    }

    /// The module that `path` (absolute) names, through re-exports.
    fn resolve(&self, path: &str, hops: usize) -> String {
        let segs: Vec<&str> = path.split("::").skip(1).collect();
        let mut known = 0;
        for n in (1..=segs.len()).rev() {
            let m = segs[..n].join("::");
            if self.modules.contains(&m) && !self.opaque.contains(&m) {
                known = n;
                break;
            }
        }
        let module = if known == 0 { "crate".to_string() } else { segs[..known].join("::") };
        // Only the crate root is a facade: a path through another module's re-export uses that
        // module (`crate::models::GgufMetadata` uses `models`, whatever file defines it).
        if module == "crate" && hops < 8 {
            if let Some(next) = segs.get(known) {
                if let Some(target) = self.exports.get(&module).and_then(|e| e.get(*next)) {
                    return self.resolve(target, hops + 1);
                }
                if let Some(glob) = self.globs.get(&module).and_then(|g| g.first()) {
                    return self.resolve(&format!("{glob}::{next}"), hops + 1);
                }
            }
        }
        module
    }

    /// A cycle, if the graph has one, as the list of modules around it.
    fn cycle(&self) -> Option<Vec<String>> {
        fn visit<'a>(
            g: &'a Graph,
            m: &'a str,
            state: &mut BTreeMap<&'a str, u8>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match state.get(m) {
                Some(2) => return None,
                Some(1) => {
                    let start = path.iter().position(|p| *p == m).unwrap();
                    let mut c: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                    c.push(m.to_string());
                    return Some(c);
                }
                _ => {}
            }
            state.insert(m, 1);
            path.push(m);
            for next in g.edges.get(m).into_iter().flatten() {
                if let Some(c) = visit(g, next, state, path) {
                    return Some(c);
                }
            }
            path.pop();
            state.insert(m, 2);
            None
        }
        let mut state = BTreeMap::new();
        self.edges.keys().find_map(|m| visit(self, m, &mut state, &mut Vec::new()))
    }
}

#[test]
fn src_has_no_module_cycle() {
    let graph = Graph::build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let edges: usize = graph.edges.values().map(BTreeSet::len).sum();
    assert!(edges > 50, "the checker found only {edges} dependencies: it is not reading the sources");
    if let Some(cycle) = graph.cycle() {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
    // Facts the layering rests on (and that show the checker sees each kind of path).
    let uses = |a: &str, b: &str| graph.edges.get(a).is_some_and(|e| e.contains(b));
    assert!(uses("adapters", "adapters::lora"), "the registry uses the methods");
    assert!(uses("adapters::lora", "method") && uses("adapters::lora", "target"));
    assert!(uses("adapters::lora", "error"), "crate::Result resolves through lib.rs to error");
    assert!(uses("crate", "adapters") && uses("peft_model", "config"));
}

#[test]
fn the_checker_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub use b::Thing;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "pub mod c;\nuse c::f;\n").unwrap();
    // a::c uses the crate root's re-export of b::Thing; b uses a::c inline: a::c -> b -> a::c.
    std::fs::write(src.join("a/c.rs"), "use crate::Thing;\npub fn f() {}\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct Thing;\nfn g() { crate::a::c::f() }\n").unwrap();
    let graph = Graph::build(src);
    let cycle = graph.cycle().expect("a cycle");
    assert!(cycle.contains(&"b".to_string()) && cycle.contains(&"a::c".to_string()), "{cycle:?}");
    std::fs::write(src.join("b.rs"), "pub struct Thing;\n").unwrap();
    assert_eq!(Graph::build(src).cycle(), None);
}
