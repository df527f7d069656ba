//! `notes`: a notes store whose state outlives the call — it lives in
//! `/state/notes.txt`, which the policy grants read-write (a state volume
//! in the service). Each change writes a new file and renames it over the
//! old one, so a call that ends half-way leaves the old notes intact.

wit_bindgen::generate!({ path: "wit", world: "notes-tool" });

use exports::airlock::notes::notes::{Guest, Note};

const STATE: &str = "/state/notes.txt";
const STAGED: &str = "/state/notes.txt.new";
const MAX_NOTE: usize = 4096;

struct Notes;

/// One note per line: `<id>\t<text>`, with `\\`, `\t` and `\n` escaped.
fn load() -> Result<Vec<Note>, String> {
    let text = match std::fs::read_to_string(STATE) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {STATE}: {e}")),
    };
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let (id, body) = line
                .split_once('\t')
                .ok_or_else(|| format!("{STATE} line {} is damaged", i + 1))?;
            let id = id
                .parse()
                .map_err(|_| format!("{STATE} line {} has a bad id", i + 1))?;
            Ok(Note {
                id,
                text: unescape(body),
            })
        })
        .collect()
}

fn save(notes: &[Note]) -> Result<(), String> {
    let mut out = String::new();
    for n in notes {
        out.push_str(&format!("{}\t{}\n", n.id, escape(&n.text)));
    }
    std::fs::write(STAGED, out).map_err(|e| format!("cannot write {STAGED}: {e}"))?;
    std::fs::rename(STAGED, STATE).map_err(|e| format!("cannot replace {STATE}: {e}"))
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            },
            (c, false) => out.push(c),
        }
    }
    out
}

impl Guest for Notes {
    fn add(text: String) -> Result<u32, String> {
        if text.len() > MAX_NOTE {
            return Err(format!("a note is at most {MAX_NOTE} bytes"));
        }
        let mut notes = load()?;
        let id = notes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        notes.push(Note { id, text });
        save(&notes)?;
        Ok(id)
    }

    fn list() -> Result<Vec<Note>, String> {
        load()
    }

    fn remove(id: u32) -> Result<bool, String> {
        let mut notes = load()?;
        let before = notes.len();
        notes.retain(|n| n.id != id);
        if notes.len() == before {
            return Ok(false);
        }
        save(&notes)?;
        Ok(true)
    }

    fn clear() -> Result<u32, String> {
        let n = load()?.len() as u32;
        for f in [STATE, STAGED] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove {f}: {e}"));
                }
                _ => {}
            }
        }
        Ok(n)
    }
}

export!(Notes);
