//! The architecture test: `src/` is organised in folders by layer, a module imports only from
//! its own layer or the layers below, and no modules import each other, directly or through
//! others. It reads the sources, so the shape stays as the code changes.
//!
//! An import is a `use crate::…`, `use super::…` or `use self::…` tree, or a `crate::…`,
//! `super::…` or `self::…` path anywhere in the code, attributed to the deepest module it
//! names. Comments and string literals are skipped; test modules are checked like the rest.
//! A module declaring its own submodules is not importing them.

// A failed expectation is the test's failure message (clippy.toml allows it only inside
// #[test] functions, not in their helpers).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: the top-level modules of `src/`.
const LAYERS: &[&str] = &[
    "config",
    "observe",
    "core",
    "store",
    "transport",
    "integrations",
    "catalog",
    "pipeline",
    "interfaces",
];

/// A module's path from the crate root: `src/pipeline/settle.rs` is `["pipeline", "settle"]`.
type Module = Vec<String>;

type Graph = BTreeMap<Module, BTreeSet<Module>>;

#[test]
fn every_module_belongs_to_a_layer() {
    let sources = sources();
    let strays: Vec<String> = sources
        .keys()
        .filter(|module| layer(module).is_none())
        .map(name)
        .collect();

    assert!(
        strays.is_empty(),
        "modules outside the layers {LAYERS:?}: {strays:?}"
    );
}

#[test]
fn imports_only_point_down_or_across_a_layer() {
    let graph = imports(&sources());
    let mut upward = Vec::new();
    for (from, targets) in &graph {
        for to in targets {
            if let (Some(below), Some(above)) = (layer(from), layer(to))
                && above > below
            {
                upward.push(format!(
                    "{} imports {} (up from {} to {})",
                    name(from),
                    name(to),
                    LAYERS[below],
                    LAYERS[above]
                ));
            }
        }
    }

    assert!(
        upward.is_empty(),
        "imports pointing up a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_cycles() {
    let cycles = cycles(&imports(&sources()));

    assert!(
        cycles.is_empty(),
        "import cycles:\n{}",
        cycles
            .iter()
            .map(|cycle| cycle.iter().map(name).collect::<Vec<_>>().join(", "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The checks above pass on an empty graph too: this one makes sure the sources were read
/// and their imports found.
#[test]
fn the_imports_of_the_sources_are_found() {
    let sources = sources();
    let graph = imports(&sources);
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    let has = |from: &str, to: &str| {
        graph
            .get(&module(from))
            .is_some_and(|targets| targets.contains(&module(to)))
    };

    assert!(sources.len() > 40, "{} modules read", sources.len());
    assert!(edges > 150, "{edges} imports found");
    assert!(
        has("pipeline::work", "core::event"),
        "a `use crate::…` tree"
    );
    assert!(
        has("integrations::hubspot", "integrations"),
        "a `use super::…` tree"
    );
    assert!(has("interfaces::http::ingest", "interfaces::http::state"));
}

#[test]
fn use_trees_expand_into_one_path_each() {
    assert_eq!(
        expand("crate::a::{b, c::{d, e as f}, self}"),
        [
            vec!["crate", "a", "b"],
            vec!["crate", "a", "c", "d"],
            vec!["crate", "a", "c", "e"],
            vec!["crate", "a"],
        ]
    );
    assert_eq!(expand("super::*"), [vec!["super"]]);
}

#[test]
fn comments_strings_and_test_modules_are_read_as_rust_reads_them() {
    let code = "use crate::a::B; // crate::hidden::C\n\
                const S: &str = \"crate::not::Code\"; /* crate::gone */ fn f<'a>(c: char) { let _ = 'x'; }\n\
                #[cfg(test)] mod tests { use super::*; use crate::c::D; }";
    let modules: BTreeSet<Module> = [module("a"), module("c"), module("x::y"), module("x")]
        .into_iter()
        .collect();

    let found = imports_of(&module("x::y"), code, &modules);

    assert_eq!(
        found,
        [module("a"), module("c"), module("x::y")]
            .into_iter()
            .collect(),
        "super inside `mod tests` is the file's module itself"
    );
}

#[test]
fn a_cycle_is_found_however_long() {
    let graph: Graph = [
        (module("a"), [module("b")].into()),
        (module("b"), [module("c")].into()),
        (module("c"), [module("a")].into()),
        (module("d"), [module("a")].into()),
    ]
    .into();

    assert_eq!(
        cycles(&graph),
        [vec![module("a"), module("b"), module("c")]]
    );
}

fn module(path: &str) -> Module {
    path.split("::").map(str::to_owned).collect()
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

fn layer(module: &Module) -> Option<usize> {
    LAYERS
        .iter()
        .position(|layer| module.first() == Some(&(*layer).to_owned()))
}

/// Every module of the library, with its source.
fn sources() -> BTreeMap<Module, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    files
        .into_iter()
        // The binary is its own crate; it reaches the library as `appevents::`.
        .filter(|file| file != &src.join("main.rs"))
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            (module_of(&file, &src), text)
        })
        .filter(|(module, _)| !module.is_empty())
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

fn module_of(file: &Path, src: &Path) -> Module {
    let relative = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Each module's imports of other modules, without its own submodules.
fn imports(sources: &BTreeMap<Module, String>) -> Graph {
    let mut modules: BTreeSet<Module> = sources.keys().cloned().collect();
    modules.insert(Vec::new());
    sources
        .iter()
        .map(|(from, text)| {
            let targets = imports_of(from, text, &modules)
                .into_iter()
                .filter(|to| to != from && !to.is_empty() && !to.starts_with(from))
                .collect();
            (from.clone(), targets)
        })
        .collect()
}

/// The modules `code` (the source of module `file`) names through `crate::`, `super::` and
/// `self::` paths, each resolved to the deepest module of `modules` it reaches.
fn imports_of(file: &Module, code: &str, modules: &BTreeSet<Module>) -> BTreeSet<Module> {
    let code = code_only(code);
    let mut found = BTreeSet::new();
    for (position, path) in paths(&code) {
        let scope = scope_at(file, &code, position);
        let Some(absolute) = absolute(&scope, &path) else {
            continue;
        };
        if let Some(target) = deepest(&absolute, modules) {
            found.insert(target);
        }
    }
    found
}

/// Every path in the code that starts at `crate`, `super` or `self`, with where it starts:
/// the paths of `use` trees (expanded) and those written inline.
fn paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        if starts_word(code, at, "use") {
            let end = code[at..].find(';').map_or(code.len(), |end| at + end);
            let tree = code[at + 3..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            for path in expand(&tree) {
                if matches!(
                    path.first().map(String::as_str),
                    Some("crate" | "super" | "self")
                ) {
                    found.push((at, path));
                }
            }
            at = end;
        } else if ["crate::", "super::", "self::"]
            .iter()
            .any(|root| starts_word(code, at, root))
        {
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((
                at,
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ));
            at += path.len();
        } else {
            at += 1;
        }
    }
    found
}

/// Whether `word` starts at `at`, not inside a longer identifier (nor after `$`, as in
/// `$crate`).
fn starts_word(code: &str, at: usize, word: &str) -> bool {
    let before = code[..at].chars().next_back();
    let after = code[at + word.len().min(code.len() - at)..].chars().next();
    code[at..].starts_with(word)
        && !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
        && (word.ends_with("::") || !after.is_some_and(|c| c.is_alphanumeric() || c == '_'))
}

/// A `use` tree, `a::{b, c::{d, e as f}}`, as one path per leaf. Globs and `self` leaves
/// name the path before them; `as` renames are dropped.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let leaf = tree.split(" as ").next().unwrap_or(tree);
        let path: Vec<String> = leaf
            .split("::")
            .map(str::trim)
            .filter(|segment| !segment.is_empty() && *segment != "*" && *segment != "self")
            .map(str::to_owned)
            .collect();
        return vec![path];
    };
    let base: Vec<String> = tree[..open]
        .split("::")
        .map(str::trim)
        .filter(|segment| !segment.is_empty())
        .map(str::to_owned)
        .collect();
    let close = tree.rfind('}').unwrap_or(tree.len());
    let mut paths = Vec::new();
    for item in split_top_level(&tree[open + 1..close]) {
        for tail in expand(item) {
            paths.push(base.iter().cloned().chain(tail).collect());
        }
    }
    paths
}

/// `b, c::{d, e}` → `["b", "c::{d, e}"]`.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (index, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&list[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .collect()
}

/// The module path at `position`: the file's module, and the inline modules (`mod tests {`)
/// open there.
fn scope_at(file: &Module, code: &str, position: usize) -> Module {
    let mut scope = file.clone();
    let mut open: Vec<(usize, bool)> = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < position {
        if starts_word(code, at, "mod") {
            let rest = &code[at + 3..];
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                scope.push(name);
                open.push((depth, true));
                depth += 1;
                at += 3 + rest.find('{').unwrap_or(0) + 1;
                continue;
            }
        }
        match code.as_bytes()[at] {
            b'{' => {
                open.push((depth, false));
                depth += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if let Some((_, true)) = open.pop() {
                    scope.pop();
                }
            }
            _ => {}
        }
        at += 1;
    }
    scope
}

/// The path from the crate root: `super` and `self` taken from `scope`.
fn absolute(scope: &Module, path: &[String]) -> Option<Module> {
    let mut current = match path.first().map(String::as_str) {
        Some("crate") => return Some(path[1..].to_vec()),
        Some("super" | "self") => scope.clone(),
        _ => return None,
    };
    let mut rest = path;
    while let Some(first) = rest.first() {
        match first.as_str() {
            "super" => {
                current.pop()?;
            }
            "self" => {}
            _ => break,
        }
        rest = &rest[1..];
    }
    current.extend(rest.iter().cloned());
    Some(current)
}

/// The longest prefix of `path` that is a module.
fn deepest(path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|prefix| modules.contains(prefix))
}

/// The code without comments and without the contents of string and character literals,
/// each character kept or blanked (ASCII only, so byte positions are character positions).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    while at < chars.len() {
        let c = chars[at];
        let next = chars.get(at + 1).copied();
        if c == '/' && next == Some('/') {
            while at < chars.len() && chars[at] != '\n' {
                blank(&mut out, chars[at]);
                at += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if at >= chars.len() {
                    break;
                }
                if chars[at] == '/' && chars.get(at + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    at += 2;
                } else if chars[at] == '*' && chars.get(at + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    at += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[at]);
                    at += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, at)
        {
            // A raw string: r"…" or r#"…"#, as many hashes closing as opening.
            let hashes = chars[at + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(at + 1 + hashes) != Some(&'"') {
                out.push(c);
                at += 1;
                continue;
            }
            let close: String = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            let body_start = at + 2 + hashes;
            let end = (body_start..chars.len())
                .find(|&i| {
                    chars[i..]
                        .iter()
                        .take(close.len())
                        .copied()
                        .eq(close.chars())
                })
                .map_or(chars.len(), |i| i + close.len());
            for &c in &chars[at..end] {
                blank(&mut out, c);
            }
            at = end;
        } else if c == '"' {
            out.push(' ');
            at += 1;
            while at < chars.len() && chars[at] != '"' {
                if chars[at] == '\\' {
                    blank(&mut out, chars[at]);
                    at += 1;
                }
                if at < chars.len() {
                    blank(&mut out, chars[at]);
                    at += 1;
                }
            }
            out.push(' ');
            at += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1f}') or a lifetime ('a): only the first
            // closes with a quote.
            let end = if next == Some('\\') {
                chars[at + 2..]
                    .iter()
                    .position(|c| *c == '\'')
                    .map(|i| at + 2 + i + 1)
            } else if chars.get(at + 2) == Some(&'\'') {
                Some(at + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for &c in &chars[at..end] {
                        blank(&mut out, c);
                    }
                    at = end;
                }
                None => {
                    out.push(c);
                    at += 1;
                }
            }
        } else {
            out.push(if c.is_ascii() { c } else { ' ' });
            at += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], at: usize) -> bool {
    at > 0 && (chars[at - 1].is_alphanumeric() || chars[at - 1] == '_')
}

/// Sets of modules that import each other (directly or through others), each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<Module>> {
    // Tarjan's strongly connected components.
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a Module) {
            let number = self.index.len();
            self.index.insert(node, number);
            self.low.insert(node, number);
            self.stack.push(node);
            self.on_stack.insert(node);
            let targets = self.graph.get(node).into_iter().flatten();
            for target in targets {
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.low[node].min(self.low[target]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(target) {
                    let low = self.low[node].min(self.index[target]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.clone());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node) {
            walk.visit(node);
        }
    }
    walk.found.sort();
    walk.found
}
