//! A gateway's side of the route directory: every route its index takes and drops is published
//! to Redis in order ([`RoutePublisher`], a [`RouteSink`] queueing for one task), a login that
//! replaced a connection on another gateway closes that one with 4001 (through the services,
//! which stream it to that gateway), and a sweep keeps the node alive and every held route
//! fresh, writing back what Redis lost and closing connections another login took over.
//!
//! # Bounds
//! The event queue holds [`EVENT_QUEUE`] changes; when it is full (Redis far behind) a change
//! is dropped with a warning: the next sweep writes every held route back, and a route of a
//! connection that ended expires with its TTL or is dropped by the first lookup after its
//! connection's gateway is gone.

use crate::pipeline::Forward;
use crate::routes::{Announced, Placed, Refreshed, RouteDirectory, RouteError};
use sai_pipeline::flow::{CloseReason, Delivery, Ms2Ps, Route, RouteSink, Routes};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Route changes queued for Redis.
pub const EVENT_QUEUE: usize = 65_536;

enum Event {
    Registered(String, Route),
    Removed(String, Route),
}

/// The [`RouteSink`] a cluster's gateway index tells; see the module docs.
pub struct RoutePublisher {
    tx: mpsc::Sender<Event>,
}

/// The receiving end, for [`publish`].
pub struct RouteEvents {
    rx: mpsc::Receiver<Event>,
}

/// A publisher and the queue it fills.
pub fn channel() -> (RoutePublisher, RouteEvents) {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    (RoutePublisher { tx }, RouteEvents { rx })
}

impl RoutePublisher {
    fn queue(&self, e: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(e) {
            tracing::warn!("route event queue full: the next sweep repairs the directory");
        }
    }
}

impl RouteSink for RoutePublisher {
    fn registered(&self, user: &str, route: Route) {
        self.queue(Event::Registered(user.to_string(), route));
    }

    fn removed(&self, user: &str, route: Route) {
        self.queue(Event::Removed(user.to_string(), route));
    }
}

/// This gateway process in the directory.
#[derive(Clone)]
pub struct Node {
    /// The route directory.
    pub directory: RouteDirectory,
    /// The node id.
    pub id: u32,
    /// This process's life (drawn at start).
    pub incarnation: u64,
}

impl Node {
    fn placed(&self, route: Route) -> Placed {
        Placed {
            route,
            incarnation: self.incarnation,
        }
    }
}

/// Publishes `events` in order on `runtime`; a login that replaced a connection on another
/// node has it closed through `services`.
pub fn publish(mut events: RouteEvents, node: Node, services: Arc<dyn Forward>, runtime: &tokio::runtime::Handle) {
    runtime.spawn(async move {
        while let Some(e) = events.rx.recv().await {
            match e {
                Event::Registered(user, route) => match node.directory.register(&user, node.placed(route)).await {
                    Ok(Some(old)) if old.node != node.id => {
                        let close = Delivery::Close {
                            to: old,
                            reason: CloseReason::Replaced,
                        };
                        if let Err(e) = services.forward(close).await {
                            tracing::warn!(error = %e, node = old.node, "closing a replaced login failed");
                        }
                    }
                    // The same node: the gateway's own index already closed it.
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "publishing a route failed: the next sweep repairs it"),
                },
                Event::Removed(user, route) => {
                    if let Err(e) = node.directory.remove(&user, node.placed(route)).await {
                        tracing::warn!(error = %e, "removing a route failed: it expires with its TTL");
                    }
                }
            }
        }
    });
}

/// Every `every`: renews the node; every `refresh_every`-th time also renews each route `index`
/// holds, writes back what Redis lost and closes (through `local`, the gateway's shards)
/// connections another login took over.
pub fn sweep(
    node: Node,
    index: Arc<dyn Routes>,
    local: Arc<dyn Ms2Ps>,
    every: Duration,
    refresh_every: u32,
    runtime: &tokio::runtime::Handle,
) {
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u32 = 0;
        // Refresh at once on the first turn, after any failure and when the node key had to be
        // written again (Redis lost everything): routes heal within one sweep (5 s).
        let mut repair = true;
        loop {
            tick.tick().await;
            n = n.wrapping_add(1);
            match node.directory.announce(node.id, node.incarnation).await {
                Err(RouteError::NodeTaken { .. }) => {
                    tracing::error!(node = node.id, "another live gateway process holds this node id");
                    repair = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the node failed");
                    repair = true;
                    continue;
                }
                // Redis lost the node key (a FLUSHALL, a restart): it lost the routes too.
                Ok(Announced::Written) => repair = true,
                Ok(Announced::Renewed) => {}
            }
            if !repair && !n.is_multiple_of(refresh_every.max(1)) {
                continue;
            }
            let held = index.held();
            let placed: Vec<(&str, Placed)> = held.iter().map(|(u, r)| (u.as_str(), node.placed(*r))).collect();
            match node.directory.refresh(&placed).await {
                Ok(codes) => {
                    let mut healed = 0;
                    for ((user, route), code) in held.iter().zip(codes) {
                        match code {
                            Refreshed::Kept => {}
                            Refreshed::Healed => healed += 1,
                            Refreshed::Replaced => {
                                index.remove(user, *route);
                                local.deliver(Delivery::Close {
                                    to: *route,
                                    reason: CloseReason::Replaced,
                                });
                            }
                        }
                    }
                    if healed > 0 {
                        tracing::info!(healed, "routes written back to the directory");
                    }
                    repair = false;
                }
                Err(e) => tracing::warn!(error = %e, "refreshing routes failed"),
            }
        }
    });
}
