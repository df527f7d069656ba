//! WIT doc comments for a component's exports.
//!
//! Docs come from the WIT package embedded in the component (toolchains such
//! as wit-bindgen embed it, including `package-docs`), or from a WIT package
//! given alongside. Keys are the same as tool export paths: `func` for a
//! top-level function, `iface-export-name#func` for an interface function.

use std::collections::BTreeMap;
use std::path::Path;
use wit_parser::{Resolve, WorldItem, WorldKey};

/// Doc comments, keyed by export path, plus parameter-level notes.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    /// `func` or `ns:pkg/iface@ver#func` → doc comment.
    pub functions: BTreeMap<String, String>,
}

/// Name of the custom section that carries a WIT package's source text, for
/// toolchains whose output drops doc comments (`cargo xtask examples` adds it).
pub const WIT_SECTION: &str = "airlock-wit";

/// Read docs from the component binary: first from an [`WIT_SECTION`] custom
/// section, then from the WIT that toolchains embed. Returns empty docs when
/// the component carries none (this is not an error).
pub fn from_component(bytes: &[u8]) -> Docs {
    let mut docs = from_embedded_wit(bytes);
    if let Some(text) = wit_section(bytes) {
        let mut resolve = Resolve::default();
        match resolve.push_str("airlock-wit.wit", &text) {
            Ok(pkg) => {
                for (_, &w) in &resolve.packages[pkg].worlds {
                    for (k, v) in collect(&resolve, w).functions {
                        docs.functions.entry(k).or_insert(v);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the {WIT_SECTION} section does not parse; ignoring it")
            }
        }
    }
    docs
}

fn wit_section(bytes: &[u8]) -> Option<String> {
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(wasmparser::Payload::CustomSection(c)) if c.name() == WIT_SECTION => {
                return String::from_utf8(c.data().to_vec()).ok();
            }
            Ok(
                wasmparser::Payload::ModuleSection { .. }
                | wasmparser::Payload::ComponentSection { .. },
            ) => {}
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

fn from_embedded_wit(bytes: &[u8]) -> Docs {
    match wit_component::decode(bytes) {
        Ok(decoded) => {
            let resolve = decoded.resolve();
            let world = decoded.package();
            // A decoded component has a single world describing it.
            let world_id = resolve.packages[world].worlds.values().next().copied();
            match world_id {
                Some(w) => collect(resolve, w),
                None => Docs::default(),
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "component has no decodable WIT; no docs");
            Docs::default()
        }
    }
}

/// Read docs from a WIT package directory or file, matching any world that
/// exports the same functions.
///
/// # Errors
/// The WIT could not be parsed.
pub fn from_wit_path(path: &Path) -> Result<Docs, String> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_path(path).map_err(|e| format!("{e:#}"))?;
    let mut docs = Docs::default();
    for (_, &w) in &resolve.packages[pkg].worlds {
        let d = collect(&resolve, w);
        docs.functions.extend(d.functions);
    }
    // Also key every interface function by `iface#func` for worlds that
    // re-export them under a different world.
    for (_, &iface) in &resolve.packages[pkg].interfaces {
        let i = &resolve.interfaces[iface];
        if let Some(name) = resolve.id_of(iface) {
            for (fname, f) in &i.functions {
                if let Some(d) = &f.docs.contents {
                    docs.functions
                        .entry(format!("{name}#{fname}"))
                        .or_insert_with(|| d.clone());
                }
            }
        }
    }
    Ok(docs)
}

fn collect(resolve: &Resolve, world: wit_parser::WorldId) -> Docs {
    let mut docs = Docs::default();
    let w = &resolve.worlds[world];
    for (key, item) in &w.exports {
        match item {
            WorldItem::Function(f) => {
                if let Some(d) = &f.docs.contents {
                    docs.functions.insert(f.name.clone(), d.clone());
                }
            }
            WorldItem::Interface { id, .. } => {
                let export_name = match key {
                    WorldKey::Name(n) => n.clone(),
                    WorldKey::Interface(i) => resolve.id_of(*i).unwrap_or_default(),
                };
                let iface = &resolve.interfaces[*id];
                for (fname, f) in &iface.functions {
                    if let Some(d) = &f.docs.contents {
                        docs.functions
                            .insert(format!("{export_name}#{fname}"), d.clone());
                    }
                }
                if let Some(d) = &iface.docs.contents {
                    docs.functions.insert(format!("{export_name}#"), d.clone());
                }
            }
            WorldItem::Type { .. } => {}
        }
    }
    docs
}
