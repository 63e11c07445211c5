//! Settings: defaults, then a TOML file (`--config`), then environment variables and flags
//! (flags win over the environment; both win over the file).

use clap::{Args, Parser, Subcommand};
use sai_gateway::{AckMode, Engine, GatewayConfig};
use sai_services::throttle::{AttemptLimit, HashPoolConfig, LoginLimits};
use sai_services::users::UserConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The `sai-im` command line.
#[derive(Debug, Parser)]
#[command(
    name = "sai-im",
    version,
    about = "SAI-IM: instant messaging in one binary (gateway + services + embedded storage)"
)]
pub struct Cli {
    /// TOML config file; keys are the long flag names with `_` for `-`.
    #[arg(long, env = "SAI_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Settings that override the file.
    #[command(flatten)]
    pub overrides: Overrides,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default): everything in one process.
    Serve,
    /// Run a services process of a cluster (storage, services, HTTP, gRPC, the internal
    /// pipeline port); needs --redis-url.
    Services,
    /// Run a gateway process of a cluster (WebSocket); needs --services, --redis-url, --node.
    Gateway,
    /// Run a task process of a cluster: group read receipts' bitmaps, read from Kafka's
    /// msg_to_mongo and written in batches; needs --kafka and the services' --database-url
    /// (and --chat-log). The services hand it that work with --read-bitmaps task.
    Task,
    /// Maintenance on the storage (the server need not run).
    Admin {
        /// What to do.
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// `sai-im admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Bring the database's schema up to date and exit (the server also does it at start).
    Migrate,
    /// Bulk-create users `<prefix>0` .. `<prefix><count-1>` (user id = username) sharing one
    /// password hash, for load tests. Existing users are skipped, so it can be re-run.
    SeedUsers {
        /// How many users.
        #[arg(long)]
        count: u64,
        /// Username and id prefix.
        #[arg(long, default_value = "load")]
        prefix: String,
        /// The password all of them get.
        #[arg(long, default_value = "load-password")]
        password: String,
    },
}

/// Flags and environment variables, each overriding the config file.
#[derive(Debug, Default, Clone, Args)]
pub struct Overrides {
    /// WebSocket gateway address (path /ws).
    #[arg(long, env = "SAI_WS_LISTEN", global = true)]
    pub ws_listen: Option<SocketAddr>,
    /// HTTP JSON API address.
    #[arg(long, env = "SAI_HTTP_LISTEN", global = true)]
    pub http_listen: Option<SocketAddr>,
    /// gRPC address.
    #[arg(long, env = "SAI_GRPC_LISTEN", global = true)]
    pub grpc_listen: Option<SocketAddr>,
    /// Prometheus metrics (`GET /metrics`) on a listener of their own. Unset: the embedded
    /// server and services processes serve them on their HTTP listener, gateway and task
    /// processes on 127.0.0.1 with a free port (named on the ready line).
    #[arg(long, env = "SAI_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where the SQLite database and the JWT secret live.
    #[arg(long, env = "SAI_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Storage instead of the embedded SQLite: mysql://user:password@host:port/database
    /// (`?pool=N` sets the pool size).
    #[arg(long, env = "SAI_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// With a MySQL database: the messages and their read bitmaps in MongoDB instead of its
    /// tables (mongodb://host:port/database).
    #[arg(long, env = "SAI_CHAT_LOG", global = true, hide_env_values = true)]
    pub chat_log: Option<String>,
    /// Cluster: the Redis of the route directory (redis://host:port/db).
    #[arg(long, env = "SAI_REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Cluster: the prefix of every Redis key (default `sai:`), to share one Redis.
    #[arg(long, env = "SAI_REDIS_PREFIX", global = true)]
    pub redis_prefix: Option<String>,
    /// Cluster: this gateway's node id, unique among the live gateways (default 0).
    #[arg(long, env = "SAI_NODE", global = true)]
    pub node: Option<u32>,
    /// Cluster: the internal pipeline address of each services process, comma-separated.
    #[arg(long, env = "SAI_SERVICES", global = true, value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// Cluster: the secret every process of the cluster shares (16+ printable bytes); the
    /// internal port serves only callers that present it.
    #[arg(long, env = "SAI_CLUSTER_KEY", global = true, hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// Cluster: the internal pipeline port of a services process (default 127.0.0.1:8083;
    /// keep it off any network clients reach).
    #[arg(long, env = "SAI_INTERNAL_LISTEN", global = true)]
    pub internal_listen: Option<SocketAddr>,
    /// Cluster: chat commands and deliveries through these Kafka brokers (host:port,...)
    /// instead of the internal port; every process of the cluster must say the same.
    #[arg(long, env = "SAI_KAFKA", global = true)]
    pub kafka: Option<String>,
    /// Cluster: the prefix of the Kafka topics and consumer groups (default `sai.`).
    #[arg(long, env = "SAI_KAFKA_PREFIX", global = true)]
    pub kafka_prefix: Option<String>,
    /// Cluster: partitions of each Kafka topic this process creates (default 16).
    #[arg(long, env = "SAI_KAFKA_PARTITIONS", global = true)]
    pub kafka_partitions: Option<i32>,
    /// Cluster: how long a Kafka producer waits to fill a batch, ms (default 1).
    #[arg(long, env = "SAI_KAFKA_LINGER_MS", global = true)]
    pub kafka_linger_ms: Option<u32>,
    /// Cluster: the largest Kafka batch per partition, bytes (default 1,000,000).
    #[arg(long, env = "SAI_KAFKA_BATCH_BYTES", global = true)]
    pub kafka_batch_bytes: Option<u32>,
    /// Cluster: this services process's share of the chat commands, `i/M` (default 0/1): it
    /// reads partition p of ws2ms_chat when p mod M = i; give each of M processes its own i.
    #[arg(long, env = "SAI_KAFKA_SHARE", global = true, value_parser = parse_share)]
    pub kafka_share: Option<(u32, u32)>,
    /// Cluster: who writes group read receipts' bitmaps: `inline` (each receipt, as it
    /// commits; the default) or `task` (task processes, in batches, from Kafka's msg_to_mongo;
    /// needs --kafka).
    #[arg(long, env = "SAI_READ_BITMAPS", global = true)]
    pub read_bitmaps: Option<ReadBitmaps>,
    /// none | only | rigor.
    #[arg(long, env = "SAI_ACK_MODE", global = true)]
    pub ack_mode: Option<AckMode>,
    /// Gateway data plane: direct (raw io_uring, direct descriptors: connections beyond the
    /// descriptor limit; the default, falling back to monoio where the kernel lacks a feature)
    /// or monoio.
    #[arg(long, env = "SAI_ENGINE", global = true)]
    pub engine: Option<Engine>,
    /// Close WebSocket connections idle this long.
    #[arg(long, env = "SAI_IDLE_TIMEOUT_SECS", global = true)]
    pub idle_timeout_secs: Option<u64>,
    /// Gateway threads (default: number of cores).
    #[arg(long, env = "SAI_SHARDS", global = true)]
    pub shards: Option<usize>,
    /// Largest inbound WebSocket message in bytes (default 65536).
    #[arg(long, env = "SAI_MAX_FRAME_BYTES", global = true)]
    pub max_frame_bytes: Option<usize>,
    /// bcrypt cost for new passwords (default 12; 4 is the minimum, for tests).
    #[arg(long, env = "SAI_BCRYPT_COST", global = true)]
    pub bcrypt_cost: Option<u32>,
    /// Token lifetime in seconds (default 7 days).
    #[arg(long, env = "SAI_TOKEN_TTL_SECS", global = true)]
    pub token_ttl_secs: Option<i64>,
    /// Private chat only between friends (`chat.require_friendship`, default true).
    #[arg(long, env = "SAI_REQUIRE_FRIENDSHIP", global = true)]
    pub require_friendship: Option<bool>,
    /// Most members of a group (default 2000).
    #[arg(long, env = "SAI_MAX_GROUP_MEMBERS", global = true)]
    pub max_group_members: Option<u32>,
    /// JWT signing secret; when unset one is generated and kept in the data dir.
    #[arg(long, env = "SAI_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// EdDSA tokens instead of HS256: the Ed25519 private key (PKCS#8 PEM file) to sign with.
    #[arg(long, env = "SAI_JWT_PRIVATE_KEY", global = true)]
    pub jwt_private_key: Option<PathBuf>,
    /// EdDSA tokens: the private key's public key (PEM file), to verify with.
    #[arg(long, env = "SAI_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,
    /// A rotation: the previous Ed25519 public key (PEM file), whose tokens stay good.
    #[arg(long, env = "SAI_JWT_PREVIOUS_PUBLIC_KEY", global = true)]
    pub jwt_previous_public_key: Option<PathBuf>,
    /// Most WebSocket connections in all (0: 1,048,576 on the direct engine; on monoio the
    /// descriptor limit minus `fd_reserve`).
    #[arg(long, env = "SAI_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Most WebSocket connections from one client address (IPv6: one /64).
    #[arg(long, env = "SAI_MAX_CONNECTIONS_PER_ADDRESS", global = true)]
    pub max_connections_per_address: Option<usize>,
    /// Most unfinished WebSocket handshakes from one client address.
    #[arg(long, env = "SAI_MAX_HANDSHAKES_PER_ADDRESS", global = true)]
    pub max_handshakes_per_address: Option<usize>,
    /// Bearer token of the admin routes (at least 16 bytes); unset turns them off.
    #[arg(long, env = "SAI_ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// On SIGTERM or Ctrl-C, the longest a graceful stop may take (closing clients with 1012,
    /// flushing what is queued) before the process exits anyway (default 30).
    #[arg(long, env = "SAI_SHUTDOWN_TIMEOUT_SECS", global = true)]
    pub shutdown_timeout_secs: Option<u64>,
    /// Log lines: `text` (for people, the default) or `json` (one object per line: time,
    /// level, target, message and fields, for shipping to ELK and the like).
    #[arg(long, env = "SAI_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// What to log: a level (`info`) or directives (`info,sai_cluster=debug`). Unset: RUST_LOG,
    /// else `info`.
    #[arg(long, env = "SAI_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Export traces over OTLP/gRPC to this collector (`http://host:4317`: Jaeger, the
    /// OpenTelemetry Collector, ...). Unset: no traces (the default).
    #[arg(long, env = "SAI_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The share of chat messages traced, 0.0 to 1.0 (default 1.0); decided where each trace
    /// starts, and followed by every process after it.
    #[arg(long, env = "SAI_TRACE_SAMPLING", global = true)]
    pub trace_sampling: Option<f64>,
    /// The embedded default: replace the server running on this data directory without
    /// downtime (bind its ports beside it, stop it, then serve).
    #[arg(long, global = true)]
    pub take_over: bool,
}

/// The effective settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// WebSocket gateway address.
    pub ws_listen: SocketAddr,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// gRPC address.
    pub grpc_listen: SocketAddr,
    /// The metrics' own listener (`None`: see the flag).
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Storage URL; `None`: SQLite in the data directory.
    pub database_url: Option<String>,
    /// The chat log's MongoDB URL; `None`: the database's own tables.
    pub chat_log: Option<String>,
    /// Cluster: Redis of the route directory.
    pub redis_url: Option<String>,
    /// Cluster: prefix of every Redis key.
    pub redis_prefix: String,
    /// Cluster: this gateway's node id.
    pub node: u32,
    /// Cluster: internal pipeline addresses of the services processes.
    pub services: Vec<String>,
    /// Cluster: the internal pipeline port of a services process.
    pub internal_listen: SocketAddr,
    /// Cluster: the key of the internal port.
    pub cluster_key: Option<String>,
    /// Cluster: Kafka brokers of the chat flows (`None`: the internal port carries them).
    pub kafka: Option<String>,
    /// Cluster: prefix of the Kafka topics and groups.
    pub kafka_prefix: String,
    /// Cluster: partitions of each Kafka topic created.
    pub kafka_partitions: i32,
    /// Cluster: Kafka producer linger, ms.
    pub kafka_linger_ms: u32,
    /// Cluster: Kafka batch size per partition, bytes.
    pub kafka_batch_bytes: u32,
    /// Cluster: who writes group read receipts' bitmaps.
    pub read_bitmaps: ReadBitmaps,
    /// Cluster: this services process's share of ws2ms_chat, (i, M); a flag only.
    #[serde(skip, default = "whole_share")]
    pub kafka_share: (u32, u32),
    /// Ack mode name.
    #[serde(deserialize_with = "de_ack_mode")]
    pub ack_mode: AckMode,
    /// Gateway engine name.
    #[serde(deserialize_with = "de_engine")]
    pub engine: Engine,
    /// Idle timeout in seconds.
    pub idle_timeout_secs: u64,
    /// Gateway shards; 0 = number of cores.
    pub shards: usize,
    /// Largest inbound WebSocket message.
    pub max_frame_bytes: usize,
    /// Most bytes queued for one WebSocket connection.
    pub max_outbound_bytes: usize,
    /// Most WebSocket connections in all; 0 = the descriptor limit minus `fd_reserve`.
    pub max_connections: usize,
    /// Descriptors kept for everything but WebSocket connections when `max_connections` is 0.
    pub fd_reserve: usize,
    /// Most WebSocket connections per client address.
    pub max_connections_per_address: usize,
    /// Most unfinished handshakes per client address.
    pub max_handshakes_per_address: usize,
    /// bcrypt cost.
    pub bcrypt_cost: u32,
    /// Token lifetime in seconds.
    pub token_ttl_secs: i64,
    /// JWT secret (generated and stored in the data dir when absent).
    pub jwt_secret: Option<String>,
    /// EdDSA: the private key file.
    pub jwt_private_key: Option<PathBuf>,
    /// EdDSA: the public key file.
    pub jwt_public_key: Option<PathBuf>,
    /// EdDSA: the previous public key file (rotation).
    pub jwt_previous_public_key: Option<PathBuf>,
    /// Bearer token of the admin routes (`/v1/admin/...`: disable and enable accounts); the
    /// routes answer 403 while it is unset.
    pub admin_token: Option<String>,
    /// The longest a graceful stop may take, seconds.
    pub shutdown_timeout_secs: u64,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log directives (`None`: RUST_LOG, else `info`).
    pub log_level: Option<String>,
    /// The OTLP/gRPC collector traces go to (`None`: no traces).
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded.
    pub trace_sampling: f64,
    /// Replace the embedded server running on the data directory (a flag, not a file key).
    #[serde(skip)]
    pub take_over: bool,
    /// Chat policy (`[chat]` table).
    pub chat: ChatConfig,
    /// Groups (`[group]` table).
    pub group: GroupConfig,
    /// Login and registration limits, and the bcrypt threads (`[auth]` table).
    pub auth: AuthConfig,
}

/// `[auth]` settings: the brakes on login and registration (see `sai_services::throttle`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Threads that run bcrypt (0: half the cores, at least one).
    pub hash_threads: usize,
    /// Hash jobs waiting at most; past it login and registration answer 503 `server_busy`.
    pub hash_queue: usize,
    /// Login attempts per account name before blocks start (0: no limit).
    pub login_attempts_per_account: u32,
    /// Login attempts per client address before blocks start (0: no limit).
    pub login_attempts_per_address: u32,
    /// Registrations per client address before blocks start (0: no limit).
    pub registrations_per_address: u32,
    /// Blocks double from 1 s up to this.
    pub max_block_secs: u64,
    /// An account or address that makes no attempt for this long starts over.
    pub window_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let l = LoginLimits::default();
        let h = HashPoolConfig::default();
        Self {
            hash_threads: h.threads,
            hash_queue: h.queue,
            login_attempts_per_account: l.account.free,
            login_attempts_per_address: l.address.free,
            registrations_per_address: l.register.free,
            max_block_secs: u64::try_from(l.account.max_block_ms / 1000).unwrap_or(300),
            window_secs: u64::try_from(l.account.window_ms / 1000).unwrap_or(900),
        }
    }
}

impl AuthConfig {
    /// The login and registration limits it sets (these reload live).
    pub fn limits(&self) -> LoginLimits {
        let limit = |free| AttemptLimit {
            free,
            max_block_ms: i64::try_from(self.max_block_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            window_ms: i64::try_from(self.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        };
        LoginLimits {
            account: limit(self.login_attempts_per_account),
            address: limit(self.login_attempts_per_address),
            register: limit(self.registrations_per_address),
        }
    }
}

/// `[chat]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Private chat only between friends.
    pub require_friendship: bool,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            require_friendship: true,
        }
    }
}

/// `[group]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupConfig {
    /// Most members of a group.
    pub max_members: u32,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self { max_members: 2000 }
    }
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Who writes group read receipts' bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReadBitmaps {
    /// The services, with each receipt.
    #[default]
    Inline,
    /// Task processes, in batches, from Kafka's msg_to_mongo.
    Task,
}

fn whole_share() -> (u32, u32) {
    (0, 1)
}

/// `i/M`, i below M.
fn parse_share(s: &str) -> Result<(u32, u32), String> {
    let (i, m) = s.split_once('/').ok_or("expected i/M, e.g. 0/2")?;
    let (i, m): (u32, u32) = (
        i.trim().parse().map_err(|e| format!("{i}: {e}"))?,
        m.trim().parse().map_err(|e| format!("{m}: {e}"))?,
    );
    if m == 0 || i >= m {
        return Err("i must be below M, and M at least 1".into());
    }
    Ok((i, m))
}

fn de_engine<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Engine, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_ack_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<AckMode, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

impl Default for Config {
    fn default() -> Self {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        let limits = sai_gateway::admission::Limits::default();
        Self {
            ws_listen: (ip, 8080).into(),
            http_listen: (ip, 8081).into(),
            grpc_listen: (ip, 8082).into(),
            metrics_listen: None,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            chat_log: None,
            redis_url: None,
            redis_prefix: "sai:".into(),
            node: 0,
            services: Vec::new(),
            internal_listen: (ip, 8083).into(),
            cluster_key: None,
            kafka: None,
            kafka_prefix: "sai.".into(),
            kafka_partitions: 16,
            kafka_linger_ms: 1,
            kafka_batch_bytes: 1_000_000,
            kafka_share: whole_share(),
            read_bitmaps: ReadBitmaps::Inline,
            ack_mode: AckMode::Only,
            engine: Engine::Direct,
            idle_timeout_secs: 60,
            shards: 0,
            max_frame_bytes: 64 * 1024,
            max_outbound_bytes: 1024 * 1024,
            max_connections: limits.max_connections,
            fd_reserve: limits.fd_reserve,
            max_connections_per_address: limits.max_per_address,
            max_handshakes_per_address: limits.max_handshakes_per_address,
            bcrypt_cost: 12,
            token_ttl_secs: 7 * 24 * 3600,
            jwt_secret: None,
            jwt_private_key: None,
            jwt_public_key: None,
            jwt_previous_public_key: None,
            admin_token: None,
            shutdown_timeout_secs: 30,
            log_format: LogFormat::Text,
            log_level: None,
            otlp_endpoint: None,
            trace_sampling: 1.0,
            take_over: false,
            chat: ChatConfig::default(),
            group: GroupConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Config {
    /// File (if any) + overrides, validated.
    pub fn load(file: Option<&std::path::Path>, o: Overrides) -> Result<Self, String> {
        let mut c = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = o.$f { c.$f = v; })* };
        }
        set!(
            ws_listen,
            http_listen,
            grpc_listen,
            data_dir,
            redis_prefix,
            node,
            services,
            internal_listen,
            kafka_prefix,
            kafka_partitions,
            kafka_linger_ms,
            kafka_batch_bytes,
            kafka_share,
            read_bitmaps,
            ack_mode,
            engine,
            idle_timeout_secs,
            shutdown_timeout_secs,
            shards,
            max_frame_bytes,
            max_connections,
            max_connections_per_address,
            max_handshakes_per_address,
            bcrypt_cost,
            token_ttl_secs
        );
        if let Some(v) = o.require_friendship {
            c.chat.require_friendship = v;
        }
        if let Some(v) = o.max_group_members {
            c.group.max_members = v;
        }
        if o.jwt_secret.is_some() {
            c.jwt_secret = o.jwt_secret;
        }
        for (to, from) in [
            (&mut c.jwt_private_key, o.jwt_private_key),
            (&mut c.jwt_public_key, o.jwt_public_key),
            (&mut c.jwt_previous_public_key, o.jwt_previous_public_key),
        ] {
            if from.is_some() {
                *to = from;
            }
        }
        if o.database_url.is_some() {
            c.database_url = o.database_url;
        }
        if o.metrics_listen.is_some() {
            c.metrics_listen = o.metrics_listen;
        }
        if o.chat_log.is_some() {
            c.chat_log = o.chat_log;
        }
        if o.redis_url.is_some() {
            c.redis_url = o.redis_url;
        }
        if o.cluster_key.is_some() {
            c.cluster_key = o.cluster_key;
        }
        if o.kafka.is_some() {
            c.kafka = o.kafka;
        }
        if o.admin_token.is_some() {
            c.admin_token = o.admin_token;
        }
        if let Some(f) = o.log_format {
            c.log_format = f;
        }
        if o.log_level.is_some() {
            c.log_level = o.log_level;
        }
        if o.otlp_endpoint.is_some() {
            c.otlp_endpoint = o.otlp_endpoint;
        }
        if let Some(r) = o.trace_sampling {
            c.trace_sampling = r;
        }
        c.take_over = o.take_over;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err("bcrypt_cost must be 4 to 31".into());
        }
        if self.shutdown_timeout_secs == 0 {
            return Err("shutdown_timeout_secs must be at least 1".into());
        }
        if self.idle_timeout_secs == 0 {
            return Err("idle_timeout_secs must be at least 1".into());
        }
        if self.max_frame_bytes < 128 {
            return Err("max_frame_bytes must be at least 128".into());
        }
        if self.max_outbound_bytes < self.max_frame_bytes {
            return Err("max_outbound_bytes must be at least max_frame_bytes".into());
        }
        if self.max_connections_per_address == 0 || self.max_handshakes_per_address == 0 {
            return Err("max_connections_per_address and max_handshakes_per_address must be at least 1".into());
        }
        if self.group.max_members < 2 || self.group.max_members > sai_services::MAX_GROUP_MEMBERS {
            return Err(format!(
                "group.max_members must be 2 to {}",
                sai_services::MAX_GROUP_MEMBERS
            ));
        }
        if !(1..=1024).contains(&self.kafka_partitions) {
            return Err("kafka_partitions must be 1 to 1024".into());
        }
        if self.read_bitmaps == ReadBitmaps::Task && self.kafka.is_none() {
            return Err("read_bitmaps = task needs kafka (the task processes read msg_to_mongo)".into());
        }
        if self.token_ttl_secs <= 0 {
            return Err("token_ttl_secs must be positive".into());
        }
        if self.auth.hash_queue == 0 {
            return Err("auth.hash_queue must be at least 1".into());
        }
        if self.auth.max_block_secs == 0 || self.auth.window_secs == 0 {
            return Err("auth.max_block_secs and auth.window_secs must be at least 1".into());
        }
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("log_level {level:?}: {e}"))?;
        }
        if !(0.0..=1.0).contains(&self.trace_sampling) {
            return Err("trace_sampling must be 0.0 to 1.0".into());
        }
        if let Some(e) = &self.otlp_endpoint {
            let rest = e.strip_prefix("http://").unwrap_or_default();
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(format!(
                    "otlp_endpoint {e:?} must be http://host:port (OTLP over gRPC; this build has no TLS)"
                ));
            }
        }
        if self.admin_token.as_ref().is_some_and(|s| s.len() < 16) {
            return Err("admin_token must be at least 16 bytes".into());
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err("jwt_secret must be at least 16 bytes".into());
        }
        // A public key alone is a gateway's: it verifies and never signs (the services
        // processes, which sign, refuse it at start).
        if self.jwt_private_key.is_some() && self.jwt_public_key.is_none() {
            return Err("jwt_private_key needs jwt_public_key (EdDSA tokens)".into());
        }
        if self.jwt_previous_public_key.is_some() && self.jwt_public_key.is_none() {
            return Err("jwt_previous_public_key needs jwt_public_key".into());
        }
        Ok(())
    }

    /// The Kafka settings of the chat flows, when configured.
    pub fn kafka(&self) -> Option<sai_cluster::kafka::KafkaSettings> {
        Some(sai_cluster::kafka::KafkaSettings {
            brokers: self.kafka.clone()?,
            prefix: self.kafka_prefix.clone(),
            partitions: self.kafka_partitions,
            linger_ms: self.kafka_linger_ms,
            batch_bytes: self.kafka_batch_bytes,
            share: self.kafka_share,
            stats: Default::default(),
        })
    }

    /// The user service's part.
    pub fn users(&self) -> UserConfig {
        UserConfig {
            bcrypt_cost: self.bcrypt_cost,
            token_ttl_secs: self.token_ttl_secs,
            limits: self.auth.limits(),
            hash_pool: HashPoolConfig {
                threads: self.auth.hash_threads,
                queue: self.auth.hash_queue,
            },
        }
    }

    /// The gateway's part.
    pub fn gateway(&self) -> GatewayConfig {
        let mut g = GatewayConfig {
            engine: self.engine,
            ack_mode: self.ack_mode,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_frame_bytes: self.max_frame_bytes,
            max_outbound_bytes: self.max_outbound_bytes,
            admission: sai_gateway::admission::Limits {
                max_connections: self.max_connections,
                fd_reserve: self.fd_reserve,
                max_per_address: self.max_connections_per_address,
                max_handshakes_per_address: self.max_handshakes_per_address,
            },
            ..GatewayConfig::default()
        };
        if self.shards > 0 {
            g.shards = self.shards;
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_group_limit(n: u32) -> Result<Config, String> {
        Config::load(
            None,
            Overrides {
                max_group_members: Some(n),
                ..Overrides::default()
            },
        )
    }

    #[test]
    fn a_group_limit_past_what_read_receipts_can_hold_is_refused() {
        assert!(with_group_limit(sai_services::MAX_GROUP_MEMBERS).is_ok());
        let e = with_group_limit(sai_services::MAX_GROUP_MEMBERS + 1).unwrap_err();
        assert!(e.contains("group.max_members"), "{e}");
        assert!(with_group_limit(1).is_err());
    }

    #[test]
    fn bitmaps_by_task_need_kafka() {
        let with = |kafka: Option<&str>| {
            Config::load(
                None,
                Overrides {
                    read_bitmaps: Some(ReadBitmaps::Task),
                    kafka: kafka.map(String::from),
                    ..Overrides::default()
                },
            )
        };
        let e = with(None).unwrap_err();
        assert!(e.contains("read_bitmaps = task needs kafka"), "{e}");
        assert_eq!(
            with(Some("127.0.0.1:9092")).map(|c| c.read_bitmaps),
            Ok(ReadBitmaps::Task)
        );
        let file: Config = toml::from_str("read_bitmaps = \"task\"").unwrap();
        assert_eq!(file.read_bitmaps, ReadBitmaps::Task);
    }
}
