//! A broadcast between a cluster's processes over Redis pub/sub: what one publishes, every
//! subscribed process receives (itself included; a payload names its sender so it can skip
//! its own). Nothing is kept: a process that was not subscribed misses what was said, so a
//! subscriber is told each time its subscription (re)starts and must assume it missed
//! something (the services forget every cached fact).

use crate::routes::RouteError;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

/// A channel to publish on.
#[derive(Clone)]
pub struct Bus {
    conn: ConnectionManager,
    channel: Arc<str>,
}

impl Bus {
    /// Publishes on `channel` of the Redis at `url`.
    pub async fn connect(url: &str, channel: &str) -> Result<Self, RouteError> {
        Ok(Self {
            conn: crate::routes::connection(url).await?,
            channel: Arc::from(channel),
        })
    }

    /// Publishes `payload` without waiting (on the current runtime); a failure is logged (the
    /// subscribers that missed it are those whose subscription dropped, and they start over).
    pub fn publish(&self, payload: String) {
        let (mut conn, channel) = (self.conn.clone(), self.channel.clone());
        tokio::spawn(async move {
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&*channel)
                .arg(payload)
                .query_async(&mut conn)
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "publishing on the cluster bus failed");
            }
        });
    }
}

/// Keeps a subscription to `channel` for as long as the runtime runs: `on_subscribed` each
/// time it (re)starts, `on_message` for each payload.
pub fn subscribe(
    url: &str,
    channel: &str,
    on_message: impl Fn(&str) + Send + Sync + 'static,
    on_subscribed: impl Fn() + Send + Sync + 'static,
) -> Result<(), RouteError> {
    let client = redis::Client::open(url)?;
    let channel = channel.to_string();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(100);
        loop {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                    Ok(()) => {
                        wait = Duration::from_millis(100);
                        on_subscribed();
                        let mut messages = pubsub.on_message();
                        while let Some(m) = messages.next().await {
                            match m.get_payload::<String>() {
                                Ok(p) => on_message(&p),
                                Err(e) => tracing::warn!(error = %e, "a cluster bus message that is not text"),
                            }
                        }
                        tracing::warn!("cluster bus subscription lost; subscribing again");
                    }
                    Err(e) => tracing::warn!(error = %e, "subscribing to the cluster bus failed"),
                },
                Err(e) => tracing::debug!(error = %e, "connecting to the cluster bus failed"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    });
    Ok(())
}
