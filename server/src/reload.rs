//! Configuration hot reload (the seed's Sail): the TOML file given by `--config` is read again
//! on SIGHUP and whenever it changes (its size or modification time, looked at every
//! [`WATCH_EVERY`]), with the same flags and environment on top, and validated whole.
//!
//! - A file that fails to parse or validate is refused: one error line says why (naming the
//!   key), and the running configuration stays, every part of it.
//! - Settings that can change live take effect at once: `log_level`, `trace_sampling` (new
//!   traces); the `[auth]` attempt limits (`login_attempts_per_account`,
//!   `login_attempts_per_address`, `registrations_per_address`, `max_block_secs`,
//!   `window_secs`: the next attempt follows them);
//!   `chat.require_friendship` and `group.max_members` (the services: the next request follows
//!   them); `idle_timeout_secs`, `max_frame_bytes` and `max_outbound_bytes` (the gateway: for
//!   connections opened from then on; open ones keep theirs, so none is dropped).
//! - Any other setting that changed is named in a warning: it takes effect at the next start.
//!
//! Each reload is counted in `sai_config_reloads_total{result="applied"|"refused"}`.

use crate::config::{Config, Overrides};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sai_gateway::SessionLimits;
use sai_services::messages::ChatPolicy;
use sai_services::Services;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing_subscriber::{reload, EnvFilter, Registry};

/// How often the file's size and modification time are compared.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Changes the log filter of the running process.
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// Where the configuration comes from, to read it again.
#[derive(Clone)]
pub struct Source {
    /// The TOML file (`None`: nothing to reload).
    pub file: Option<PathBuf>,
    /// The flags and environment, which win over the file as at start.
    pub overrides: Overrides,
    /// The log filter.
    pub log: Option<LogHandle>,
}

/// What a reload can change in this process.
#[derive(Default)]
pub struct Targets {
    /// The services (chat policy, group limit).
    pub services: Option<Arc<Services>>,
    /// The gateway's session limits.
    pub gateway: Option<SessionLimits>,
}

/// Reloads counted by result.
pub type Reloads = Family<[(&'static str, &'static str); 1], Counter>;

/// The log filter of `level` (directives), else of `RUST_LOG`, else `info`.
pub fn log_filter(level: Option<&str>) -> EnvFilter {
    match level {
        Some(level) => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    }
}

/// Watches `source` (when it names a file) for as long as the runtime runs, applying each
/// valid change to `targets`; `running` is the configuration the process started with.
pub fn watch(source: Source, running: Config, targets: Targets, reloads: Reloads) {
    let Some(file) = source.file.clone() else {
        return;
    };
    // Registered before the task first runs, so that a SIGHUP sent as soon as the process is
    // ready reloads instead of killing it (the default action).
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the config file is only watched");
            None
        }
    };
    tokio::spawn(async move {
        let mut running = running;
        let mut seen = stamp(&file);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signalled => {}
                _ = tick.tick() => {
                    if stamp(&file) == seen {
                        continue;
                    }
                }
            }
            seen = stamp(&file);
            match Config::load(Some(&file), source.overrides.clone()) {
                Ok(next) => {
                    apply(&running, &next, &targets, source.log.as_ref());
                    running = next;
                    reloads.get_or_create(&[("result", "applied")]).inc();
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "configuration reload refused: the running configuration stays");
                    reloads.get_or_create(&[("result", "refused")]).inc();
                }
            }
        }
    });
}

/// The file's size and modification time (`None` while it cannot be read).
fn stamp(file: &std::path::Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Applies what `next` changes live, and names what needs a restart.
fn apply(old: &Config, next: &Config, targets: &Targets, log: Option<&LogHandle>) {
    let mut live = Vec::new();
    if old.log_level != next.log_level {
        if let Some(handle) = log {
            // Validated with the config.
            match handle.reload(log_filter(next.log_level.as_deref())) {
                Ok(()) => live.push("log_level"),
                Err(e) => tracing::warn!(error = %e, "the log level could not be changed"),
            }
        }
    }
    if old.trace_sampling != next.trace_sampling {
        crate::trace::set_sampling(next.trace_sampling);
        live.push("trace_sampling");
    }
    if let Some(services) = &targets.services {
        if old.chat.require_friendship != next.chat.require_friendship {
            services.messages.set_policy(ChatPolicy {
                require_friendship: next.chat.require_friendship,
            });
            live.push("chat.require_friendship");
        }
        if old.group.max_members != next.group.max_members {
            services.social.set_max_group_members(next.group.max_members);
            live.push("group.max_members");
        }
        if old.auth.limits() != next.auth.limits() {
            services.users.set_limits(next.auth.limits());
            live.push("auth attempt limits");
        }
    }
    if let Some(gateway) = &targets.gateway {
        let limits = |c: &Config| (c.idle_timeout_secs, c.max_frame_bytes, c.max_outbound_bytes);
        if limits(old) != limits(next) {
            gateway.set(
                Duration::from_secs(next.idle_timeout_secs),
                next.max_frame_bytes,
                next.max_outbound_bytes,
            );
            live.push("idle_timeout_secs, max_frame_bytes, max_outbound_bytes (new connections)");
        }
    }
    let restart = needs_restart(old, next);
    tracing::info!(live = ?live, "configuration reloaded");
    if !restart.is_empty() {
        tracing::warn!(settings = ?restart, "changed settings that take effect at the next start");
    }
}

/// The settings, other than the live ones, whose values differ.
fn needs_restart(old: &Config, next: &Config) -> Vec<String> {
    // Each side with the live settings taken from `old`, compared field by field through
    // their pretty `Debug` lines (one top-level field per line at four spaces).
    let strip = |c: &Config| {
        let mut c = c.clone();
        c.log_level = old.log_level.clone();
        c.trace_sampling = old.trace_sampling;
        c.chat = old.chat.clone();
        c.group = old.group.clone();
        // Of [auth], the attempt limits are live; the bcrypt threads and queue are not.
        c.auth = crate::config::AuthConfig {
            hash_threads: c.auth.hash_threads,
            hash_queue: c.auth.hash_queue,
            ..old.auth.clone()
        };
        (c.idle_timeout_secs, c.max_frame_bytes, c.max_outbound_bytes) =
            (old.idle_timeout_secs, old.max_frame_bytes, old.max_outbound_bytes);
        format!("{c:#?}")
    };
    let (a, b) = (strip(old), strip(next));
    let fields = |text: &str| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            match line.strip_prefix("    ") {
                Some(rest) if !rest.starts_with(' ') => {
                    let name = rest.split(':').next().unwrap_or(rest).to_string();
                    out.push((name, line.to_string()));
                }
                _ => {
                    if let Some(last) = out.last_mut() {
                        last.1.push_str(line);
                    }
                }
            }
        }
        out
    };
    let (fa, fb) = (fields(&a), fields(&b));
    fa.iter()
        .zip(&fb)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_settings_that_changed_and_are_not_live_need_a_restart() {
        let old = Config::default();
        let mut next = old.clone();
        next.chat.require_friendship = !old.chat.require_friendship;
        next.idle_timeout_secs += 1;
        assert!(needs_restart(&old, &next).is_empty(), "live settings only");
        next.auth.login_attempts_per_account += 1;
        next.auth.window_secs += 1;
        next.trace_sampling = 0.5;
        assert!(needs_restart(&old, &next).is_empty(), "live settings only");
        next.bcrypt_cost += 1;
        next.auth.hash_queue += 1;
        assert_eq!(needs_restart(&old, &next), vec!["bcrypt_cost", "auth"]);
    }
}
