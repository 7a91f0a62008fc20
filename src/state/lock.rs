//! One process per state directory: an exclusive lock on
//! `<state-dir>/tally.lock`, taken before anything in the directory is
//! touched. Two pods on one directory would each take the other's
//! partitions' RocksDB and changelog checkpoints for their own; the
//! serving view's store, rebuilt at every start, would be deleted under
//! the running pod. The lock is the operating system's (`flock`), so it
//! goes with the process, however it ends.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "tally.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot use state directory {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {dir} is in use by {holder}; each pod needs a --state-dir of its own"
    )]
    InUse { dir: String, holder: String },
}

/// Held for as long as the process uses the directory.
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
    pub dir: PathBuf,
}

impl StateDirLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<StateDirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "another tally process".to_string(),
                    p => format!("another tally process (pid {p})"),
                };
                return Err(LockError::InUse {
                    dir: dir.display().to_string(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateDirLock {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_directory_is_refused_naming_the_holder() {
        let dir = std::env::temp_dir().join(format!("tally-lock-{}", std::process::id()));
        let held = StateDirLock::acquire(&dir).unwrap();
        let err = StateDirLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        StateDirLock::acquire(&dir).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
