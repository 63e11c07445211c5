//! The storage a process runs on, chosen by the database URL: the embedded SQLite adapter in
//! the data directory (no URL: the default) or MySQL (`mysql://...`), on MySQL optionally with
//! the chat log in MongoDB (`mongodb://...`). The services only see the `sai-storage` traits
//! this hands out.

use crate::mysql::MySqlStore;
use crate::sqlite::SqliteStore;
use sai_storage::{MessageStore, SocialStore, StoreError, StoreResult, UserStore};
use std::path::Path;
use std::sync::Arc;

/// An open store.
#[derive(Clone)]
pub enum Storage {
    /// `<data dir>/sai-im.db`.
    Sqlite(Arc<SqliteStore>),
    /// A MySQL / MariaDB database.
    MySql(Arc<MySqlStore>),
}

impl Storage {
    /// Opens the store `url` names (`None`: SQLite in `data_dir`), applying its migrations; on
    /// MySQL with the messages in the MongoDB database `chat_log` names, when given.
    pub async fn open(data_dir: &Path, url: Option<&str>, chat_log: Option<&str>) -> StoreResult<Self> {
        if let Some(log) = chat_log {
            if !log.starts_with("mongodb://") {
                return Err(StoreError::Unavailable(format!(
                    "unsupported chat log URL {}: use mongodb://host:port/database",
                    redact(log)
                )));
            }
        }
        match url {
            None if chat_log.is_some() => Err(StoreError::Unavailable(
                "a MongoDB chat log goes with a MySQL database (--database-url mysql://...)".into(),
            )),
            None => Ok(Self::Sqlite(Arc::new(SqliteStore::open(&data_dir.join("sai-im.db")).await?))),
            Some(u) if u.starts_with("mysql://") || u.starts_with("mariadb://") => {
                let u = u.replacen("mariadb://", "mysql://", 1);
                Ok(Self::MySql(Arc::new(MySqlStore::open_with(&u, chat_log).await?)))
            }
            Some(u) => Err(StoreError::Unavailable(format!(
                "unsupported database URL {}: use mysql://user:password@host:port/database, or none for the embedded SQLite",
                redact(u)
            ))),
        }
    }

    /// `sqlite` or `mysql`, for the logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::MySql(_) => "mysql",
        }
    }

    /// Accounts.
    pub fn users(&self) -> Arc<dyn UserStore> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::MySql(s) => s.clone(),
        }
    }

    /// Friends and groups.
    pub fn social(&self) -> Arc<dyn SocialStore> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::MySql(s) => s.clone(),
        }
    }

    /// Conversations and messages.
    pub fn messages(&self) -> Arc<dyn MessageStore> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::MySql(s) => s.clone(),
        }
    }

    /// Finishes queued writes and closes.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
            Self::MySql(s) => s.close().await,
        }
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("mysql://root:s3cret@db:3306/im"), "mysql://root:***@db:3306/im");
        assert_eq!(redact("mysql://db/im"), "mysql://db/im");
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused_with_the_password_hidden() {
        let dir = std::env::temp_dir();
        let Err(e) = Storage::open(&dir, Some("postgres://u:pw@h/db"), None).await else {
            panic!("postgres accepted");
        };
        let e = e.to_string();
        assert!(e.contains("unsupported database URL") && !e.contains("pw"), "{e}");
        let Err(e) = Storage::open(&dir, None, Some("mongodb://u:pw@h/db")).await else {
            panic!("a chat log without MySQL accepted");
        };
        assert!(e.to_string().contains("MySQL"), "{e}");
        let Err(e) = Storage::open(&dir, Some("mysql://h/db"), Some("redis://u:pw@h")).await else {
            panic!("redis accepted as a chat log");
        };
        let e = e.to_string();
        assert!(e.contains("unsupported chat log URL") && !e.contains("pw"), "{e}");
    }
}
