//! `files`: list, read, search and write files in directories the policy grants.

wit_bindgen::generate!({ path: "wit", world: "files-tool" });

use exports::airlock::files::files::{DirStats, Entry, Guest, LineMatch};
use std::fs;

struct Files;

fn err(what: &str, path: &str, e: std::io::Error) -> String {
    format!("{what} {path}: {e}")
}

impl Guest for Files {
    fn list(dir: String) -> Result<Vec<Entry>, String> {
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| err("cannot list", &dir, e))? {
            let e = e.map_err(|e| err("cannot list", &dir, e))?;
            let md = e.metadata().map_err(|e| err("cannot stat in", &dir, e))?;
            out.push(Entry {
                name: e.file_name().to_string_lossy().into_owned(),
                is_dir: md.is_dir(),
                size: md.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(path: String) -> Result<String, String> {
        fs::read_to_string(&path).map_err(|e| err("cannot read", &path, e))
    }

    fn search(dir: String, needle: String) -> Result<Vec<LineMatch>, String> {
        let mut out = Vec::new();
        for entry in Self::list(dir.clone())? {
            if entry.is_dir {
                continue;
            }
            let path = format!("{}/{}", dir.trim_end_matches('/'), entry.name);
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            for (i, line) in text.lines().enumerate() {
                if line.contains(&needle) {
                    out.push(LineMatch {
                        path: path.clone(),
                        line: i as u32 + 1,
                        text: line.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn write(path: String, content: String) -> Result<u64, String> {
        fs::write(&path, content.as_bytes()).map_err(|e| err("cannot write", &path, e))?;
        Ok(content.len() as u64)
    }

    fn checksum(path: String) -> Result<String, String> {
        use std::io::Read;
        let mut f = fs::File::open(&path).map_err(|e| err("cannot open", &path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut size, mut sum) = (0u64, 0u64);
        loop {
            let n = f.read(&mut buf).map_err(|e| err("cannot read", &path, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            for w in buf[..n].chunks(8) {
                let mut word = [0u8; 8];
                word[..w.len()].copy_from_slice(w);
                sum = sum.wrapping_add(u64::from_le_bytes(word));
            }
        }
        Ok(format!("{size} bytes, sum {sum:016x}"))
    }

    fn stat_dir(dir: String) -> Result<DirStats, String> {
        let mut s = DirStats {
            entries: 0,
            bytes: 0,
        };
        for e in fs::read_dir(&dir).map_err(|e| err("cannot list", &dir, e))? {
            let e = e.map_err(|e| err("cannot list", &dir, e))?;
            let md = fs::metadata(e.path()).map_err(|e| err("cannot stat in", &dir, e))?;
            s.entries += 1;
            s.bytes += md.len();
        }
        Ok(s)
    }
}

export!(Files);
