//! Crash-safe file replacement.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// old file or the new one, never a mix: write a temporary file in the same
/// folder, fsync it, rename it over `path`, fsync the folder.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// [`write()`] with the contents streamed by `fill` through a buffer into the
/// temporary file, so they never need to be in memory whole (a model or a
/// checkpoint is written as it is encoded).
pub fn write_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name =
        path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path names no file"))?;
    let name = name.to_string_lossy();
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(format!("{}{}", temporary_prefix(&name), std::process::id()));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Persist the rename itself. Opening a folder for sync works on Unix;
        // elsewhere the rename is already as durable as the platform allows.
        #[cfg(unix)]
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The name of a temporary for the file `name`, less the writer's process id.
fn temporary_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// Removes the temporaries of `dir/name` that writers killed mid-write left
/// behind (each as large as the file): those whose process is gone. A
/// temporary of a live process, or of another file, is left alone; so is
/// everything where it cannot be told whether the process lives.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = temporary_prefix(name);
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let pid = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && process_is_gone(pid)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether no process has this id now (Linux: no `/proc/PID`).
#[cfg(target_os = "linux")]
fn process_is_gone(pid: u32) -> bool {
    !Path::new("/proc").join(pid.to_string()).exists()
}

/// Elsewhere it cannot be told cheaply: every temporary may be a live writer's.
#[cfg(not(target_os = "linux"))]
fn process_is_gone(_pid: u32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_never_leaves_temporaries() {
        let dir = std::env::temp_dir().join(format!("svp-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.bin");
        write(&p, b"first").unwrap();
        write(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let leftovers: Vec<_> =
            fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name() != "a.bin").collect();
        assert!(leftovers.is_empty());
        // A folder that does not exist: an error, and nothing created.
        assert!(write(&dir.join("missing/b.bin"), b"x").is_err());
        // Streamed in pieces: the same file. A failing writer keeps the old one.
        write_with(&p, |w| w.write_all(b"thi").and_then(|_| w.write_all(b"rd"))).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"third");
        let failed = write_with(&p, |w| w.write_all(b"half").and_then(|_| Err(std::io::Error::other("boom"))));
        assert!(failed.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"third");
        let leftovers = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name() != "a.bin").count();
        assert_eq!(leftovers, 0, "a failed write leaves no temporary");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A temporary left by a writer that was killed is removed by the next
    /// write of the same file; a live writer's, and another file's, stay.
    #[cfg(target_os = "linux")]
    #[test]
    fn removes_the_temporaries_of_killed_writers() {
        let dir = std::env::temp_dir().join(format!("svp-atomic-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // A process id that was just in use and is gone now.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.join(format!(".m.svpm.tmp-{dead}"));
        let live = dir.join(".m.svpm.tmp-1"); // init lives as long as the system
        let other = dir.join(format!(".n.svpm.tmp-{dead}"));
        let unrelated = dir.join(".m.svpm.tmp-notapid");
        for p in [&stale, &live, &other, &unrelated] {
            fs::write(p, b"half a file").unwrap();
        }
        write(&dir.join("m.svpm"), b"model").unwrap();
        assert!(!stale.exists(), "the killed writer's temporary was left");
        assert!(live.exists() && other.exists() && unrelated.exists());
        assert_eq!(fs::read(dir.join("m.svpm")).unwrap(), b"model");
        fs::remove_dir_all(&dir).unwrap();
    }
}
