//! `sai-im admin`: maintenance commands that work on the storage directly.

use crate::storage::Storage;
use sai_storage::User;
use std::path::Path;
use std::time::Instant;

/// Users inserted per transaction.
const BATCH: u64 = 10_000;

/// Opens the storage (which applies its migrations) and closes it again.
pub async fn migrate(data_dir: &Path, database_url: Option<&str>, chat_log: Option<&str>) -> Result<String, String> {
    if database_url.is_none() {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    }
    let store = Storage::open(data_dir, database_url, chat_log)
        .await
        .map_err(|e| e.to_string())?;
    let kind = store.kind();
    store.close().await;
    Ok(format!("{kind} schema is up to date"))
}

/// Creates `<prefix>0..<prefix><count-1>` in the storage (`database_url`, else the data dir) with one shared bcrypt
/// hash (of `bcrypt_cost`) of `password`. The names are also the user ids, so the prefix may not
/// hold `_`: private conversation ids join two user ids with `_` (`si_<a>_<b>`), and ids with
/// `_` in them made two pairs share one conversation.
pub async fn seed_users(
    data_dir: &Path,
    database_url: Option<&str>,
    chat_log: Option<&str>,
    bcrypt_cost: u32,
    count: u64,
    prefix: &str,
    password: &str,
) -> Result<String, String> {
    let longest = format!("{prefix}{}", count.saturating_sub(1));
    let valid = (3..=32).contains(&longest.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if !valid || prefix.is_empty() {
        return Err(
            "prefix must be letters, digits, '.' or '-' (no '_': it separates the user ids of a \
             conversation id) and make usernames of 3 to 32 characters"
                .into(),
        );
    }
    if database_url.is_none() {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    }
    let storage = Storage::open(data_dir, database_url, chat_log)
        .await
        .map_err(|e| e.to_string())?;
    let store = storage.users();
    let t0 = Instant::now();
    let hash = bcrypt::hash(password, bcrypt_cost).map_err(|e| e.to_string())?;
    let now = crate::Clock::now_ms(&crate::SystemClock);
    let mut inserted = 0;
    let mut start = 0;
    while start < count {
        let end = (start + BATCH).min(count);
        let batch: Vec<User> = (start..end)
            .map(|i| {
                let name = format!("{prefix}{i}");
                User {
                    user_id: name.clone(),
                    username: name.clone(),
                    nickname: name,
                    password_hash: hash.clone(),
                    created_at: now,
                    token_epoch: 0,
                    disabled: false,
                }
            })
            .collect();
        inserted += store.create_users_bulk(&batch).await.map_err(|e| e.to_string())?;
        start = end;
    }
    storage.close().await;
    Ok(format!(
        "seeded {inserted} new users ({} already there): ids {prefix}0..{prefix}{} in {:.1} s",
        count - inserted,
        count.saturating_sub(1),
        t0.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixes_that_would_make_ambiguous_conversation_ids_are_refused() {
        let dir = std::env::temp_dir().join(format!("sai-admin-{}", std::process::id()));
        for bad in ["load_", "a_b", "", "x y"] {
            let e = seed_users(&dir, None, None, 4, 2, bad, "password1").await.unwrap_err();
            assert!(e.contains("no '_'"), "{bad:?}: {e}");
        }
        assert!(!dir.join("sai-im.db").exists(), "nothing was created");
    }
}
