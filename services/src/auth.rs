//! Tokens: the JWT codec lives in `sai_pipeline::token` (shared with the load generator); this
//! module keeps the signing secret in the data directory.

pub use sai_pipeline::token::{Claims, JwtKeys, TokenError};
use std::path::Path;

/// Reads the secret from `path`, or generates 32 random bytes (hex) and writes them there (mode
/// 0600) so tokens survive a restart.
pub fn load_or_create_keys(path: &Path) -> std::io::Result<JwtKeys> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(JwtKeys::new(s.trim().as_bytes().to_vec())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, hex.as_bytes())?;
    Ok(JwtKeys::new(hex.into_bytes()))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_persists() {
        let dir = std::env::temp_dir().join(format!("sai-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("jwt.secret");
        let _ = std::fs::remove_file(&p);
        let a = load_or_create_keys(&p).unwrap();
        let b = load_or_create_keys(&p).unwrap();
        let claims = Claims {
            gen: 0,
            sub: "u1".into(),
            iat: 100,
            exp: 200,
        };
        let t = a.sign(&claims);
        assert!(b.verify(&t, 150).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
