//! What a connection's requests do, for both engines: each request is one pipeline call, and its
//! answer goes back through the engine's [`Client`]. Requests of one connection run one at a
//! time, in the order they arrived, so a client's messages are stored in the order it sent them.

use crate::{AckMode, GatewayConfig};
use sai_pipeline::flow::Ws2Ms;
use sai_pipeline::frame::{ack_frame, data_frame, error_frame, PushFrame};
use sai_pipeline::message::method;
use sai_proto::im::Request;
use std::collections::BTreeMap;

/// A connection as the request handlers see it.
#[allow(async_fn_in_trait)]
pub(crate) trait Client {
    /// The authenticated user.
    fn user(&self) -> &str;
    /// Queues a text frame (an ack, an error, a sync reply).
    fn send(&self, text: &str);
    /// Queues a push (tracked for resend in rigor mode).
    fn push(&self, push: &PushFrame);
    /// Waits until at most `bytes` are queued for writing; false when the connection is
    /// closing or gone (nothing more will be sent).
    async fn drained(&self, bytes: usize) -> bool;
}

/// Carries out one request of `client`.
pub(crate) async fn handle(pipeline: &dyn Ws2Ms, cfg: &GatewayConfig, client: &impl Client, req: Request) {
    match req {
        Request::Ping | Request::Ack { .. } => {}
        Request::MarkRead {
            id,
            conversation_id,
            read_seq,
        } => match pipeline
            .mark_read(client.user(), conversation_id.clone(), read_seq)
            .await
        {
            Ok(read_seq) => {
                if cfg.ack_mode != AckMode::None {
                    #[derive(serde::Serialize)]
                    #[serde(rename_all = "camelCase")]
                    struct Marked<'a> {
                        conversation_id: &'a str,
                        read_seq: u64,
                    }
                    let data = Marked {
                        conversation_id: &conversation_id,
                        read_seq,
                    };
                    client.send(&ack_frame(id.as_deref(), &data));
                }
            }
            Err(e) => client.send(&error_frame(id.as_deref(), e.code, &e.message)),
        },
        // The pipeline pushes the message to the other members itself (ms2ps_chat).
        Request::Chat { id, want_ack, chat } => match pipeline.chat(client.user(), chat).await {
            Ok(ack) => {
                if want_ack && cfg.ack_mode != AckMode::None {
                    client.send(&ack_frame(id.as_deref(), &ack));
                }
            }
            Err(e) => client.send(&error_frame(id.as_deref(), e.code, &e.message)),
        },
        Request::Sync { id, conversations } => sync(pipeline, cfg, client, id, conversations).await,
    }
}

/// Pushes everything after the client's seqs, page by page, waiting for the output to drain
/// between pages, then answers with the conversations' newest seqs.
async fn sync(
    pipeline: &dyn Ws2Ms,
    cfg: &GatewayConfig,
    client: &impl Client,
    id: Option<String>,
    mut known: BTreeMap<String, u64>,
) {
    let mut pushed = 0usize;
    let heads = loop {
        let page = match pipeline.sync(client.user(), known.clone(), cfg.sync_page).await {
            Ok(p) => p,
            Err(e) => {
                client.send(&error_frame(id.as_deref(), e.code, &e.message));
                return;
            }
        };
        let n = page.pushes.len();
        for p in &page.pushes {
            let seq = known.entry(p.conversation_id.clone()).or_insert(0);
            *seq = (*seq).max(p.seq);
            client.push(&PushFrame::new(p));
        }
        pushed += n;
        if page.complete || n == 0 {
            break page.heads;
        }
        if !client.drained(cfg.max_outbound_bytes / 2).await {
            return;
        }
    };
    #[derive(serde::Serialize)]
    struct SyncDone<'a> {
        conversations: &'a BTreeMap<String, u64>,
        pushed: usize,
    }
    let done = SyncDone {
        conversations: &heads,
        pushed,
    };
    client.send(&data_frame(id.as_deref(), method::SYNC, &done));
}
