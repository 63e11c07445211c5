//! Test harness: starts the real `sai-im` binary on free ports with its own data dir, and talks
//! to it over real TCP with a real WebSocket client (tungstenite) and HTTP client (ureq).
//!
//! `SAI_TEST_DATABASE=mysql` runs each server on a database of its own on the MySQL server at
//! `SAI_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306`), created by the server and
//! dropped with it; otherwise each server has the embedded SQLite in its data dir.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod otlp;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub struct Server {
    child: Option<Child>,
    /// The subcommand (`services`, `gateway`), none for the all-in-one server.
    command: Option<String>,
    /// The last ready line.
    pub ready: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub ws: String,
    pub http: String,
    pub grpc: String,
    /// (server URL, database) when the server runs on MySQL.
    database: Option<(String, String)>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Server {
    /// Starts with extra flags, e.g. `["--ack-mode", "rigor"]`.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_as(None, extra)
    }

    /// Starts one process of a cluster (`services` or `gateway`) with `extra` flags; its ready
    /// line's fields are in [`Server::field`].
    pub fn start_as(command: Option<&str>, extra: &[&str]) -> Server {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let data_dir = std::env::temp_dir().join(format!("sai-im-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let on_mysql = command.is_none() && std::env::var("SAI_TEST_DATABASE").as_deref() == Ok("mysql");
        let database = on_mysql.then(|| {
            let server = std::env::var("SAI_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
            let name = format!("sai_e2e_{}_{n}", std::process::id());
            args.extend(["--database-url".to_string(), format!("{server}/{name}?pool=4")]);
            (server, name)
        });
        let mut s = Server {
            child: None,
            command: command.map(str::to_string),
            ready: String::new(),
            data_dir,
            database,
            args,
            ws: String::new(),
            http: String::new(),
            grpc: String::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sai-im"))
            .args(self.command.iter())
            .args(if self.args.iter().any(|a| a == "--ws-listen") {
                &[][..]
            } else {
                &["--ws-listen", "127.0.0.1:0"][..]
            })
            .args(
                ["--http-listen", "--grpc-listen"]
                    .into_iter()
                    .filter(|flag| !self.args.iter().any(|a| a == flag))
                    .flat_map(|flag| [flag, "127.0.0.1:0"]),
            )
            .args(["--bcrypt-cost", "4"])
            .args(if self.args.iter().any(|a| a == "--shards") {
                &[][..]
            } else {
                &["--shards", "2"][..]
            })
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            // SAI_TEST_LOG=<filter> shows the server's log while debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("SAI_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Spans, when a test collects them, go out every 100 ms instead of 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sai-im");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("server ready line");
        self.ready = line;
        let field = |s: &Server, k: &str| s.field(k).unwrap_or_default();
        self.ws = field(self, "ws");
        self.http = format!("http://{}", field(self, "http"));
        self.grpc = format!("http://{}", field(self, "grpc"));
        // The suite runs once per engine (SAI_ENGINE, read by the server too): a silent
        // fallback must not pass the direct run on monoio.
        if let (Ok(engine), false) = (std::env::var("SAI_ENGINE"), self.ws.is_empty()) {
            assert_eq!(
                field(self, "engine"),
                engine,
                "the server runs the engine the suite asked for"
            );
        }
        self.child = Some(child);
    }

    /// A `key=value` of the ready line.
    pub fn field(&self, key: &str) -> Option<String> {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    }

    /// Stops the process: gracefully (SIGTERM) or by SIGKILL.
    pub fn stop(&mut self, graceful: bool) {
        if let Some(mut c) = self.child.take() {
            if graceful {
                let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = c.try_wait() {
                        assert!(status.success(), "graceful exit failed: {status}");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                panic!("server did not stop within 15 s of SIGTERM");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same data dir (new ports).
    pub fn restart(&mut self, graceful: bool) {
        self.stop(graceful);
        self.spawn();
    }

    pub fn secret(&self) -> Vec<u8> {
        std::fs::read_to_string(self.data_dir.join("jwt.secret"))
            .unwrap()
            .trim()
            .as_bytes()
            .to_vec()
    }

    // ---- HTTP ----

    pub fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into()
    }

    /// A handle on a server this test started itself, reached at `http` (for [`Self::user`]
    /// and the other HTTP helpers; it stops nothing when dropped).
    pub fn attach(http: &str) -> Server {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Server {
            child: None,
            command: None,
            ready: String::new(),
            data_dir: std::env::temp_dir().join(format!("sai-im-attached-{}-{n}", std::process::id())),
            database: None,
            args: Vec::new(),
            ws: String::new(),
            http: http.to_string(),
            grpc: String::new(),
        }
    }

    /// Sends the process a signal (`HUP`, `TERM`, ...).
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("running");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// The text of `GET /metrics` where the ready line says (`metrics=`).
    pub fn metrics(&self) -> String {
        let addr = self.field("metrics").expect("a metrics address on the ready line");
        let mut resp = Self::agent()
            .get(format!("http://{addr}/metrics"))
            .call()
            .expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200);
        resp.body_mut().read_to_string().expect("metrics text")
    }

    pub fn post(&self, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
        let mut req = Self::agent().post(format!("{}{path}", self.http));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.send_json(body).expect("http");
        (
            resp.status().as_u16(),
            resp.body_mut().read_json().unwrap_or(Value::Null),
        )
    }

    /// Like [`Server::post`], with the `Retry-After` header.
    pub fn post_retry_after(&self, path: &str, body: &Value) -> (u16, Value, Option<u64>) {
        let mut resp = Self::agent()
            .post(format!("{}{path}", self.http))
            .send_json(body)
            .expect("http");
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        (
            resp.status().as_u16(),
            resp.body_mut().read_json().unwrap_or(Value::Null),
            retry,
        )
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut resp = Self::agent()
            .post(format!("{}{path}", self.http))
            .header("Content-Type", "application/json")
            .send(body)
            .expect("http");
        (
            resp.status().as_u16(),
            resp.body_mut().read_json().unwrap_or(Value::Null),
        )
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        Self::call(Self::agent().get(format!("{}{path}", self.http)), token)
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        Self::call(Self::agent().delete(format!("{}{path}", self.http)), token)
    }

    /// A request without a body, with the token if any: its status and JSON body.
    fn call(mut req: ureq::RequestBuilder<ureq::typestate::WithoutBody>, token: Option<&str>) -> (u16, Value) {
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().expect("http");
        (
            resp.status().as_u16(),
            resp.body_mut().read_json().unwrap_or(Value::Null),
        )
    }

    /// Registers and logs in; returns (userId, token).
    pub fn user(&self, name: &str) -> (String, String) {
        let (st, v) = self.post(
            "/v1/users/register",
            &json!({"username": name, "password": "correct horse", "nickname": name}),
            None,
        );
        assert_eq!(st, 201, "{v}");
        let (st, v) = self.post(
            "/v1/users/login",
            &json!({"username": name, "password": "correct horse"}),
            None,
        );
        assert_eq!(st, 200, "{v}");
        (
            v["userId"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    /// Makes two users friends through the HTTP request/accept flow.
    pub fn befriend(&self, ta: &str, b_id: &str, tb: &str) {
        let (st, v) = self.post(
            "/v1/friends/requests",
            &json!({"toUserId": b_id, "message": "hi"}),
            Some(ta),
        );
        assert_eq!(st, 201, "{v}");
        let id = v["requestId"].as_str().unwrap().to_string();
        let (st, v) = self.post(&format!("/v1/friends/requests/{id}/accept"), &json!({}), Some(tb));
        assert_eq!(st, 200, "{v}");
    }

    pub fn connect(&self, token: &str) -> Client {
        Client::connect(&self.ws, token).unwrap_or_else(|e| panic!("connect: {e}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(false);
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if let Some((server, name)) = self.database.take() {
            drop_database(&server, &name);
        }
    }
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    next_id: u64,
}

#[derive(Debug)]
pub enum ConnectError {
    Status(u16, Value),
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Client {
    pub fn connect(addr: &str, token: &str) -> Result<Client, ConnectError> {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        if !token.is_empty() {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", token.parse().unwrap());
        }
        let stream = TcpStream::connect(addr).map_err(|e| ConnectError::Other(e.to_string()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        match tungstenite::client(req, stream) {
            Ok((ws, resp)) => {
                let echoed = resp
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.to_str().unwrap().to_string());
                assert_eq!(echoed.as_deref(), Some(token), "token must be echoed");
                Ok(Client { ws, next_id: 0 })
            }
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null));
                Err(ConnectError::Status(
                    resp.status().as_u16(),
                    body.unwrap_or(Value::Null),
                ))
            }
            Err(e) => Err(ConnectError::Other(e.to_string())),
        }
    }

    pub fn set_timeout(&mut self, d: Duration) {
        self.ws.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    pub fn send(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_string())).unwrap();
    }

    /// Sends a private chat message; returns the frame id.
    pub fn chat(&mut self, to: &str, client_msg_id: &str, content: &str) -> String {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        self.send(&json!({
            "frameType": 0, "id": id, "method": "conversation.chat",
            "data": {"chatType": 2, "recvId": to, "clientMsgId": client_msg_id,
                     "msg": {"mType": 0, "content": content}}
        }));
        id
    }

    /// Next JSON frame (skips WebSocket control frames). Panics on timeout or close.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).unwrap(),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("unexpected message {other:?}"),
                Err(e) => panic!("recv failed: {e}"),
            }
        }
    }

    /// Next JSON frame or `None` if nothing arrives within `d`.
    pub fn try_recv(&mut self, d: Duration) -> Option<Value> {
        self.set_timeout(d);
        let r = loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => break Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("unexpected message {other:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break None
                }
                Err(e) => panic!("recv failed: {e}"),
            }
        };
        self.set_timeout(Duration::from_secs(10));
        r
    }

    /// Reads until the server closes; returns the close code and reason.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    /// Every JSON frame until the server closes, and the close code.
    pub fn recv_until_close(&mut self) -> (Vec<Value>, u16) {
        let mut frames = Vec::new();
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Close(f)) => return (frames, f.map_or(1005, |f| u16::from(f.code))),
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    /// Acks a push (rigor mode).
    pub fn ack(&mut self, push: &Value) {
        self.send(&json!({"frameType": 2, "id": push["id"]}));
    }

    /// Sends conversation.sync and collects pushes until the sync reply.
    pub fn sync(&mut self, known: Value) -> (Vec<Value>, Value) {
        self.send(&json!({"frameType": 0, "id": "sync1", "method": "conversation.sync",
                          "data": {"conversations": known}}));
        let mut pushes = Vec::new();
        loop {
            let f = self.recv();
            if f["method"] == "push" {
                pushes.push(f);
            } else {
                assert_eq!(f["method"], "conversation.sync", "{f}");
                assert_eq!(f["id"], "sync1");
                return (pushes, f);
            }
        }
    }
}

/// A gRPC request carrying `authorization: Bearer <token>`.
/// Runs `fut` to completion on a runtime of its own (for the gRPC clients).
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

pub fn drop_database(server: &str, name: &str) {
    use sqlx::Connection;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        if let Ok(mut c) = sqlx::MySqlConnection::connect(server).await {
            let drop = sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"));
            let _ = sqlx::query(drop).execute(&mut c).await;
        }
    });
}

/// The MongoDB server of the chat log's tests (`scripts/backends.sh mongo` starts one).
pub fn mongo_server() -> String {
    std::env::var("SAI_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

/// Drops the MongoDB database `name` of `mongo_server()`.
pub fn drop_mongo_database(name: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        if let Ok(c) = mongodb::Client::with_uri_str(mongo_server()).await {
            let _ = c.database(name).drop().await;
        }
    });
}

/// The sum of the samples of `name` whose labels hold every `label="value"` of `labels`
/// (0 when none does).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|want| rest.contains(want))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
