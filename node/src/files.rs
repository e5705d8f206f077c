//! What a node keeps in small files of its data directory (tokens, keys,
//! its identity): written privately and whole, read back bounded.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a file only its owner may read (0600), whole or not at all:
/// a temporary file beside it, fsync, rename over the old one, fsync of
/// the directory. A crash leaves the old contents or the new, never half.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(())
}

/// [`write_private`] of one line of text (a trailing newline added).
pub fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    write_private(path, format!("{text}\n").as_bytes())
}

/// Reads 32 random bytes from the kernel.
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_whole_and_private() {
        let dir = testkit::TempDir::new("files").unwrap();
        let p = dir.path().join("secret");
        write_secret(&p, "one").unwrap();
        write_secret(&p, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!p.with_extension("tmp").exists());
        assert_eq!(hex(&[0, 255]), "00ff");
    }
}
